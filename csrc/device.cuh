// The torch-free device helpers of the CUDA kernels: conversions, 16-byte vectors, warp/block
// reductions.  Included by common.cuh, and by the host emulator of the kernels
// (tests/cuda_emu.h), which provides the CUDA intrinsics these use.
#pragma once

#include <cstdint>

// Dynamic shared memory (the host emulator defines its own).
#ifndef FASTLM_EXTERN_SMEM
#define FASTLM_EXTERN_SMEM(T, name) extern __shared__ T name[]
#endif

namespace fastlm {

template <typename T>
__device__ __forceinline__ float to_float(T v) {
  return static_cast<float>(v);
}
template <>
__device__ __forceinline__ float to_float<__half>(__half v) {
  return __half2float(v);
}
template <>
__device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 v) {
  return __bfloat162float(v);
}

template <typename T>
__device__ __forceinline__ T from_float(float v) {
  return static_cast<T>(v);
}
template <>
__device__ __forceinline__ __half from_float<__half>(float v) {
  return __float2half_rn(v);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// N elements of T moved as one aligned vector (16 bytes when N * sizeof(T) == 16).
template <typename T, int N>
struct alignas(sizeof(T) * N) Vec {
  T v[N];
};

template <typename T, int N>
__device__ __forceinline__ Vec<T, N> load_vec(const T* p) {
#ifdef FASTLM_HOST_EMU
  emu_check_aligned(p, sizeof(T) * N, "load_vec");
#endif
  return *reinterpret_cast<const Vec<T, N>*>(p);
}
template <typename T, int N>
__device__ __forceinline__ void store_vec(T* p, const Vec<T, N>& v) {
#ifdef FASTLM_HOST_EMU
  emu_check_aligned(p, sizeof(T) * N, "store_vec");
#endif
  *reinterpret_cast<Vec<T, N>*>(p) = v;
}

// Elements of T per 16-byte vector.
template <typename T>
constexpr int vec16() {
  return 16 / static_cast<int>(sizeof(T));
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// Reduce over the whole block by a warp reduction (warp_sum, warp_max) whose identity is
// `identity`; every thread gets the result.  `smem` holds >= 32 floats.  Safe to call
// repeatedly (synchronizes before reusing smem).
template <float (*WarpOp)(float)>
__device__ __forceinline__ float block_reduce(float v, float identity, float* smem) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = (blockDim.x + 31) >> 5;
  v = WarpOp(v);
  __syncthreads();
  if (lane == 0) smem[warp] = v;
  __syncthreads();
  v = lane < nwarps ? smem[lane] : identity;
  return WarpOp(v);
}

__device__ __forceinline__ float block_sum(float v, float* smem) { return block_reduce<warp_sum>(v, 0.f, smem); }
__device__ __forceinline__ float block_max(float v, float* smem) { return block_reduce<warp_max>(v, -INFINITY, smem); }

// Two floats rounded to T (fp16 / bf16) in one 32-bit register, lo in the low half (the
// element order of mma / wgmma fragments).
template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi);
template <>
__device__ __forceinline__ uint32_t pack2<__half>(float lo, float hi) {
  __half2 h = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&h);
}
template <>
__device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float lo, float hi) {
  __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&h);
}

// The online softmax's running-max step for a thread's two accumulator rows of an mma / wgmma
// fragment (a row's columns spread over the 4 lanes of a quad): mx[r] (this thread's max of the
// tile's scores, log2 domain) becomes the quad's; m[r] the new running max; alpha[r] the factor
// that rescales what was accumulated; msafe[r] the max to subtract (0 while the row has seen no
// key: no (-inf) - (-inf)).
__device__ __forceinline__ void online_max_step(float (&mx)[2], float (&m)[2], float (&alpha)[2],
                                                float (&msafe)[2]) {
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 1));
    mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 2));
    const float mn = fmaxf(m[r], mx[r]);
    msafe[r] = mn == -INFINITY ? 0.f : mn;
    alpha[r] = exp2f(m[r] - msafe[r]);
    m[r] = mn;
  }
}

}  // namespace fastlm
