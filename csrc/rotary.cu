// Rotary position embeddings (torch.ops.fastlm.rotary_cuda): q and k rotated by one launch.
// Semantics match the Triton launcher rotary_fwd in kernels/rotary.py exactly; the schema is
// in csrc/ops.cpp, the op layer (validation, autograd, in place) in fastlm/ops/rotary.py.
//
//   q_out[.., h, :], k_out[.., h, :] = rotate(q/k[.., h, :], position of the token)
//   rotate_half  : pairs (i, i + half)     y1 = x1 c - x2 s,  y2 = x2 c + x1 s
//   interleaved  : pairs (2i, 2i + 1)      same formula; c, s = cos/sin[pos, i] (* sign)
//   conj (backward): s -> -s, the inverse rotation.  Dims [2 half, head_dim) are copied
//   when q_out is not q (out of place) and left alone in place.
//
// Bytes: every element of q and k is read once and written once; the table rows of a token
// are shared by its heads and come from L1/L2.  Floor: 2 * bytes(q, k) at copy bandwidth.
//
// Work split: a CTA of 256 threads takes `tpb` consecutive tokens (~2048 work units).  The
// first threads compute each token's address offsets and position once into shared memory
// (arange + offset, per-sequence offsets, explicit positions, or a binary search in
// cu_seqlens for packed sequences); then every thread walks units of VEC pairs:
//   rotate_half unit: VEC elements at i0 and VEC at half + i0 (two 16-byte loads for bf16)
//   interleaved unit: 2 VEC contiguous elements (two 16-byte loads)
//   pass-through unit: VEC elements copied.
// VEC is the widest of {16 / sizeof(T), ..., 1} that divides half (and head_dim - 2 half
// when copying) and every stride, with every pointer aligned to it: 16-byte accesses on the
// usual shapes, scalar accesses on odd ones, correct on all.
//
// A token whose position is outside [0, max_pos) (or, packed, that lies in no sequence of
// cu_seqlens) reads no table memory: its cos/sin are NaN, so its rotated dims are NaN.
#include <algorithm>
#include <optional>
#include <utility>

#include "common.cuh"

namespace fastlm {
namespace {

// ---- kernel begin: this section (to 'kernel end') is compiled on the host and emulated by
// tests/test_rotary.py::test_cuda_kernel_host_emulation, so CI checks its logic without a GPU.
constexpr int kThreads = 256;
constexpr int kMaxTokensPerBlock = 64;
constexpr int kUnitsPerBlock = 8 * kThreads;  // ~8 units per thread amortize the per-token prologue

struct RotaryParams {
  const void* q;
  const void* k;
  void* qo;
  void* ko;
  const void* cos;  // (max_pos, half), row stride s_cos, unit column stride
  const void* sin;
  const void* pos;  // int32 or int64 positions (pos_mode 1: [seq * spos_b]; 2: [b * spos_b + s * spos_s])
  const int* cu;    // (num_seqs + 1,) int32, varlen only
  int64_t sq[3], sk[3], sqo[3], sko[3];  // strides (elements) of dims batch, token, head
  int64_t s_cos, spos_b, spos_s;
  int64_t n_tokens;  // batch * seqlen, or total tokens when packed
  int64_t seqlen;    // dense layout: tokens per sequence
  int64_t offset;    // pos_mode 0: added to the arange positions
  int64_t max_pos;
  int n_heads_q, n_heads_k, head_dim, half, num_seqs, pos_mode, tpb;
  bool pos64, varlen, copy_pass;
  float sin_sign;  // +1 forward, -1 backward (conj)
};

__device__ __forceinline__ int64_t load_pos(const RotaryParams& p, int64_t idx) {
  return p.pos64 ? static_cast<const int64_t*>(p.pos)[idx] : static_cast<int64_t>(static_cast<const int*>(p.pos)[idx]);
}

// N values of U as floats, in chunks of at most 16 bytes (p aligned to one chunk).
template <typename U, int N>
__device__ __forceinline__ void load_floats(const U* p, float* out) {
  constexpr int CH = (N * sizeof(U) <= 16) ? N : 16 / static_cast<int>(sizeof(U));
#pragma unroll
  for (int c0 = 0; c0 < N; c0 += CH) {
    const Vec<U, CH> v = load_vec<U, CH>(p + c0);
#pragma unroll
    for (int e = 0; e < CH; ++e) out[c0 + e] = to_float(v.v[e]);
  }
}

template <typename T, int N>
__device__ __forceinline__ void store_floats(T* p, const float* in) {
  Vec<T, N> v;
#pragma unroll
  for (int e = 0; e < N; ++e) v.v[e] = from_float<T>(in[e]);
  store_vec<T, N>(p, v);
}

template <typename T, typename C, int VEC, bool INTERLEAVED>
__global__ void __launch_bounds__(kThreads) rotary_kernel(const RotaryParams p) {
  __shared__ int64_t s_pos[kMaxTokensPerBlock];  // position, or -1 if invalid
  __shared__ int64_t s_row[4][kMaxTokensPerBlock];  // row offsets in q, k, q_out, k_out

  const int64_t t0 = static_cast<int64_t>(blockIdx.x) * p.tpb;
  const int64_t left = p.n_tokens - t0;
  const int nt = static_cast<int>(left < p.tpb ? left : p.tpb);
  for (int i = threadIdx.x; i < nt; i += blockDim.x) {
    const int64_t t = t0 + i;
    int64_t seq, loc, ab, as;
    bool inside = true;
    if (p.varlen) {
      // seq = number of cu[1..num_seqs] <= t (upper bound), clamped to the last sequence.
      int lo = 0, hi = p.num_seqs;
      while (lo < hi) {
        const int mid = (lo + hi) >> 1;
        if (static_cast<int64_t>(p.cu[mid + 1]) <= t) lo = mid + 1; else hi = mid;
      }
      seq = min(lo, p.num_seqs - 1);
      const int64_t start = p.cu[seq];
      inside = t >= start && t < static_cast<int64_t>(p.cu[p.num_seqs]);
      loc = t - start;
      ab = 0;
      as = t;
    } else {
      seq = t / p.seqlen;
      loc = t - seq * p.seqlen;
      ab = seq;
      as = loc;
    }
    int64_t pos;
    if (p.pos_mode == 0) pos = loc + p.offset;
    else if (p.pos_mode == 1) pos = loc + load_pos(p, seq * p.spos_b);
    else pos = load_pos(p, ab * p.spos_b + as * p.spos_s);
    s_pos[i] = (inside && pos >= 0 && pos < p.max_pos) ? pos : -1;
    s_row[0][i] = ab * p.sq[0] + as * p.sq[1];
    s_row[1][i] = ab * p.sk[0] + as * p.sk[1];
    s_row[2][i] = ab * p.sqo[0] + as * p.sqo[1];
    s_row[3][i] = ab * p.sko[0] + as * p.sko[1];
  }
  __syncthreads();

  const int H = p.n_heads_q + p.n_heads_k;
  const int NR = p.half / VEC;  // rotary units per head
  const int NP = p.copy_pass ? (p.head_dim - 2 * p.half) / VEC : 0;
  const int U = NR + NP;
  const int per_tok = H * U;
  const int total = nt * per_tok;
  // No __restrict__: in place, y aliases x (each element is read once, then written once).
  const T* cq = static_cast<const T*>(p.q);
  const T* ck = static_cast<const T*>(p.k);
  const C* cosp = static_cast<const C*>(p.cos);
  const C* sinp = static_cast<const C*>(p.sin);
  const float nan = __int_as_float(0x7fffffff);

  for (int u = threadIdx.x; u < total; u += blockDim.x) {
    const int tok = u / per_tok;
    const int r = u - tok * per_tok;
    const int h = r / U;
    const int j = r - h * U;
    const T* x;
    T* y;
    if (h < p.n_heads_q) {
      x = cq + s_row[0][tok] + h * p.sq[2];
      y = static_cast<T*>(p.qo) + s_row[2][tok] + h * p.sqo[2];
    } else {
      const int hk = h - p.n_heads_q;
      x = ck + s_row[1][tok] + hk * p.sk[2];
      y = static_cast<T*>(p.ko) + s_row[3][tok] + hk * p.sko[2];
    }
    if (j < NR) {
      const int i0 = j * VEC;
      const int64_t pos = s_pos[tok];
      float c[VEC], s[VEC];
      if (pos >= 0) {
        load_floats<C, VEC>(cosp + pos * p.s_cos + i0, c);
        load_floats<C, VEC>(sinp + pos * p.s_cos + i0, s);
#pragma unroll
        for (int e = 0; e < VEC; ++e) s[e] *= p.sin_sign;
      } else {
#pragma unroll
        for (int e = 0; e < VEC; ++e) c[e] = s[e] = nan;
      }
      if constexpr (!INTERLEAVED) {
        float a[VEC], b[VEC], o1[VEC], o2[VEC];
        load_floats<T, VEC>(x + i0, a);
        load_floats<T, VEC>(x + p.half + i0, b);
#pragma unroll
        for (int e = 0; e < VEC; ++e) {
          o1[e] = a[e] * c[e] - b[e] * s[e];
          o2[e] = b[e] * c[e] + a[e] * s[e];
        }
        store_floats<T, VEC>(y + i0, o1);
        store_floats<T, VEC>(y + p.half + i0, o2);
      } else {
        float v[2 * VEC], o[2 * VEC];
        load_floats<T, VEC>(x + 2 * i0, v);
        load_floats<T, VEC>(x + 2 * i0 + VEC, v + VEC);
#pragma unroll
        for (int m = 0; m < VEC; ++m) {
          o[2 * m] = v[2 * m] * c[m] - v[2 * m + 1] * s[m];
          o[2 * m + 1] = v[2 * m + 1] * c[m] + v[2 * m] * s[m];
        }
        store_floats<T, VEC>(y + 2 * i0, o);
        store_floats<T, VEC>(y + 2 * i0 + VEC, o + VEC);
      }
    } else {
      const int d0 = 2 * p.half + (j - NR) * VEC;
      store_vec<T, VEC>(y + d0, load_vec<T, VEC>(x + d0));
    }
  }
}

// ---- kernel end

// (B, S, H, D) view of a 4-D tensor or (1, T, H, D) of a packed 3-D one: strides of the
// batch, token and head dims, with 0 for dims of size 1 (their stride never matters).
void dims3(const at::Tensor& x, int64_t* st) {
  const bool packed = x.dim() == 3;
  const int64_t sizes[3] = {packed ? 1 : x.size(0), x.size(packed ? 0 : 1), x.size(packed ? 1 : 2)};
  const int64_t strides[3] = {packed ? 0 : x.stride(0), x.stride(packed ? 0 : 1), x.stride(packed ? 1 : 2)};
  for (int d = 0; d < 3; ++d) st[d] = sizes[d] > 1 ? strides[d] : 0;
}

template <typename T, typename C, bool INTERLEAVED>
void launch_vec(const RotaryParams& p, int vec, dim3 grid, cudaStream_t stream) {
  switch (vec) {
    case 8:
      if constexpr (16 / sizeof(T) >= 8) {
        rotary_kernel<T, C, 8, INTERLEAVED><<<grid, kThreads, 0, stream>>>(p);
        return;
      }
      break;
    case 4:
      rotary_kernel<T, C, 4, INTERLEAVED><<<grid, kThreads, 0, stream>>>(p);
      return;
    case 2:
      rotary_kernel<T, C, 2, INTERLEAVED><<<grid, kThreads, 0, stream>>>(p);
      return;
    case 1:
      rotary_kernel<T, C, 1, INTERLEAVED><<<grid, kThreads, 0, stream>>>(p);
      return;
    default:
      break;
  }
  TORCH_CHECK(false, "rotary_cuda: internal error, unsupported vector width ", vec);
}

void check_rows(const at::Tensor& x, const at::Tensor& ref, const char* name) {
  TORCH_CHECK(x.is_cuda(), name, " must be a CUDA tensor, got ", x.device());
  TORCH_CHECK(x.device() == ref.device(), name, " must be on ", ref.device(), ", got ", x.device());
  TORCH_CHECK(x.dim() == ref.dim(), name, " must have rank ", ref.dim(), ", got shape ", x.sizes());
  TORCH_CHECK(x.scalar_type() == ref.scalar_type(), name, " must have dtype ", ref.scalar_type(), ", got ",
              x.scalar_type());
  TORCH_CHECK(x.size(-1) <= 1 || x.stride(-1) == 1, name, " must have a unit stride in the head dim, got strides ",
              x.strides());
}

}  // namespace

void rotary_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos, const at::Tensor& sin,
                 const std::optional<at::Tensor>& positions, const std::optional<at::Tensor>& cu_seqlens,
                 const at::Tensor& q_out, const at::Tensor& k_out, int64_t offset, int64_t pos_mode, bool interleaved,
                 bool conj) {
  FASTLM_CHECK_CUDA(q, "q");
  TORCH_CHECK(q.dim() == 3 || q.dim() == 4, "q must be (batch, seqlen, heads, head_dim) or (tokens, heads, head_dim), "
              "got shape ", q.sizes());
  TORCH_CHECK(q.size(-1) <= 1 || q.stride(-1) == 1, "q must have a unit stride in the head dim, got ", q.strides());
  check_rows(k, q, "k");
  check_rows(q_out, q, "q_out");
  check_rows(k_out, q, "k_out");
  TORCH_CHECK(q_out.sizes() == q.sizes(), "q_out must have q's shape ", q.sizes(), ", got ", q_out.sizes());
  TORCH_CHECK(k_out.sizes() == k.sizes(), "k_out must have k's shape ", k.sizes(), ", got ", k_out.sizes());
  const bool packed = q.dim() == 3;
  for (int d = 0; d < q.dim() - 2; ++d)
    TORCH_CHECK(k.size(d) == q.size(d), "k must match q in its batch/token dims: q ", q.sizes(), ", k ", k.sizes());
  const int64_t D = q.size(-1);
  TORCH_CHECK(k.size(-1) == D, "k head_dim ", k.size(-1), " must equal q head_dim ", D);
  TORCH_CHECK(cos.dim() == 2 && cos.size(1) >= 1, "cos must be (max_positions, rotary_dim / 2), got ", cos.sizes());
  TORCH_CHECK(sin.sizes() == cos.sizes() && sin.strides() == cos.strides(), "sin must have cos's shape and strides");
  TORCH_CHECK(cos.scalar_type() == sin.scalar_type() &&
              (cos.scalar_type() == at::kFloat || cos.scalar_type() == q.scalar_type()),
              "cos and sin must both be float32 or q's dtype ", q.scalar_type());
  TORCH_CHECK(cos.size(1) <= 1 || cos.stride(1) == 1, "cos must have a unit column stride");
  FASTLM_CHECK_SAME_DEVICE(cos, q, "cos", "q");
  FASTLM_CHECK_SAME_DEVICE(sin, q, "sin", "q");
  const int64_t half = cos.size(1);
  TORCH_CHECK(2 * half <= D, "rotary_dim 2 * cos.size(1) = ", 2 * half, " exceeds head_dim ", D);
  TORCH_CHECK(pos_mode >= 0 && pos_mode <= 2, "pos_mode must be 0, 1 or 2, got ", pos_mode);

  const int64_t B = packed ? 1 : q.size(0);
  const int64_t S = packed ? q.size(0) : q.size(1);
  const int64_t T = B * S;
  const bool varlen = cu_seqlens.has_value() && cu_seqlens->defined();
  int64_t num_seqs = B;
  if (varlen) {
    const at::Tensor& cu = *cu_seqlens;
    TORCH_CHECK(packed, "cu_seqlens needs packed (tokens, heads, head_dim) q");
    FASTLM_CHECK_SAME_DEVICE(cu, q, "cu_seqlens", "q");
    FASTLM_CHECK_DTYPE(cu, at::kInt, "cu_seqlens");
    TORCH_CHECK(cu.dim() == 1 && cu.size(0) >= 2 && cu.is_contiguous(),
                "cu_seqlens must be a contiguous (num_seqs + 1,) tensor, got ", cu.sizes());
    num_seqs = cu.size(0) - 1;
  }
  RotaryParams p{};
  if (pos_mode != 0) {
    TORCH_CHECK(positions.has_value() && positions->defined(), "positions is required for pos_mode ", pos_mode);
    const at::Tensor& pt = *positions;
    FASTLM_CHECK_SAME_DEVICE(pt, q, "positions", "q");
    TORCH_CHECK(pt.scalar_type() == at::kInt || pt.scalar_type() == at::kLong,
                "positions must be int32 or int64, got ", pt.scalar_type());
    if (pos_mode == 1) {
      TORCH_CHECK(pt.dim() == 1 && pt.size(0) == num_seqs, "positions (per-sequence offsets) must be (", num_seqs,
                  ",), got ", pt.sizes());
      p.spos_b = pt.size(0) > 1 ? pt.stride(0) : 0;
    } else if (packed) {
      TORCH_CHECK(pt.dim() == 1 && pt.size(0) == T, "positions must be (", T, ",), got ", pt.sizes());
      p.spos_s = pt.size(0) > 1 ? pt.stride(0) : 0;
    } else {
      TORCH_CHECK(pt.dim() == 2 && pt.size(0) == B && pt.size(1) == S, "positions must be (", B, ", ", S, "), got ",
                  pt.sizes());
      p.spos_b = B > 1 ? pt.stride(0) : 0;
      p.spos_s = S > 1 ? pt.stride(1) : 0;
    }
    p.pos = pt.data_ptr();
    p.pos64 = pt.scalar_type() == at::kLong;
  }
  const int64_t Hq = q.size(-2), Hk = k.size(-2);
  if (T == 0 || Hq + Hk == 0) return;
  TORCH_CHECK(std::max(Hq, Hk) < (1 << 20) && D <= 4096, "rotary_cuda: too many heads or too large a head_dim");
  c10::cuda::CUDAGuard guard(q.device());

  // One flag for both tensors (it also skips copying the dims past rotary_dim): a k_out that is
  // not k beside an in-place q would keep those dims unwritten.  (An empty tensor's data pointer
  // says nothing: the other one decides.)
  const bool q_inplace = q_out.data_ptr() == q.data_ptr(), k_inplace = k_out.data_ptr() == k.data_ptr();
  TORCH_CHECK(q.numel() == 0 || k.numel() == 0 || q_inplace == k_inplace,
              "rotary_cuda: q_out and k_out must both be q and k (in place) or both be other tensors");
  const bool inplace = q.numel() ? q_inplace : k_inplace;
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.qo = q_out.data_ptr();
  p.ko = k_out.data_ptr();
  p.cos = cos.data_ptr();
  p.sin = sin.data_ptr();
  p.cu = varlen ? cu_seqlens->data_ptr<int>() : nullptr;
  dims3(q, p.sq);
  dims3(k, p.sk);
  dims3(q_out, p.sqo);
  dims3(k_out, p.sko);
  p.s_cos = cos.size(0) > 1 ? cos.stride(0) : 0;
  p.n_tokens = T;
  p.seqlen = S;
  p.offset = offset;
  p.max_pos = cos.size(0);
  p.n_heads_q = static_cast<int>(Hq);
  p.n_heads_k = static_cast<int>(Hk);
  p.head_dim = static_cast<int>(D);
  p.half = static_cast<int>(half);
  p.num_seqs = static_cast<int>(num_seqs);
  p.pos_mode = static_cast<int>(pos_mode);
  p.varlen = varlen;
  p.copy_pass = !inplace && 2 * half < D;
  p.sin_sign = conj ? -1.f : 1.f;

  // Widest vector that every access of the launch can use.
  const int es = static_cast<int>(q.element_size());
  const int cs = static_cast<int>(cos.element_size());
  auto fits = [&](int v) {
    if (half % v) return false;
    if (p.copy_pass && (D - 2 * half) % v) return false;
    const std::pair<const at::Tensor*, const int64_t*> rows[4] = {{&q, p.sq}, {&k, p.sk}, {&q_out, p.sqo},
                                                                  {&k_out, p.sko}};
    for (const auto& [t, st] : rows) {
      if (t->numel() == 0) continue;
      if (!is_aligned(t->data_ptr(), v * es)) return false;
      for (int d = 0; d < 3; ++d)
        if (st[d] % v) return false;
    }
    const int cv = std::min(v, 16 / cs);  // cos/sin are loaded in chunks of <= 16 bytes
    return is_aligned(p.cos, cv * cs) && is_aligned(p.sin, cv * cs) && p.s_cos % cv == 0;
  };
  int vec = 16 / es;
  while (vec > 1 && !fits(vec)) vec >>= 1;

  const int64_t units_per_token = (Hq + Hk) * (half / vec + (p.copy_pass ? (D - 2 * half) / vec : 0));
  TORCH_CHECK(units_per_token * kMaxTokensPerBlock < (int64_t{1} << 31), "rotary_cuda: too much work per token");
  p.tpb = static_cast<int>(std::clamp<int64_t>((kUnitsPerBlock + units_per_token - 1) / units_per_token, 1,
                                               kMaxTokensPerBlock));
  const int64_t blocks = (T + p.tpb - 1) / p.tpb;
  TORCH_CHECK(blocks < (int64_t{1} << 31), "rotary_cuda: too many tokens");
  const dim3 grid(static_cast<unsigned>(blocks));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  FASTLM_DISPATCH_FLOAT(q.scalar_type(), "rotary_cuda", [&] {
    const bool cos_f32 = cos.scalar_type() == at::kFloat;
    if (interleaved) {
      if (cos_f32) launch_vec<scalar_t, float, true>(p, vec, grid, stream);
      else launch_vec<scalar_t, scalar_t, true>(p, vec, grid, stream);
    } else {
      if (cos_f32) launch_vec<scalar_t, float, false>(p, vec, grid, stream);
      else launch_vec<scalar_t, scalar_t, false>(p, vec, grid, stream);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace fastlm

TORCH_LIBRARY_IMPL(fastlm, CUDA, m) { m.impl("rotary_cuda", &fastlm::rotary_cuda); }
