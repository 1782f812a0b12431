// Attention forward and backward for Hopper (sm_90a), warp-specialized in the FlashAttention-3
// manner (the backward: see attn_bwd_sm90_kernel).  The forward:
// a producer warp issues TMA loads of Q and of K/V tiles into a ring of shared-memory stages,
// and two consumer warpgroups (64 query rows each of a 128-row tile) run S = Q K^T and O += P V
// on wgmma (fp32 accumulators in registers) with the online softmax between them.  Registers go
// where the work is (setmaxnreg: 240 per consumer thread, 24 for the producer warpgroup, as FA3).
//
// Dense fp16/bf16, q (batch, seqlen_q, heads_q, D), k/v (batch, seqlen_k, heads_kv, D) with unit
// stride in D and 16-byte aligned strides (TMA), heads_q a multiple of heads_kv (GQA), D 64 or
// 128, causal (bottom-right aligned) or not.  Returns out like q and lse (batch, heads_q,
// seqlen_q) fp32 (natural log; -inf with out = 0 for rows that see no key).
//
// Pipeline (per CTA, one 128-row query tile of one head): for K and for V, full[s] (stage s
// landed: TMA transaction bytes) and empty[s] (the 256 consumer threads are done with it)
// mbarriers; the producer waits empty, the consumers wait full.  Each tile: S (64 x 128 per
// warpgroup) = Q K^T over D/16 k-steps of wgmma m64n128k16 (both operands from shared memory,
// K-major); masks and the online softmax in registers (log2 domain); P packed to the A-register
// layout of wgmma (the m64 accumulator and the A fragment share their rows and columns, as for
// mma.sync); O += P V over 8 k-steps of m64nDk16 with V MN-major.
//
// Three consumer loops (template MODE; the op's `overlap` argument): 1 (default),
// FlashAttention-3's overlap inside a warpgroup (S_j = Q K_j^T issued together with
// O += P_{j-1} V_{j-1}, the softmax of S_j running while the P V is on the tensor cores; K
// streams one tile ahead of V, each with its own full/empty barriers); 2, that plus its
// ping-pong between the two consumer warpgroups (named barriers: they take turns issuing their
// GEMMs, one's softmax hiding under the other's matmuls); 0, each wgmma group waited for in turn.
// Tested in the SIMT emulator
// (tests/test_attention_sm90_emu.py: tests/cuda_emu_sm90.h implements mbarriers, TMA and wgmma
// from the PTX ISA), compiled for sm_90a here; on a GPU by
// tests/test_attention.py::test_gpu_sm90_forward, through fastlm.ops.attention with
// FASTLM_ATTENTION_SM90=1 (kernels/attention.py: _sm90_ok).
#ifndef FASTLM_HOST_EMU
#include "../common.cuh"

#include <cuda.h>  // CUtensorMap (the encode function is reached through the runtime: no -lcuda)
#include <cuda_runtime.h>

#include <ATen/ops/empty.h>

#include "hopper.cuh"
#endif

namespace fastlm {
namespace sm90 {
namespace {

// ---- kernel begin: this section (to 'kernel end') is also compiled on the host by
// tests/test_attention_sm90_emu.py, which runs the kernel in the SIMT emulator with the Hopper
// primitives of tests/cuda_emu_sm90.h.
constexpr int kBlockM = 128, kBlockN = 128;  // query rows per CTA (2 consumer warpgroups), keys per tile
// Consumer loops (MODE, the op's `overlap`): each wgmma waited for in turn; the softmax of tile
// j overlapped with P V of tile j - 1; that, with the two warpgroups taking turns at the GEMMs.
constexpr int kSerial = 0, kOverlap = 1, kPingPongOverlap = 2;
constexpr int kThreads = 384;                // producer warpgroup + 2 consumer warpgroups
constexpr int kBoxBytes = 128 * kSwizzleBytes;  // one TMA box: 128 rows x 64 elements (16-bit)

template <int D>
struct Shape {
  static constexpr int kBoxes = D / 64;  // boxes per 128-row tile (64 columns each)
  static constexpr int kStages = D == 64 ? 4 : 2;
  static constexpr int kTileBytes = kBoxes * kBoxBytes;
  // Q, K stages, V stages, then the mbarriers; +1024 to align the base.
  static constexpr int kBarOffset = (1 + 2 * kStages) * kTileBytes;
  static constexpr int kSmemBytes = kBarOffset + (1 + 4 * kStages) * 8 + 1024;
};

struct FwdParams {
  void* out;   // (batch, seqlen_q, heads_q, D)
  float* lse;  // (batch, heads_q, seqlen_q) contiguous
  int64_t o_b, o_s, o_h;
  int seqlen_q, seqlen_k, heads_q, group;  // group = heads_q / heads_kv
  float scale_log2;                        // softmax_scale * log2(e)
};


// A consumer thread's two accumulator rows (r[0] = g, r[1] = g + 8 of its warp's 16) and its
// column offset t (columns 8 j + 2 t, + 1); causal: row r sees keys <= r + shift, and diag is
// the CTA's first row's limit (tiles past it need the mask).
struct Rows {
  int r[2];
  int t, shift, diag;
};

// S = Q K^T of one key tile into sacc: D / 16 k-steps of m64n128k16, 4 per 64-column box (32
// bytes apart along the swizzled rows); issued and committed, not waited for.
template <typename T, int D>
__device__ __forceinline__ void issue_qk(float (&sacc)[kBlockN / 2], uint32_t q_addr, uint32_t k_addr) {
  wgmma_fence();
#pragma unroll
  for (int ks = 0; ks < D / 16; ++ks) {
    const uint32_t off = (ks / 4) * kBoxBytes + (ks % 4) * 32;
    wgmma_ss<T, kBlockN>(sacc, smem_desc(q_addr + off, 16, 1024), smem_desc(k_addr + off, 16, 1024), ks > 0);
  }
  wgmma_commit();
}

// O += P V: 8 k-steps of 16 keys (2048 bytes of V rows each), N = D (the boxes kBoxBytes
// apart); issued and committed.
template <typename T, int D>
__device__ __forceinline__ void issue_pv(float (&o)[D / 2], const uint32_t (&pa)[kBlockN / 16][4], uint32_t v_addr) {
  wgmma_fence();
#pragma unroll
  for (int kk = 0; kk < kBlockN / 16; ++kk)
    wgmma_rs<T, D>(o, pa[kk], smem_desc(v_addr + kk * 16 * kSwizzleBytes, kBoxBytes, 1024), 1);
  wgmma_commit();
}

// The online softmax of one tile (keys key0 ..): scores to the log2 domain, keys past seqlen_k
// (TMA zero-filled) and causal ones past the row's diagonal to -inf; m_i, l_i updated (l_i:
// this thread's columns, the quad's sum at the end), sacc left holding the probabilities and
// alpha the factor that rescales O.
template <bool CAUSAL>
__device__ __forceinline__ void softmax_tile(float (&sacc)[kBlockN / 2], float (&m_i)[2], float (&l_i)[2],
                                             float (&alpha)[2], int key0, const Rows& rows, const FwdParams& p) {
  const bool edge = key0 + kBlockN > p.seqlen_k || (CAUSAL && key0 + kBlockN - 1 > rows.diag);
  float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
  for (int i = 0; i < kBlockN / 2; ++i) {
    float x = sacc[i] * p.scale_log2;
    if (edge) {
      const int key = key0 + 8 * (i / 4) + 2 * rows.t + (i & 1);
      if (key >= p.seqlen_k || (CAUSAL && key > rows.r[(i >> 1) & 1] + rows.shift)) x = -INFINITY;
    }
    sacc[i] = x;
    mx[(i >> 1) & 1] = fmaxf(mx[(i >> 1) & 1], x);
  }
  float msafe[2];
  online_max_step(mx, m_i, alpha, msafe);
  float rs[2] = {0.f, 0.f};
#pragma unroll
  for (int i = 0; i < kBlockN / 2; ++i) {
    const float e = exp2f(sacc[i] - msafe[(i >> 1) & 1]);
    sacc[i] = e;
    rs[(i >> 1) & 1] += e;
  }
  l_i[0] = l_i[0] * alpha[0] + rs[0];
  l_i[1] = l_i[1] * alpha[1] + rs[1];
}

// P as wgmma A registers: k-step kk covers keys 16 kk .. + 15 = accumulator tiles 2 kk and
// 2 kk + 1 (the m64 accumulator and the A fragment share rows and columns, as for mma.sync).
template <typename T, int N>
__device__ __forceinline__ void pack_p_n(const float (&sacc)[N / 2], uint32_t (&pa)[N / 16][4]) {
#pragma unroll
  for (int kk = 0; kk < N / 16; ++kk) {
    pa[kk][0] = pack2<T>(sacc[8 * kk + 0], sacc[8 * kk + 1]);
    pa[kk][1] = pack2<T>(sacc[8 * kk + 2], sacc[8 * kk + 3]);
    pa[kk][2] = pack2<T>(sacc[8 * kk + 4], sacc[8 * kk + 5]);
    pa[kk][3] = pack2<T>(sacc[8 * kk + 6], sacc[8 * kk + 7]);
  }
}

template <typename T, int D, bool CAUSAL, int MODE>
__global__ void __launch_bounds__(kThreads, 1)
    attn_fwd_sm90_kernel(const __grid_constant__ CUtensorMap tq, const __grid_constant__ CUtensorMap tk,
                         const __grid_constant__ CUtensorMap tv, const FwdParams p) {
  using S = Shape<D>;
  FASTLM_EXTERN_SMEM(unsigned char, smem_raw);
  unsigned char* smem = smem_raw + ((1024 - smem_u32(smem_raw) % 1024) % 1024);
  unsigned char* sq = smem;
  unsigned char* sk = smem + S::kTileBytes;                  // stage s at + s * kTileBytes
  unsigned char* sv = smem + (1 + S::kStages) * S::kTileBytes;
  uint64_t* bars = reinterpret_cast<uint64_t*>(smem + S::kBarOffset);
  uint64_t* q_full = bars;
  uint64_t* k_full = bars + 1;
  uint64_t* v_full = bars + 1 + S::kStages;
  uint64_t* k_empty = bars + 1 + 2 * S::kStages;
  uint64_t* v_empty = bars + 1 + 3 * S::kStages;

  const int tid = threadIdx.x, wg = tid / 128;
  const int n_mblocks = (p.seqlen_q + kBlockM - 1) / kBlockM;
  // Causal: the longest rows first (the last query tile sees the most keys).
  const int mb = CAUSAL ? n_mblocks - 1 - static_cast<int>(blockIdx.x) : static_cast<int>(blockIdx.x);
  const int h = blockIdx.y, b = blockIdx.z, hkv = h / p.group;
  const int m0 = mb * kBlockM;
  const int shift = p.seqlen_k - p.seqlen_q;  // causal: row r sees keys <= r + shift
  const int n_end = CAUSAL ? min(p.seqlen_k, m0 + kBlockM + shift) : p.seqlen_k;
  const int n_tiles = n_end > 0 ? (n_end + kBlockN - 1) / kBlockN : 0;

  if (tid == 0) {
    mbar_init(q_full, 1);
    for (int s = 0; s < S::kStages; ++s) {
      mbar_init(&k_full[s], 1);
      mbar_init(&v_full[s], 1);
      mbar_init(&k_empty[s], 256);
      mbar_init(&v_empty[s], 256);
    }
    mbar_fence_init();
  }
  __syncthreads();

  if (wg == 0) {  // ---- producer
    setmaxnreg_dec<24>();
    if (tid == 0) {
      tma_prefetch_map(&tq);
      tma_prefetch_map(&tk);
      tma_prefetch_map(&tv);
      mbar_arrive_expect_tx(q_full, S::kTileBytes);
      for (int x = 0; x < S::kBoxes; ++x) tma_load_4d(sq + x * kBoxBytes, &tq, q_full, 64 * x, m0, h, b);
      // K runs one tile ahead of V, the order the consumers use them in (S_j = Q K_j^T is issued
      // with O += P_{j-1} V_{j-1}); each waits for its stage's previous tile to be released.
      auto load = [&](const CUtensorMap* map, unsigned char* ring, uint64_t* full, uint64_t* empty, int j) {
        const int s = j % S::kStages;
        mbar_wait(&empty[s], ((j / S::kStages) & 1) ^ 1);  // (the first pass through the ring finds it free)
        mbar_arrive_expect_tx(&full[s], S::kTileBytes);
        for (int x = 0; x < S::kBoxes; ++x)
          tma_load_4d(ring + s * S::kTileBytes + x * kBoxBytes, map, &full[s], 64 * x, j * kBlockN, hkv, b);
      };
      for (int j = 0; j <= n_tiles; ++j) {
        if (j < n_tiles) load(&tk, sk, k_full, k_empty, j);
        if (j > 0) load(&tv, sv, v_full, v_empty, j - 1);
      }
    }
    return;
  }

  // ---- consumers: warpgroup cw owns rows m0 + 64 cw .. + 63; warp w of it rows 16 w .. + 15,
  // thread (g, t) rows g and g + 8 of those, columns 8 j + 2 t (+ 1) of each accumulator tile.
  setmaxnreg_inc<240>();
  const int cw = wg - 1, w = (tid / 32) % 4, lane = tid % 32, t = lane % 4;
  Rows rows;
  rows.r[0] = m0 + 64 * cw + 16 * w + lane / 4;
  rows.r[1] = rows.r[0] + 8;
  rows.t = t;
  rows.shift = shift;
  rows.diag = m0 + shift;
  const uint32_t q_addr = smem_u32(sq) + cw * 64 * kSwizzleBytes;
  auto k_addr = [&](int j) { return smem_u32(sk + (j % S::kStages) * S::kTileBytes); };
  auto v_addr = [&](int j) { return smem_u32(sv + (j % S::kStages) * S::kTileBytes); };
  auto phase = [](int j) { return static_cast<uint32_t>((j / S::kStages) & 1); };

  float o[D / 2];
#pragma unroll
  for (int i = 0; i < D / 2; ++i) o[i] = 0.f;
  float m_i[2] = {-INFINITY, -INFINITY}, l_i[2] = {0.f, 0.f}, alpha[2];
  float sacc[kBlockN / 2];
  uint32_t pa[kBlockN / 16][4];

  mbar_wait(q_full, 0);
  if (MODE == kSerial) {  // each wgmma group waited for before the next step
    for (int j = 0; j < n_tiles; ++j) {
      mbar_wait(&k_full[j % S::kStages], phase(j));
      issue_qk<T, D>(sacc, q_addr, k_addr(j));
      wgmma_wait<0>();
      fence_regs(sacc);
      mbar_arrive(&k_empty[j % S::kStages]);
      softmax_tile<CAUSAL>(sacc, m_i, l_i, alpha, j * kBlockN, rows, p);
#pragma unroll
      for (int i = 0; i < D / 2; ++i) o[i] *= alpha[(i >> 1) & 1];
      pack_p_n<T, kBlockN>(sacc, pa);
      mbar_wait(&v_full[j % S::kStages], phase(j));
      issue_pv<T, D>(o, pa, v_addr(j));
      wgmma_wait<0>();
      fence_regs(o);
      mbar_arrive(&v_empty[j % S::kStages]);
    }
  } else if (n_tiles > 0) {
    // FlashAttention-3's overlap inside a warpgroup: tile j's S = Q K^T and tile j-1's O += P V
    // are issued together, and the softmax of S_j runs while P V is still on the tensor cores.
    mbar_wait(&k_full[0], 0);
    issue_qk<T, D>(sacc, q_addr, k_addr(0));
    wgmma_wait<0>();
    fence_regs(sacc);
    mbar_arrive(&k_empty[0]);
    softmax_tile<CAUSAL>(sacc, m_i, l_i, alpha, 0, rows, p);  // (o is 0: no rescale)
    pack_p_n<T, kBlockN>(sacc, pa);
    // Ping-pong: the two warpgroups take turns issuing their GEMMs (named barrier 1 + cw is
    // warpgroup cw's turn), so one's softmax runs while the other's GEMMs hold the tensor cores.
    // Warpgroup 1 hands warpgroup 0 the first turn; every turn taken is handed back, but the
    // last one of warpgroup 1, which nobody would take.
    constexpr bool kPingPong = MODE == kPingPongOverlap;
    if (kPingPong && cw == 1 && n_tiles > 1) named_bar_arrive(1, 256);
    for (int j = 1; j < n_tiles; ++j) {
      mbar_wait(&k_full[j % S::kStages], phase(j));
      mbar_wait(&v_full[(j - 1) % S::kStages], phase(j - 1));
      if (kPingPong) named_bar_sync(1 + cw, 256);
      issue_qk<T, D>(sacc, q_addr, k_addr(j));
      issue_pv<T, D>(o, pa, v_addr(j - 1));
      if (kPingPong && !(cw == 1 && j == n_tiles - 1)) named_bar_arrive(2 - cw, 256);
      wgmma_wait<1>();  // S_j is in; P_{j-1} V_{j-1} may still run (it reads pa, writes o)
      fence_regs(sacc);
      mbar_arrive(&k_empty[j % S::kStages]);
      softmax_tile<CAUSAL>(sacc, m_i, l_i, alpha, j * kBlockN, rows, p);
      wgmma_wait<0>();
      fence_regs(o);
      mbar_arrive(&v_empty[(j - 1) % S::kStages]);
#pragma unroll
      for (int i = 0; i < D / 2; ++i) o[i] *= alpha[(i >> 1) & 1];
      pack_p_n<T, kBlockN>(sacc, pa);
    }
    const int last = n_tiles - 1;
    mbar_wait(&v_full[last % S::kStages], phase(last));
    issue_pv<T, D>(o, pa, v_addr(last));
    wgmma_wait<0>();
    fence_regs(o);
    mbar_arrive(&v_empty[last % S::kStages]);
  }
  const int row0 = rows.r[0], row1 = rows.r[1];

  // Epilogue: the quad's row sums, out = O / l (0 for a row with no key), lse.
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    l_i[r] += __shfl_xor_sync(0xffffffffu, l_i[r], 1);
    l_i[r] += __shfl_xor_sync(0xffffffffu, l_i[r], 2);
  }
  T* out = static_cast<T*>(p.out) + b * p.o_b + h * p.o_h;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int row = r ? row1 : row0;
    if (row >= p.seqlen_q) continue;
    const float inv = l_i[r] > 0.f ? 1.f / l_i[r] : 0.f;
    T* orow = out + static_cast<int64_t>(row) * p.o_s;
#pragma unroll
    for (int jj = 0; jj < D / 8; ++jj) {
      const uint32_t v = pack2<T>(o[4 * jj + 2 * r] * inv, o[4 * jj + 2 * r + 1] * inv);
      memcpy(orow + 8 * jj + 2 * t, &v, 4);
    }
    if (t == 0)
      p.lse[(static_cast<int64_t>(b) * p.heads_q + h) * p.seqlen_q + row] =
          l_i[r] > 0.f ? (m_i[r] + log2f(l_i[r])) * 0.6931471805599453f : -INFINITY;
  }
}

// ---- backward: dK, dV per 128-key block (and dQ added into an fp32 accumulator), FlashAttention-3's
// layout of the work.  A CTA owns keys n0 .. n0 + 127 of one KV head (its two consumer
// warpgroups 64 keys each) and streams the (query head of the group, 64-query tile) steps that
// can see them: the producer loads K and V once, then Q and dO of each step into a 2-stage ring.
// Per step, in the transposed form (rows = keys, columns = queries, like the m64 accumulator):
//   S^T = K Q^T and dP^T = V dO^T (wgmma, both operands K-major in shared memory),
//   P^T = exp2(S^T * scale * log2 e - lse * log2 e) (masked) to shared memory, dV += P^T dO,
//   dS^T = P^T (dP^T - delta) to shared memory, dK += dS^T Q (P^T and dS^T K-major, dO and Q
//   MN-major: FlashAttention-3's way of leaving the registers to the dK/dV accumulators), and
//   dQ (64 queries x 64 head-dim columns per warpgroup) = dS K with both operands MN-major,
//   staged in shared memory and added into the fp32 dQ accumulator by TMA reduce-adds (as FA3).
// lse (natural log) and delta = rowsum(dO * O) come from the caller, (batch, heads_q, seqlen_q).
constexpr int kBwdM = 64, kBwdN = 128;  // queries per step, keys per CTA
constexpr int kQBoxBytes = kBwdM * kSwizzleBytes;  // a 64-row box

template <int D>
struct BwdShape {
  static constexpr int kBoxes = D / 64;
  static constexpr int kKVBytes = kBoxes * kBoxBytes;    // K or V: 128 rows
  static constexpr int kQBytes = kBoxes * kQBoxBytes;    // Q or dO: 64 rows
  static constexpr int kDsBytes = kBwdN * kSwizzleBytes;  // dS^T: 128 keys x 64 queries
  static constexpr int kStages = 2;
  static constexpr int kQOffset = 2 * kKVBytes, kDoOffset = kQOffset + kStages * kQBytes;
  static constexpr int kDsOffset = kDoOffset + kStages * kQBytes, kPOffset = kDsOffset + 2 * kDsBytes;
  // dQ staging, per consumer warpgroup: 64 queries x 64 fp32 columns as two TMA boxes of 32
  // columns (128-byte rows, the 128-byte swizzle), added into dq_accum by the TMA unit
  static constexpr int kDqBoxBytes = kBwdM * kSwizzleBytes, kDqBytes = 2 * kDqBoxBytes;
  static constexpr int kDqOffset = kPOffset + kDsBytes;
  static constexpr int kBarOffset = kDqOffset + 2 * kDqBytes;
  static constexpr int kSmemBytes = kBarOffset + (1 + 2 * kStages) * 8 + 1024;
};

struct BwdParams {
  const float* lse;    // (batch, heads_q, seqlen_q)
  const float* delta;  // (batch, heads_q, seqlen_q)
  void* dk;            // (batch, seqlen_k, heads_kv, D)
  void* dv;
  int64_t dk_b, dk_s, dk_h, dv_b, dv_s, dv_h;
  int seqlen_q, seqlen_k, heads_q, group;
  float scale, scale_log2;
};

// A thread's m64 x 64 accumulator tile (rows kr0, kr0 + 8 of the block; columns 8 j + 2 t, + 1)
// as 16-bit values into `buf`: row r's 64 columns are one 128-byte line, 8 lines per 1024 bytes,
// in the 128-byte swizzle (what TMA writes and wgmma reads).
template <typename T>
__device__ __forceinline__ void store_rows(unsigned char* buf, int kr0, int t, const float (&acc)[kBwdM / 2]) {
  const uint32_t base = smem_u32(buf);
#pragma unroll
  for (int i = 0; i < kBwdM / 2; i += 2) {
    const int row = kr0 + 8 * ((i >> 1) & 1), col = 8 * (i / 4) + 2 * t;
    const uint32_t at = base + (row % 8) * kSwizzleBytes + (row / 8) * 1024 + 2 * col;
    const uint32_t v = pack2<T>(acc[i], acc[i + 1]);
    st_async_src(buf + ((at ^ (((at >> 7) & 7u) << 4)) - base), v);
  }
}

// A thread's m64 x 64 fp32 dQ fragment (rows r0 and r0 + 8 of the tile, columns 8 j + 2 t and + 1)
// times `scale` into a staging tile of two 64-row x 32-column boxes (128-byte rows in the
// 128-byte swizzle: what the TMA reduce reads), one 8-byte store per column pair.  Element
// (row, col) lies at box col / 32, line row, 16-byte chunk ((col % 32) / 4) ^ (row % 8), byte
// (col % 4) * 4; the thread's rows share row % 8 = g and its columns give chunk 2 (j % 4) + t / 2,
// so the chunk term is 32 ((j % 4) ^ (g / 2)) + 16 ((t / 2) ^ (g % 2)): four XORs, the rest
// immediates (per-store swizzle arithmetic had spilled the dK/dV accumulators).
__device__ __forceinline__ void store_dq(unsigned char* tile, int r0, int t, const float (&dq)[32], float scale) {
  const int g = r0 % 8;
  unsigned char* row = tile + r0 * kSwizzleBytes + 16 * ((t >> 1) ^ (g & 1)) + 8 * (t & 1);
#pragma unroll
  for (int m = 0; m < 4; ++m) {
    unsigned char* at = row + 32 * (m ^ (g >> 1));
#pragma unroll
    for (int box = 0; box < 2; ++box)
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const int i = 4 * (4 * box + m) + 2 * r;  // accumulator i: column tile j = 4 box + m, row r0 + 8 r
        st_async_src(at + box * kQBoxBytes + r * 8 * kSwizzleBytes, make_float2(dq[i] * scale, dq[i + 1] * scale));
      }
  }
}

template <typename T, int D, bool CAUSAL>
__global__ void __launch_bounds__(kThreads, 1)
    attn_bwd_sm90_kernel(const __grid_constant__ CUtensorMap tq, const __grid_constant__ CUtensorMap tk,
                         const __grid_constant__ CUtensorMap tv, const __grid_constant__ CUtensorMap tdo,
                         const __grid_constant__ CUtensorMap tdq, const BwdParams p) {
  using S = BwdShape<D>;
  FASTLM_EXTERN_SMEM(unsigned char, smem_raw);
  unsigned char* smem = smem_raw + ((1024 - smem_u32(smem_raw) % 1024) % 1024);
  unsigned char* sk = smem;
  unsigned char* sv = smem + S::kKVBytes;
  unsigned char* sq = smem + S::kQOffset;    // stage s at + s * kQBytes
  unsigned char* sdo = smem + S::kDoOffset;
  unsigned char* sds = smem + S::kDsOffset;  // buffer u at + u * kDsBytes
  unsigned char* sp = smem + S::kPOffset;
  unsigned char* sdq = smem + S::kDqOffset;  // warpgroup cw's tile at + cw * kDqBytes
  __shared__ float s_lse[2][kBwdM], s_delta[2][kBwdM];  // per consumer warpgroup
  uint64_t* bars = reinterpret_cast<uint64_t*>(smem + S::kBarOffset);
  uint64_t* kv_full = bars;
  uint64_t* q_full = bars + 1;
  uint64_t* q_empty = bars + 1 + S::kStages;

  const int tid = threadIdx.x, wg = tid / 128;
  const int n0 = blockIdx.x * kBwdN, hkv = blockIdx.y, b = blockIdx.z;
  const int shift = p.seqlen_k - p.seqlen_q;  // causal: query q sees keys <= q + shift
  const int i_lo = CAUSAL ? max(0, n0 - shift) / kBwdM : 0;
  const int n_i = max(0, (p.seqlen_q + kBwdM - 1) / kBwdM - i_lo);  // query tiles per head
  const int n_steps = p.group * n_i;

  if (tid == 0) {
    mbar_init(kv_full, 1);
    for (int s = 0; s < S::kStages; ++s) {
      mbar_init(&q_full[s], 1);
      mbar_init(&q_empty[s], 256);
    }
    mbar_fence_init();
  }
  __syncthreads();

  if (wg == 0) {  // ---- producer
    setmaxnreg_dec<24>();
    if (tid == 0) {
      mbar_arrive_expect_tx(kv_full, 2 * S::kKVBytes);
      for (int x = 0; x < S::kBoxes; ++x) {
        tma_load_4d(sk + x * kBoxBytes, &tk, kv_full, 64 * x, n0, hkv, b);
        tma_load_4d(sv + x * kBoxBytes, &tv, kv_full, 64 * x, n0, hkv, b);
      }
      for (int st = 0; st < n_steps; ++st) {
        const int s = st % S::kStages, h = hkv * p.group + st / n_i, m0 = (i_lo + st % n_i) * kBwdM;
        mbar_wait(&q_empty[s], ((st / S::kStages) & 1) ^ 1);
        mbar_arrive_expect_tx(&q_full[s], 2 * S::kQBytes);
        for (int x = 0; x < S::kBoxes; ++x) {
          tma_load_4d(sq + s * S::kQBytes + x * kQBoxBytes, &tq, &q_full[s], 64 * x, m0, h, b);
          tma_load_4d(sdo + s * S::kQBytes + x * kQBoxBytes, &tdo, &q_full[s], 64 * x, m0, h, b);
        }
      }
    }
    return;
  }

  // ---- consumers: warpgroup cw owns keys n0 + 64 cw .. + 63 (accumulator rows); thread (g, t)
  // of warp w rows 16 w + g (+ 8), query columns 8 j + 2 t (+ 1).
  setmaxnreg_inc<240>();
  const int cw = wg - 1, w = (tid / 32) % 4, lane = tid % 32, g = lane / 4, t = lane % 4;
  const int kr0 = 64 * cw + 16 * w + g;  // the thread's first key row in the block (+ 8: second)
  const uint32_t k_addr = smem_u32(sk) + cw * 64 * kSwizzleBytes, v_addr = smem_u32(sv) + cw * 64 * kSwizzleBytes;
  float dk[D / 2], dv[D / 2];
#pragma unroll
  for (int i = 0; i < D / 2; ++i) dk[i] = dv[i] = 0.f;

  mbar_wait(kv_full, 0);
  for (int st = 0; st < n_steps; ++st) {
    const int s = st % S::kStages, h = hkv * p.group + st / n_i, m0 = (i_lo + st % n_i) * kBwdM;
    const uint32_t q_addr = smem_u32(sq + s * S::kQBytes), do_addr = smem_u32(sdo + s * S::kQBytes);
    const int64_t row_base = (static_cast<int64_t>(b) * p.heads_q + h) * p.seqlen_q;
    mbar_wait(&q_full[s], (st / S::kStages) & 1);

    float sacc[kBwdM / 2], dpacc[kBwdM / 2];
    wgmma_fence();
#pragma unroll
    for (int ks = 0; ks < D / 16; ++ks) {
      const uint32_t off = (ks / 4) * kBoxBytes + (ks % 4) * 32, qoff = (ks / 4) * kQBoxBytes + (ks % 4) * 32;
      wgmma_ss<T, kBwdM>(sacc, smem_desc(k_addr + off, 16, 1024), smem_desc(q_addr + qoff, 16, 1024), ks > 0);
    }
    wgmma_commit();
#pragma unroll
    for (int ks = 0; ks < D / 16; ++ks) {
      const uint32_t off = (ks / 4) * kBoxBytes + (ks % 4) * 32, qoff = (ks / 4) * kQBoxBytes + (ks % 4) * 32;
      wgmma_ss<T, kBwdM>(dpacc, smem_desc(v_addr + off, 16, 1024), smem_desc(do_addr + qoff, 16, 1024), ks > 0);
    }
    wgmma_commit();
    // The step's lse (log2 domain, +inf for a row with no key: P = 0) and delta, staged in shared
    // memory per warpgroup while the GEMMs run (loads kept out of the registers the
    // accumulators need); the previous step's readers are past its barriers by now.
    {
      const int x = tid % 128, q = m0 + x % kBwdM;
      const bool in = q < p.seqlen_q;
      if (x < kBwdM) {
        const float l = in ? __ldg(p.lse + row_base + q) : -INFINITY;
        s_lse[cw][x] = l == -INFINITY ? INFINITY : l * 1.4426950408889634f;
      } else {
        s_delta[cw][x - kBwdM] = in ? __ldg(p.delta + row_base + q) : 0.f;
      }
    }
    named_bar_sync(2 + cw, 128);
    wgmma_wait<1>();
    fence_regs(sacc);

    // P^T; queries past seqlen_q (lse +inf), keys past seqlen_k and (causal) keys after the
    // query: 0.
#pragma unroll
    for (int i = 0; i < kBwdM / 2; ++i) {
      const int ql = 8 * (i / 4) + 2 * t + (i & 1), key = n0 + kr0 + 8 * ((i >> 1) & 1);
      bool vis = key < p.seqlen_k;
      if (CAUSAL) vis = vis && key <= m0 + ql + shift;
      sacc[i] = vis ? exp2f(sacc[i] * p.scale_log2 - s_lse[cw][ql]) : 0.f;
    }
    // P^T (this warpgroup's 64 key rows) to shared memory for dV += P^T dO: a 128-byte line of 64
    // queries per key, K-major for that GEMM (registers stay for the accumulators).
    store_rows<T>(sp, kr0, t, sacc);
    fence_proxy_async();
    named_bar_sync(2 + cw, 128);  // the warpgroup's P^T rows are in
    const uint32_t p_addr = smem_u32(sp) + cw * 64 * kSwizzleBytes;
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < kBwdM / 16; ++kk)
      wgmma_ss_nt<T, D>(dv, smem_desc(p_addr + kk * 32, 16, 1024),
                        smem_desc(do_addr + kk * 16 * kSwizzleBytes, kQBoxBytes, 1024), 1);
    wgmma_commit();
    wgmma_wait<1>();  // dP^T is in (dV += P^T dO may still run)
    fence_regs(dpacc);
#pragma unroll
    for (int i = 0; i < kBwdM / 2; ++i)  // dS^T (0 wherever P is)
      dpacc[i] = sacc[i] * (dpacc[i] - s_delta[cw][8 * (i / 4) + 2 * t + (i & 1)]);
    // dS^T likewise, in the buffer of this step's parity (the other one may still be read by the
    // previous step's dQ): K-major for dK += dS^T Q, and M-major (M = queries) for dQ = dS K.
    unsigned char* ds = sds + (st & 1) * S::kDsBytes;
    store_rows<T>(ds, kr0, t, dpacc);
    fence_proxy_async();
    named_bar_sync(1, 256);  // both warpgroups' dS^T are in
    const uint32_t ds_addr = smem_u32(ds);
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < kBwdM / 16; ++kk)
      wgmma_ss_nt<T, D>(dk, smem_desc(ds_addr + cw * 64 * kSwizzleBytes + kk * 32, 16, 1024),
                        smem_desc(q_addr + kk * 16 * kSwizzleBytes, kQBoxBytes, 1024), 1);
    wgmma_commit();
    if (D == 128 || cw == 0) {  // dQ columns 64 cw .. + 63 (head_dim 64: warpgroup 0 alone)
      // dQ (times the softmax scale) goes to the warpgroup's staging tile, then into dq_accum by
      // two TMA reduce-adds (one per 32-column box; query rows past seqlen_q are skipped by the
      // TMA unit): no per-element atomics.  The tile is written again only after the previous
      // step's reduce has read it (bulk_wait_read, then the warpgroup's barrier: before dQ's
      // registers are live, while dK's wgmma runs).
      const int wt = tid % 128;
      unsigned char* tile = sdq + cw * S::kDqBytes;
      if (wt == 0) bulk_wait_read<0>();
      named_bar_sync(2 + cw, 128);
      float dq[32];
      wgmma_fence();
#pragma unroll
      for (int kk = 0; kk < kBwdN / 16; ++kk)
        wgmma_ss_tt<T, 64>(dq, smem_desc(ds_addr + kk * 2048, kQBoxBytes, 1024),
                           smem_desc(smem_u32(sk) + cw * kBoxBytes + kk * 2048, kBoxBytes, 1024), kk > 0);
      wgmma_commit();
      wgmma_wait<0>();
      fence_regs(dq);
      store_dq(tile, 16 * w + g, t, dq, p.scale);
      fence_proxy_async();
      named_bar_sync(2 + cw, 128);
      if (wt == 0) {
        tma_reduce_add_4d(&tdq, tile, 64 * cw, m0, h, b);
        tma_reduce_add_4d(&tdq, tile + S::kDqBoxBytes, 64 * cw + 32, m0, h, b);
        bulk_commit();
      }
    } else {
      wgmma_wait<0>();
    }
    fence_regs(dk);
    fence_regs(dv);
    mbar_arrive(&q_empty[s]);  // Q and dO of this stage are done with (dV, dK, dQ waited for)
  }
  if (tid % 128 == 0) bulk_wait_read<0>();  // (the last dQ reduce has read the tile before the CTA ends)

  // dK (times the softmax scale) and dV of the thread's two key rows.
  T* dkp = static_cast<T*>(p.dk) + b * p.dk_b + hkv * p.dk_h;
  T* dvp = static_cast<T*>(p.dv) + b * p.dv_b + hkv * p.dv_h;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int key = n0 + kr0 + 8 * r;
    if (key >= p.seqlen_k) continue;
#pragma unroll
    for (int jj = 0; jj < D / 8; ++jj) {
      const uint32_t a = pack2<T>(dk[4 * jj + 2 * r] * p.scale, dk[4 * jj + 2 * r + 1] * p.scale);
      const uint32_t c = pack2<T>(dv[4 * jj + 2 * r], dv[4 * jj + 2 * r + 1]);
      memcpy(dkp + static_cast<int64_t>(key) * p.dk_s + 8 * jj + 2 * t, &a, 4);
      memcpy(dvp + static_cast<int64_t>(key) * p.dv_s + 8 * jj + 2 * t, &c, 4);
    }
  }
}

// The kernels' parameters from shapes and strides (in elements), and the dispatch over the
// runtime choices: shared by the host code below and the emulator's entry points.
inline FwdParams fwd_params(void* out, float* lse, const int64_t* out_strides, int64_t seqlen_q, int64_t seqlen_k,
                            int64_t heads_q, int64_t heads_kv, double softmax_scale) {
  FwdParams p{};
  p.out = out;
  p.lse = lse;
  p.o_b = out_strides[0];
  p.o_s = out_strides[1];
  p.o_h = out_strides[2];
  p.seqlen_q = static_cast<int>(seqlen_q);
  p.seqlen_k = static_cast<int>(seqlen_k);
  p.heads_q = static_cast<int>(heads_q);
  p.group = static_cast<int>(heads_q / heads_kv);
  p.scale_log2 = static_cast<float>(softmax_scale * 1.4426950408889634);
  return p;
}

inline BwdParams bwd_params(const float* lse, const float* delta, void* dk, const int64_t* dk_strides,
                            void* dv, const int64_t* dv_strides, int64_t seqlen_q, int64_t seqlen_k, int64_t heads_q,
                            int64_t heads_kv, double softmax_scale) {
  BwdParams p{};
  p.lse = lse;
  p.delta = delta;
  p.dk = dk;
  p.dv = dv;
  p.dk_b = dk_strides[0];
  p.dk_s = dk_strides[1];
  p.dk_h = dk_strides[2];
  p.dv_b = dv_strides[0];
  p.dv_s = dv_strides[1];
  p.dv_h = dv_strides[2];
  p.seqlen_q = static_cast<int>(seqlen_q);
  p.seqlen_k = static_cast<int>(seqlen_k);
  p.heads_q = static_cast<int>(heads_q);
  p.group = static_cast<int>(heads_q / heads_kv);
  p.scale = static_cast<float>(softmax_scale);
  p.scale_log2 = static_cast<float>(softmax_scale * 1.4426950408889634);
  return p;
}

// f.template operator()<T, D, CAUSAL, MODE>() for bf16 (else fp16), head_dim D (64, else 128),
// causal and the consumer loop `mode` (the backward passes kSerial and ignores MODE).
template <typename F>
void dispatch(bool bf16, int64_t head_dim, bool causal, int64_t mode, F&& f) {
  auto by_type = [&]<typename T>() {
    auto by_dim = [&]<int D>() {
      auto by_mask = [&]<bool C>() {
        if (mode == kSerial) {
          f.template operator()<T, D, C, kSerial>();
        } else if (mode == kOverlap) {
          f.template operator()<T, D, C, kOverlap>();
        } else {
          f.template operator()<T, D, C, kPingPongOverlap>();
        }
      };
      causal ? by_mask.template operator()<true>() : by_mask.template operator()<false>();
    };
    head_dim == 64 ? by_dim.template operator()<64>() : by_dim.template operator()<128>();
  };
  bf16 ? by_type.template operator()<__nv_bfloat16>() : by_type.template operator()<__half>();
}
// ---- kernel end

}  // namespace
}  // namespace sm90
}  // namespace fastlm

#ifndef FASTLM_HOST_EMU
namespace fastlm {
namespace sm90 {
namespace {

// cuTensorMapEncodeTiled through the runtime's driver entry point (no link against libcuda).
using EncodeTiled = CUresult (*)(CUtensorMap*, CUtensorMapDataType, cuuint32_t, void*, const cuuint64_t*,
                                 const cuuint64_t*, const cuuint32_t*, const cuuint32_t*, CUtensorMapInterleave,
                                 CUtensorMapSwizzle, CUtensorMapL2promotion, CUtensorMapFloatOOBfill);

EncodeTiled encode_tiled() {
  static EncodeTiled fn = [] {
    void* p = nullptr;
    cudaDriverEntryPointQueryResult q;
    const cudaError_t err =
        cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &p, 12000, cudaEnableDefault, &q);
    TORCH_CHECK(err == cudaSuccess && q == cudaDriverEntryPointSuccess && p != nullptr,
                "attention_fwd_sm90_cuda: cuTensorMapEncodeTiled is not available from the driver");
    return reinterpret_cast<EncodeTiled>(p);
  }();
  return fn;
}

// A (batch, seqlen, heads, D) tensor as a 4-D TMA map (D innermost), boxes of 128 bytes (64
// 16-bit or 32 fp32 elements) x box_rows rows, 128-byte swizzle, rows past seqlen read as 0 (and
// skipped by a reduce).
CUtensorMap make_map(const at::Tensor& x, const char* name, int box_rows = kBlockN) {
  const int64_t es = x.element_size();
  for (int d = 0; d < 3; ++d)
    TORCH_CHECK(x.stride(d) * es % 16 == 0, "attention_fwd_sm90_cuda: ", name,
                " needs 16-byte aligned strides (TMA), got strides ", x.strides());
  TORCH_CHECK(reinterpret_cast<uintptr_t>(x.data_ptr()) % 16 == 0, "attention_fwd_sm90_cuda: ", name,
              " must be 16-byte aligned");
  CUtensorMap map;
  const cuuint64_t dims[4] = {static_cast<cuuint64_t>(x.size(3)), static_cast<cuuint64_t>(x.size(1)),
                              static_cast<cuuint64_t>(x.size(2)), static_cast<cuuint64_t>(x.size(0))};
  const cuuint64_t strides[3] = {static_cast<cuuint64_t>(x.stride(1) * es), static_cast<cuuint64_t>(x.stride(2) * es),
                                 static_cast<cuuint64_t>(x.stride(0) * es)};
  const cuuint32_t box[4] = {static_cast<cuuint32_t>(kSwizzleBytes / es), static_cast<cuuint32_t>(box_rows), 1, 1};
  const cuuint32_t elem_strides[4] = {1, 1, 1, 1};
  const CUtensorMapDataType type = x.scalar_type() == at::kFloat      ? CU_TENSOR_MAP_DATA_TYPE_FLOAT32
                                   : x.scalar_type() == at::kBFloat16 ? CU_TENSOR_MAP_DATA_TYPE_BFLOAT16
                                                                      : CU_TENSOR_MAP_DATA_TYPE_FLOAT16;
  const CUresult r = encode_tiled()(
      &map, type, 4, x.data_ptr(), dims, strides, box, elem_strides, CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
      CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  TORCH_CHECK(r == CUDA_SUCCESS, "attention_fwd_sm90_cuda: cuTensorMapEncodeTiled failed for ", name, " (error ",
              static_cast<int>(r), ")");
  return map;
}

// q (batch, seqlen_q, heads_q, D), k and v (batch, seqlen_k, heads_kv, D): CUDA, one fp16/bf16
// dtype, unit stride in head_dim, D 64 or 128, heads_q a multiple of heads_kv.
void check_qkv(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const char* op) {
  for (const auto& [t, name] : {std::pair<const at::Tensor&, const char*>{q, "q"}, {k, "k"}, {v, "v"}}) {
    FASTLM_CHECK_CUDA(t, "attention sm90: tensors");
    TORCH_CHECK(t.dim() == 4, op, ": ", name, " must be (batch, seqlen, heads, head_dim), got ", t.sizes());
    TORCH_CHECK(t.scalar_type() == q.scalar_type() && t.device() == q.device(), op, ": ", name,
                " must have q's dtype and device");
    TORCH_CHECK(t.stride(3) == 1, op, ": ", name, " needs unit stride in head_dim");
  }
  TORCH_CHECK(q.scalar_type() == at::kHalf || q.scalar_type() == at::kBFloat16, op, ": fp16 or bf16 only, got ",
              q.scalar_type());
  const int64_t B = q.size(0), Sq = q.size(1), Hq = q.size(2), D = q.size(3), Sk = k.size(1), Hkv = k.size(2);
  TORCH_CHECK(D == 64 || D == 128, op, ": head_dim 64 or 128, got ", D);
  TORCH_CHECK(k.sizes() == v.sizes() && k.size(0) == B && k.size(3) == D, op, ": k and v must be (", B,
              ", seqlen_k, heads_kv, ", D, "), got ", k.sizes(), " and ", v.sizes());
  TORCH_CHECK(Hkv >= 1 && Hq % Hkv == 0, op, ": heads_q ", Hq, " must be a multiple of heads_kv ", Hkv);
  TORCH_CHECK(Sq < (int64_t{1} << 31) && Sk < (int64_t{1} << 31) && Hq <= 65535 && B <= 65535, op,
              ": shape too large");
}

void check_sm90(const at::Tensor& q, const char* op) {
  int major = 0, minor = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, q.get_device()));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, q.get_device()));
  TORCH_CHECK(major == 9 && minor == 0, op, ": needs an sm_90 GPU (H100/H200), got sm_", major, minor);
}

template <typename T, int D, bool CAUSAL, int MODE>
void launch(const CUtensorMap& tq, const CUtensorMap& tk, const CUtensorMap& tv, const FwdParams& p, int batch,
            cudaStream_t stream) {
  auto kernel = attn_fwd_sm90_kernel<T, D, CAUSAL, MODE>;
  constexpr int smem = Shape<D>::kSmemBytes;
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
  const dim3 grid((p.seqlen_q + kBlockM - 1) / kBlockM, p.heads_q, batch);
  kernel<<<grid, kThreads, smem, stream>>>(tq, tk, tv, p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor> attention_fwd_sm90_cuda(const at::Tensor& q, const at::Tensor& k,
                                                           const at::Tensor& v, double softmax_scale, bool causal,
                                                           int64_t overlap) {
  check_qkv(q, k, v, "attention_fwd_sm90_cuda");
  TORCH_CHECK(overlap >= 0 && overlap <= 2, "attention_fwd_sm90_cuda: overlap must be 0, 1 or 2, got ", overlap);
  const int64_t B = q.size(0), Sq = q.size(1), Hq = q.size(2), D = q.size(3), Sk = k.size(1), Hkv = k.size(2);
  c10::cuda::CUDAGuard guard(q.device());
  check_sm90(q, "attention_fwd_sm90_cuda");
  at::Tensor out = at::empty(q.sizes(), q.options());
  at::Tensor lse = at::empty({B, Hq, Sq}, q.options().dtype(at::kFloat));
  if (out.numel() == 0) return {out, lse};
  const CUtensorMap tq = make_map(q, "q"), tk = make_map(k, "k"), tv = make_map(v, "v");
  const FwdParams p =
      fwd_params(out.data_ptr(), lse.data_ptr<float>(), out.strides().data(), Sq, Sk, Hq, Hkv, softmax_scale);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch(q.scalar_type() == at::kBFloat16, D, causal, overlap, [&]<typename T, int DD, bool C, int MODE>() {
    launch<T, DD, C, MODE>(tq, tk, tv, p, static_cast<int>(B), stream);
  });
  return {out, lse};
}

template <typename T, int D, bool CAUSAL>
void launch_bwd(const CUtensorMap& tq, const CUtensorMap& tk, const CUtensorMap& tv, const CUtensorMap& tdo,
                const CUtensorMap& tdq, const BwdParams& p, int heads_kv, int batch, cudaStream_t stream) {
  auto kernel = attn_bwd_sm90_kernel<T, D, CAUSAL>;
  constexpr int smem = BwdShape<D>::kSmemBytes;
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
  const dim3 grid((p.seqlen_k + kBwdN - 1) / kBwdN, heads_kv, batch);
  kernel<<<grid, kThreads, smem, stream>>>(tq, tk, tv, tdo, tdq, p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// dQ is accumulated (+=) into dq_accum (fp32, q's shape, zeroed by the caller); returns (dk, dv).
std::tuple<at::Tensor, at::Tensor> attention_bwd_sm90_cuda(const at::Tensor& dout, const at::Tensor& q,
                                                           const at::Tensor& k, const at::Tensor& v,
                                                           const at::Tensor& lse, const at::Tensor& delta,
                                                           const at::Tensor& dq_accum, double softmax_scale,
                                                           bool causal) {
  check_qkv(q, k, v, "attention_bwd_sm90_cuda");
  TORCH_CHECK(dout.sizes() == q.sizes() && dout.scalar_type() == q.scalar_type() && dout.device() == q.device() &&
                  dout.stride(3) == 1,
              "attention_bwd_sm90_cuda: dout must be like q with unit stride in head_dim");
  const int64_t B = q.size(0), Sq = q.size(1), Hq = q.size(2), D = q.size(3), Sk = k.size(1), Hkv = k.size(2);
  for (const auto& [t, name] : {std::pair<const at::Tensor&, const char*>{lse, "lse"}, {delta, "delta"}}) {
    TORCH_CHECK(t.scalar_type() == at::kFloat && t.device() == q.device() && t.is_contiguous() &&
                    t.sizes() == at::IntArrayRef({B, Hq, Sq}),
                "attention_bwd_sm90_cuda: ", name, " must be contiguous fp32 (batch, heads_q, seqlen_q)");
  }
  TORCH_CHECK(dq_accum.scalar_type() == at::kFloat && dq_accum.is_contiguous() && dq_accum.sizes() == q.sizes() &&
                  dq_accum.device() == q.device(),
              "attention_bwd_sm90_cuda: dq_accum must be contiguous fp32 like q");
  c10::cuda::CUDAGuard guard(q.device());
  check_sm90(q, "attention_bwd_sm90_cuda");
  at::Tensor dk = at::empty(k.sizes(), k.options()), dv = at::empty(v.sizes(), v.options());
  if (dk.numel() == 0) return {dk, dv};
  const CUtensorMap tq = make_map(q, "q", kBwdM), tdo = make_map(dout, "dout", kBwdM);
  const CUtensorMap tk = make_map(k, "k", kBwdN), tv = make_map(v, "v", kBwdN);
  const CUtensorMap tdq = make_map(dq_accum, "dq_accum", kBwdM);
  const BwdParams p = bwd_params(lse.data_ptr<float>(), delta.data_ptr<float>(),
                                 dk.data_ptr(), dk.strides().data(), dv.data_ptr(), dv.strides().data(), Sq, Sk, Hq,
                                 Hkv, softmax_scale);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch(q.scalar_type() == at::kBFloat16, D, causal, kSerial, [&]<typename T, int DD, bool C, int>() {
    launch_bwd<T, DD, C>(tq, tk, tv, tdo, tdq, p, static_cast<int>(Hkv), static_cast<int>(B), stream);
  });
  return {dk, dv};
}

}  // namespace
}  // namespace sm90
}  // namespace fastlm

TORCH_LIBRARY_IMPL(fastlm, CUDA, m) {
  m.impl("attention_fwd_sm90_cuda", &fastlm::sm90::attention_fwd_sm90_cuda);
  m.impl("attention_bwd_sm90_cuda", &fastlm::sm90::attention_bwd_sm90_cuda);
}
#endif  // !FASTLM_HOST_EMU
