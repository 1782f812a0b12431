// Small shared helpers for the CUDA kernels of fastlm: input checks, dtype dispatch,
// 16-byte vector loads/stores and warp/block reductions.
#pragma once

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <torch/library.h>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

namespace fastlm {

#define FASTLM_CHECK_CUDA(t, name) TORCH_CHECK((t).is_cuda(), name " must be a CUDA tensor, got ", (t).device())
#define FASTLM_CHECK_SAME_DEVICE(a, b, name_a, name_b)                                           \
  TORCH_CHECK((a).device() == (b).device(), name_a " and " name_b " must be on the same device, got ", \
              (a).device(), " and ", (b).device())
#define FASTLM_CHECK_DTYPE(t, dt, name) \
  TORCH_CHECK((t).scalar_type() == (dt), name " must have dtype ", dt, ", got ", (t).scalar_type())

// Dispatch over the three floating dtypes the kernels support; `scalar_t` is the CUDA type
// (float, __half, __nv_bfloat16).
#define FASTLM_DISPATCH_FLOAT(dtype, name, ...)                                         \
  [&] {                                                                                 \
    switch (dtype) {                                                                    \
      case at::ScalarType::Float: {                                                     \
        using scalar_t = float;                                                         \
        return __VA_ARGS__();                                                           \
      }                                                                                 \
      case at::ScalarType::Half: {                                                      \
        using scalar_t = __half;                                                        \
        return __VA_ARGS__();                                                           \
      }                                                                                 \
      case at::ScalarType::BFloat16: {                                                  \
        using scalar_t = __nv_bfloat16;                                                 \
        return __VA_ARGS__();                                                           \
      }                                                                                 \
      default:                                                                          \
        TORCH_CHECK(false, name ": unsupported dtype ", dtype, " (expected float32, float16 or bfloat16)"); \
    }                                                                                   \
  }()

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
  return *reinterpret_cast<const Vec<T, N>*>(p);
}
template <typename T, int N>
__device__ __forceinline__ void store_vec(T* p, const Vec<T, N>& v) {
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

// Sum over the whole block; every thread gets the result.  `smem` holds >= 32 floats.
// Safe to call repeatedly (synchronizes before reusing smem).
__device__ __forceinline__ float block_sum(float v, float* smem) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = (blockDim.x + 31) >> 5;
  v = warp_sum(v);
  __syncthreads();
  if (lane == 0) smem[warp] = v;
  __syncthreads();
  v = lane < nwarps ? smem[lane] : 0.f;
  return warp_sum(v);
}

inline bool is_aligned(const void* p, int bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

}  // namespace fastlm
