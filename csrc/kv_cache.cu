// KV cache append and split-KV decode attention (Flash-Decoding) for paged and contiguous caches.
//
// Layouts: contiguous caches (batch, max_seqlen, Hkv, D), or paged caches (num_blocks, page, Hkv, D)
// with an int32 block table (batch, max_blocks): token t of sequence b lives in block
// block_table[b][t / page], slot t % page.  Any page size >= 1 (shifts for powers of two).
//
// kv_cache_append_cuda: one CTA per new token copies its (Hkv, D) slices of k and v with 16-byte
// vectors.  Positions past the capacity and block ids outside [0, num_blocks) are skipped: the
// kernel never writes out of bounds (negative block ids mean "no block" by design).
//
// decode_attention_with_kv_cuda (flash_attn_with_kvcache's form, the model's decode step): one
// launch for a decode step (seqlen_new == seqlen_q <= 16, with a workspace of zeroed counters or
// nothing to merge): the decode kernel normalizes and rotates q and the new keys itself, its last
// split attends to the new tokens from shared memory / registers, the first row tile's CTA of that
// split appends them, and the last CTA per tile merges the splits (fused_combine), leaving the
// counters zeroed.  Otherwise two launches: kv_append_rotary_kernel (or kv_append_norm_kernel)
// appends the new tokens, rotating k and q at their positions when rotary tables are given, and
// zeroes the fused-combine counters; the decode then attends over the old and new tokens and
// merges the same way.  A tile whose partials exceed kMaxFusedMergeBytes is merged by a
// combine_kernel launch instead.
//
// decode_attention_cuda: memory-bound, so the floor is reading every visible K/V byte once.
// Grid (split, kv_head x row_tile, batch), 4 warps per CTA.  A CTA owns one KV head and 16 "query
// rows" (the GQA group's query heads x seqlen_q, row = s * G + g), so each K/V byte is read once
// for the whole group.  Tensor-core path (fp16/bf16, head_dim % 8 == 0, 16-byte aligned caches,
// contiguous or with pages of whole 16-token steps: page % 16 == 0, every page size from 16 up):
// each warp takes 16-token steps of its CTA's chunk (one block each, its id loaded a step ahead)
// and computes S = Q K^T and O += P V with
// mma.sync m16n8k16 (fp32 accumulation), loading K and V straight from global memory into
// registers with 16-byte loads in a layout that *is* the mma B fragment:
//   - QK: the contraction runs over head_dim, whose order is free: thread (g = lane/4, t = lane%4)
//     loads 16-byte chunks t, t+4, ... of key g, and the Q fragments (staged in shared memory in
//     fragment order) use the same permutation of head_dim.
//   - PV: the contraction runs over tokens.  Thread (g, t) loads chunks g, g+8, ... of tokens
//     2t, 2t+1, 2t+8, 2t+9 and pairs them per element with byte permutes; n-tile j = 8m + e then
//     holds output dims 8 * (column + 8m) + e, unscrambled when the output goes through shared
//     memory.  P comes from the S accumulators in registers (the FlashAttention-2 identity between
//     the m16n8 accumulator and the m16k16 A fragment).
// The 4 warps' online-softmax states are merged through shared memory (deterministic order); a
// single split writes the output, several write fp32 partials (normalized output + log2-sum-exp)
// that combine_kernel merges (or the decode's own last CTA per tile: fused_combine).  Other dtypes/shapes (fp32, head_dim % 8 != 0, unaligned caches, pages of other sizes)
// take decode_simple_kernel: CUDA cores, one token at a time, each warp owning 4 of the 16 rows.
// Masks: query row at position p = L - seqlen_q + s sees key j iff j < L, j <= p (causal) and
// j >= p - window (window >= 0), and j >= cache_leftpad[b] when given (the split range starts
// there: a left-padded prompt's padding is never read); rows that see nothing give 0; keys of
// invalid blocks are masked.
// A NaN score (a NaN query, or a NaN in a visible key) gives a NaN row, as in the reference:
// normalizers are tested with != 0 (NaN passes), never > 0, so no NaN is turned into a 0.
#include "common.cuh"

#include <ATen/ops/empty_like.h>

namespace fastlm {
namespace {

// ---- kernel begin: this section (to 'kernel end') is also compiled on the host by
// tests/test_kv_cache_emu.py, which runs the kernels there in a SIMT emulator (tests/cuda_emu.h:
// one host thread per CUDA thread, warp shuffles / mma.sync / __syncthreads as collectives).
constexpr int kWarps = 4;
constexpr int kThreads = 32 * kWarps;
constexpr int kRows = 16;  // query rows per CTA (the mma M)
constexpr int kStep = 16;  // tokens per warp step (the PV mma K)
constexpr int kMaxSplits = 128;

// ------------------------------------------------------------------------------------ append
template <typename T, int VEC>
__global__ void __launch_bounds__(256) kv_append_kernel(
    T* __restrict__ k_cache, T* __restrict__ v_cache, const T* __restrict__ k, const T* __restrict__ v,
    const int* __restrict__ seqlens, const int* __restrict__ block_table, int seqlen_new, int H, int D, int n_pages,
    int capacity, int page, int64_t kc_b, int64_t kc_t, int64_t kc_h, int64_t vc_b, int64_t vc_t, int64_t vc_h,
    int64_t k_b, int64_t k_s, int64_t k_h, int64_t v_b, int64_t v_s, int64_t v_h, int64_t bt_s) {
  const int b = blockIdx.x / seqlen_new;
  const int s = blockIdx.x % seqlen_new;
  const int64_t pos = static_cast<int64_t>(seqlens[b]) + s;
  if (pos < 0 || pos >= capacity) return;  // past the capacity: skipped (never out of bounds)
  int64_t blk, slot;
  if (block_table != nullptr) {
    const int id = block_table[b * bt_s + pos / page];
    if (id < 0 || id >= n_pages) return;  // no block / invalid block id: skipped
    blk = id;
    slot = pos % page;
  } else {
    blk = b;
    slot = pos;
  }
  const int nv = D / VEC;
  T* kd = k_cache + blk * kc_b + slot * kc_t;
  T* vd = v_cache + blk * vc_b + slot * vc_t;
  const T* ks = k + b * k_b + s * k_s;
  const T* vs = v + b * v_b + s * v_s;
  for (int i = threadIdx.x; i < H * nv; i += blockDim.x) {
    const int h = i / nv, d = (i - h * nv) * VEC;
    store_vec<T, VEC>(kd + h * kc_h + d, load_vec<T, VEC>(ks + h * k_h + d));
    store_vec<T, VEC>(vd + h * vc_h + d, load_vec<T, VEC>(vs + h * v_h + d));
  }
}

// The append of decode_attention_with_kv_cuda: the new tokens' k and v go to the cache as above,
// optionally rotated on the way (k) together with the queries of the same positions (q into
// q_out), and the fused-combine counters of the decode launched next are zeroed (by the first CTA
// of each sequence's first new token).  Grid (new token (b, s), chunk): position
// pos = seqlens[b] + s; q is rotated even where the cache row is skipped.  Units of work: per
// head (the Hq query heads, then the H key heads) `half` rotary pairs, then the D - 2 half
// pass-through elements (copied); without rotary (Hq = half = 0) every k element is a copy.
// Each thread takes one unit and one v element, so its few loads are in flight together: a
// decode step appends one token per sequence (a few KiB), and latency, not bandwidth, is the
// cost here.  A position outside the tables rotates to NaN (and reads no table memory).
struct AppendParams {
  void* k_cache;
  void* v_cache;
  const void* k;
  const void* v;
  const int* seqlens;
  const int* block_table;  // nullptr: contiguous layout
  const void* q;           // rotary: (batch, seqlen_new, Hq, D), unit stride in D
  void* q_out;             // rotary: the rotated q, same shape
  const void* cos;         // rotary: (max_pos, half), row stride s_cos, unit column stride
  const void* sin;
  int* sem;  // (batch, n_sem) fused-combine counters to zero, or nullptr
  const void* q_w;  // norm: (D,) RMSNorm weights of the q heads and the k heads, fp32 or T (w_f32)
  const void* k_w;
  int64_t kc_b, kc_t, kc_h, vc_b, vc_t, vc_h;  // cache strides: block|batch, slot|token, head
  int64_t k_b, k_s, k_h, v_b, v_s, v_h, q_b, q_s, q_h, qo_b, qo_s, qo_h;
  int64_t bt_s, s_cos, max_pos;
  int seqlen_new, H, Hq, D, half, n_pages, capacity, page, n_sem;
  float eps, w_offset;  // norm: rstd = 1 / sqrt(mean(x^2) + eps); the heads scale by w_offset + w
  bool interleaved, cos_f32, w_f32;
};

// The cache row of position pos of sequence b: (block|batch, slot|token); false if there is none
// (outside [0, capacity), or a block id outside [0, n_pages): the token is not written).
__device__ __forceinline__ bool cache_slot(const AppendParams& p, int b, int64_t pos, int64_t& blk, int64_t& slot) {
  bool ok = pos >= 0 && pos < p.capacity;
  blk = b;
  slot = pos;
  if (ok && p.block_table != nullptr) {
    const int id = p.block_table[b * p.bt_s + pos / p.page];
    ok = id >= 0 && id < p.n_pages;
    blk = id;
    slot = pos % p.page;
  }
  return ok;
}

// What both append kernels do first for new token (b, s): zero the fused-combine counters (first
// CTA of each sequence's first token), find the cache row of position pos = seqlens[b] + s (false:
// none, the token is not written) and copy the v element u of this thread.
template <typename T>
__device__ __forceinline__ bool append_row(const AppendParams& p, int b, int s, int u, int64_t& pos, int64_t& blk,
                                           int64_t& slot) {
  if (p.sem != nullptr && s == 0 && blockIdx.y == 0)
    for (int i = threadIdx.x; i < p.n_sem; i += blockDim.x) p.sem[static_cast<int64_t>(b) * p.n_sem + i] = 0;
  pos = static_cast<int64_t>(p.seqlens[b]) + s;
  const bool ok = cache_slot(p, b, pos, blk, slot);  // (else only q is rotated)
  if (ok && u < p.H * p.D) {
    const int h = u / p.D, d = u - h * p.D;
    static_cast<T*>(p.v_cache)[blk * p.vc_b + slot * p.vc_t + h * p.vc_h + d] =
        static_cast<const T*>(p.v)[b * p.v_b + s * p.v_s + h * p.v_h + d];
  }
  return ok;
}

// cos / sin of pair e at position pos; NaN outside the tables (and no table memory read).
template <typename T>
__device__ __forceinline__ void rotary_row(const AppendParams& p, int64_t pos, int e, float& c, float& sn) {
  c = sn = __int_as_float(0x7fffffff);
  if (pos >= 0 && pos < p.max_pos) {
    const int64_t off = pos * p.s_cos + e;
    c = p.cos_f32 ? static_cast<const float*>(p.cos)[off] : to_float(static_cast<const T*>(p.cos)[off]);
    sn = p.cos_f32 ? static_cast<const float*>(p.sin)[off] : to_float(static_cast<const T*>(p.sin)[off]);
  }
}

// Head hh of token (b, s) of the append's rows (the Hq query heads, then the H key heads): where
// it is read (q or k) and where it goes (q_out, or the key's cache slot (blk, slot)).
template <typename T>
__device__ __forceinline__ void head_row(const AppendParams& p, int b, int s, int hh, int64_t blk, int64_t slot,
                                         const T*& x, T*& y) {
  if (hh < p.Hq) {
    x = static_cast<const T*>(p.q) + b * p.q_b + s * p.q_s + hh * p.q_h;
    y = static_cast<T*>(p.q_out) + b * p.qo_b + s * p.qo_s + hh * p.qo_h;
  } else {
    x = static_cast<const T*>(p.k) + b * p.k_b + s * p.k_s + (hh - p.Hq) * p.k_h;
    y = static_cast<T*>(p.k_cache) + blk * p.kc_b + slot * p.kc_t + (hh - p.Hq) * p.kc_h;
  }
}

template <typename T>
__global__ void __launch_bounds__(256) kv_append_rotary_kernel(const AppendParams p) {
  const int b = blockIdx.x / p.seqlen_new;
  const int s = blockIdx.x % p.seqlen_new;
  const int u = blockIdx.y * blockDim.x + threadIdx.x;  // this thread's unit and v element
  int64_t pos, blk, slot;
  const bool ok = append_row<T>(p, b, s, u, pos, blk, slot);
  const int per_head = p.D - p.half;  // half pairs + D - 2 half pass-through elements
  const int hh = u / per_head, e = u - hh * per_head;
  const bool is_q = hh < p.Hq;
  if (hh >= p.Hq + p.H || (!is_q && !ok)) return;
  const T* x;
  T* y;
  head_row<T>(p, b, s, hh, blk, slot, x, y);
  if (e >= p.half) {
    const int d = p.half + e;  // 2 half + (e - half)
    y[d] = x[d];
    return;
  }
  const int i1 = p.interleaved ? 2 * e : e, i2 = p.interleaved ? 2 * e + 1 : e + p.half;
  float c, sn;
  rotary_row<T>(p, pos, e, c, sn);
  const float x1 = to_float(x[i1]), x2 = to_float(x[i2]);
  y[i1] = from_float<T>(x1 * c - x2 * sn);
  y[i2] = from_float<T>(x2 * c + x1 * sn);
}

// The append with the q/k norms (Qwen3, Gemma 3): one warp per head (the Hq query heads, then the
// H key heads), kAppendWarps heads per CTA.  The warp sums x^2 over the head (warp_sum), then
// writes each element normalized, times w_offset + w, and rotated (pairs e < half) or passed
// through (dims >= 2 half; all of them without tables: half = 0).  The v copy is spread over the
// CTAs' threads as in kv_append_rotary_kernel.  The head's elements are read twice (the second time
// from L1): a decode step's few KiB, where latency, not bandwidth, is the cost.
constexpr int kAppendWarps = 8;

template <typename T>
__device__ __forceinline__ float norm_weight(const AppendParams& p, const void* w, int d) {
  return p.w_offset + (p.w_f32 ? static_cast<const float*>(w)[d] : to_float(static_cast<const T*>(w)[d]));
}

// 1 / sqrt(mean(x^2) + eps) over the D elements of head row x; called by a whole warp.
template <typename T>
__device__ __forceinline__ float head_rstd(const AppendParams& p, const T* x, int lane) {
  float ss = 0.f;
  for (int d = lane; d < p.D; d += 32) {
    const float t = to_float(x[d]);
    ss += t * t;
  }
  return rsqrtf(warp_sum(ss) / p.D + p.eps);
}

// Element d of head row x as the append kernels write it, in fp32 before the rounding to T:
// normalized (norm: times rstd and w_offset + w) and rotated at position pos (pairs of dims
// < 2 half), with the same operations in the same order.  The decode kernels' one-launch form
// (DecodeParams::new_kv) computes q and the new keys element by element with it.
template <typename T>
__device__ __forceinline__ float prepared(const AppendParams& p, bool norm, const T* x, const void* w, float rstd,
                                          int64_t pos, int d) {
  auto val = [&](int i) {
    const float t = to_float(x[i]);
    return norm ? t * rstd * norm_weight<T>(p, w, i) : t;
  };
  if (d >= 2 * p.half) return val(d);
  const int e = p.interleaved ? d >> 1 : (d < p.half ? d : d - p.half);
  const int i1 = p.interleaved ? 2 * e : e, i2 = p.interleaved ? 2 * e + 1 : e + p.half;
  float c, sn;
  rotary_row<T>(p, pos, e, c, sn);
  const float x1 = val(i1), x2 = val(i2);
  return d == i1 ? x1 * c - x2 * sn : x2 * c + x1 * sn;
}

template <typename T>
__global__ void __launch_bounds__(32 * kAppendWarps) kv_append_norm_kernel(const AppendParams p) {
  const int b = blockIdx.x / p.seqlen_new;
  const int s = blockIdx.x % p.seqlen_new;
  int64_t pos, blk, slot;
  const bool ok = append_row<T>(p, b, s, blockIdx.y * blockDim.x + threadIdx.x, pos, blk, slot);
  const int lane = threadIdx.x & 31;
  const int hh = blockIdx.y * kAppendWarps + threadIdx.x / 32;  // warp-uniform, as ok: whole warps leave
  const bool is_q = hh < p.Hq;
  if (hh >= p.Hq + p.H || (!is_q && !ok)) return;
  const T* x;
  T* y;
  head_row<T>(p, b, s, hh, blk, slot, x, y);
  const void* w = is_q ? p.q_w : p.k_w;
  const float rstd = head_rstd<T>(p, x, lane);
  for (int e = lane; e < p.half; e += 32) {
    const int i1 = p.interleaved ? 2 * e : e, i2 = p.interleaved ? 2 * e + 1 : e + p.half;
    float c, sn;
    rotary_row<T>(p, pos, e, c, sn);
    const float x1 = to_float(x[i1]) * rstd * norm_weight<T>(p, w, i1);
    const float x2 = to_float(x[i2]) * rstd * norm_weight<T>(p, w, i2);
    y[i1] = from_float<T>(x1 * c - x2 * sn);
    y[i2] = from_float<T>(x2 * c + x1 * sn);
  }
  for (int d = 2 * p.half + lane; d < p.D; d += 32)
    y[d] = from_float<T>(to_float(x[d]) * rstd * norm_weight<T>(p, w, d));
}

// ------------------------------------------------------------------------------------ decode
struct DecodeParams {
  const void* q;
  const void* k;
  const void* v;
  const int* seqlens;
  const int* leftpad;      // (batch,) each sequence's first key (cache_leftpad), or nullptr: 0
  const int* block_table;  // nullptr: contiguous layout
  void* out;
  float* o_part;    // (batch, seqlen_q, Hq, num_splits, D) when num_splits > 1
  float* lse_part;  // (batch, seqlen_q, Hq, num_splits), log2 domain
  int* sem;         // (batch, Hkv * n_mtiles) zeroed counters: fused combine (num_splits > 1), or nullptr
  int64_t q_b, q_s, q_h;  // q strides (unit stride in D)
  int64_t k_b, k_t, k_h;  // K cache strides: block|batch, slot|token, head
  int64_t v_b, v_t, v_h;
  int64_t o_b, o_s, o_h, o_d;
  int64_t bt_s;
  int seqlen_q, G, Hq, D, n_pages, capacity, page, page_shift, window, num_splits, n_mtiles;
  int seqlen_add;      // added to seqlens[b]: tokens appended by the launch just before (with_kv), else 0
  float qk_scale;      // softmax_scale * log2(e), or softmax_scale / softcap when softcap > 0
  float softcap_log2;  // softcap * log2(e); 0 = no softcap
  bool causal;
  // The one-launch form of decode_attention_with_kv_cuda: the decode appends the seqlen_q new
  // tokens itself (new_kv).  nk holds them (k, v, their strides, the cache to write, the rotary
  // tables and the q/k norm weights, as for the append kernels).  The cached keys end at
  // seqlens[b]; the last split also attends to the new tokens, prepared (normalized, rotated,
  // rounded to T) from nk.k / nk.v by every CTA of that split, and written to the cache by the
  // first row tile's CTA, which no other CTA reads them from.  q_prep: q is read raw from nk.q
  // and prepared the same way (norm: the q/k norms; nk.half > 0: the rotation), at positions
  // seqlens[b] + s.
  AppendParams nk;
  bool new_kv, q_prep, norm;
};

// Where token `tok` of sequence b lives: (block|batch index, slot|token index); false if it must
// not be read (outside [0, hi) or an invalid block id).
__device__ __forceinline__ bool locate(const DecodeParams& p, int b, int tok, int hi, int& blk, int& slot) {
  if (tok < 0 || tok >= hi) return false;
  if (p.block_table == nullptr) {
    blk = b;
    slot = tok;
    return true;
  }
  const int bi = p.page_shift >= 0 ? (tok >> p.page_shift) : tok / p.page;
  slot = tok - bi * p.page;
  blk = __ldg(p.block_table + b * p.bt_s + bi);
  return blk >= 0 && blk < p.n_pages;
}

// The visible keys [lo, hi) of sequence b and this CTA's share of them, in 16-token steps
// counted from lo rounded down to a multiple of 16.
struct SplitRange {
  int L, hi, lo, base, step0, step1;
};

__device__ __forceinline__ SplitRange split_range(const DecodeParams& p, int b, int split) {
  SplitRange r;
  const int64_t L = static_cast<int64_t>(p.seqlens[b]) + p.seqlen_add;
  r.L = L < 0 ? 0 : (L > p.capacity ? p.capacity : static_cast<int>(L));
  // (new_kv: the cache holds the keys before the new tokens; those come from registers)
  r.hi = p.new_kv ? max(0, min(p.seqlens[b], r.L)) : r.L;
  int lo = p.window >= 0 ? max(0, r.L - p.seqlen_q - p.window) : 0;
  if (p.leftpad != nullptr) lo = max(lo, min(p.leftpad[b], r.L));  // a left-padded prompt's padding
  r.lo = lo;
  r.base = lo & ~(kStep - 1);
  const int n_steps = max(0, (r.hi - r.base + kStep - 1) / kStep);
  const int per = (n_steps + p.num_splits - 1) / p.num_splits;
  r.step0 = split * per;
  r.step1 = min(r.step0 + per, n_steps);
  return r;
}

// tanh accurate to a few ulp even under --use_fast_math (which turns tanhf into tanh.approx, ~1e-3
// relative error): an odd Taylor polynomial near 0, (1 - e^-2a) / (1 + e^-2a) elsewhere.
__device__ __forceinline__ float tanh_accurate(float x) {
  const float a = fabsf(x);
  float t;
  if (a < 0.5f) {
    const float x2 = a * a;
    t = a * (1.f + x2 * (-0.33333333f + x2 * (0.13333333f + x2 * (-0.053968254f + x2 * (0.021869489f + x2 * (
                   -0.0088632355f + x2 * (0.0035921280f + x2 * -0.0014558344f)))))));
  } else {
    const float e = exp2f(-2.885390081777927f * a);  // e^(-2a)
    t = (1.f - e) / (1.f + e);
  }
  return copysignf(t, x);
}

__device__ __forceinline__ float score(const DecodeParams& p, float qk) {
  return p.softcap_log2 > 0.f ? p.softcap_log2 * tanh_accurate(qk * p.qk_scale) : qk * p.qk_scale;
}

__device__ __forceinline__ bool visible(const DecodeParams& p, int tok, int pos) {
  return (!p.causal || tok <= pos) && (p.window < 0 || tok >= pos - p.window);
}

template <typename T>
__device__ __forceinline__ void store_out(const DecodeParams& p, int b, int s, int h, int d, float val) {
  static_cast<T*>(p.out)[b * p.o_b + s * p.o_s + h * p.o_h + d * p.o_d] = from_float<T>(val);
}

// ---- the one-launch form (DecodeParams::new_kv)
// Raw head rows: q head h of query s, the new key / value j of KV head hkv, of sequence b.
template <typename T>
__device__ __forceinline__ const T* raw_q_row(const DecodeParams& p, int b, int s, int h) {
  return static_cast<const T*>(p.nk.q) + b * p.nk.q_b + s * p.nk.q_s + h * p.nk.q_h;
}
template <typename T>
__device__ __forceinline__ const T* new_k_row(const DecodeParams& p, int b, int j, int hkv) {
  return static_cast<const T*>(p.nk.k) + b * p.nk.k_b + j * p.nk.k_s + hkv * p.nk.k_h;
}
template <typename T>
__device__ __forceinline__ const T* new_v_row(const DecodeParams& p, int b, int j, int hkv) {
  return static_cast<const T*>(p.nk.v) + b * p.nk.v_b + j * p.nk.v_s + hkv * p.nk.v_h;
}

// Writes element d of new token j of sequence b (KV head hkv) to the cache, if its row exists.
template <typename T>
__device__ __forceinline__ void write_new(const DecodeParams& p, int b, int j, int hkv, int d, T kval, T vval) {
  int64_t blk, slot;
  if (!cache_slot(p.nk, b, static_cast<int64_t>(p.seqlens[b]) + j, blk, slot)) return;
  static_cast<T*>(p.nk.k_cache)[blk * p.nk.kc_b + slot * p.nk.kc_t + hkv * p.nk.kc_h + d] = kval;
  static_cast<T*>(p.nk.v_cache)[blk * p.nk.vc_b + slot * p.nk.vc_t + hkv * p.nk.vc_h + d] = vval;
}

// Whether new token j of sequence b (position seqlens[b] + j) may be attended to: its cache row
// exists (else the two-launch form would not have appended it either) and it is at or past lo.
__device__ __forceinline__ bool new_visible(const DecodeParams& p, int b, int j, int lo) {
  int64_t blk, slot;
  const int64_t pos = static_cast<int64_t>(p.seqlens[b]) + j;
  return pos >= lo && cache_slot(p.nk, b, pos, blk, slot);
}


// D (16x8, fp32) += A (16x16, row) * B (16x8, col).  (The emulator defines its own.)
#ifndef FASTLM_HOST_EMU
template <typename T>
__device__ __forceinline__ void mma16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1);
template <>
__device__ __forceinline__ void mma16816<__half>(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
template <>
__device__ __forceinline__ void mma16816<__nv_bfloat16>(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                                        uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
#endif

__device__ __forceinline__ void ldg16(uint32_t (&w)[4], const void* ptr) {
  const uint4 x = __ldg(reinterpret_cast<const uint4*>(ptr));
  w[0] = x.x;
  w[1] = x.y;
  w[2] = x.z;
  w[3] = x.w;
}

// V chunks g + 8m of the 4 tokens of a thread (zeros where not loadable).
template <typename T, int VM>
__device__ __forceinline__ void load_v_chunks(uint32_t (&vw)[4][VM][4], const bool (&vok)[4], const T* const (&vp)[4],
                                              int g, int D) {
#pragma unroll
  for (int u = 0; u < 4; ++u) {
#pragma unroll
    for (int mm = 0; mm < VM; ++mm) {
      const int c = g + 8 * mm;
      if (vok[u] && 8 * c < D) {
        ldg16(vw[u][mm], vp[u] + 8 * c);
      } else {
        vw[u][mm][0] = vw[u][mm][1] = vw[u][mm][2] = vw[u][mm][3] = 0u;
      }
    }
  }
}

constexpr int kMergeUnroll = 8;  // splits whose partials are loaded together (combine_kernel, merge_tile)
// The fused combine merges in one CTA what combine_kernel spreads over one CTA per row: above
// this many bytes of partials per tile (rows x head_dim x splits x 4), the separate kernel is
// used.  At batch 1 with 8 KV heads (33 splits on an H100) a Llama tile of 4 rows reads 34 KiB
// (head_dim 64) or 68 KiB (128); MQA's 16-row tiles at 128 splits would read 1 MiB.  (A first
// guess, to be set from bench_decode's decode_step rows on a GPU.)
constexpr int64_t kMaxFusedMergeBytes = 128 * 1024;

// Fused combine (decode_attention_with_kv_cuda, num_splits > 1): after writing its partials,
// each CTA takes a ticket from the counter of its (batch, kv head, row tile) -- its threads'
// writes fenced to device scope first, then one thread's atomicAdd (the pattern of a grid-wide
// reduction); the CTA that draws the last ticket merges the splits of its rows, which saves the
// combine launch.  The merge: 8 threads per row (16 rows x 8 = 128) reduce the max and the sum
// of the splits' weights 2^(lse_i - max) into s_w (normalized); then every (row, 4-column) item
// of the tile sums its splits' partials, kMergeUnroll splits' 16-byte loads at a time.  Reads
// with .cg (L2): the other CTAs wrote these, and a stale L1 line must not answer.
template <typename T>
__device__ void merge_tile(const DecodeParams& p, int b, int hkv, int mtile) {
  __shared__ float s_w[kRows][kMaxSplits];
  static_assert(kThreads == 8 * kRows, "8 threads per row");
  const int NS = p.num_splits, tid = threadIdx.x;
  const int rows = min(kRows, p.seqlen_q * p.G - mtile * kRows);
  auto prow_of = [&](int r) {
    const int R = mtile * kRows + r;
    return ((static_cast<int64_t>(b) * p.seqlen_q + R / p.G) * p.Hq + hkv * p.G + R % p.G) * NS;
  };
  {
    const int r = tid >> 3, j = tid & 7;
    const bool ok = r < rows;
    const float* lse = p.lse_part + (ok ? prow_of(r) : 0);
    float M = -INFINITY;
    for (int i = j; ok && i < NS; i += 8) M = fmaxf(M, __ldcg(lse + i));
#pragma unroll
    for (int o = 1; o < 8; o <<= 1) M = fmaxf(M, __shfl_xor_sync(0xffffffffu, M, o));
    const float Ms = M == -INFINITY ? 0.f : M;  // no split saw a key: every weight is 0
    float den = 0.f;
    for (int i = j; ok && i < NS; i += 8) {
      const float w = exp2f(__ldcg(lse + i) - Ms);
      s_w[r][i] = w;
      den += w;
    }
#pragma unroll
    for (int o = 1; o < 8; o <<= 1) den += __shfl_xor_sync(0xffffffffu, den, o);
    const float inv = den != 0.f ? 1.f / den : 0.f;
    for (int i = j; ok && i < NS; i += 8) s_w[r][i] *= inv;
  }
  __syncthreads();
  const int vec = (p.D & 3) == 0 ? 4 : 1;  // o_part rows are D floats: 16-byte aligned when D % 4 == 0
  const int cols = p.D / vec;
  for (int it = tid; it < rows * cols; it += kThreads) {
    const int r = it / cols, c = (it - r * cols) * vec;
    const int64_t prow = prow_of(r);
    const float* o = p.o_part + prow * p.D + c;
    float acc[4] = {0.f, 0.f, 0.f, 0.f};
    if (vec == 4) {
      for (int i0 = 0; i0 < NS; i0 += kMergeUnroll) {
        float4 x[kMergeUnroll];
#pragma unroll
        for (int u = 0; u < kMergeUnroll; ++u)
          x[u] = i0 + u < NS ? __ldcg(reinterpret_cast<const float4*>(o + static_cast<int64_t>(i0 + u) * p.D))
                             : make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll
        for (int u = 0; u < kMergeUnroll; ++u) {
          if (i0 + u >= NS) break;
          const float w = s_w[r][i0 + u];
          acc[0] += w * x[u].x;
          acc[1] += w * x[u].y;
          acc[2] += w * x[u].z;
          acc[3] += w * x[u].w;
        }
      }
    } else {
      for (int i = 0; i < NS; ++i) acc[0] += s_w[r][i] * __ldcg(o + static_cast<int64_t>(i) * p.D);
    }
    const int R = mtile * kRows + r;
#pragma unroll
    for (int e = 0; e < 4; ++e)  // (static indices: acc stays in registers)
      if (e < vec) store_out<T>(p, b, R / p.G, hkv * p.G + R % p.G, c + e, acc[e]);
  }
}

// Called by every thread of a decode CTA after its partials are written.
template <typename T>
__device__ __forceinline__ void fused_combine(const DecodeParams& p, int b, int hkv, int mtile) {
  if (p.sem == nullptr) return;  // (uniform) a combine_kernel launch follows instead
  __shared__ int s_ticket;
  __threadfence();  // this thread's partials, visible device-wide before the ticket is drawn
  __syncthreads();
  if (threadIdx.x == 0) s_ticket = atomicAdd(p.sem + static_cast<int64_t>(b) * gridDim.y + blockIdx.y, 1);
  __syncthreads();
  if (s_ticket != p.num_splits - 1) return;  // (uniform) not the last split of this tile
  __threadfence();
  merge_tile<T>(p, b, hkv, mtile);
  // Every CTA of the tile has drawn its ticket: the counter goes back to 0 for the next launch,
  // so counters kept between calls (a workspace) never need zeroing.
  if (threadIdx.x == 0) p.sem[static_cast<int64_t>(b) * gridDim.y + blockIdx.y] = 0;
}

// Tensor-core decode.  DP: head_dim padded to a multiple of 64 (64, 128, 192, 256).  NEW_KV:
// p.new_kv (a separate instantiation: the plain decode keeps its registers).  At DP 64, 5 CTAs
// per SM (<= 102 registers): the main loop takes 96, and without the bound ptxas gave the NEW_KV
// form 120-128 (its new-token pass scheduled for ILP it does not need).  (A min-blocks of 1
// instead of none changes ptxas's choices at the larger DPs: 0 keeps them.)
template <typename T, int DP, bool NEW_KV = false>
__global__ void __launch_bounds__(kThreads, DP == 64 ? 5 : 0) decode_tc_kernel(const DecodeParams p) {
  constexpr int KCH = DP / 32;     // 16-byte K chunks per thread per key (4 threads share a key)
  constexpr int KSTEPS = DP / 16;  // QK mma k-steps
  constexpr int VM = DP / 64;      // 16-byte V chunks per thread per token (chunk g + 8m)
  constexpr int NT = 8 * VM;       // PV n-tiles of 8 output dims
  constexpr bool kLateV = DP > 128;  // load V after QK to bound registers at large head_dim
  __shared__ __align__(16) uint32_t s_q[KSTEPS][32][4];  // Q A-fragments, in fragment order
  __shared__ float s_o[kRows][DP + 4];
  __shared__ float s_m[kWarps][kRows], s_l[kWarps][kRows];
  __shared__ float s_M[kRows], s_L[kRows];

  const int split = blockIdx.x;
  const int hkv = blockIdx.y / p.n_mtiles, mtile = blockIdx.y % p.n_mtiles;
  const int b = blockIdx.z;
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, tq = lane & 3;
  const int n_rows = p.seqlen_q * p.G;
  const T* __restrict__ q = static_cast<const T*>(p.q);
  const T* __restrict__ kc = static_cast<const T*>(p.k) + hkv * p.k_h;
  const T* __restrict__ vc = static_cast<const T*>(p.v) + hkv * p.v_h;

  const SplitRange sr = split_range(p, b, split);
  const bool last = NEW_KV && split == p.num_splits - 1;  // (uniform) this CTA attends to the new tokens
  __shared__ float s_rstd[2 * kRows];  // norm: 1 / rms of the tile's q rows, then of the new keys
  const bool norm = NEW_KV && p.norm;
  if (norm) {
    for (int r = warp; r < 2 * kRows; r += kWarps) {  // (warp-uniform)
      const int R = mtile * kRows + r;
      if (r < kRows && R < n_rows) {
        s_rstd[r] = head_rstd<T>(p.nk, raw_q_row<T>(p, b, R / p.G, hkv * p.G + R % p.G), lane);
      } else if (r >= kRows && last && r - kRows < p.seqlen_q) {
        s_rstd[r] = head_rstd<T>(p.nk, new_k_row<T>(p, b, r - kRows, hkv), lane);
      }
    }
    __syncthreads();
  }

  // Where the keys are: contiguous caches, or pages of whole 16-key steps (page % 16 == 0;
  // run_decode gives other page sizes to decode_simple_kernel).  A step's keys then share one
  // block and sit at consecutive slots; the warp loads the block id of its next step while this
  // one's K/V loads are in flight, so those never wait for a block-table load (the first one is
  // loaded here, beside q).
  const bool paged = p.block_table != nullptr;
  auto block_of = [&](int tok) { return __ldg(p.block_table + b * p.bt_s + tok / p.page); };
  int next_blk = paged && sr.step0 + warp < sr.step1 ? block_of(sr.base + (sr.step0 + warp) * kStep)
                                                     : b;  // (contiguous: the sequence's own row)
  // Q fragments: register r of k-step ks of lane (rg, rt) holds Q[row][d0], Q[row][d0 + 1] with
  // row = rg + 8 * (r & 1) and d0 the head-dim pair that K's B fragment holds (same permutation).
  // Thread tid fills entry (lane tid / 4, register tid % 4) of every k-step: one query row, KSTEPS
  // pairs of it, all loaded before any is stored (a load-store loop waited for each load in turn:
  // KSTEPS dependent round trips before the first key).
  static_assert(kThreads == 32 * 4, "one Q fragment entry per thread and k-step");
  {
    const int ln = tid >> 2, r = tid & 3;
    const int row = (ln >> 2) + 8 * (r & 1), pr = r >> 1;
    const int R = mtile * kRows + row;
    const bool row_ok = R < n_rows;
    const int s = row_ok ? R / p.G : 0, h = hkv * p.G + (row_ok ? R % p.G : 0);
    uint32_t val[KSTEPS];
    if (NEW_KV && p.q_prep) {  // (D % 8 == 0 here: d0 + 1 < D)
      const T* x = raw_q_row<T>(p, b, s, h);
      const int64_t pos = static_cast<int64_t>(p.seqlens[b]) + s;
      const float rs = norm ? s_rstd[row] : 0.f;
#pragma unroll
      for (int ks = 0; ks < KSTEPS; ++ks) {
        const int d0 = 8 * ((ln & 3) + 4 * (ks >> 1)) + 2 * (2 * (ks & 1) + pr);
        val[ks] = row_ok && d0 < p.D ? pack2<T>(prepared<T>(p.nk, norm, x, p.nk.q_w, rs, pos, d0),
                                                prepared<T>(p.nk, norm, x, p.nk.q_w, rs, pos, d0 + 1))
                                     : 0u;
      }
    } else {
      const T* qrow = q + b * p.q_b + s * p.q_s + h * p.q_h;
#pragma unroll
      for (int ks = 0; ks < KSTEPS; ++ks) {
        const int d0 = 8 * ((ln & 3) + 4 * (ks >> 1)) + 2 * (2 * (ks & 1) + pr);
        val[ks] = row_ok && d0 < p.D ? *reinterpret_cast<const uint32_t*>(qrow + d0) : 0u;
      }
    }
#pragma unroll
    for (int ks = 0; ks < KSTEPS; ++ks) s_q[ks][ln][r] = val[ks];
  }

  // The last split's new keys and values, prepared and rounded to T, [kRows][DP] each, in s_o's
  // storage (2 x 16 x DP x 2 bytes <= 16 x (DP + 4) x 4: free until the warps merge); the first
  // row tile's CTA appends them to the cache.
  T* const s_kn = reinterpret_cast<T*>(&s_o[0][0]);
  T* const s_vn = s_kn + kRows * DP;
  if (last) {
    for (int idx = tid; idx < p.seqlen_q * p.D; idx += kThreads) {
      const int j = idx / p.D, d = idx - j * p.D;
      const int64_t pos = static_cast<int64_t>(p.seqlens[b]) + j;
      const T kt = from_float<T>(prepared<T>(p.nk, norm, new_k_row<T>(p, b, j, hkv), p.nk.k_w,
                                             norm ? s_rstd[kRows + j] : 0.f, pos, d));
      const T vt = new_v_row<T>(p, b, j, hkv)[d];
      s_kn[j * DP + d] = kt;
      s_vn[j * DP + d] = vt;
      if (mtile == 0) write_new<T>(p, b, j, hkv, d, kt, vt);
    }
  }
  // Query positions of this thread's two accumulator rows (g and g + 8).
  const int pos0 = sr.L - p.seqlen_q + (mtile * kRows + g) / p.G;
  const int pos1 = sr.L - p.seqlen_q + (mtile * kRows + g + 8) / p.G;

  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};
  float o[NT][4];
#pragma unroll
  for (int j = 0; j < NT; ++j) o[j][0] = o[j][1] = o[j][2] = o[j][3] = 0.f;
  __syncthreads();

  for (int st = sr.step0 + warp; st < sr.step1; st += kWarps) {
    const int base = sr.base + st * kStep;
    const int blk = next_blk;
    if (paged && st + kWarps < sr.step1) next_blk = block_of(base + kWarps * kStep);
    const bool blk_ok = blk >= 0 && blk < p.n_pages;  // (a freed sequence's -1, an id out of range: never read)
    const int slot0 = paged ? base % p.page : base;  // key base + i: slot slot0 + i of block blk
    const T* const kstep = kc + blk_ok * (blk * p.k_b + slot0 * p.k_t);
    const T* const vstep = vc + blk_ok * (blk * p.v_b + slot0 * p.v_t);
    // K: keys base + 8t + g, chunks tq + 4i.
    uint32_t kw[2][KCH][4];
#pragma unroll
    for (int t = 0; t < 2; ++t) {
      const int i_key = 8 * t + g;
      const bool ok = blk_ok && base + i_key < sr.hi;
      const T* kp = kstep + i_key * p.k_t;
#pragma unroll
      for (int i = 0; i < KCH; ++i) {
        const int c = tq + 4 * i;
        if (ok && 8 * c < p.D) {
          ldg16(kw[t][i], kp + 8 * c);
        } else {
          kw[t][i][0] = kw[t][i][1] = kw[t][i][2] = kw[t][i][3] = 0u;
        }
      }
    }
    // V: tokens base + 2tq + {0, 1, 8, 9} (u = (u & 1) + 2 * (u >> 1) in that order), chunks g + 8m.
    // These are also the key columns of this thread's S accumulators: vok masks them.
    uint32_t vw[4][VM][4];
    bool vok[4];
    const T* vp[4];
#pragma unroll
    for (int u = 0; u < 4; ++u) {
      const int i_key = 2 * tq + (u & 1) + 8 * (u >> 1), tok = base + i_key;
      // Tokens before the window's first key (base is lo rounded down) get P = 0, but their
      // V must not be read either: a reused block could hold NaN/Inf, and 0 * NaN = NaN.
      vok[u] = blk_ok && tok < sr.hi && tok >= sr.lo;
      vp[u] = vstep + i_key * p.v_t;
    }
    if (!kLateV) load_v_chunks<T, VM>(vw, vok, vp, g, p.D);

    // S = Q K^T for keys base .. base + 15 (n-tiles t = 0, 1).
    float sacc[2][4];
#pragma unroll
    for (int t = 0; t < 2; ++t) sacc[t][0] = sacc[t][1] = sacc[t][2] = sacc[t][3] = 0.f;
#pragma unroll
    for (int ks = 0; ks < KSTEPS; ++ks) {
      const uint4 a4 = *reinterpret_cast<const uint4*>(&s_q[ks][lane][0]);
      const uint32_t a[4] = {a4.x, a4.y, a4.z, a4.w};
#pragma unroll
      for (int t = 0; t < 2; ++t) mma16816<T>(sacc[t], a, kw[t][ks >> 1][2 * (ks & 1)], kw[t][ks >> 1][2 * (ks & 1) + 1]);
    }
    if (kLateV) load_v_chunks<T, VM>(vw, vok, vp, g, p.D);

    // Scores (log2 domain), masks, online softmax.  Accumulator e of n-tile t: row g + 8 * (e >> 1),
    // key base + 8t + 2tq + (e & 1), i.e. V token u = 2t + (e & 1).
    float sc[2][4];
#pragma unroll
    for (int t = 0; t < 2; ++t) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int tok = base + 8 * t + 2 * tq + (e & 1);
        const bool vis = vok[2 * t + (e & 1)] && visible(p, tok, e < 2 ? pos0 : pos1);
        sc[t][e] = vis ? score(p, sacc[t][e]) : -INFINITY;
      }
    }
    float mx[2] = {fmaxf(fmaxf(sc[0][0], sc[0][1]), fmaxf(sc[1][0], sc[1][1])),
                   fmaxf(fmaxf(sc[0][2], sc[0][3]), fmaxf(sc[1][2], sc[1][3]))};
    float alpha[2], msafe[2];
    online_max_step(mx, m, alpha, msafe);
    float pr[2][4];
#pragma unroll
    for (int t = 0; t < 2; ++t) {
#pragma unroll
      for (int e = 0; e < 4; ++e) pr[t][e] = exp2f(sc[t][e] - msafe[e >> 1]);
    }
    l[0] = l[0] * alpha[0] + (pr[0][0] + pr[0][1] + pr[1][0] + pr[1][1]);
    l[1] = l[1] * alpha[1] + (pr[0][2] + pr[0][3] + pr[1][2] + pr[1][3]);
#pragma unroll
    for (int j = 0; j < NT; ++j) {
      o[j][0] *= alpha[0];
      o[j][1] *= alpha[0];
      o[j][2] *= alpha[1];
      o[j][3] *= alpha[1];
    }
    // P as the A fragment (rows g / g + 8, keys 2tq.. and 8 + 2tq..).
    const uint32_t pa[4] = {pack2<T>(pr[0][0], pr[0][1]), pack2<T>(pr[0][2], pr[0][3]), pack2<T>(pr[1][0], pr[1][1]),
                            pack2<T>(pr[1][2], pr[1][3])};
    // O += P V.  n-tile j = 8mm + 2k + hh, column g <-> output dim 8 * (g + 8mm) + 2k + hh.
#pragma unroll
    for (int mm = 0; mm < VM; ++mm) {
#pragma unroll
      for (int k = 0; k < 4; ++k) {
#pragma unroll
        for (int hh = 0; hh < 2; ++hh) {
          const uint32_t sel = hh ? 0x7632u : 0x5410u;
          const uint32_t b0 = __byte_perm(vw[0][mm][k], vw[1][mm][k], sel);
          const uint32_t b1 = __byte_perm(vw[2][mm][k], vw[3][mm][k], sel);
          mma16816<T>(o[8 * mm + 2 * k + hh], pa, b0, b1);
        }
      }
    }
  }

  // The new tokens (last split, new_kv), one at a time, by the warp with the fewest steps: the
  // scores of rows g and g + 8 from this thread's Q fragment dims against the key in shared
  // memory, summed over the quad; fp32 products (no mma); the quad's tq == 0 thread carries the
  // row sum, as the quad's partial sums are added below.
  if (last && warp == max(0, sr.step1 - sr.step0) % kWarps) {
    for (int j = 0; j < p.seqlen_q; ++j) {
      const T* kn = s_kn + j * DP;
      const T* vn = s_vn + j * DP;
      float dot[2] = {0.f, 0.f};
#pragma unroll
      for (int ks = 0; ks < KSTEPS; ++ks) {
#pragma unroll
        for (int pr = 0; pr < 2; ++pr) {
          const int d0 = 8 * (tq + 4 * (ks >> 1)) + 2 * (2 * (ks & 1) + pr);
          if (d0 >= p.D) continue;
          const float k0 = to_float(kn[d0]), k1 = to_float(kn[d0 + 1]);
#pragma unroll
          for (int r = 0; r < 2; ++r) {  // register 2 pr + r: row g + 8 r, dims d0, d0 + 1
            const T* qq = reinterpret_cast<const T*>(&s_q[ks][lane][2 * pr + r]);
            dot[r] += to_float(qq[0]) * k0 + to_float(qq[1]) * k1;
          }
        }
      }
      const int tok = p.seqlens[b] + j;
      const bool ok = new_visible(p, b, j, sr.lo);
      bool vis[2];
      float alpha[2], pw[2];
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        dot[r] += __shfl_xor_sync(0xffffffffu, dot[r], 1);
        dot[r] += __shfl_xor_sync(0xffffffffu, dot[r], 2);
        vis[r] = ok && visible(p, tok, r ? pos1 : pos0);
        const float sc = vis[r] ? score(p, dot[r]) : -INFINITY;
        const float mn = fmaxf(m[r], sc);
        const float ms = mn == -INFINITY ? 0.f : mn;
        alpha[r] = exp2f(m[r] - ms);
        pw[r] = exp2f(sc - ms);
        m[r] = mn;
        l[r] = l[r] * alpha[r] + (tq == 0 ? pw[r] : 0.f);
      }
#pragma unroll
      for (int mm = 0; mm < VM; ++mm) {
#pragma unroll
        for (int e = 0; e < 8; ++e) {  // accumulators as in the merge below: dims d0 and d0 + 8
          const int jj = 8 * mm + e, d0 = 8 * (2 * tq + 8 * mm) + e;
          const float v0 = d0 < p.D ? to_float(vn[d0]) : 0.f, v1 = d0 + 8 < p.D ? to_float(vn[d0 + 8]) : 0.f;
          o[jj][0] = o[jj][0] * alpha[0] + (vis[0] ? pw[0] * v0 : 0.f);
          o[jj][1] = o[jj][1] * alpha[0] + (vis[0] ? pw[0] * v1 : 0.f);
          o[jj][2] = o[jj][2] * alpha[1] + (vis[1] ? pw[1] * v0 : 0.f);
          o[jj][3] = o[jj][3] * alpha[1] + (vis[1] ? pw[1] * v1 : 0.f);
        }
      }
    }
  }

  // Merge the 4 warps: row sums over the quad, then max / rescale / sum through shared memory.
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    l[r] += __shfl_xor_sync(0xffffffffu, l[r], 1);
    l[r] += __shfl_xor_sync(0xffffffffu, l[r], 2);
  }
  if (tq == 0) {
    s_m[warp][g] = m[0];
    s_m[warp][g + 8] = m[1];
    s_l[warp][g] = l[0];
    s_l[warp][g + 8] = l[1];
  }
  __syncthreads();
  float f[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int row = g + 8 * r;
    float M = -INFINITY;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) M = fmaxf(M, s_m[w][row]);
    const float Ms = M == -INFINITY ? 0.f : M;
    f[r] = exp2f(m[r] - Ms);
    if (warp == 0 && tq == 0) {
      float Lsum = 0.f;
#pragma unroll
      for (int w = 0; w < kWarps; ++w) Lsum += s_l[w][row] * exp2f(s_m[w][row] - Ms);
      s_M[row] = M;
      s_L[row] = Lsum;
    }
  }
#pragma unroll
  for (int w = 0; w < kWarps; ++w) {
    if (warp == w) {
#pragma unroll
      for (int mm = 0; mm < VM; ++mm) {
#pragma unroll
        for (int e = 0; e < 8; ++e) {
          const int j = 8 * mm + e;
          const int d0 = 8 * (2 * tq + 8 * mm) + e, d1 = d0 + 8;
          if (w == 0) {
            s_o[g][d0] = o[j][0] * f[0];
            s_o[g][d1] = o[j][1] * f[0];
            s_o[g + 8][d0] = o[j][2] * f[1];
            s_o[g + 8][d1] = o[j][3] * f[1];
          } else {
            s_o[g][d0] += o[j][0] * f[0];
            s_o[g][d1] += o[j][1] * f[0];
            s_o[g + 8][d0] += o[j][2] * f[1];
            s_o[g + 8][d1] += o[j][3] * f[1];
          }
        }
      }
    }
    __syncthreads();
  }

  for (int idx = tid; idx < kRows * p.D; idx += kThreads) {
    const int r = idx / p.D, d = idx - r * p.D;
    const int R = mtile * kRows + r;
    if (R >= n_rows) break;  // rows are in order: the rest are padding too
    const int s = R / p.G, h = hkv * p.G + R % p.G;
    const float Lr = s_L[r];
    const float val = Lr != 0.f ? s_o[r][d] / Lr : 0.f;
    if (p.num_splits == 1) {
      store_out<T>(p, b, s, h, d, val);
    } else {
      const int64_t prow = ((static_cast<int64_t>(b) * p.seqlen_q + s) * p.Hq + h) * p.num_splits + split;
      p.o_part[prow * p.D + d] = val;
      if (d == 0) p.lse_part[prow] = Lr != 0.f ? s_M[r] + log2f(Lr) : -INFINITY;
    }
  }
  fused_combine<T>(p, b, hkv, mtile);
}

// CUDA-core decode for every dtype and head_dim <= 256 (the fallback): warp w owns tile rows
// w, w + 4, w + 8, w + 12; lanes split head_dim (NV elements each); one key at a time.
template <typename T, int NV, bool NEW_KV = false>
__global__ void __launch_bounds__(kThreads) decode_simple_kernel(const DecodeParams p) {
  constexpr int RPW = kRows / kWarps;  // rows per warp
  const int split = blockIdx.x;
  const int hkv = blockIdx.y / p.n_mtiles, mtile = blockIdx.y % p.n_mtiles;
  const int b = blockIdx.z;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int n_rows = p.seqlen_q * p.G;
  const T* __restrict__ q = static_cast<const T*>(p.q);
  const T* __restrict__ kc = static_cast<const T*>(p.k) + hkv * p.k_h;
  const T* __restrict__ vc = static_cast<const T*>(p.v) + hkv * p.v_h;
  const SplitRange sr = split_range(p, b, split);
  const bool q_prep = NEW_KV && p.q_prep, norm = NEW_KV && p.norm;

  float qv[RPW][NV], acc[RPW][NV], m[RPW], l[RPW];
  int pos[RPW];
#pragma unroll
  for (int i = 0; i < RPW; ++i) {
    const int R = mtile * kRows + warp + kWarps * i;
    const bool ok = R < n_rows;  // (warp-uniform)
    const int s = ok ? R / p.G : 0, h = hkv * p.G + (ok ? R % p.G : 0);
    pos[i] = sr.L - p.seqlen_q + s;
    m[i] = -INFINITY;
    l[i] = 0.f;
    const T* x = q_prep ? raw_q_row<T>(p, b, s, h) : nullptr;
    const float rs = q_prep && norm && ok ? head_rstd<T>(p.nk, x, lane) : 0.f;
#pragma unroll
    for (int j = 0; j < NV; ++j) {
      const int d = lane + 32 * j;
      const bool in = ok && d < p.D;
      if (q_prep) {
        const int64_t qpos = static_cast<int64_t>(p.seqlens[b]) + s;  // (rounded to T, as the append stores q)
        qv[i][j] = in ? to_float(from_float<T>(prepared<T>(p.nk, norm, x, p.nk.q_w, rs, qpos, d))) : 0.f;
      } else {
        qv[i][j] = in ? to_float(q[b * p.q_b + s * p.q_s + h * p.q_h + d]) : 0.f;
      }
      acc[i][j] = 0.f;
    }
  }
  // Key `tok` (its elements d = lane + 32 j in kv, vv) into every visible row's online softmax.
  auto attend = [&](int tok, const float (&kv)[NV], const float (&vv)[NV]) {
#pragma unroll
    for (int i = 0; i < RPW; ++i) {
      float dot = 0.f;
#pragma unroll
      for (int j = 0; j < NV; ++j) dot += qv[i][j] * kv[j];
      dot = warp_sum(dot);
      if (!visible(p, tok, pos[i])) continue;  // uniform across the warp
      const float sc = score(p, dot);
      const float mn = fmaxf(m[i], sc);
      const float alpha = exp2f(m[i] - mn), pw = exp2f(sc - mn);
      l[i] = l[i] * alpha + pw;
#pragma unroll
      for (int j = 0; j < NV; ++j) acc[i][j] = acc[i][j] * alpha + pw * vv[j];
      m[i] = mn;
    }
  };
  // (base is lo rounded down: the tokens before lo are the window's or the padding's, never seen)
  const int t0 = max(sr.base + sr.step0 * kStep, sr.lo), t1 = min(sr.base + sr.step1 * kStep, sr.hi);
  for (int tok = t0; tok < t1; ++tok) {
    int blk = 0, slot = 0;
    if (!locate(p, b, tok, sr.hi, blk, slot)) continue;  // warp-uniform
    const T* kp = kc + blk * p.k_b + slot * p.k_t;
    const T* vp = vc + blk * p.v_b + slot * p.v_t;
    float kv[NV], vv[NV];
#pragma unroll
    for (int j = 0; j < NV; ++j) {
      const int d = lane + 32 * j;
      kv[j] = d < p.D ? to_float(kp[d]) : 0.f;
      vv[j] = d < p.D ? to_float(vp[d]) : 0.f;
    }
    attend(tok, kv, vv);
  }
  // The new tokens (last split, new_kv): every warp prepares them itself (a few KiB, L1-resident);
  // warp 0 of the first row tile's CTA appends them to the cache.
  if (NEW_KV && split == p.num_splits - 1) {
    for (int jn = 0; jn < p.seqlen_q; ++jn) {
      const T* xk = new_k_row<T>(p, b, jn, hkv);
      const T* xv = new_v_row<T>(p, b, jn, hkv);
      const float rs = norm ? head_rstd<T>(p.nk, xk, lane) : 0.f;
      float kv[NV], vv[NV];
#pragma unroll
      for (int j = 0; j < NV; ++j) {
        const int d = lane + 32 * j;
        kv[j] = vv[j] = 0.f;
        if (d >= p.D) continue;
        const T kt = from_float<T>(prepared<T>(p.nk, norm, xk, p.nk.k_w, rs, static_cast<int64_t>(p.seqlens[b]) + jn, d));
        const T vt = xv[d];
        kv[j] = to_float(kt);
        vv[j] = to_float(vt);
        if (mtile == 0 && warp == 0) write_new<T>(p, b, jn, hkv, d, kt, vt);
      }
      if (new_visible(p, b, jn, sr.lo)) attend(p.seqlens[b] + jn, kv, vv);  // (warp-uniform)
    }
  }
#pragma unroll
  for (int i = 0; i < RPW; ++i) {
    const int R = mtile * kRows + warp + kWarps * i;
    if (R >= n_rows) continue;
    const int s = R / p.G, h = hkv * p.G + R % p.G;
    const float inv = l[i] != 0.f ? 1.f / l[i] : 0.f;
    const int64_t prow = ((static_cast<int64_t>(b) * p.seqlen_q + s) * p.Hq + h) * p.num_splits + split;
#pragma unroll
    for (int j = 0; j < NV; ++j) {
      const int d = lane + 32 * j;
      if (d >= p.D) continue;
      if (p.num_splits == 1) {
        store_out<T>(p, b, s, h, d, acc[i][j] * inv);
      } else {
        p.o_part[prow * p.D + d] = acc[i][j] * inv;
      }
    }
    if (p.num_splits > 1 && lane == 0) p.lse_part[prow] = l[i] != 0.f ? m[i] + log2f(l[i]) : -INFINITY;
  }
  fused_combine<T>(p, b, hkv, mtile);
}

// Merge the splits of one (batch, query, head) row: out = sum_i 2^(lse_i - M) o_i / sum_i 2^(lse_i - M).
// One split per thread for the max and the weights (two block reductions, not a serial loop of
// loads), then per output element the partials kMergeUnroll splits at a time, their loads issued
// together: ceil(num_splits / 8) L2 round trips instead of num_splits.

template <typename T>
__global__ void __launch_bounds__(kMaxSplits) combine_kernel(const DecodeParams p) {
  __shared__ float s_w[kMaxSplits];
  __shared__ float s_red[32];
  const int64_t row = blockIdx.x;  // ((b * seqlen_q) + s) * Hq + h
  const int NS = p.num_splits, t = threadIdx.x;  // NS <= kMaxSplits = blockDim.x
  const float l = t < NS ? p.lse_part[row * NS + t] : -INFINITY;
  const float M = block_max(l, s_red);
  const float w = t < NS ? exp2f(l - (M == -INFINITY ? 0.f : M)) : 0.f;
  if (t < NS) s_w[t] = w;
  const float den = block_sum(w, s_red);  // (its barriers also publish s_w)
  const float inv = den != 0.f ? 1.f / den : 0.f;
  const int h = static_cast<int>(row % p.Hq);
  const int s = static_cast<int>((row / p.Hq) % p.seqlen_q);
  const int b = static_cast<int>(row / (static_cast<int64_t>(p.Hq) * p.seqlen_q));
  for (int d = t; d < p.D; d += blockDim.x) {
    const float* o = p.o_part + row * NS * p.D + d;
    float acc = 0.f;
    for (int i0 = 0; i0 < NS; i0 += kMergeUnroll) {
      float v[kMergeUnroll];
#pragma unroll
      for (int j = 0; j < kMergeUnroll; ++j) v[j] = i0 + j < NS ? o[static_cast<int64_t>(i0 + j) * p.D] : 0.f;
#pragma unroll
      for (int j = 0; j < kMergeUnroll; ++j) acc += i0 + j < NS ? s_w[i0 + j] * v[j] : 0.f;
    }
    store_out<T>(p, b, s, h, d, acc * inv);
  }
}

// ---- kernel end

// ------------------------------------------------------------------------------------ host
void check_cache(const at::Tensor& c, const at::Tensor& ref, const char* name) {
  TORCH_CHECK(c.is_cuda(), name, " must be a CUDA tensor, got ", c.device());
  TORCH_CHECK(c.device() == ref.device(), name, " must be on ", ref.device(), ", got ", c.device());
  TORCH_CHECK(c.dim() == 4, name, " must be 4-D (num_blocks|batch, block_size|max_seqlen, n_kv_heads, head_dim), got ",
              c.sizes());
  TORCH_CHECK(c.scalar_type() == ref.scalar_type(), name, " must have dtype ", ref.scalar_type(), ", got ",
              c.scalar_type());
  TORCH_CHECK(c.stride(3) == 1, name, " must have unit stride in head_dim, got strides ", c.strides());
}

void check_index(const at::Tensor& t, const at::Tensor& ref, const char* name, int64_t dim) {
  TORCH_CHECK(t.is_cuda(), name, " must be a CUDA tensor, got ", t.device());
  TORCH_CHECK(t.device() == ref.device(), name, " must be on ", ref.device(), ", got ", t.device());
  TORCH_CHECK(t.scalar_type() == at::kInt, name, " must have dtype int32, got ", t.scalar_type());
  TORCH_CHECK(t.dim() == dim, name, " must be ", dim, "-D, got shape ", t.sizes());
}

// cache_leftpad (int32 (batch,), contiguous), or undefined when absent.
at::Tensor check_leftpad(const std::optional<at::Tensor>& cache_leftpad, const at::Tensor& k_cache, int64_t batch) {
  if (!cache_leftpad.has_value() || !cache_leftpad->defined()) return at::Tensor();
  const at::Tensor& t = *cache_leftpad;
  check_index(t, k_cache, "cache_leftpad", 1);
  TORCH_CHECK(t.size(0) == batch, "cache_leftpad must have shape (", batch, ",), got ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), "cache_leftpad must be contiguous");
  return t;
}

// Validates cache_seqlens / block_table for `batch` sequences; returns (block_table or undefined,
// capacity in tokens).
std::pair<at::Tensor, int64_t> check_layout(const at::Tensor& k_cache, const at::Tensor& cache_seqlens,
                                            const std::optional<at::Tensor>& block_table, int64_t batch) {
  check_index(cache_seqlens, k_cache, "cache_seqlens", 1);
  TORCH_CHECK(cache_seqlens.size(0) == batch, "cache_seqlens must have shape (", batch, ",), got ",
              cache_seqlens.sizes());
  TORCH_CHECK(cache_seqlens.is_contiguous(), "cache_seqlens must be contiguous");
  TORCH_CHECK(k_cache.size(1) >= 1 && k_cache.size(2) >= 1, "k_cache has an empty dimension: ", k_cache.sizes());
  if (block_table.has_value() && block_table->defined()) {
    const at::Tensor& bt = *block_table;
    check_index(bt, k_cache, "block_table", 2);
    TORCH_CHECK(bt.size(0) == batch, "block_table must have shape (", batch, ", max_blocks_per_seq), got ", bt.sizes());
    TORCH_CHECK(bt.size(1) <= 1 || bt.stride(1) == 1, "block_table must have unit stride in its last dim");
    const int64_t cap = bt.size(1) * k_cache.size(1);
    TORCH_CHECK(cap < (int64_t{1} << 30), "capacity max_blocks_per_seq * block_size = ", cap, " is too large");
    TORCH_CHECK(k_cache.size(0) < (int64_t{1} << 31), "num_blocks is too large");
    return {bt, cap};
  }
  TORCH_CHECK(k_cache.size(0) == batch, "contiguous cache: k_cache.size(0) = ", k_cache.size(0),
              " must equal the batch ", batch);
  TORCH_CHECK(k_cache.size(1) < (int64_t{1} << 30), "max_seqlen ", k_cache.size(1), " is too large");
  return {at::Tensor(), k_cache.size(1)};
}

template <typename T>
bool aligned16(const at::Tensor& t, std::initializer_list<int64_t> strides) {
  for (int64_t s : strides)
    if (s % vec16<T>() != 0) return false;
  return is_aligned(t.data_ptr(), 16);
}

template <typename T, bool NEW_KV>
void launch_decode_kernel(const DecodeParams& p, dim3 grid, cudaStream_t stream, bool tc) {
  if (tc) {
    if constexpr (!std::is_same_v<T, float>) {
      if (p.D <= 64) {
        decode_tc_kernel<T, 64, NEW_KV><<<grid, kThreads, 0, stream>>>(p);
      } else if (p.D <= 128) {
        decode_tc_kernel<T, 128, NEW_KV><<<grid, kThreads, 0, stream>>>(p);
      } else if (p.D <= 192) {
        decode_tc_kernel<T, 192, NEW_KV><<<grid, kThreads, 0, stream>>>(p);
      } else {
        decode_tc_kernel<T, 256, NEW_KV><<<grid, kThreads, 0, stream>>>(p);
      }
    }
  } else if (p.D <= 64) {
    decode_simple_kernel<T, 2, NEW_KV><<<grid, kThreads, 0, stream>>>(p);
  } else if (p.D <= 128) {
    decode_simple_kernel<T, 4, NEW_KV><<<grid, kThreads, 0, stream>>>(p);
  } else {
    decode_simple_kernel<T, 8, NEW_KV><<<grid, kThreads, 0, stream>>>(p);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
void run_decode(const DecodeParams& p, dim3 grid, cudaStream_t stream, const at::Tensor& k_cache,
                const at::Tensor& v_cache, int64_t combine_rows) {
  bool tc = false;
  if constexpr (!std::is_same_v<T, float>)
    tc = p.D % 8 == 0 && aligned16<T>(k_cache, {p.k_b, p.k_t, p.k_h}) && aligned16<T>(v_cache, {p.v_b, p.v_t, p.v_h}) &&
         (p.block_table == nullptr || p.page % kStep == 0);  // (pages of whole steps: decode_tc_kernel)
  if (p.new_kv) {
    launch_decode_kernel<T, true>(p, grid, stream, tc);
  } else {
    launch_decode_kernel<T, false>(p, grid, stream, tc);
  }
  if (p.num_splits > 1 && p.sem == nullptr) {  // (with counters the decode CTAs merge: fused_combine)
    combine_kernel<T><<<static_cast<unsigned>(combine_rows), kMaxSplits, 0, stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

// k, v of an append, checked against the cache; returned with unit stride in head_dim.
std::pair<at::Tensor, at::Tensor> check_new_kv(const at::Tensor& k_cache, const at::Tensor& v_cache,
                                               const at::Tensor& k_in, const at::Tensor& v_in) {
  FASTLM_CHECK_CUDA(k_in, "k");
  TORCH_CHECK(k_in.dim() == 4, "k must be (batch, seqlen_new, n_kv_heads, head_dim), got ", k_in.sizes());
  check_cache(k_cache, k_in, "k_cache");
  check_cache(v_cache, k_in, "v_cache");
  TORCH_CHECK(v_cache.sizes() == k_cache.sizes(), "v_cache shape ", v_cache.sizes(), " must equal k_cache shape ",
              k_cache.sizes());
  FASTLM_CHECK_CUDA(v_in, "v");
  TORCH_CHECK(v_in.sizes() == k_in.sizes(), "v shape ", v_in.sizes(), " must equal k shape ", k_in.sizes());
  TORCH_CHECK(v_in.scalar_type() == k_in.scalar_type() && v_in.device() == k_in.device(),
              "v must have k's dtype and device");
  TORCH_CHECK(k_in.size(2) == k_cache.size(2) && k_in.size(3) == k_cache.size(3), "k must have n_kv_heads = ",
              k_cache.size(2), " and head_dim = ", k_cache.size(3), " like the cache, got ", k_in.sizes());
  TORCH_CHECK(k_in.size(0) * k_in.size(1) < (int64_t{1} << 31), "batch * seqlen_new is too large");
  return {k_in.stride(3) == 1 ? k_in : k_in.contiguous(), v_in.stride(3) == 1 ? v_in : v_in.contiguous()};
}

// q against the cache and the scalar arguments of decode attention.
void check_decode(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache, int64_t window,
                  double softcap, int64_t num_splits) {
  FASTLM_CHECK_CUDA(q, "q");
  TORCH_CHECK(q.dim() == 4, "q must be (batch, seqlen_q, n_heads_q, head_dim), got ", q.sizes());
  check_cache(k_cache, q, "k_cache");
  check_cache(v_cache, q, "v_cache");
  TORCH_CHECK(v_cache.sizes() == k_cache.sizes(), "v_cache shape ", v_cache.sizes(), " must equal k_cache shape ",
              k_cache.sizes());
  const int64_t Sq = q.size(1), Hq = q.size(2), D = q.size(3), Hkv = k_cache.size(2);
  TORCH_CHECK(k_cache.size(3) == D, "head_dim of q (", D, ") and k_cache (", k_cache.size(3), ") differ");
  TORCH_CHECK(D >= 1 && D <= 256, "head_dim must be in [1, 256], got ", D);
  TORCH_CHECK(Hkv >= 1 && Hq >= 1 && Hq % Hkv == 0, "n_heads_q = ", Hq,
              " must be a positive multiple of n_kv_heads = ", Hkv);
  TORCH_CHECK(Sq >= 1 && Sq <= 4096, "seqlen_q must be in [1, 4096], got ", Sq);
  TORCH_CHECK(window >= -1, "window must be >= -1, got ", window);
  TORCH_CHECK(softcap >= 0.0, "softcap must be >= 0, got ", softcap);
  TORCH_CHECK(num_splits >= 1 && num_splits <= kMaxSplits, "num_splits must be in [1, ", kMaxSplits, "], got ",
              num_splits);
}

int64_t row_tiles(const at::Tensor& q, const at::Tensor& k_cache) {
  return (q.size(2) / k_cache.size(2) * q.size(1) + kRows - 1) / kRows;
}

// Whether a split decode's row tile merges in its last CTA (fused_combine): its partials are at
// most kMaxFusedMergeBytes (else combine_kernel merges).
bool fused_merge_fits(const at::Tensor& q, const at::Tensor& k_cache, int64_t num_splits) {
  const int64_t tile_rows = std::min<int64_t>(kRows, q.size(2) / k_cache.size(2) * q.size(1));
  return num_splits > 1 && tile_rows * q.size(3) * num_splits * 4 <= kMaxFusedMergeBytes;
}

// The caller's zeroed counters (fastlm.ops.decode_workspace; left zeroed), or undefined.
at::Tensor check_workspace(const std::optional<at::Tensor>& workspace, const at::Tensor& q, const at::Tensor& k_cache) {
  if (!workspace.has_value() || !workspace->defined()) return at::Tensor();
  const at::Tensor& t = *workspace;
  TORCH_CHECK(t.device() == q.device(), "workspace must be on ", q.device(), ", got ", t.device());
  TORCH_CHECK(t.scalar_type() == at::kInt, "workspace must have dtype int32, got ", t.scalar_type());
  TORCH_CHECK(t.is_contiguous(), "workspace must be contiguous");
  const int64_t need = q.size(0) * k_cache.size(2) * row_tiles(q, k_cache);
  TORCH_CHECK(t.numel() >= need, "workspace has ", t.numel(), " elements; this call needs at least ", need,
              " (batch x n_kv_heads x 16-row tiles)");
  return t;
}

// q with what the decode kernels read: contiguous, 16-byte aligned (the tensor-core kernel reads
// q in 4-byte pairs).
at::Tensor decode_ready(const at::Tensor& q) {
  return q.is_contiguous() && is_aligned(q.data_ptr(), 16) ? q : at::empty(q.sizes(), q.options()).copy_(q);
}

// Launches the decode of q (decode_ready) into out over the first cache_seqlens[b] + seqlen_add
// tokens.  sem: zeroed counters (batch, Hkv * row tiles) for the fused combine, or undefined.
void launch_decode(const at::Tensor& q, const at::Tensor& out, const at::Tensor& k_cache, const at::Tensor& v_cache,
                   const at::Tensor& cache_seqlens, const at::Tensor& leftpad, const at::Tensor& bt, int64_t capacity,
                   double softmax_scale, bool causal, int64_t window, double softcap, int64_t num_splits,
                   int64_t seqlen_add, const at::Tensor& sem, const AppendParams* nk = nullptr, bool q_prep = false,
                   bool norm = false) {
  const int64_t B = q.size(0), Sq = q.size(1), Hq = q.size(2), D = q.size(3), Hkv = k_cache.size(2);
  const int64_t G = Hq / Hkv;
  const int64_t n_mtiles = row_tiles(q, k_cache);
  TORCH_CHECK(Hkv * n_mtiles <= 65535 && B <= 65535, "too many KV heads x row tiles or sequences for the grid");
  at::Tensor o_part, lse_part;
  if (num_splits > 1) {
    o_part = at::empty({B, Sq, Hq, num_splits, D}, q.options().dtype(at::kFloat));
    lse_part = at::empty({B, Sq, Hq, num_splits}, q.options().dtype(at::kFloat));
  }
  constexpr double kLog2e = 1.4426950408889634;
  DecodeParams p{};
  p.q = q.data_ptr();
  p.k = k_cache.data_ptr();
  p.v = v_cache.data_ptr();
  p.seqlens = cache_seqlens.data_ptr<int>();
  p.leftpad = leftpad.defined() ? leftpad.data_ptr<int>() : nullptr;
  p.block_table = bt.defined() ? bt.data_ptr<int>() : nullptr;
  p.out = out.data_ptr();
  p.o_part = num_splits > 1 ? o_part.data_ptr<float>() : nullptr;
  p.lse_part = num_splits > 1 ? lse_part.data_ptr<float>() : nullptr;
  p.sem = num_splits > 1 && sem.defined() ? sem.data_ptr<int>() : nullptr;
  p.q_b = q.stride(0);
  p.q_s = q.stride(1);
  p.q_h = q.stride(2);
  p.k_b = k_cache.stride(0);
  p.k_t = k_cache.stride(1);
  p.k_h = k_cache.stride(2);
  p.v_b = v_cache.stride(0);
  p.v_t = v_cache.stride(1);
  p.v_h = v_cache.stride(2);
  p.o_b = out.stride(0);
  p.o_s = out.stride(1);
  p.o_h = out.stride(2);
  p.o_d = out.stride(3);
  p.bt_s = bt.defined() ? bt.stride(0) : 0;
  p.seqlen_q = static_cast<int>(Sq);
  p.G = static_cast<int>(G);
  p.Hq = static_cast<int>(Hq);
  p.D = static_cast<int>(D);
  p.n_pages = static_cast<int>(k_cache.size(0));
  p.capacity = static_cast<int>(capacity);
  p.page = bt.defined() ? static_cast<int>(k_cache.size(1)) : 1;
  p.page_shift = -1;
  for (int sh = 0; sh < 31; ++sh)
    if ((1 << sh) == p.page) p.page_shift = sh;
  p.window = static_cast<int>(std::min<int64_t>(window, int64_t{1} << 30));
  p.num_splits = static_cast<int>(num_splits);
  p.n_mtiles = static_cast<int>(n_mtiles);
  p.seqlen_add = static_cast<int>(seqlen_add);
  p.causal = causal;
  if (nk != nullptr) {  // the one-launch form
    p.nk = *nk;
    p.new_kv = true;
    p.q_prep = q_prep;
    p.norm = norm;
  }
  if (softcap > 0.0) {
    p.qk_scale = static_cast<float>(softmax_scale / softcap);
    p.softcap_log2 = static_cast<float>(softcap * kLog2e);
  } else {
    p.qk_scale = static_cast<float>(softmax_scale * kLog2e);
    p.softcap_log2 = 0.f;
  }
  const dim3 grid(static_cast<unsigned>(num_splits), static_cast<unsigned>(Hkv * n_mtiles), static_cast<unsigned>(B));
  auto stream = c10::cuda::getCurrentCUDAStream();
  FASTLM_DISPATCH_FLOAT(q.scalar_type(), "decode_attention_cuda", [&] {
    run_decode<scalar_t>(p, grid, stream, k_cache, v_cache, B * Sq * Hq);
  });
}

}  // namespace

void kv_cache_append_cuda(const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& k_in,
                          const at::Tensor& v_in, const at::Tensor& cache_seqlens,
                          const std::optional<at::Tensor>& block_table) {
  auto [k, v] = check_new_kv(k_cache, v_cache, k_in, v_in);
  const int64_t B = k.size(0), S = k.size(1), H = k.size(2), D = k.size(3);
  auto [bt, capacity] = check_layout(k_cache, cache_seqlens, block_table, B);
  if (B == 0 || S == 0 || H == 0 || D == 0) return;
  c10::cuda::CUDAGuard guard(k.device());
  auto stream = c10::cuda::getCurrentCUDAStream();
  const int* btp = bt.defined() ? bt.data_ptr<int>() : nullptr;
  const int64_t bt_s = bt.defined() ? bt.stride(0) : 0;
  FASTLM_DISPATCH_FLOAT(k.scalar_type(), "kv_cache_append_cuda", [&] {
    auto launch = [&](auto vec_tag) {
      constexpr int VEC = decltype(vec_tag)::value;
      const int64_t work = H * (D / VEC);
      const int threads = static_cast<int>(std::min<int64_t>(256, std::max<int64_t>(32, (work + 31) / 32 * 32)));
      kv_append_kernel<scalar_t, VEC><<<static_cast<unsigned>(B * S), threads, 0, stream>>>(
          static_cast<scalar_t*>(k_cache.data_ptr()), static_cast<scalar_t*>(v_cache.data_ptr()),
          static_cast<const scalar_t*>(k.data_ptr()), static_cast<const scalar_t*>(v.data_ptr()),
          cache_seqlens.data_ptr<int>(), btp, static_cast<int>(S), static_cast<int>(H), static_cast<int>(D),
          static_cast<int>(k_cache.size(0)), static_cast<int>(capacity), static_cast<int>(k_cache.size(1)),
          k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), v_cache.stride(0), v_cache.stride(1),
          v_cache.stride(2), k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2), bt_s);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    constexpr int V16 = vec16<scalar_t>();
    const bool vec_ok = D % V16 == 0 &&
                        aligned16<scalar_t>(k_cache, {k_cache.stride(0), k_cache.stride(1), k_cache.stride(2)}) &&
                        aligned16<scalar_t>(v_cache, {v_cache.stride(0), v_cache.stride(1), v_cache.stride(2)}) &&
                        aligned16<scalar_t>(k, {k.stride(0), k.stride(1), k.stride(2)}) &&
                        aligned16<scalar_t>(v, {v.stride(0), v.stride(1), v.stride(2)});
    if (vec_ok) {
      launch(std::integral_constant<int, V16>{});
    } else {
      launch(std::integral_constant<int, 1>{});
    }
  });
}

at::Tensor decode_attention_cuda(const at::Tensor& q_in, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                 const at::Tensor& cache_seqlens, const std::optional<at::Tensor>& block_table,
                                 const std::optional<at::Tensor>& cache_leftpad, double softmax_scale, bool causal,
                                 int64_t window, double softcap, int64_t num_splits,
                                 const std::optional<at::Tensor>& workspace) {
  check_decode(q_in, k_cache, v_cache, window, softcap, num_splits);
  auto [bt, capacity] = check_layout(k_cache, cache_seqlens, block_table, q_in.size(0));
  const at::Tensor leftpad = check_leftpad(cache_leftpad, k_cache, q_in.size(0));
  const at::Tensor ws = check_workspace(workspace, q_in, k_cache);
  at::Tensor out = at::empty_like(q_in);
  if (out.numel() == 0) return out;
  c10::cuda::CUDAGuard guard(q_in.device());
  // With a workspace a split decode merges its splits itself (its counters): one launch.
  const at::Tensor sem = fused_merge_fits(q_in, k_cache, num_splits) ? ws : at::Tensor();
  launch_decode(decode_ready(q_in), out, k_cache, v_cache, cache_seqlens, leftpad, bt, capacity, softmax_scale, causal,
                window, softcap, num_splits, 0, sem);
  return out;
}

// decode_attention with new tokens (flash_attn_with_kvcache).  One launch when the new tokens are
// the query rows' own (seqlen_new == seqlen_q <= 16) and the decode either needs no zeroed
// counters (one split, or tiles too big for the fused merge) or has them (a workspace): the
// decode kernel normalizes, rotates and appends the new tokens itself (DecodeParams::new_kv).
// Otherwise two: the append writes k, v at positions cache_seqlens[b] + s, normalizing / rotating k
// and q (into a dense copy) at those positions when asked, and zeroes the fused-combine counters;
// the decode then attends over cache_seqlens[b] + seqlen_new tokens and, when split, merges its
// splits itself.
at::Tensor decode_attention_with_kv_cuda(const at::Tensor& q_in, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                         const at::Tensor& k_in, const at::Tensor& v_in,
                                         const at::Tensor& cache_seqlens, const std::optional<at::Tensor>& block_table,
                                         const std::optional<at::Tensor>& cache_leftpad,
                                         const std::optional<at::Tensor>& rotary_cos,
                                         const std::optional<at::Tensor>& rotary_sin, bool rotary_interleaved,
                                         double softmax_scale, bool causal, int64_t window, double softcap,
                                         int64_t num_splits, const std::optional<at::Tensor>& q_norm_weight,
                                         const std::optional<at::Tensor>& k_norm_weight, double qk_norm_eps,
                                         double qk_norm_offset, const std::optional<at::Tensor>& workspace) {
  check_decode(q_in, k_cache, v_cache, window, softcap, num_splits);
  auto [k, v] = check_new_kv(k_cache, v_cache, k_in, v_in);
  const int64_t B = q_in.size(0), Sq = q_in.size(1), Hq = q_in.size(2), D = q_in.size(3);
  const int64_t S = k.size(1), H = k.size(2);
  TORCH_CHECK(k.size(0) == B, "k has batch ", k.size(0), " but q has batch ", B);
  const bool rotary = rotary_cos.has_value() && rotary_cos->defined();
  TORCH_CHECK(rotary == (rotary_sin.has_value() && rotary_sin->defined()), "rotary_cos and rotary_sin come together");
  at::Tensor cos, sin;
  if (rotary) {
    cos = *rotary_cos;
    sin = *rotary_sin;
    for (const at::Tensor* t : {&cos, &sin}) {
      const char* name = t == &cos ? "rotary_cos" : "rotary_sin";
      TORCH_CHECK(t->device() == q_in.device(), name, " must be on ", q_in.device(), ", got ", t->device());
      TORCH_CHECK(t->dim() == 2 && t->size(1) >= 1 && 2 * t->size(1) <= D, name,
                  " must be (max_positions, rotary_dim // 2) with rotary_dim <= head_dim ", D, ", got ", t->sizes());
      TORCH_CHECK(t->scalar_type() == at::kFloat || t->scalar_type() == q_in.scalar_type(), name,
                  " must be float32 or q's dtype, got ", t->scalar_type());
    }
    TORCH_CHECK(sin.sizes() == cos.sizes() && sin.scalar_type() == cos.scalar_type(),
                "rotary_sin must have rotary_cos's shape and dtype");
    TORCH_CHECK(S == Sq, "with rotary tables, k's seqlen_new (", S, ") must equal q's seqlen_q (", Sq, ")");
  }
  const bool norm = q_norm_weight.has_value() && q_norm_weight->defined();
  TORCH_CHECK(norm == (k_norm_weight.has_value() && k_norm_weight->defined()),
              "q_norm_weight and k_norm_weight come together");
  at::Tensor qw, kw;
  if (norm) {
    qw = q_norm_weight->contiguous();
    kw = k_norm_weight->contiguous();
    for (const at::Tensor* t : {&qw, &kw}) {
      const char* name = t == &qw ? "q_norm_weight" : "k_norm_weight";
      TORCH_CHECK(t->device() == q_in.device(), name, " must be on ", q_in.device(), ", got ", t->device());
      TORCH_CHECK(t->dim() == 1 && t->size(0) == D, name, " must have shape (", D, ",) (head_dim), got ", t->sizes());
      TORCH_CHECK(t->scalar_type() == at::kFloat || t->scalar_type() == q_in.scalar_type(), name,
                  " must be float32 or q's dtype, got ", t->scalar_type());
    }
    TORCH_CHECK(kw.scalar_type() == qw.scalar_type(), "q_norm_weight and k_norm_weight must share a dtype");
    TORCH_CHECK(qk_norm_eps >= 0.0, "qk_norm_eps must be >= 0, got ", qk_norm_eps);
    TORCH_CHECK(S == Sq, "with q/k norms, k's seqlen_new (", S, ") must equal q's seqlen_q (", Sq, ")");
  }
  const bool transform = rotary || norm;  // q is normalized / rotated (by the append: into a dense copy)
  auto [bt, capacity] = check_layout(k_cache, cache_seqlens, block_table, B);
  const at::Tensor leftpad = check_leftpad(cache_leftpad, k_cache, B);
  const at::Tensor ws = check_workspace(workspace, q_in, k_cache);
  at::Tensor out = at::empty_like(q_in);
  if (out.numel() == 0) return out;
  c10::cuda::CUDAGuard guard(q_in.device());
  const bool append = S > 0;
  // The fused combine's counters, unless a tile's merge is too big for one CTA: the workspace's,
  // or new ones that the append launch zeroes.
  const bool fused_merge = fused_merge_fits(q_in, k_cache, num_splits);
  const bool one_launch = append && S == Sq && Sq <= kRows && (!fused_merge || ws.defined());
  at::Tensor sem;
  if (fused_merge && ws.defined()) {
    sem = ws;
  } else if (fused_merge && append) {
    sem = at::empty({B, k_cache.size(2) * row_tiles(q_in, k_cache)}, cache_seqlens.options());
  }
  // q as the decode reads it: raw (the one-launch form prepares it itself), the append's dense copy
  // (transform), or q itself.
  at::Tensor q = one_launch && transform ? (q_in.stride(3) == 1 ? q_in : q_in.contiguous())
                 : transform            ? at::empty(q_in.sizes(), q_in.options())
                                        : decode_ready(q_in);
  AppendParams p{};
  if (append) {
    if (rotary) {  // one row stride for both tables, unit column stride
      cos = cos.contiguous();
      sin = sin.contiguous();
    }
    const at::Tensor q_src = one_launch ? q : (transform && q_in.stride(3) != 1 ? q_in.contiguous() : q_in);
    p.k_cache = k_cache.data_ptr();
    p.v_cache = v_cache.data_ptr();
    p.k = k.data_ptr();
    p.v = v.data_ptr();
    p.seqlens = cache_seqlens.data_ptr<int>();
    p.block_table = bt.defined() ? bt.data_ptr<int>() : nullptr;
    p.q = transform ? q_src.data_ptr() : nullptr;
    p.q_out = transform && !one_launch ? q.data_ptr() : nullptr;
    p.cos = rotary ? cos.data_ptr() : nullptr;
    p.sin = rotary ? sin.data_ptr() : nullptr;
    p.sem = sem.defined() ? sem.data_ptr<int>() : nullptr;
    p.kc_b = k_cache.stride(0);
    p.kc_t = k_cache.stride(1);
    p.kc_h = k_cache.stride(2);
    p.vc_b = v_cache.stride(0);
    p.vc_t = v_cache.stride(1);
    p.vc_h = v_cache.stride(2);
    p.k_b = k.stride(0);
    p.k_s = k.stride(1);
    p.k_h = k.stride(2);
    p.v_b = v.stride(0);
    p.v_s = v.stride(1);
    p.v_h = v.stride(2);
    if (transform) {
      p.q_b = q_src.stride(0);
      p.q_s = q_src.stride(1);
      p.q_h = q_src.stride(2);
      p.qo_b = q.stride(0);  // (unused by the one-launch form)
      p.qo_s = q.stride(1);
      p.qo_h = q.stride(2);
      p.Hq = static_cast<int>(Hq);
    }
    if (rotary) {
      p.s_cos = cos.stride(0);
      p.max_pos = cos.size(0);
      p.half = static_cast<int>(cos.size(1));
      p.interleaved = rotary_interleaved;
      p.cos_f32 = cos.scalar_type() == at::kFloat;
    }
    if (norm) {
      p.q_w = qw.data_ptr();
      p.k_w = kw.data_ptr();
      p.w_f32 = qw.scalar_type() == at::kFloat;
      p.eps = static_cast<float>(qk_norm_eps);
      p.w_offset = static_cast<float>(qk_norm_offset);
    }
    p.bt_s = bt.defined() ? bt.stride(0) : 0;
    p.seqlen_new = static_cast<int>(S);
    p.H = static_cast<int>(H);
    p.D = static_cast<int>(D);
    p.n_pages = static_cast<int>(k_cache.size(0));
    p.capacity = static_cast<int>(capacity);
    p.page = static_cast<int>(k_cache.size(1));
    p.n_sem = sem.defined() ? static_cast<int>(k_cache.size(2) * row_tiles(q_in, k_cache)) : 0;
    auto stream = c10::cuda::getCurrentCUDAStream();
    if (one_launch) {
      // (the decode launch below does it all)
    } else if (norm) {  // a warp per head, and the v copy spread over the same CTAs
      constexpr int threads = 32 * kAppendWarps;
      const int64_t ctas =
          std::max<int64_t>((Hq + H + kAppendWarps - 1) / kAppendWarps, (H * D + threads - 1) / threads);
      const dim3 grid(static_cast<unsigned>(B * S), static_cast<unsigned>(ctas));
      FASTLM_DISPATCH_FLOAT(q_in.scalar_type(), "decode_attention_with_kv_cuda", [&] {
        kv_append_norm_kernel<scalar_t><<<grid, threads, 0, stream>>>(p);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    } else {
      const int64_t work = std::max(H * D, (p.Hq + H) * (D - p.half));  // v elements; pairs + pass-through dims
      const int threads = static_cast<int>(std::min<int64_t>(256, (work + 31) / 32 * 32));
      const dim3 grid(static_cast<unsigned>(B * S), static_cast<unsigned>((work + threads - 1) / threads));
      FASTLM_DISPATCH_FLOAT(q_in.scalar_type(), "decode_attention_with_kv_cuda", [&] {
        kv_append_rotary_kernel<scalar_t><<<grid, threads, 0, stream>>>(p);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    }
  }
  launch_decode(q, out, k_cache, v_cache, cache_seqlens, leftpad, bt, capacity, softmax_scale, causal, window,
                softcap, num_splits, S, sem, one_launch ? &p : nullptr, transform, norm);
  return out;
}

}  // namespace fastlm

TORCH_LIBRARY_IMPL(fastlm, CUDA, m) {
  m.impl("kv_cache_append_cuda", &fastlm::kv_cache_append_cuda);
  m.impl("decode_attention_cuda", &fastlm::decode_attention_cuda);
  m.impl("decode_attention_with_kv_cuda", &fastlm::decode_attention_with_kv_cuda);
}
