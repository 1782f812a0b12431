// LayerNorm / RMSNorm forward and backward (torch.ops.fastlm.norm_fwd_cuda / norm_bwd_cuda),
// with the optional fused pre-norm residual add.  Semantics match the Triton launchers
// norm_fwd / norm_bwd in kernels/norm.py; the schemas are in csrc/ops.cpp.
//
// Rows: every input is viewed as (M, N) with a unit column stride (copied only if it has
// none); row strides are passed, so expanded inputs (stride 0, e.g. the grad of .sum()) are
// read in place.  Outputs are fresh and contiguous.  Statistics are fp32.  N <= 2^20.
// VEC = elements per 16 bytes (8 for fp16/bf16, 4 for fp32); a "chunk" is VEC elements.
// A row is handled by TPR threads: a power-of-two sub-warp (TPR <= 32, several rows per CTA,
// shuffle reductions) for short rows, else a multiple of 32 (block / named-barrier reductions).
//
// Forward, one pass over HBM:
//   * vector path (N % VEC == 0, 16-byte aligned rows, N <= 8192 chunks): thread t loads its
//     chunks t + k TPR (k < NVEC <= 16) of x (+ residual) once and keeps them packed in
//     registers (4 registers per chunk for every dtype; compiler barriers stop it from
//     holding unpacked fp32 copies).  h = x + residual is rounded to x's dtype, stored as
//     residual_out, and the statistics are taken from that rounded h.  LayerNorm uses the
//     two-pass variance on the registers (mean, then sum (h - mean)^2).
//   * scalar stream path (odd or misaligned N, or longer rows): the same passes, re-reading
//     the row (x, or the h this thread just wrote) from L1/L2.
//   Bytes per row (s = element size): read x (N s) [+ residual N s], write out (N s)
//   [+ residual_out N s], + 4 or 8 bytes of statistics: 2 N s (4 N s with the residual),
//   the floor.  weight / bias are re-read per row from L1/L2, not from HBM.
//
// Backward, persistent (fused path: N % VEC == 0, aligned rows, N <= 2048 chunks, and its
// shared memory fits the device):
//   G CTAs (grid and RY from the occupancy API: ~one CTA per SM holding RY row groups, i.e.
//   RY rows in flight).  Row block b = RY consecutive rows; CTA c takes the blocks c, c + G,
//   ...  Per row a group loads dy and h once (packed registers), reduces
//   c1 = sum(xhat wdy) / N and c2 = sum(wdy) / N (wdy = dy weight; c2 = 0 for RMS), writes
//   dh = (wdy - xhat c1 - c2) rstd (+ dresidual_out) and accumulates dweight += dy xhat,
//   dbias += dy in fp32 shared-memory slots owned by the thread (the fp32 weight is cached
//   there too).  At the end each CTA sums its groups in a fixed order and writes one fp32
//   partial row to a (G, N) buffer; a small second kernel sums the G rows in a fixed order.
//   Deterministic, no atomics.
//   Bytes per row: read dy, h (2 N s) [+ dresidual_out N s], write dh (N s), + 8 bytes of
//   statistics: 3 N s (4 N s with the residual), the floor.  The partials add 4 G N bytes
//   per gradient written and read once (mostly L2), G ~ #SMs: a few % at 4k rows.
//   Split path (odd / misaligned N, or larger N): kernel 1 computes (c1, c2) per row,
//   kernel 2 walks 32-column tiles over row ranges computing dh and partial dweight / dbias;
//   it reads dy and h twice (5 N s per row) but works for any N.
#include <algorithm>
#include <cstring>
#include <map>
#include <mutex>
#include <tuple>
#include <type_traits>

#include "common.cuh"

#include <ATen/ops/zeros.h>

namespace fastlm {
namespace {

// ---- kernel begin: this section (to 'kernel end') is also compiled on the host by
// tests/test_norm_emu.py, which runs the kernels there in the SIMT emulator of tests/cuda_emu.h.
// Largest hidden size accepted.  Column indices are int32 and the statistics fp32; the
// kernels themselves have no other limit (larger rows take the stream / split paths).
constexpr int64_t kMaxN = int64_t(1) << 20;
// Most row groups (rows in flight) per CTA in the backward; named barriers 1..kMaxGroups.
constexpr int kMaxGroups = 8;
// Most 16-byte chunks per row held in registers.
constexpr int kFwdMaxChunks = 512 * 16;
constexpr int kBwdMaxChunks = 512 * 4;

struct FwdParams {
  const void* x;     // (M, N) T, row stride sx
  const void* res;   // (M, N) T, row stride sr, or null
  const void* w;     // (N,) fp32 or T, or null
  const void* b;     // (N,) fp32 or T, or null
  void* out;         // (M, N) T contiguous
  void* hout;        // (M, N) T contiguous (residual_out), or null
  float* mean;       // (M,) or null (RMS)
  float* rstd;       // (M,)
  int64_t M, sx, sr;
  int N;
  float eps, inv_n;
  float w_off;  // the rows scale by w_off + w (Gemma's 1 + w); 0 otherwise
  bool is_rms, has_res, has_w, has_b, w_f32, b_f32;
};

struct BwdParams {
  const void* dy;     // (M, N) T, row stride sdy
  const void* dres;   // (M, N) T, row stride sdres, or null
  const void* h;      // (M, N) T, row stride sh
  const void* w;      // (N,) fp32 or T, or null
  const float* mean;  // (M,) or null (RMS)
  const float* rstd;  // (M,)
  void* dh;           // (M, N) T contiguous
  float* dw_part;     // (P, N) partial dweight, or null
  float* db_part;     // (P, N) partial dbias, or null
  int64_t M, sdy, sdres, sh;
  int N;
  float inv_n;
  float w_off;  // as FwdParams::w_off (dweight is unchanged by it)
  bool is_rms, has_dres, has_w, has_b, w_f32;
};

// ------------------------------------------------------------------------ device helpers

// Synchronizes the TPR threads of this row group: the whole CTA when it holds one group,
// else the named barrier 1 + threadIdx.y (TPR is then a multiple of 32).
__device__ __forceinline__ void group_barrier() {
  if (blockDim.y == 1) {
    __syncthreads();
  } else {
#ifdef FASTLM_HOST_EMU
    emu_bar_sync(static_cast<int>(threadIdx.y) + 1, static_cast<int>(blockDim.x));
#else
    asm volatile("bar.sync %0, %1;" ::"r"(static_cast<int>(threadIdx.y) + 1), "r"(static_cast<int>(blockDim.x))
                 : "memory");
#endif
  }
}

// Sums v[0..K) over the blockDim.x threads sharing a row; every one of them gets the sums.
// blockDim.x is either a power of two <= 32 (a sub-warp: shuffles only) or a multiple of 32
// (warps, then `red` holds 32 * K floats of shared memory per row group).  NAMED: several
// row groups per CTA, synchronized by named barriers; else one group (the whole CTA) when
// blockDim.x > 32.  Every thread of the group must call it (no early exits around it).
template <int K, bool NAMED = false>
__device__ __forceinline__ void group_reduce(float (&v)[K], float* red) {
  const int tpr = blockDim.x;
  if (tpr <= 32) {
    for (int o = tpr >> 1; o > 0; o >>= 1) {
#pragma unroll
      for (int k = 0; k < K; ++k) v[k] += __shfl_xor_sync(0xffffffffu, v[k], o);
    }
    return;
  }
#pragma unroll
  for (int k = 0; k < K; ++k) v[k] = warp_sum(v[k]);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = tpr >> 5;
  float* s = red + (NAMED ? threadIdx.y * (32 * K) : 0);
  if (NAMED) group_barrier(); else __syncthreads();  // the previous call's readers are done with s
  if (lane == 0) {
#pragma unroll
    for (int k = 0; k < K; ++k) s[warp * K + k] = v[k];
  }
  if (NAMED) group_barrier(); else __syncthreads();
#pragma unroll
  for (int k = 0; k < K; ++k) v[k] = warp_sum(lane < nw ? s[lane * K + k] : 0.f);
}

// One 16-byte vector read once (evict-first: it is not needed again).
template <typename T, int VEC>
__device__ __forceinline__ Vec<T, VEC> load_vec_once(const T* p) {
  static_assert(sizeof(Vec<T, VEC>) == 16, "16-byte vectors only");
  const uint4 u = __ldcs(reinterpret_cast<const uint4*>(p));
  Vec<T, VEC> v;
  memcpy(&v, &u, 16);
  return v;
}

// The VEC elements of a 16-byte vector as fp32, and back (round to nearest even), working
// on 32-bit words (bf16: a shift or a mask per element; pairs for fp16).
template <typename T, int VEC>
__device__ __forceinline__ void unpack(const Vec<T, VEC>& v, float (&f)[VEC]) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    uint32_t u[VEC / 2];
    memcpy(u, &v, sizeof(u));
#pragma unroll
    for (int i = 0; i < VEC / 2; ++i) {
      f[2 * i] = __uint_as_float(u[i] << 16);
      f[2 * i + 1] = __uint_as_float(u[i] & 0xffff0000u);
    }
  } else if constexpr (std::is_same_v<T, __half>) {
    __half2 h[VEC / 2];
    memcpy(h, &v, sizeof(h));
#pragma unroll
    for (int i = 0; i < VEC / 2; ++i) {
      const float2 g = __half22float2(h[i]);
      f[2 * i] = g.x;
      f[2 * i + 1] = g.y;
    }
  } else {
#pragma unroll
    for (int j = 0; j < VEC; ++j) f[j] = to_float(v.v[j]);
  }
}

template <typename T, int VEC>
__device__ __forceinline__ Vec<T, VEC> pack(const float (&f)[VEC]) {
  Vec<T, VEC> v;
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    __nv_bfloat162 h[VEC / 2];
#pragma unroll
    for (int i = 0; i < VEC / 2; ++i) h[i] = __floats2bfloat162_rn(f[2 * i], f[2 * i + 1]);
    memcpy(&v, h, sizeof(h));
  } else if constexpr (std::is_same_v<T, __half>) {
    __half2 h[VEC / 2];
#pragma unroll
    for (int i = 0; i < VEC / 2; ++i) h[i] = __floats2half2_rn(f[2 * i], f[2 * i + 1]);
    memcpy(&v, h, sizeof(h));
  } else {
#pragma unroll
    for (int j = 0; j < VEC; ++j) v.v[j] = from_float<T>(f[j]);
  }
  return v;
}

// Compiler barrier on a cached vector: later conversions cannot reuse the fp32 values of
// earlier passes, so the row stays packed in registers (4 per chunk) instead of unpacked.
template <typename T, int VEC>
__device__ __forceinline__ void keep_packed(Vec<T, VEC>& v) {
  static_assert(sizeof(Vec<T, VEC>) == 16, "16-byte vectors only");
  uint4 u;
  memcpy(&u, &v, 16);
#ifndef FASTLM_HOST_EMU
  asm volatile("" : "+r"(u.x), "+r"(u.y), "+r"(u.z), "+r"(u.w));
#endif
  memcpy(&v, &u, 16);
}

template <typename T, int VEC>
__device__ __forceinline__ Vec<T, VEC> zero_vec() {
  Vec<T, VEC> v;
#pragma unroll
  for (int j = 0; j < VEC; ++j) v.v[j] = from_float<T>(0.f);
  return v;
}

// VEC (a multiple of 4) elements i.. of a weight / bias of fp32 (is_f32) or T, as fp32.
// Read-only path: the parameter is L1/L2-resident after the first rows.  16-byte aligned.
template <typename T, int VEC>
__device__ __forceinline__ void load_param(const void* p, bool is_f32, int64_t i, float (&out)[VEC]) {
  static_assert(VEC % 4 == 0, "whole float4s");
  if (is_f32) {
    const float4* q = reinterpret_cast<const float4*>(static_cast<const float*>(p) + i);
#pragma unroll
    for (int u = 0; u < VEC / 4; ++u) {
      const float4 f = __ldg(q + u);
      out[4 * u] = f.x;
      out[4 * u + 1] = f.y;
      out[4 * u + 2] = f.z;
      out[4 * u + 3] = f.w;
    }
  } else {
    unpack<T, VEC>(load_vec<T, VEC>(static_cast<const T*>(p) + i), out);
  }
}

// Element i of a weight / bias of fp32 (is_f32) or T, as fp32.
template <typename T>
__device__ __forceinline__ float load_param1(const void* p, bool is_f32, int64_t i) {
  return is_f32 ? __ldg(static_cast<const float*>(p) + i) : to_float(static_cast<const T*>(p)[i]);
}

// The weight's VEC elements i.. plus the offset (the scale the rows get), as fp32.
template <typename T, int VEC, typename P>
__device__ __forceinline__ void load_weight(const P& p, int64_t i, float (&out)[VEC]) {
  load_param<T, VEC>(p.w, p.w_f32, i, out);
#pragma unroll
  for (int j = 0; j < VEC; ++j) out[j] += p.w_off;
}

template <typename T, typename P>
__device__ __forceinline__ float load_weight1(const P& p, int64_t i) {
  return load_param1<T>(p.w, p.w_f32, i) + p.w_off;
}

// --------------------------------------------------------------------------- forward

// Most threads per CTA per NVEC (the register cap: 64 registers at 1024, 128 at 512).
template <int NVEC>
constexpr int fwd_max_threads() {
  return NVEC >= 8 ? 512 : 1024;
}

// Vector path.  Block (TPR, RY): RY rows per CTA, TPR threads per row; thread t owns the
// 16-byte chunks c = t + k * TPR, k < NVEC, of its row (coalesced), kept packed in registers.
template <typename T, int NVEC>
__global__ void __launch_bounds__(fwd_max_threads<NVEC>()) norm_fwd_cached_kernel(const FwdParams p) {
  constexpr int VEC = vec16<T>();
  __shared__ float red[32];  // block mode only (RY == 1)
  const int tpr = blockDim.x, t = threadIdx.x;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;
  const bool row_ok = row < p.M;
  const int64_t r = row_ok ? row : 0;
  const int nch = row_ok ? p.N / VEC : 0;  // chunks of this row (none for a padding row)
  const T* x = static_cast<const T*>(p.x) + r * p.sx;
  const T* res = p.has_res ? static_cast<const T*>(p.res) + r * p.sr : nullptr;
  T* hout = p.has_res ? static_cast<T*>(p.hout) + r * p.N : nullptr;
  T* out = static_cast<T*>(p.out) + r * p.N;

  Vec<T, VEC> hv[NVEC];
  float acc[1] = {0.f};  // sum h (LayerNorm) or sum h^2 (RMSNorm)
#pragma unroll
  for (int k = 0; k < NVEC; ++k) {
    const int c = t + k * tpr;
    if (c < nch) {
      Vec<T, VEC> a = load_vec_once<T, VEC>(x + c * VEC);
      if (p.has_res) {
        float fa[VEC], fb[VEC];
        unpack<T, VEC>(a, fa);
        unpack<T, VEC>(load_vec_once<T, VEC>(res + c * VEC), fb);
#pragma unroll
        for (int j = 0; j < VEC; ++j) fa[j] += fb[j];
        a = pack<T, VEC>(fa);  // h rounded to T: the statistics are taken from this
        store_vec<T, VEC>(hout + c * VEC, a);
      }
      hv[k] = a;
      float f[VEC];
      unpack<T, VEC>(a, f);
#pragma unroll
      for (int j = 0; j < VEC; ++j) acc[0] += p.is_rms ? f[j] * f[j] : f[j];
    } else {
      hv[k] = zero_vec<T, VEC>();
    }
  }
#pragma unroll
  for (int k = 0; k < NVEC; ++k) keep_packed<T, VEC>(hv[k]);
  group_reduce<1>(acc, red);
  float mean = 0.f, var;
  if (p.is_rms) {
    var = acc[0] * p.inv_n;
  } else {
    mean = acc[0] * p.inv_n;
    float sq[1] = {0.f};
#pragma unroll
    for (int k = 0; k < NVEC; ++k) {
      if (t + k * tpr < nch) {
        float f[VEC];
        unpack<T, VEC>(hv[k], f);
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          const float d = f[j] - mean;
          sq[0] += d * d;
        }
      }
    }
#pragma unroll
    for (int k = 0; k < NVEC; ++k) keep_packed<T, VEC>(hv[k]);
    group_reduce<1>(sq, red);
    var = sq[0] * p.inv_n;
  }
  const float rstd = rsqrtf(var + p.eps);
  if (row_ok && t == 0) {
    if (!p.is_rms) p.mean[r] = mean;
    p.rstd[r] = rstd;
  }
#pragma unroll
  for (int k = 0; k < NVEC; ++k) {
    const int c = t + k * tpr;
    if (c < nch) {
      float wv[VEC], bv[VEC];
      if (p.has_w) load_weight<T, VEC>(p, c * VEC, wv);
      if (p.has_b) load_param<T, VEC>(p.b, p.b_f32, c * VEC, bv);
      float f[VEC];
      unpack<T, VEC>(hv[k], f);
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        f[j] = (f[j] - mean) * rstd;
        if (p.has_w) f[j] *= wv[j];
        if (p.has_b) f[j] += bv[j];
      }
      store_vec<T, VEC>(out + c * VEC, pack<T, VEC>(f));
    }
  }
}

// Scalar stream path: any N, any alignment.  Block (TPR, RY) as above; thread t owns the
// elements t, t + TPR, ... and re-reads them in each pass (the row stays in L1/L2).  With a
// residual the later passes read the h this same thread stored (plain, coherent loads).
template <typename T>
__global__ void __launch_bounds__(1024) norm_fwd_stream_kernel(const FwdParams p) {
  __shared__ float red[32];
  const int tpr = blockDim.x, t = threadIdx.x;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;
  const bool row_ok = row < p.M;
  const int64_t r = row_ok ? row : 0;
  const int n = row_ok ? p.N : 0;
  const T* x = static_cast<const T*>(p.x) + r * p.sx;
  const T* res = p.has_res ? static_cast<const T*>(p.res) + r * p.sr : nullptr;
  T* hout = p.has_res ? static_cast<T*>(p.hout) + r * p.N : nullptr;
  T* out = static_cast<T*>(p.out) + r * p.N;
  const T* src = p.has_res ? hout : x;  // h, for the passes after the first

  float acc[1] = {0.f};
  for (int c = t; c < n; c += tpr) {
    float f;
    if (p.has_res) {
      const T hr = from_float<T>(to_float(x[c]) + to_float(res[c]));
      hout[c] = hr;
      f = to_float(hr);
    } else {
      f = to_float(x[c]);
    }
    acc[0] += p.is_rms ? f * f : f;
  }
  group_reduce<1>(acc, red);
  float mean = 0.f, var;
  if (p.is_rms) {
    var = acc[0] * p.inv_n;
  } else {
    mean = acc[0] * p.inv_n;
    float sq[1] = {0.f};
    for (int c = t; c < n; c += tpr) {
      const float d = to_float(src[c]) - mean;
      sq[0] += d * d;
    }
    group_reduce<1>(sq, red);
    var = sq[0] * p.inv_n;
  }
  const float rstd = rsqrtf(var + p.eps);
  if (row_ok && t == 0) {
    if (!p.is_rms) p.mean[r] = mean;
    p.rstd[r] = rstd;
  }
  for (int c = t; c < n; c += tpr) {
    float y = (to_float(src[c]) - mean) * rstd;
    if (p.has_w) y *= load_weight1<T>(p, c);
    if (p.has_b) y += load_param1<T>(p.b, p.b_f32, c);
    out[c] = from_float<T>(y);
  }
}

// -------------------------------------------------------------------------- backward

// Most threads per CTA of the fused backward per NVEC (the register cap: 65536 / threads).
template <int NVEC>
constexpr int bwd_max_threads() {
  return NVEC == 4 ? 512 : 1024;
}

// Fused persistent backward.  Block (TPR, RY): RY row groups of TPR threads.  Thread t owns
// the 16-byte chunks c = t + k * TPR (k < NVEC) of every row its group processes: dy and h
// of the current row stay packed in its registers; the fp32 weight and the dweight / dbias
// accumulators of its chunks live in shared memory slots only it touches (float4 slot
// (k * VEC/4 + u) * TPR + t: consecutive threads, consecutive 16 bytes, no bank conflicts).
// Dynamic shared memory, in float4 slots of S = TPR * NVEC * VEC / 4 each:
//   [weight: S if has_w] [dweight: RY * S if has_w] [dbias: RY * S if has_b]
// At the end the CTA sums its RY groups' accumulators in a fixed order and writes partial
// row blockIdx.x of dw_part / db_part.
template <typename T, int NVEC>
__global__ void __launch_bounds__(bwd_max_threads<NVEC>()) norm_bwd_fused_kernel(const BwdParams p) {
  constexpr int VEC = vec16<T>(), V4 = VEC / 4;
  __shared__ float red[kMaxGroups * 32 * 2];
  FASTLM_EXTERN_SMEM(float4, sm4);
  const int tpr = blockDim.x, ry = blockDim.y, t = threadIdx.x, y = threadIdx.y;
  const int nch_all = p.N / VEC;
  const int S = tpr * NVEC * V4;
  float4* ws = sm4;
  float4* dws = sm4 + (p.has_w ? S : 0) + y * S;                            // this group's dweight
  float4* dbs = sm4 + (p.has_w ? (1 + ry) * S : 0) + y * S;                 // this group's dbias
  const float4 zero4 = make_float4(0.f, 0.f, 0.f, 0.f);

#pragma unroll
  for (int k = 0; k < NVEC; ++k) {
    const int c = t + k * tpr;
#pragma unroll
    for (int u = 0; u < V4; ++u) {
      const int i = (k * V4 + u) * tpr + t;
      if (p.has_w) {
        dws[i] = zero4;
        if (y == 0) {
          float wv[4] = {0.f, 0.f, 0.f, 0.f};
          if (c < nch_all) load_weight<T, 4>(p, c * VEC + 4 * u, wv);
          ws[i] = make_float4(wv[0], wv[1], wv[2], wv[3]);
        }
      }
      if (p.has_b) dbs[i] = zero4;
    }
  }
  __syncthreads();  // the weight copy is shared by the groups

  // The loop condition depends on the row block only: uniform over the CTA.
  for (int64_t rb = blockIdx.x; rb * ry < p.M; rb += gridDim.x) {
    const int64_t row = rb * ry + y;
    const bool row_ok = row < p.M;
    const int64_t r = row_ok ? row : 0;
    const int nch = row_ok ? nch_all : 0;
    const T* dy = static_cast<const T*>(p.dy) + r * p.sdy;
    const T* h = static_cast<const T*>(p.h) + r * p.sh;

    Vec<T, VEC> dyv[NVEC], hv[NVEC];
#pragma unroll
    for (int k = 0; k < NVEC; ++k) {
      const int c = t + k * tpr;
      if (c < nch) {
        dyv[k] = load_vec_once<T, VEC>(dy + c * VEC);
        hv[k] = load_vec_once<T, VEC>(h + c * VEC);
      } else {
        dyv[k] = zero_vec<T, VEC>();
        hv[k] = zero_vec<T, VEC>();
      }
    }
    const float rstd = row_ok ? p.rstd[r] : 0.f;
    const float mean = (row_ok && !p.is_rms) ? p.mean[r] : 0.f;

    float s[2] = {0.f, 0.f};  // sum xhat * wdy, sum wdy
#pragma unroll
    for (int k = 0; k < NVEC; ++k) {
      if (t + k * tpr < nch) {
        float g[VEC], hf[VEC];
        unpack<T, VEC>(dyv[k], g);
        unpack<T, VEC>(hv[k], hf);
#pragma unroll
        for (int u = 0; u < V4; ++u) {
          const float4 w4 = p.has_w ? ws[(k * V4 + u) * tpr + t] : make_float4(1.f, 1.f, 1.f, 1.f);
          const float wv[4] = {w4.x, w4.y, w4.z, w4.w};
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int j = 4 * u + e;
            const float xhat = (hf[j] - mean) * rstd;
            const float wdy = g[j] * wv[e];
            s[0] += xhat * wdy;
            s[1] += wdy;
          }
        }
      }
    }
#pragma unroll
    for (int k = 0; k < NVEC; ++k) {
      keep_packed<T, VEC>(dyv[k]);
      keep_packed<T, VEC>(hv[k]);
    }
    group_reduce<2, true>(s, red);
    const float c1 = s[0] * p.inv_n;
    const float c2 = p.is_rms ? 0.f : s[1] * p.inv_n;

    T* dh = static_cast<T*>(p.dh) + r * p.N;
    const T* dres = p.has_dres ? static_cast<const T*>(p.dres) + r * p.sdres : nullptr;
#pragma unroll
    for (int k = 0; k < NVEC; ++k) {
      const int c = t + k * tpr;
      if (c < nch) {
        float g[VEC], hf[VEC], d[VEC];
        if (p.has_dres) unpack<T, VEC>(load_vec_once<T, VEC>(dres + c * VEC), d);
        unpack<T, VEC>(dyv[k], g);
        unpack<T, VEC>(hv[k], hf);
#pragma unroll
        for (int u = 0; u < V4; ++u) {
          const int i = (k * V4 + u) * tpr + t;
          const float4 w4 = p.has_w ? ws[i] : make_float4(1.f, 1.f, 1.f, 1.f);
          const float wv[4] = {w4.x, w4.y, w4.z, w4.w};
          float xh[4];
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int j = 4 * u + e;
            xh[e] = (hf[j] - mean) * rstd;
            const float v = (g[j] * wv[e] - xh[e] * c1 - c2) * rstd;
            d[j] = p.has_dres ? d[j] + v : v;
          }
          if (p.has_w) {
            float4 a = dws[i];
            a.x += g[4 * u] * xh[0];
            a.y += g[4 * u + 1] * xh[1];
            a.z += g[4 * u + 2] * xh[2];
            a.w += g[4 * u + 3] * xh[3];
            dws[i] = a;
          }
          if (p.has_b) {
            float4 a = dbs[i];
            a.x += g[4 * u];
            a.y += g[4 * u + 1];
            a.z += g[4 * u + 2];
            a.w += g[4 * u + 3];
            dbs[i] = a;
          }
        }
        store_vec<T, VEC>(dh + c * VEC, pack<T, VEC>(d));
      }
    }
  }

  // Partial row of this CTA: sum of the RY groups (fixed order), written column-contiguous.
  __syncthreads();
  const int nthreads = tpr * ry, tid = y * tpr + t;
  const int n4 = p.N / 4;
  for (int q = tid; q < n4; q += nthreads) {
    const int c = q / V4, u = q % V4;  // chunk and float4 within it
    const int i = ((c / tpr) * V4 + u) * tpr + c % tpr;
    if (p.has_w) {
      const float4* a = sm4 + S + i;
      float4 sum = a[0];
      for (int g = 1; g < ry; ++g) {
        const float4 b = a[g * S];
        sum.x += b.x;
        sum.y += b.y;
        sum.z += b.z;
        sum.w += b.w;
      }
      reinterpret_cast<float4*>(p.dw_part + static_cast<int64_t>(blockIdx.x) * p.N)[q] = sum;
    }
    if (p.has_b) {
      const float4* a = sm4 + (p.has_w ? (1 + ry) * S : 0) + i;
      float4 sum = a[0];
      for (int g = 1; g < ry; ++g) {
        const float4 b = a[g * S];
        sum.x += b.x;
        sum.y += b.y;
        sum.z += b.z;
        sum.w += b.w;
      }
      reinterpret_cast<float4*>(p.db_part + static_cast<int64_t>(blockIdx.x) * p.N)[q] = sum;
    }
  }
}

// Split path, kernel 1: per row (c1, c2) = (sum xhat * wdy, sum wdy) / N (c2 = 0 for RMS).
// Block (TPR, RY) as in norm_fwd_stream_kernel; scalar loads, any N and alignment.
template <typename T>
__global__ void __launch_bounds__(1024) norm_bwd_rowstats_kernel(const BwdParams p, float2* stats) {
  __shared__ float red[32 * 2];
  const int tpr = blockDim.x, t = threadIdx.x;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;
  const bool row_ok = row < p.M;
  const int64_t r = row_ok ? row : 0;
  const int n = row_ok ? p.N : 0;
  const T* dy = static_cast<const T*>(p.dy) + r * p.sdy;
  const T* h = static_cast<const T*>(p.h) + r * p.sh;
  const float rstd = row_ok ? p.rstd[r] : 0.f;
  const float mean = (row_ok && !p.is_rms) ? p.mean[r] : 0.f;
  float s[2] = {0.f, 0.f};
  for (int c = t; c < n; c += tpr) {
    const float xhat = (to_float(h[c]) - mean) * rstd;
    float wdy = to_float(dy[c]);
    if (p.has_w) wdy *= load_weight1<T>(p, c);
    s[0] += xhat * wdy;
    s[1] += wdy;
  }
  group_reduce<2>(s, red);
  if (row_ok && t == 0) stats[r] = make_float2(s[0] * p.inv_n, p.is_rms ? 0.f : s[1] * p.inv_n);
}

// Split path, kernel 2.  Block (32, 8): 32 consecutive columns x 8 row lanes; grid
// (ceil(N / 32), GR).  CTA (i, g) walks the rows g * 8 + ty, step GR * 8, writes dh for its
// columns and partial row g of dw_part / db_part (summed over its 8 lanes in a fixed order).
constexpr int kTileRows = 8;
template <typename T>
__global__ void __launch_bounds__(32 * kTileRows) norm_bwd_tile_kernel(const BwdParams p, const float2* stats) {
  __shared__ float sw[kTileRows][33], sb[kTileRows][33];
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int col = blockIdx.x * 32 + tx;
  const bool col_ok = col < p.N;
  const float w = (p.has_w && col_ok) ? load_weight1<T>(p, col) : 1.f;
  float dwa = 0.f, dba = 0.f;
  if (col_ok) {
    const T* dyp = static_cast<const T*>(p.dy);
    const T* hp = static_cast<const T*>(p.h);
    const T* drp = static_cast<const T*>(p.dres);
    T* dhp = static_cast<T*>(p.dh);
    const int64_t step = static_cast<int64_t>(gridDim.y) * kTileRows;
    for (int64_t row = static_cast<int64_t>(blockIdx.y) * kTileRows + ty; row < p.M; row += step) {
      const float rstd = p.rstd[row];
      const float mean = p.is_rms ? 0.f : p.mean[row];
      const float2 cc = stats[row];
      const float g = to_float(dyp[row * p.sdy + col]);
      const float xhat = (to_float(hp[row * p.sh + col]) - mean) * rstd;
      float d = (g * w - xhat * cc.x - cc.y) * rstd;
      if (p.has_dres) d += to_float(drp[row * p.sdres + col]);
      dhp[row * p.N + col] = from_float<T>(d);
      dwa += g * xhat;
      dba += g;
    }
  }
  sw[ty][tx] = dwa;
  sb[ty][tx] = dba;
  __syncthreads();
  if (ty == 0 && col_ok) {
    float a = 0.f, b = 0.f;
#pragma unroll
    for (int i = 0; i < kTileRows; ++i) {
      a += sw[i][tx];
      b += sb[i][tx];
    }
    const int64_t o = static_cast<int64_t>(blockIdx.y) * p.N + col;
    if (p.has_w) p.dw_part[o] = a;
    if (p.has_b) p.db_part[o] = b;
  }
}

// Sums the P partial rows of (P, N) fp32 buffers, in a fixed order.  Block (32, 16), grid
// (ceil(N / 32), nbuf): blockIdx.y picks (part0, out0) or (part1, out1).
__global__ void __launch_bounds__(512) reduce_partials_kernel(const float* part0, float* out0, const float* part1,
                                                              float* out1, int P, int N) {
  __shared__ float s[16][33];
  const float* part = blockIdx.y == 0 ? part0 : part1;
  float* out = blockIdx.y == 0 ? out0 : out1;
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int col = blockIdx.x * 32 + tx;
  float a = 0.f;
  if (col < N) {
#pragma unroll 4
    for (int i = ty; i < P; i += 16) a += part[static_cast<int64_t>(i) * N + col];
  }
  s[ty][tx] = a;
  __syncthreads();
  if (ty == 0 && col < N) {
    float b = 0.f;
#pragma unroll
    for (int i = 0; i < 16; ++i) b += s[i][tx];
    out[col] = b;
  }
}

// ------------------------------------------------------------------ launch shapes (host)
int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
int next_pow2(int v) {
  int p = 1;
  while (p < v) p <<= 1;
  return p;
}
int round_up(int v, int m) { return static_cast<int>(ceil_div(v, m) * m); }

struct Cfg {
  int nvec, tpr, ry;
};

// Launch shapes.  A row is handled by TPR threads: a power-of-two sub-warp (TPR <= 32, RY rows
// per CTA, shuffle reductions) when the row is short, else a multiple of 32 (block reductions).
// Scalar stream path: ~8 elements per thread, up to 1024 threads per row.
Cfg stream_cfg(int64_t N) {
  const int per = static_cast<int>(ceil_div(N, 8));  // ~8 elements per thread
  if (per <= 32) {
    const int tpr = next_pow2(per);
    return {0, tpr, 128 / tpr};
  }
  return {0, std::min(1024, round_up(per, 32)), 1};
}

// Forward vector path, nch <= kFwdMaxChunks chunks per row.
Cfg fwd_cached_cfg(int nch) {
  if (nch <= 128) {
    const int nvec = nch <= 32 ? 1 : nch <= 64 ? 2 : 4;
    const int tpr = next_pow2(static_cast<int>(ceil_div(nch, nvec)));
    return {nvec, tpr, 128 / tpr};
  }
  for (int nvec : {1, 2, 4, 8, 16}) {
    if (ceil_div(nch, nvec) <= 128) return {nvec, round_up(static_cast<int>(ceil_div(nch, nvec)), 32), 1};
  }
  return {16, round_up(static_cast<int>(ceil_div(nch, 16)), 32), 1};  // <= 512 threads
}

// Backward fused path, nch <= kBwdMaxChunks chunks per row.  ry = 0: chosen by occupancy.
Cfg bwd_fused_cfg(int nch) {
  if (nch <= 64) {
    const int nvec = nch <= 32 ? 1 : 2;
    const int tpr = next_pow2(static_cast<int>(ceil_div(nch, nvec)));
    return {nvec, tpr, 256 / tpr};
  }
  for (int nvec : {1, 2, 4}) {
    if (ceil_div(nch, nvec) <= 256) return {nvec, round_up(static_cast<int>(ceil_div(nch, nvec)), 32), 0};
  }
  return {4, round_up(static_cast<int>(ceil_div(nch, 4)), 32), 0};  // <= 512 threads
}

// ---- kernel end

// ------------------------------------------------------------------------------ host

int sm_count(int dev) {
  static std::mutex mu;
  static std::map<int, int> cache;
  std::lock_guard<std::mutex> lock(mu);
  auto it = cache.find(dev);
  if (it != cache.end()) return it->second;
  int n = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev));
  cache[dev] = n;
  return n;
}

// Resident CTAs per SM of `kern` with `threads` threads and `smem` dynamic shared bytes.
int occupancy(const void* kern, int threads, size_t smem, int dev) {
  static std::mutex mu;
  static std::map<std::tuple<const void*, int, size_t, int>, int> cache;
  std::lock_guard<std::mutex> lock(mu);
  const auto key = std::make_tuple(kern, threads, smem, dev);
  auto it = cache.find(key);
  if (it != cache.end()) return it->second;
  int n = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, kern, threads, smem));
  cache[key] = n;
  return n;
}

template <typename T>
void launch_fwd(const FwdParams& p, bool vec_ok, cudaStream_t stream) {
  constexpr int VEC = vec16<T>();
  if (vec_ok && p.N % VEC == 0 && p.N / VEC <= kFwdMaxChunks) {
    const Cfg c = fwd_cached_cfg(p.N / VEC);
    const dim3 grid(static_cast<unsigned>(ceil_div(p.M, c.ry))), block(c.tpr, c.ry);
    switch (c.nvec) {
      case 1: norm_fwd_cached_kernel<T, 1><<<grid, block, 0, stream>>>(p); break;
      case 2: norm_fwd_cached_kernel<T, 2><<<grid, block, 0, stream>>>(p); break;
      case 4: norm_fwd_cached_kernel<T, 4><<<grid, block, 0, stream>>>(p); break;
      case 8: norm_fwd_cached_kernel<T, 8><<<grid, block, 0, stream>>>(p); break;
      default: norm_fwd_cached_kernel<T, 16><<<grid, block, 0, stream>>>(p); break;
    }
  } else {
    const Cfg c = stream_cfg(p.N);
    const dim3 grid(static_cast<unsigned>(ceil_div(p.M, c.ry))), block(c.tpr, c.ry);
    norm_fwd_stream_kernel<T><<<grid, block, 0, stream>>>(p);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor alloc_parts(bool want, int64_t P, int64_t N, const at::TensorOptions& f32) {
  return want ? at::empty({P, N}, f32) : at::Tensor();
}

// (P, N) partials -> (N,) sums (a view of the buffer when P == 1).
void finish_partials(const at::Tensor& pw, const at::Tensor& pb, int64_t P, int64_t N, const at::TensorOptions& f32,
                     cudaStream_t stream, at::Tensor& dw, at::Tensor& db) {
  if (P == 1) {
    if (pw.defined()) dw = pw.view({N});
    if (pb.defined()) db = pb.view({N});
    return;
  }
  const float* parts[2];
  float* outs[2];
  int nb = 0;
  if (pw.defined()) {
    dw = at::empty({N}, f32);
    parts[nb] = pw.data_ptr<float>();
    outs[nb++] = dw.data_ptr<float>();
  }
  if (pb.defined()) {
    db = at::empty({N}, f32);
    parts[nb] = pb.data_ptr<float>();
    outs[nb++] = db.data_ptr<float>();
  }
  if (nb == 0) return;
  const dim3 grid(static_cast<unsigned>(ceil_div(N, 32)), nb), block(32, 16);
  reduce_partials_kernel<<<grid, block, 0, stream>>>(parts[0], outs[0], parts[nb - 1], outs[nb - 1],
                                                     static_cast<int>(P), static_cast<int>(N));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Largest dynamic shared memory `kern` may use on `dev`; raises the kernel's limit to it
// (the device's opt-in maximum less the static shared memory) the first time.
size_t max_dyn_smem(const void* kern, int dev) {
  static std::mutex mu;
  static std::map<std::pair<const void*, int>, size_t> cache;
  std::lock_guard<std::mutex> lock(mu);
  const auto key = std::make_pair(kern, dev);
  auto it = cache.find(key);
  if (it != cache.end()) return it->second;
  int optin = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
  cudaFuncAttributes attr;
  C10_CUDA_CHECK(cudaFuncGetAttributes(&attr, kern));
  const size_t avail = static_cast<size_t>(optin) - attr.sharedSizeBytes;
  C10_CUDA_CHECK(cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(avail)));
  cache[key] = avail;
  return avail;
}

// Launches the fused backward if its shared memory fits this device; false otherwise.
template <typename T, int NVEC>
bool launch_bwd_fused(BwdParams p, const Cfg& c, int dev, const at::TensorOptions& f32, cudaStream_t stream,
                      at::Tensor& dw, at::Tensor& db) {
  constexpr int VEC = vec16<T>();
  const void* kern = reinterpret_cast<const void*>(&norm_bwd_fused_kernel<T, NVEC>);
  const size_t array_bytes = static_cast<size_t>(c.tpr) * NVEC * VEC * sizeof(float);
  auto smem_for = [&](int ry) { return ((p.has_w ? 1 + ry : 0) + (p.has_b ? ry : 0)) * array_bytes; };
  const size_t smem_max = max_dyn_smem(kern, dev);
  // Sub-warp mode: RY fixed (256 threads).  Block mode: the RY with the most rows in flight
  // per SM (RY x resident CTAs); ties go to the larger RY (fewer partial rows).
  const int ry_hi = c.ry ? c.ry : std::min(kMaxGroups, bwd_max_threads<NVEC>() / c.tpr);
  const int ry_lo = c.ry ? c.ry : 1;
  int ry = 0, occ = 0;
  for (int r = ry_hi; r >= ry_lo; --r) {
    if (smem_for(r) > smem_max) continue;
    const int o = occupancy(kern, c.tpr * r, smem_for(r), dev);
    if (o * r > occ * ry) {
      ry = r;
      occ = o;
    }
  }
  if (ry == 0) return false;
  const int64_t G = std::min<int64_t>(static_cast<int64_t>(sm_count(dev)) * occ, ceil_div(p.M, ry));
  at::Tensor pw = alloc_parts(p.has_w, G, p.N, f32), pb = alloc_parts(p.has_b, G, p.N, f32);
  p.dw_part = pw.defined() ? pw.data_ptr<float>() : nullptr;
  p.db_part = pb.defined() ? pb.data_ptr<float>() : nullptr;
  norm_bwd_fused_kernel<T, NVEC><<<static_cast<unsigned>(G), dim3(c.tpr, ry), smem_for(ry), stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  finish_partials(pw, pb, G, p.N, f32, stream, dw, db);
  return true;
}

template <typename T>
void launch_bwd(BwdParams p, bool vec_ok, int dev, const at::TensorOptions& f32, cudaStream_t stream, at::Tensor& dw,
                at::Tensor& db) {
  constexpr int VEC = vec16<T>();
  if (vec_ok && p.N % VEC == 0 && p.N / VEC <= kBwdMaxChunks) {
    const Cfg c = bwd_fused_cfg(p.N / VEC);
    bool done;
    switch (c.nvec) {
      case 1: done = launch_bwd_fused<T, 1>(p, c, dev, f32, stream, dw, db); break;
      case 2: done = launch_bwd_fused<T, 2>(p, c, dev, f32, stream, dw, db); break;
      default: done = launch_bwd_fused<T, 4>(p, c, dev, f32, stream, dw, db); break;
    }
    if (done) return;
  }
  // Split path.
  at::Tensor stats = at::empty({p.M, 2}, f32);
  float2* st = reinterpret_cast<float2*>(stats.data_ptr<float>());
  const Cfg c = stream_cfg(p.N);
  norm_bwd_rowstats_kernel<T>
      <<<static_cast<unsigned>(ceil_div(p.M, c.ry)), dim3(c.tpr, c.ry), 0, stream>>>(p, st);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const int64_t tiles = ceil_div(p.N, 32);
  const int64_t want = ceil_div(static_cast<int64_t>(sm_count(dev)) * 8, tiles);  // ~8 CTAs per SM
  const int64_t GR = std::max<int64_t>(1, std::min<int64_t>({want, ceil_div(p.M, kTileRows), 65535}));
  at::Tensor pw = alloc_parts(p.has_w, GR, p.N, f32), pb = alloc_parts(p.has_b, GR, p.N, f32);
  p.dw_part = pw.defined() ? pw.data_ptr<float>() : nullptr;
  p.db_part = pb.defined() ? pb.data_ptr<float>() : nullptr;
  norm_bwd_tile_kernel<T><<<dim3(static_cast<unsigned>(tiles), static_cast<unsigned>(GR)), dim3(32, kTileRows), 0,
                            stream>>>(p, st);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  finish_partials(pw, pb, GR, p.N, f32, stream, dw, db);
}

// ------------------------------------------------------------------------ op boundary

bool is_kernel_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16;
}

void check_input(const at::Tensor& t, const char* op, const char* name, const at::Tensor& ref, const char* ref_name) {
  TORCH_CHECK(t.is_cuda(), op, ": ", name, " must be a CUDA tensor, got ", t.device());
  TORCH_CHECK(t.device() == ref.device(), op, ": ", name, " must be on the same device as ", ref_name, " (",
              ref.device(), "), got ", t.device());
}

// weight / bias: (N,), fp32 or the input's dtype; returned contiguous and 16-byte aligned.
at::Tensor check_param(const std::optional<at::Tensor>& t, const char* op, const char* name, const at::Tensor& ref,
                       const char* ref_name, int64_t N) {
  if (!t.has_value() || !t->defined()) return at::Tensor();
  const at::Tensor& w = *t;
  check_input(w, op, name, ref, ref_name);
  TORCH_CHECK(w.scalar_type() == at::kFloat || w.scalar_type() == ref.scalar_type(), op, ": ", name,
              " must be float32 or ", ref_name, "'s dtype ", ref.scalar_type(), ", got ", w.scalar_type());
  TORCH_CHECK(w.dim() == 1 && w.size(0) == N, op, ": ", name, " must have shape (", N, ",) (the last dim of ",
              ref_name, "), got ", w.sizes());
  at::Tensor c = w.contiguous();
  if (!is_aligned(c.data_ptr(), 16)) c = c.clone();  // a fresh allocation is aligned
  return c;
}

// t viewed as (rows, N) with a unit column stride (copied only if it has none).
at::Tensor rows2d(const at::Tensor& t) {
  const int64_t N = t.size(-1);
  at::Tensor t2 = t.reshape({-1, N});
  if (N > 1 && t2.stride(1) != 1) t2 = t2.contiguous();
  return t2;
}
int64_t row_stride(const at::Tensor& t2) { return t2.size(0) > 1 ? t2.stride(0) : t2.size(1); }

// Whether 16-byte vectors of VEC elements can be read from every row of t2.
bool vec_rows_ok(const at::Tensor& t2, int vec) {
  return is_aligned(t2.data_ptr(), 16) && row_stride(t2) % vec == 0;
}

int vec_elems(at::ScalarType t) { return t == at::kFloat ? 4 : 8; }

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> norm_fwd_cuda(const at::Tensor& x,
                                                                         const std::optional<at::Tensor>& weight,
                                                                         const std::optional<at::Tensor>& bias,
                                                                         const std::optional<at::Tensor>& residual,
                                                                         double eps, bool is_rms,
                                                                         double weight_offset) {
  constexpr const char* op = "norm_fwd_cuda";
  TORCH_CHECK(x.is_cuda(), op, ": x must be a CUDA tensor, got ", x.device());
  TORCH_CHECK(is_kernel_dtype(x.scalar_type()), op, ": x must be float32, float16 or bfloat16, got ",
              x.scalar_type());
  TORCH_CHECK(x.dim() >= 1, op, ": x must have at least one dimension (the hidden size), got a scalar");
  const int64_t N = x.size(-1);
  TORCH_CHECK(N >= 1 && N <= kMaxN, op, ": x's last (hidden) dimension must be in [1, ", kMaxN, "], got ", N);
  TORCH_CHECK(eps >= 0.0, op, ": eps must be >= 0, got ", eps);
  at::Tensor w = check_param(weight, op, "weight", x, "x", N);
  at::Tensor b = check_param(bias, op, "bias", x, "x", N);
  const bool has_res = residual.has_value() && residual->defined();
  if (has_res) {
    check_input(*residual, op, "residual", x, "x");
    TORCH_CHECK(residual->scalar_type() == x.scalar_type(), op, ": residual must have x's dtype ", x.scalar_type(),
                ", got ", residual->scalar_type());
    TORCH_CHECK(residual->sizes() == x.sizes(), op, ": residual must have x's shape ", x.sizes(), ", got ",
                residual->sizes());
  }

  c10::cuda::CUDAGuard guard(x.device());
  const auto f32 = x.options().dtype(at::kFloat);
  const auto stat_shape = x.sizes().slice(0, x.dim() - 1);
  at::Tensor out = at::empty(x.sizes(), x.options());
  at::Tensor hout = has_res ? at::empty(x.sizes(), x.options()) : at::empty({0}, x.options());
  at::Tensor mean = is_rms ? at::empty({0}, f32) : at::empty(stat_shape, f32);
  at::Tensor rstd = at::empty(stat_shape, f32);
  const int64_t M = x.numel() / N;
  if (M == 0) return {out, hout, mean, rstd};
  TORCH_CHECK(M <= INT32_MAX, op, ": too many rows (", M, "); at most ", INT32_MAX);

  const at::Tensor x2 = rows2d(x);
  const at::Tensor r2 = has_res ? rows2d(*residual) : at::Tensor();
  const int vec = vec_elems(x.scalar_type());
  const bool vec_ok = vec_rows_ok(x2, vec) && (!has_res || vec_rows_ok(r2, vec));

  FwdParams p;
  p.x = x2.data_ptr();
  p.res = has_res ? r2.data_ptr() : nullptr;
  p.w = w.defined() ? w.data_ptr() : nullptr;
  p.b = b.defined() ? b.data_ptr() : nullptr;
  p.out = out.data_ptr();
  p.hout = has_res ? hout.data_ptr() : nullptr;
  p.mean = is_rms ? nullptr : mean.data_ptr<float>();
  p.rstd = rstd.data_ptr<float>();
  p.M = M;
  p.sx = row_stride(x2);
  p.sr = has_res ? row_stride(r2) : 0;
  p.N = static_cast<int>(N);
  p.eps = static_cast<float>(eps);
  p.inv_n = static_cast<float>(1.0 / static_cast<double>(N));
  p.w_off = static_cast<float>(weight_offset);
  p.is_rms = is_rms;
  p.has_res = has_res;
  p.has_w = w.defined();
  p.has_b = b.defined();
  p.w_f32 = w.defined() && w.scalar_type() == at::kFloat;
  p.b_f32 = b.defined() && b.scalar_type() == at::kFloat;

  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  FASTLM_DISPATCH_FLOAT(x.scalar_type(), "norm_fwd_cuda", [&] { launch_fwd<scalar_t>(p, vec_ok, stream); });
  return {out, hout, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> norm_bwd_cuda(const at::Tensor& dy,
                                                             const std::optional<at::Tensor>& dresidual_out,
                                                             const at::Tensor& h,
                                                             const std::optional<at::Tensor>& weight,
                                                             const at::Tensor& mean, const at::Tensor& rstd,
                                                             bool is_rms, bool has_bias, double weight_offset) {
  constexpr const char* op = "norm_bwd_cuda";
  TORCH_CHECK(h.is_cuda(), op, ": h must be a CUDA tensor, got ", h.device());
  TORCH_CHECK(is_kernel_dtype(h.scalar_type()), op, ": h must be float32, float16 or bfloat16, got ",
              h.scalar_type());
  TORCH_CHECK(h.dim() >= 1, op, ": h must have at least one dimension (the hidden size), got a scalar");
  const int64_t N = h.size(-1);
  TORCH_CHECK(N >= 1 && N <= kMaxN, op, ": h's last (hidden) dimension must be in [1, ", kMaxN, "], got ", N);
  check_input(dy, op, "dy", h, "h");
  TORCH_CHECK(dy.scalar_type() == h.scalar_type(), op, ": dy must have h's dtype ", h.scalar_type(), ", got ",
              dy.scalar_type());
  TORCH_CHECK(dy.sizes() == h.sizes(), op, ": dy must have h's shape ", h.sizes(), ", got ", dy.sizes());
  const bool has_dres = dresidual_out.has_value() && dresidual_out->defined();
  if (has_dres) {
    check_input(*dresidual_out, op, "dresidual_out", h, "h");
    TORCH_CHECK(dresidual_out->scalar_type() == h.scalar_type(), op, ": dresidual_out must have h's dtype ",
                h.scalar_type(), ", got ", dresidual_out->scalar_type());
    TORCH_CHECK(dresidual_out->sizes() == h.sizes(), op, ": dresidual_out must have h's shape ", h.sizes(),
                ", got ", dresidual_out->sizes());
  }
  at::Tensor w = check_param(weight, op, "weight", h, "h", N);
  const int64_t M = h.numel() / N;
  check_input(rstd, op, "rstd", h, "h");
  TORCH_CHECK(rstd.scalar_type() == at::kFloat && rstd.numel() == M, op,
              ": rstd must be float32 with one value per row of h (", M, "), got ", rstd.scalar_type(), " with ",
              rstd.numel());
  if (!is_rms) {
    check_input(mean, op, "mean", h, "h");
    TORCH_CHECK(mean.scalar_type() == at::kFloat && mean.numel() == M, op,
                ": mean must be float32 with one value per row of h (", M, "), got ", mean.scalar_type(), " with ",
                mean.numel());
  }

  c10::cuda::CUDAGuard guard(h.device());
  const auto f32 = h.options().dtype(at::kFloat);
  at::Tensor dh = at::empty(h.sizes(), h.options());
  at::Tensor dw = at::empty({0}, f32), db = at::empty({0}, f32);
  if (M == 0) {
    if (w.defined()) dw = at::zeros({N}, f32);
    if (has_bias) db = at::zeros({N}, f32);
    return {dh, dw, db};
  }
  TORCH_CHECK(M <= INT32_MAX, op, ": too many rows (", M, "); at most ", INT32_MAX);

  const at::Tensor dy2 = rows2d(dy), h2 = rows2d(h);
  const at::Tensor dr2 = has_dres ? rows2d(*dresidual_out) : at::Tensor();
  const at::Tensor rstd_c = rstd.contiguous();
  const at::Tensor mean_c = is_rms ? at::Tensor() : mean.contiguous();
  const int vec = vec_elems(h.scalar_type());
  const bool vec_ok = vec_rows_ok(dy2, vec) && vec_rows_ok(h2, vec) && (!has_dres || vec_rows_ok(dr2, vec));

  BwdParams p;
  p.dy = dy2.data_ptr();
  p.dres = has_dres ? dr2.data_ptr() : nullptr;
  p.h = h2.data_ptr();
  p.w = w.defined() ? w.data_ptr() : nullptr;
  p.mean = is_rms ? nullptr : mean_c.data_ptr<float>();
  p.rstd = rstd_c.data_ptr<float>();
  p.dh = dh.data_ptr();
  p.dw_part = nullptr;
  p.db_part = nullptr;
  p.M = M;
  p.sdy = row_stride(dy2);
  p.sdres = has_dres ? row_stride(dr2) : 0;
  p.sh = row_stride(h2);
  p.N = static_cast<int>(N);
  p.inv_n = static_cast<float>(1.0 / static_cast<double>(N));
  p.w_off = static_cast<float>(weight_offset);
  p.is_rms = is_rms;
  p.has_dres = has_dres;
  p.has_w = w.defined();
  p.has_b = has_bias;
  p.w_f32 = w.defined() && w.scalar_type() == at::kFloat;

  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int dev = h.get_device();
  FASTLM_DISPATCH_FLOAT(h.scalar_type(), "norm_bwd_cuda",
                        [&] { launch_bwd<scalar_t>(p, vec_ok, dev, f32, stream, dw, db); });
  return {dh, dw, db};
}

}  // namespace
}  // namespace fastlm

TORCH_LIBRARY_IMPL(fastlm, CUDA, m) {
  m.impl("norm_fwd_cuda", &fastlm::norm_fwd_cuda);
  m.impl("norm_bwd_cuda", &fastlm::norm_bwd_cuda);
}
