"""Fused attention (FlashAttention-2 algorithm) forward and backward in Triton.

Layout: q (B, Sq, Hq, D), k/v (B, Sk, Hk, D), or packed varlen q (Tq, Hq, D), k/v (Tk, Hk, D)
with cu_seqlens.  Every tensor is addressed through its strides (unit stride in D required;
the launcher copies only a tensor whose last dim is strided).  Hq = group * Hk (GQA/MQA).

Cost model (per head, non-causal): forward 4*Sq*Sk*D FLOPs (QK^T and PV) against
2*(Sq+Sk)*D*bytes of traffic: at seqlen >= 512 and D >= 64 it is compute-bound, so the
design goal is to keep the tensor cores fed: one Q tile per program kept on chip, K/V
tiles streamed (software-pipelined by num_stages), fp32 online softmax in the log2 domain
(scale * log2(e) folded into one multiplier, exp2), and no masking work on tiles that need
none.  Backward is 2.5x the forward FLOPs (QK^T and dO V^T recomputed, dV, dK, dQ).

Masks (bottom-right aligned like FlashAttention >= 2.1; off = Lk - Lq per sequence):
  right (causal is right = 0):  key j <= i + off + right
  left:                         key j >= i + off - left
Each program splits its K (or Q) range into three loops: [lo, full_lo) masked, [full_lo,
full_hi) unmasked, [full_hi, hi) masked.  Tiles outside the band are never visited (causal
does half the work), and only the diagonal/edge tiles pay for the mask.  Fully masked rows
produce out = 0 and lse = -inf (never NaN); the backward maps lse = -inf to p = 0.

Varlen without a host sync: the grid's first axis enumerates query blocks of the *packed*
batch: sum_s cdiv(len_s, BLOCK_M) <= cdiv(Tq, BLOCK_M) + num_seqs, a bound known on the host
from shapes alone.  Each program finds its (sequence, block) by a prefix sum over cdiv(len_s,
BLOCK_M) read from cu_seqlens on the device (`_seq_lookup`, O(num_seqs / 256) vector steps),
and programs past the last block exit.  So max_seqlen_q/k are only tuning hints.  Lengths are
clamped into [0, T] so malformed cu_seqlens can never address memory out of bounds.

Backward (FA2): a preprocess kernel computes delta = rowsum(dO * O) - dlse (the lse gradient
folds into delta: dS = P * (dP - delta)).  The dK/dV kernel gives each program one (kv head,
K block): K, V stay in shared memory, dK/dV accumulate in fp32 registers while it loops over the
query heads of its GQA group and their Q blocks: the group sum needs no atomics.  dQ comes
either from fp32 atomics in that same loop (ATOMIC_DQ: 5 matmuls per tile, order-dependent
rounding) or from a separate dQ kernel, one program per (q head, Q block) looping over K
blocks (7 matmuls per tile, bitwise deterministic).  When a GQA group has too few (kv head,
K block) programs to fill the GPU, the group's query heads are split across programs that
write fp32 partial dK/dV which the launcher sums (still deterministic).

TMA (FASTLM_ATTENTION_TMA=1, sm_90+, fp16/bf16, power-of-2 head dim; off by default until GPU
runs show it faster): the forward reads Q/K/V tiles through host-built 2-D TMA descriptors of
the (tokens, heads * D) token-major views instead of per-thread pointers.  Hopper builds then
use TMA + wgmma with far fewer registers (triton 3.6, D=128, 128x128 tiles: 198 and no spills
against 255 and spills for cp.async).  A tile past a sequence's end holds the next sequence's
tokens (or TMA's zero fill): their scores are masked as usual and the values zeroed, so
non-finite values there never leak in; rows past Lq are computed and not stored.

Warp-specialized forward (FASTLM_ATTENTION_WS=1; sm_90 with triton 3.6, dense fp16/bf16,
head_dim 64/128/256, causal, windowed or full, softcap or not, seqlen_k a multiple of 128; off by
default until GPU runs check and time it): _attn_fwd_ws_kernel, one straight-line loop that
Triton's Hopper warp specialization splits into a TMA producer warpgroup and two wgmma consumer
warpgroups of 64 rows each (the FlashAttention-3 structure).  That pass takes one loop without
branches, so this kernel masks every tile of the band arithmetically instead of splitting off
the diagonal ones.
The backward's WS kernels (head_dim 64/128, seqlen_q a multiple of 128 too): dK/dV with the GQA
group's (head, query block) pairs flattened into one loop, and a separate dQ kernel (7 matmuls
per tile, no atomics: deterministic).

Tuning: a few (BLOCK_M, BLOCK_N, warps, stages) configs per head-dim class, autotuned per
sequence-length bucket on the first call of each variant (so warm up before CUDA-graph
capture); FASTLM_ATTENTION_AUTOTUNE=0 takes the first config that fits, and so do
deterministic=True calls (the autotuner's timed pick can change from run to run, and another
tile shape gives other bits).  Under TRITON_INTERPRET=1 a fixed small config
(INTERPRET_CONFIGS) is used.
"""
import functools
import os

import torch
import triton
import triton.language as tl

from fastlm import _env

from fastlm.kernels import cdiv, next_pow2, on_tensor_device

try:  # host-side TMA descriptors (triton >= 3.4)
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover - older triton: the pointer path only
    TensorDescriptor = None

MAX_HEAD_DIM = 256
LOG2E = 1.4426950408889634
# Sequences per vector step of the varlen block lookup (a constexpr global: readable in kernels).
LOOKUP_CHUNK = tl.constexpr(256)


def _interpreting():
    return _env.triton_interpret()


# ------------------------------------------------------------------------------ helpers
@triton.jit
def _dot(a, b, acc, IEEE: tl.constexpr):
    # fp32 inputs use exact fp32 products (tf32 would break the fp32 accuracy contract);
    # fp16/bf16 inputs use the tensor cores with fp32 accumulation.
    if IEEE:
        acc = tl.dot(a, b, acc, input_precision="ieee")
    else:
        acc = tl.dot(a, b, acc)
    return acc


@triton.jit
def _tanh(x):
    # |x| >= 0.55 (|tanh| >= 0.5): tanh(x) = 1 - 2 / (exp(2x) + 1), which saturates to +-1
    # without inf/inf.  Its absolute error (~1 ulp of 1) is a large relative error for small |x|,
    # which softcap * tanh(s / softcap) would scale by the cap; so below 0.55 an odd minimax
    # polynomial, x + x^3 * P(x^2), accurate to ~1.5 ulp in fp32.  (libdevice's tanh does not
    # run under the interpreter.)  Both sides are computed and selected: no divergent branch.
    y = x * x
    p = 0.016438836231827736 * y - 0.052672483026981354
    p = p * y + 0.13320735096931458
    p = p * y - 0.3333294689655304
    small = x + (x * y) * p
    big = 1.0 - 2.0 / (tl.math.exp2(x * 2.8853900817779268) + 1.0)
    return tl.where(y < 0.3025, small, big)


@triton.jit
def _seq_lookup(CU, num_seqs, total, pid, BLOCK: tl.constexpr, CHUNK: tl.constexpr):
    """Packed block index pid -> (seq, block index within seq).  seq == num_seqs: past the end.

    Block counts per sequence are cdiv(len, BLOCK); a sequence lies before pid when the
    inclusive prefix sum of the counts up to it is <= pid (empty sequences count 0).
    """
    seq = tl.full([], 0, tl.int32)
    before = tl.full([], 0, tl.int32)
    done = tl.full([], 0, tl.int32)
    for c in range(0, num_seqs, CHUNK):
        idx = c + tl.arange(0, CHUNK)
        valid = idx < num_seqs
        lo = tl.load(CU + idx, mask=valid, other=0)
        hi = tl.load(CU + idx + 1, mask=valid, other=0)
        lo = tl.minimum(tl.maximum(lo, 0), total)
        hi = tl.minimum(tl.maximum(hi, lo), total)
        nb = tl.where(valid, (hi - lo + BLOCK - 1) // BLOCK, 0)
        cum = tl.cumsum(nb, 0) + done
        is_before = valid & (cum <= pid)
        seq += tl.sum(is_before.to(tl.int32), 0)
        before += tl.sum(tl.where(is_before, nb, 0), 0)
        done += tl.sum(nb, 0)
    return seq, pid - before


@triton.jit
def _seq_bounds(CU, seq, total):
    """[start, end) of packed sequence seq, clamped into [0, total] and non-decreasing."""
    start = tl.load(CU + seq)
    end = tl.load(CU + seq + 1)
    start = tl.minimum(tl.maximum(start, 0), total)
    end = tl.minimum(tl.maximum(end, start), total)
    return start, end


@triton.jit
def _seq_spans(CU_Q, CU_K, seq, total_q, total_k):
    """Packed sequence seq's query and key spans: (q_start, k_start, Lq, Lk)."""
    q_start, q_end = _seq_bounds(CU_Q, seq, total_q)
    k_start, k_end = _seq_bounds(CU_K, seq, total_k)
    return q_start, k_start, q_end - q_start, k_end - k_start


@triton.jit
def _kv_range(m0, i_last, Lk, off, window_left, window_right,
              HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, BLOCK_N: tl.constexpr):
    """For query rows [m0, i_last]: key blocks [lo, full_lo) masked, [full_lo, full_hi)
    fully visible, [full_hi, hi) masked.  All multiples of BLOCK_N."""
    if HAS_LEFT:
        j_lo = tl.maximum(m0 + off - window_left, 0)
        full_lo = tl.cdiv(tl.maximum(i_last + off - window_left, 0), BLOCK_N) * BLOCK_N
    else:
        j_lo = tl.full([], 0, tl.int32)
        full_lo = tl.full([], 0, tl.int32)
    if HAS_RIGHT:
        j_hi = tl.minimum(tl.maximum(i_last + off + window_right + 1, 0), Lk)
        full_hi = (tl.maximum(tl.minimum(m0 + off + window_right + 1, Lk), 0) // BLOCK_N) * BLOCK_N
    else:
        j_hi = Lk
        full_hi = (Lk // BLOCK_N) * BLOCK_N
    lo = (j_lo // BLOCK_N) * BLOCK_N
    hi = tl.cdiv(j_hi, BLOCK_N) * BLOCK_N
    full_lo = tl.minimum(tl.maximum(full_lo, lo), hi)
    full_hi = tl.minimum(tl.maximum(full_hi, full_lo), hi)
    return lo, full_lo, full_hi, hi


@triton.jit
def _q_range(n0, j_last, Lq, Lk, off, window_left, window_right,
             HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr):
    """For key rows [n0, j_last]: query blocks [lo, full_lo) masked, [full_lo, full_hi)
    fully visible, [full_hi, hi) masked.  A partial key block is always masked."""
    if HAS_RIGHT:
        i_lo = tl.maximum(n0 - off - window_right, 0)
        full_lo = tl.cdiv(tl.maximum(j_last - off - window_right, 0), BLOCK_M) * BLOCK_M
    else:
        i_lo = tl.full([], 0, tl.int32)
        full_lo = tl.full([], 0, tl.int32)
    if HAS_LEFT:
        i_hi = tl.minimum(tl.maximum(j_last - off + window_left + 1, 0), Lq)
        full_hi = (tl.maximum(tl.minimum(n0 - off + window_left + 1, Lq), 0) // BLOCK_M) * BLOCK_M
    else:
        i_hi = Lq
        full_hi = (Lq // BLOCK_M) * BLOCK_M
    lo = (i_lo // BLOCK_M) * BLOCK_M
    hi = tl.cdiv(i_hi, BLOCK_M) * BLOCK_M
    full_lo = tl.minimum(tl.maximum(full_lo, lo), hi)
    full_hi = tl.minimum(tl.maximum(full_hi, full_lo), hi)
    full_hi = tl.where(n0 + BLOCK_N > Lk, full_lo, full_hi)
    return lo, full_lo, full_hi, hi


@triton.jit
def _band(ok, rows, cols, off, window_left, window_right, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr):
    """ok restricted to the window band (causal is window_right = 0): keys from row + off -
    window_left to row + off + window_right."""
    if HAS_RIGHT:
        ok = ok & (cols <= rows + (off + window_right))
    if HAS_LEFT:
        ok = ok & (cols >= rows + (off - window_left))
    return ok


@triton.jit
def _allowed(rows, cols, Lq, Lk, off, window_left, window_right,
             HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr):
    """Mask of visible (query row, key col) pairs; rows/cols are broadcastable index tiles."""
    return _band((rows < Lq) & (cols < Lk), rows, cols, off, window_left, window_right, HAS_LEFT, HAS_RIGHT)


# ------------------------------------------------------------------------------ forward
@triton.jit
def _fwd_inner(acc, m_i, l_i, q, K, V, DESC_K, DESC_V, k_row, k_col, stride_ks, stride_vs, lo, hi,
               offs_m, offs_n, offs_d, Lq, Lk, off, window_left, window_right, score_mul, cap_mul,
               MASK: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
               HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
               IEEE: tl.constexpr, BLOCK_N: tl.constexpr, USE_TMA: tl.constexpr):
    d_ok = offs_d[None, :] < HEAD_DIM
    k_ptrs = K + lo.to(tl.int64) * stride_ks + offs_n[:, None] * stride_ks + offs_d[None, :]
    v_ptrs = V + lo.to(tl.int64) * stride_vs + offs_n[:, None] * stride_vs + offs_d[None, :]
    for start_n in range(lo, hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        if MASK:
            kv_ok = ((start_n + offs_n)[:, None] < Lk) & d_ok
        else:
            kv_ok = d_ok
        if USE_TMA:
            # Rows past Lk are the next sequence's keys (or TMA zero fill): their scores are
            # masked below (MASK tiles are the only ones that reach past Lk).
            k = DESC_K.load([k_row + start_n, k_col])
        elif BLOCK_D == HEAD_DIM and not MASK:
            k = tl.load(k_ptrs)
        else:
            k = tl.load(k_ptrs, mask=kv_ok, other=0.0)
        qk = _dot(q, tl.trans(k), None, IEEE)
        if MASK or HAS_SOFTCAP:
            if HAS_SOFTCAP:
                s = cap_mul * _tanh(qk * score_mul)
            else:
                s = qk * score_mul
            if MASK:
                ok = _allowed(offs_m[:, None], (start_n + offs_n)[None, :], Lq, Lk, off, window_left,
                              window_right, HAS_LEFT, HAS_RIGHT)
                s = tl.where(ok, s, float("-inf"))
                m_new = tl.maximum(m_i, tl.max(s, 1))
                # A row with nothing visible so far keeps m = -inf: shift by 0, not inf - inf.
                m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
            else:
                m_new = tl.maximum(m_i, tl.max(s, 1))
                m_use = m_new
            p = tl.math.exp2(s - m_use[:, None])
        else:
            # Hot path: score_mul > 0 commutes with max, and scale-and-shift is one FMA.
            m_new = tl.maximum(m_i, tl.max(qk, 1) * score_mul)
            m_use = m_new
            p = tl.math.exp2(qk * score_mul - m_use[:, None])
        alpha = tl.math.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        if USE_TMA:
            v = DESC_V.load([k_row + start_n, k_col])
            if MASK:
                # p is 0 past Lk, but 0 * (inf or NaN in another sequence's values) is NaN.
                v = tl.where(kv_ok, v, 0.0)
        elif BLOCK_D == HEAD_DIM and not MASK:
            v = tl.load(v_ptrs)
        else:
            v = tl.load(v_ptrs, mask=kv_ok, other=0.0)
        acc = _dot(p.to(v.dtype), v, acc, IEEE)
        m_i = m_new
        k_ptrs += BLOCK_N * stride_ks
        v_ptrs += BLOCK_N * stride_vs
    return acc, m_i, l_i


@triton.jit
def _attn_fwd_kernel(
    Q,  # *T  (B, Sq, Hq, D) or packed (Tq, Hq, D); unit stride in D
    K,  # *T  (B, Sk, Hk, D) or packed (Tk, Hk, D)
    V,  # *T  like K
    O,  # *T  output, like Q (written)
    LSE,  # *fp32 log-sum-exp (natural log): (B, Hq, Sq) or packed (Hq, Tq); unit stride in seq
    LSE_LO,  # *fp32 like LSE (IEEE only): m + log2(l) - LSE * log2(e), the part of the lse its rounding loses
    CU_Q,  # *i32 (num_seqs + 1,) packed query offsets (IS_VARLEN only)
    CU_K,  # *i32 (num_seqs + 1,) packed key offsets (IS_VARLEN only)
    DESC_Q,  # USE_TMA: TMA descriptors of Q, K, V as 2-D (tokens, heads * D) row-major views
    DESC_K,
    DESC_V,
    stride_qb, stride_qs, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_ob, stride_os, stride_oh,
    stride_lb, stride_lh,
    seqlen_q,  # dense: Sq; varlen: Tq (bound for clamping)
    seqlen_k,  # dense: Sk; varlen: Tk
    num_seqs,  # varlen: number of sequences
    group,  # Hq // Hk
    score_mul,  # no softcap: softmax_scale * log2(e); softcap: softmax_scale / softcap
    cap_mul,  # softcap * log2(e) (HAS_SOFTCAP only)
    window_left,  # >= 0 when HAS_LEFT
    window_right,  # >= 0 when HAS_RIGHT (0 = causal)
    seq_key,  # autotune key only (power-of-2 bucket of the sequence length)
    HEAD_DIM: tl.constexpr,  # D
    BLOCK_D: tl.constexpr,  # next power of 2 >= max(D, 16); padded columns are masked
    IS_VARLEN: tl.constexpr,
    HAS_LEFT: tl.constexpr,
    HAS_RIGHT: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    IEEE: tl.constexpr,  # fp32 inputs: exact fp32 dots
    BLOCK_M: tl.constexpr,  # query rows per program
    BLOCK_N: tl.constexpr,  # keys per inner step
    USE_TMA: tl.constexpr = False,  # load Q/K/V tiles with TMA (sm_90+; BLOCK_D == HEAD_DIM)
):
    pid_m = tl.program_id(0)
    h = tl.program_id(1)
    hk = h // group
    if IS_VARLEN:
        seq, m_blk = _seq_lookup(CU_Q, num_seqs, seqlen_q, pid_m, BLOCK_M, LOOKUP_CHUNK)
        if seq >= num_seqs:
            return
        q_start, k_start, Lq, Lk = _seq_spans(CU_Q, CU_K, seq, seqlen_q, seqlen_k)
        q_off = q_start.to(tl.int64) * stride_qs
        k_off = k_start.to(tl.int64) * stride_ks
        v_off = k_start.to(tl.int64) * stride_vs
        o_off = q_start.to(tl.int64) * stride_os
        l_off = q_start.to(tl.int64)
        q_row = q_start
        k_row = k_start
    else:
        b = tl.program_id(2).to(tl.int64)
        if HAS_RIGHT:
            # Causal-like: the last query blocks see the most keys; launch them first.
            m_blk = tl.num_programs(0) - 1 - pid_m
        else:
            m_blk = pid_m
        Lq = seqlen_q
        Lk = seqlen_k
        q_off = b * stride_qb
        k_off = b * stride_kb
        v_off = b * stride_vb
        o_off = b * stride_ob
        l_off = b * stride_lb
        q_row = tl.program_id(2) * seqlen_q
        k_row = tl.program_id(2) * seqlen_k
    off = Lk - Lq
    m0 = m_blk * BLOCK_M
    Q += q_off + h.to(tl.int64) * stride_qh + m0.to(tl.int64) * stride_qs
    O += o_off + h.to(tl.int64) * stride_oh + m0.to(tl.int64) * stride_os
    K += k_off + hk.to(tl.int64) * stride_kh
    V += v_off + hk.to(tl.int64) * stride_vh
    LSE += l_off + h.to(tl.int64) * stride_lh
    LSE_LO += l_off + h.to(tl.int64) * stride_lh

    offs_r = tl.arange(0, BLOCK_M)
    offs_m = m0 + offs_r
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < Lq
    tile_ok = row_ok[:, None] & (offs_d[None, :] < HEAD_DIM)
    if USE_TMA:
        # Rows past Lq hold another sequence's queries: computed, never stored.
        q = DESC_Q.load([q_row + m0, h * HEAD_DIM])
    else:
        q = tl.load(Q + offs_r[:, None] * stride_qs + offs_d[None, :], mask=tile_ok, other=0.0)
    k_col = hk * HEAD_DIM

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    i_last = tl.minimum(m0 + BLOCK_M, Lq) - 1
    lo, full_lo, full_hi, hi = _kv_range(m0, i_last, Lk, off, window_left, window_right,
                                         HAS_LEFT, HAS_RIGHT, BLOCK_N)
    if HAS_LEFT:
        acc, m_i, l_i = _fwd_inner(acc, m_i, l_i, q, K, V, DESC_K, DESC_V, k_row, k_col, stride_ks, stride_vs,
                                   lo, full_lo, offs_m, offs_n, offs_d, Lq, Lk, off, window_left, window_right,
                                   score_mul, cap_mul, True, HEAD_DIM, BLOCK_D, HAS_LEFT, HAS_RIGHT,
                                   HAS_SOFTCAP, IEEE, BLOCK_N, USE_TMA)
    acc, m_i, l_i = _fwd_inner(acc, m_i, l_i, q, K, V, DESC_K, DESC_V, k_row, k_col, stride_ks, stride_vs,
                               full_lo, full_hi, offs_m, offs_n, offs_d, Lq, Lk, off, window_left, window_right,
                               score_mul, cap_mul, False, HEAD_DIM, BLOCK_D, HAS_LEFT, HAS_RIGHT,
                               HAS_SOFTCAP, IEEE, BLOCK_N, USE_TMA)
    acc, m_i, l_i = _fwd_inner(acc, m_i, l_i, q, K, V, DESC_K, DESC_V, k_row, k_col, stride_ks, stride_vs,
                               full_hi, hi, offs_m, offs_n, offs_d, Lq, Lk, off, window_left, window_right,
                               score_mul, cap_mul, True, HEAD_DIM, BLOCK_D, HAS_LEFT, HAS_RIGHT,
                               HAS_SOFTCAP, IEEE, BLOCK_N, USE_TMA)

    # Epilogue: rows that saw no key (l = 0) give out = 0 and lse = -inf.
    empty = l_i == 0.0
    inv_l = 1.0 / tl.where(empty, 1.0, l_i)
    out = acc * inv_l[:, None]
    log2_l = tl.math.log2(tl.where(empty, 1.0, l_i))
    lse = tl.where(empty, float("-inf"), (m_i + log2_l) * 0.6931471805599453)
    tl.store(O + offs_r[:, None] * stride_os + offs_d[None, :], out.to(O.dtype.element_ty), mask=tile_ok)
    tl.store(LSE + offs_m, lse, mask=row_ok)
    if IEEE:
        # fp32: the backward's probabilities exp2(s - lse2 - lo) then miss only fp32 roundings of
        # s - lse2 (small where p matters), not lse's own (|lse| 2^-24, relative, on the whole
        # row).  lse2 is rounded as the backward rounds it (the select keeps the product unfused);
        # m - lse2 is exact where |m| >> log2(l), the case that needs it.
        lse2 = tl.where(empty, float("inf"), lse * 1.4426950408889634)
        tl.store(LSE_LO + offs_m, tl.where(empty, 0.0, (m_i - lse2) + log2_l), mask=row_ok)


@triton.jit
def _window_ok(rows, cols, off, window_left, window_right, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr):
    """_allowed without the bounds (the WS kernels' tiles never pass seqlen_k; rows past
    seqlen_q are never stored)."""
    return _band(cols >= 0, rows, cols, off, window_left, window_right, HAS_LEFT, HAS_RIGHT)


@triton.jit
def _ws_query_block(seqlen_q, seqlen_k, group, HAS_RIGHT: tl.constexpr, BLOCK_M: tl.constexpr):
    """(head, batch, kv head, first row, Lk - Lq) of a WS program over a block of query rows
    (grid: query blocks, heads, batch), causal-like masks launching the longest rows first."""
    pid_m = tl.program_id(0)
    h = tl.program_id(1)
    if HAS_RIGHT:
        m_blk = tl.num_programs(0) - 1 - pid_m
    else:
        m_blk = pid_m
    return h, tl.program_id(2), h // group, m_blk * BLOCK_M, seqlen_k - seqlen_q


@triton.jit
def _attn_fwd_ws_kernel(
    DESC_Q,  # TMA descriptors of Q, K, V as 2-D (tokens, heads * D) row-major views (dense batch)
    DESC_K,
    DESC_V,
    O,  # *T  output (B, Sq, Hq, D), unit stride in D
    LSE,  # *fp32 (B, Hq, Sq), unit stride in seq
    stride_ob, stride_os, stride_oh,
    stride_lb, stride_lh,
    seqlen_q,
    seqlen_k,  # a multiple of BLOCK_N: a K/V tile never reaches into the next sequence
    group,  # Hq // Hk
    score_mul,  # softmax_scale * log2(e); softcap: softmax_scale / softcap
    cap_mul,  # softcap * log2(e) (HAS_SOFTCAP only)
    window_left, window_right,  # >= 0 when HAS_LEFT / HAS_RIGHT (causal: right = 0)
    seq_key,  # autotune key only
    HEAD_DIM: tl.constexpr,  # D, a power of two (one head per TMA tile column block)
    HAS_LEFT: tl.constexpr,
    HAS_RIGHT: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """The forward as ONE loop with a straight-line body, the form Triton's Hopper warp
    specialization (`tl.range(warp_specialize=True)`, sm_90) partitions: a producer warpgroup
    issues the TMA loads, two consumer warpgroups (BLOCK_M / 2 rows each, registers moved to
    them by setmaxnreg) run the wgmma chains and the softmax.  (Triton 3.6 refuses a loop with an
    `if` in its body, a second loop, or a dot before or after the loop: so no masked/unmasked
    loop split here, and a causal or window mask is applied to every tile of the band.)  Dense
    batches with seqlen_k a multiple of BLOCK_N (attention_fwd's _ws_ok); rows past seqlen_q
    hold the next sequence's queries (or TMA zero fill): computed, never stored."""
    h, b, hk, m0, off = _ws_query_block(seqlen_q, seqlen_k, group, HAS_RIGHT, BLOCK_M)
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < seqlen_q
    bb = b.to(tl.int64)
    q = DESC_Q.load([b * seqlen_q + m0, h * HEAD_DIM])
    lo, _, _, hi = _kv_range(m0, tl.minimum(m0 + BLOCK_M, seqlen_q) - 1, seqlen_k, off, window_left, window_right,
                             HAS_LEFT, HAS_RIGHT, BLOCK_N)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    k_row = b * seqlen_k
    k_col = hk * HEAD_DIM
    for start_n in tl.range(lo, hi, BLOCK_N, warp_specialize=True):
        k = DESC_K.load([k_row + start_n, k_col])
        qk = tl.dot(q, tl.trans(k))
        if HAS_LEFT or HAS_RIGHT or HAS_SOFTCAP:
            if HAS_SOFTCAP:
                s = cap_mul * _tanh(qk * score_mul)
            else:
                s = qk * score_mul
            if HAS_LEFT or HAS_RIGHT:
                ok = _window_ok(offs_m[:, None], (start_n + offs_n)[None, :], off, window_left, window_right,
                                HAS_LEFT, HAS_RIGHT)
                s = tl.where(ok, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # nothing visible yet: no inf - inf
            p = tl.math.exp2(s - m_use[:, None])
        else:
            m_new = tl.maximum(m_i, tl.max(qk, 1) * score_mul)
            m_use = m_new
            p = tl.math.exp2(qk * score_mul - m_use[:, None])
        alpha = tl.math.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        v = DESC_V.load([k_row + start_n, k_col])
        acc = tl.dot(p.to(v.dtype), v, acc)
        m_i = m_new

    empty = l_i == 0.0
    out = acc * (1.0 / tl.where(empty, 1.0, l_i))[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(tl.where(empty, 1.0, l_i))) * 0.6931471805599453)
    optr = O + bb * stride_ob + h.to(tl.int64) * stride_oh + offs_m.to(tl.int64)[:, None] * stride_os + offs_d[None, :]
    tl.store(optr, out.to(O.dtype.element_ty), mask=row_ok[:, None])
    tl.store(LSE + bb * stride_lb + h.to(tl.int64) * stride_lh + offs_m, lse, mask=row_ok)


# ------------------------------------------------------------------------------ backward
@triton.jit
def _attn_bwd_preprocess_kernel(
    O,  # *T   forward output (B, S, H, D) / packed (T, H, D) with B = 1
    DO,  # *T  its gradient, same shape, any strides with unit D stride
    DLSE,  # *fp32 gradient of lse, lse layout (HAS_DLSE only)
    DELTA,  # *fp32 output (B, H, S) / packed (H, T): rowsum(dO * O) - dlse
    stride_ob, stride_os, stride_oh,
    stride_dob, stride_dos, stride_doh,
    stride_dlb, stride_dlh, stride_dls,
    stride_lb, stride_lh,
    seqlen,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    HAS_DLSE: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    pid_m = tl.program_id(0)
    h = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < seqlen
    tile_ok = row_ok[:, None] & (offs_d[None, :] < HEAD_DIM)
    rows = offs_m.to(tl.int64)
    o = tl.load(O + b * stride_ob + h * stride_oh + rows[:, None] * stride_os + offs_d[None, :],
                mask=tile_ok, other=0.0).to(tl.float32)
    do = tl.load(DO + b * stride_dob + h * stride_doh + rows[:, None] * stride_dos + offs_d[None, :],
                 mask=tile_ok, other=0.0).to(tl.float32)
    delta = tl.sum(o * do, 1)
    if HAS_DLSE:
        delta -= tl.load(DLSE + b * stride_dlb + h * stride_dlh + rows * stride_dls, mask=row_ok, other=0.0)
    tl.store(DELTA + b * stride_lb + h * stride_lh + rows, delta, mask=row_ok)


@triton.jit
def _bwd_dkdv_inner(dk, dv, k, v, Q, DO, LSE, LSE_LO, DELTA, DQ, stride_qs, stride_dos, stride_dqs, lo, hi,
                    offs_n, offs_mb, offs_d, Lq, Lk, off, window_left, window_right, qk_scale2, score_mul,
                    cap_mul, dq_scale,
                    MASK: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                    HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                    IEEE: tl.constexpr, ATOMIC_DQ: tl.constexpr, BLOCK_M: tl.constexpr):
    """Accumulate dK, dV of one key block over query blocks [lo, hi) of one query head.
    Works on transposed score tiles (keys x queries) so no P/dS transpose is needed for
    dV = P^T dO and dK = dS^T Q."""
    d_ok = offs_d[None, :] < HEAD_DIM
    q_tile = offs_mb[:, None] * stride_qs + offs_d[None, :]
    do_tile = offs_mb[:, None] * stride_dos + offs_d[None, :]
    dq_tile = offs_mb[:, None] * stride_dqs + offs_d[None, :]
    for start_m in range(lo, hi, BLOCK_M):
        start_m = tl.multiple_of(start_m, BLOCK_M)
        offs_m = start_m + offs_mb
        q_ptrs = Q + start_m.to(tl.int64) * stride_qs + q_tile
        do_ptrs = DO + start_m.to(tl.int64) * stride_dos + do_tile
        dq_ptrs = DQ + start_m.to(tl.int64) * stride_dqs + dq_tile
        if MASK:
            row_ok = offs_m < Lq
            q_ok = row_ok[:, None] & d_ok
            lse = tl.load(LSE + offs_m, mask=row_ok, other=0.0)
            delta = tl.load(DELTA + offs_m, mask=row_ok, other=0.0)
            if IEEE:
                lse_lo = tl.load(LSE_LO + offs_m, mask=row_ok, other=0.0)
        else:
            q_ok = d_ok
            lse = tl.load(LSE + offs_m)
            delta = tl.load(DELTA + offs_m)
            if IEEE:
                lse_lo = tl.load(LSE_LO + offs_m)
        if BLOCK_D == HEAD_DIM and not MASK:
            q = tl.load(q_ptrs)
            do = tl.load(do_ptrs)
        else:
            q = tl.load(q_ptrs, mask=q_ok, other=0.0)
            do = tl.load(do_ptrs, mask=q_ok, other=0.0)
        # log2-domain lse; fully masked rows (lse = -inf) get +inf so that p = 0.
        lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
        qkT = _dot(k, tl.trans(q), None, IEEE)  # (BLOCK_N, BLOCK_M)
        if HAS_SOFTCAP:
            t = _tanh(qkT * score_mul)
            sT = cap_mul * t - lse2[None, :]
        else:
            sT = qkT * qk_scale2 - lse2[None, :]
        if IEEE:  # (fp32: lse's low part, see the forward's epilogue)
            sT = sT - lse_lo[None, :]
        pT = tl.math.exp2(sT)
        if MASK:
            ok = _allowed(offs_m[None, :], offs_n[:, None], Lq, Lk, off, window_left, window_right,
                          HAS_LEFT, HAS_RIGHT)
            pT = tl.where(ok, pT, 0.0)
        dv = _dot(pT.to(do.dtype), do, dv, IEEE)
        dpT = _dot(v, tl.trans(do), None, IEEE)
        dsT = pT * (dpT - delta[None, :])
        if HAS_SOFTCAP:
            dsT = dsT * (1.0 - t * t)
        dsT = dsT.to(q.dtype)
        dk = _dot(dsT, q, dk, IEEE)
        if ATOMIC_DQ:
            dq = _dot(tl.trans(dsT), k, None, IEEE) * dq_scale
            if BLOCK_D == HEAD_DIM and not MASK:
                tl.atomic_add(dq_ptrs, dq, sem="relaxed")
            else:
                tl.atomic_add(dq_ptrs, dq, mask=q_ok, sem="relaxed")
    return dk, dv


@triton.jit
def _attn_bwd_dkdv_kernel(
    Q, K, V,  # *T forward inputs (layouts as in the forward kernel)
    DO,  # *T  gradient of the output, like Q
    LSE,  # *fp32 forward lse, (B, Hq, Sq) / (Hq, Tq)
    LSE_LO,  # *fp32 the forward's LSE_LO, like LSE (IEEE only)
    DELTA,  # *fp32 preprocess output, same layout as LSE
    DK,  # *T or *fp32  dK: (B, Sk, Hk, D) / (Tk, Hk, D), or fp32 partials (splits, ...) when split
    DV,  # *T or *fp32  dV: like DK
    DQ,  # *fp32 dQ accumulator like Q, zero-initialised (ATOMIC_DQ only)
    CU_Q, CU_K,  # *i32 (num_seqs + 1,) (IS_VARLEN only)
    stride_qb, stride_qs, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_dob, stride_dos, stride_doh,
    stride_lb, stride_lh,
    stride_dkp, stride_dkb, stride_dks, stride_dkh,  # p = split (partials) index
    stride_dvp, stride_dvb, stride_dvs, stride_dvh,
    stride_dqb, stride_dqs, stride_dqh,
    seqlen_q, seqlen_k, num_seqs,
    group,  # Hq // Hk
    n_splits,  # programs sharing one kv head's query-head group
    heads_per_split,
    qk_scale2,  # softmax_scale * log2(e)
    score_mul, cap_mul,  # as in the forward (softcap)
    dk_scale,  # softmax_scale: dS is w.r.t. the scaled scores
    window_left, window_right,
    seq_key,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    IS_VARLEN: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, IEEE: tl.constexpr,
    ATOMIC_DQ: tl.constexpr,  # also accumulate dQ with fp32 atomics
    BLOCK_M: tl.constexpr,  # queries per inner step
    BLOCK_N: tl.constexpr,  # keys owned by the program
):
    pid_n = tl.program_id(0)
    pid_h = tl.program_id(1)
    hk = pid_h // n_splits
    split = pid_h % n_splits
    if IS_VARLEN:
        seq, n_blk = _seq_lookup(CU_K, num_seqs, seqlen_k, pid_n, BLOCK_N, LOOKUP_CHUNK)
        if seq >= num_seqs:
            return
        q_start, k_start, Lq, Lk = _seq_spans(CU_Q, CU_K, seq, seqlen_q, seqlen_k)
        q_tok = q_start.to(tl.int64)
        k_tok = k_start.to(tl.int64)
        Q += q_tok * stride_qs
        DO += q_tok * stride_dos
        DQ += q_tok * stride_dqs
        K += k_tok * stride_ks
        V += k_tok * stride_vs
        DK += k_tok * stride_dks
        DV += k_tok * stride_dvs
        LSE += q_tok
        LSE_LO += q_tok
        DELTA += q_tok
    else:
        b = tl.program_id(2).to(tl.int64)
        n_blk = pid_n
        Lq = seqlen_q
        Lk = seqlen_k
        Q += b * stride_qb
        DO += b * stride_dob
        DQ += b * stride_dqb
        K += b * stride_kb
        V += b * stride_vb
        DK += b * stride_dkb
        DV += b * stride_dvb
        LSE += b * stride_lb
        LSE_LO += b * stride_lb
        DELTA += b * stride_lb
    off = Lk - Lq
    n0 = n_blk * BLOCK_N
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_mb = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    kv_ok = (offs_n[:, None] < Lk) & (offs_d[None, :] < HEAD_DIM)
    rows_n = offs_n.to(tl.int64)
    k = tl.load(K + hk.to(tl.int64) * stride_kh + rows_n[:, None] * stride_ks + offs_d[None, :], mask=kv_ok, other=0.0)
    v = tl.load(V + hk.to(tl.int64) * stride_vh + rows_n[:, None] * stride_vs + offs_d[None, :], mask=kv_ok, other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)

    j_last = tl.minimum(n0 + BLOCK_N, Lk) - 1
    lo, full_lo, full_hi, hi = _q_range(n0, j_last, Lq, Lk, off, window_left, window_right,
                                        HAS_LEFT, HAS_RIGHT, BLOCK_N, BLOCK_M)
    h_begin = hk * group + split * heads_per_split
    h_end = tl.minimum(h_begin + heads_per_split, (hk + 1) * group)
    # q / dout head pointers advance by their stride (64-bit pointer + int32 stride): a head-major
    # view ((B, H, S, D).transpose(1, 2)) has a head stride of S * D, and h * S * D in int32
    # wraps past 2**31 (e.g. 64 heads at 266k tokens).  DQ (the dense accumulator: head stride
    # D) and LSE / DELTA (head stride Tq) are indexed in int32.
    Qh = Q + h_begin.to(tl.int64) * stride_qh
    DOh = DO + h_begin.to(tl.int64) * stride_doh
    for h in range(h_begin, h_end):
        DQh = DQ + h * stride_dqh
        LSEh = LSE + h * stride_lh
        LSE_LOh = LSE_LO + h * stride_lh
        DELTAh = DELTA + h * stride_lh
        dk, dv = _bwd_dkdv_inner(dk, dv, k, v, Qh, DOh, LSEh, LSE_LOh, DELTAh, DQh, stride_qs, stride_dos,
                                 stride_dqs,
                                 lo, full_lo, offs_n, offs_mb, offs_d, Lq, Lk, off, window_left, window_right,
                                 qk_scale2, score_mul, cap_mul, dk_scale, True, HEAD_DIM, BLOCK_D,
                                 HAS_LEFT, HAS_RIGHT, HAS_SOFTCAP, IEEE, ATOMIC_DQ, BLOCK_M)
        dk, dv = _bwd_dkdv_inner(dk, dv, k, v, Qh, DOh, LSEh, LSE_LOh, DELTAh, DQh, stride_qs, stride_dos,
                                 stride_dqs,
                                 full_lo, full_hi, offs_n, offs_mb, offs_d, Lq, Lk, off, window_left, window_right,
                                 qk_scale2, score_mul, cap_mul, dk_scale, False, HEAD_DIM, BLOCK_D,
                                 HAS_LEFT, HAS_RIGHT, HAS_SOFTCAP, IEEE, ATOMIC_DQ, BLOCK_M)
        dk, dv = _bwd_dkdv_inner(dk, dv, k, v, Qh, DOh, LSEh, LSE_LOh, DELTAh, DQh, stride_qs, stride_dos,
                                 stride_dqs,
                                 full_hi, hi, offs_n, offs_mb, offs_d, Lq, Lk, off, window_left, window_right,
                                 qk_scale2, score_mul, cap_mul, dk_scale, True, HEAD_DIM, BLOCK_D,
                                 HAS_LEFT, HAS_RIGHT, HAS_SOFTCAP, IEEE, ATOMIC_DQ, BLOCK_M)
        Qh += stride_qh
        DOh += stride_doh
    dk = dk * dk_scale
    split64 = split.to(tl.int64)
    dk_ptrs = DK + split64 * stride_dkp + hk.to(tl.int64) * stride_dkh + rows_n[:, None] * stride_dks + offs_d[None, :]
    dv_ptrs = DV + split64 * stride_dvp + hk.to(tl.int64) * stride_dvh + rows_n[:, None] * stride_dvs + offs_d[None, :]
    tl.store(dk_ptrs, dk.to(DK.dtype.element_ty), mask=kv_ok)
    tl.store(dv_ptrs, dv.to(DV.dtype.element_ty), mask=kv_ok)


@triton.jit
def _bwd_dq_inner(dq, q, do, lse2, lse_lo, delta, K, V, stride_ks, stride_vs, lo, hi,
                  offs_m, offs_n, offs_d, Lq, Lk, off, window_left, window_right, qk_scale2, score_mul, cap_mul,
                  MASK: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                  HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                  IEEE: tl.constexpr, BLOCK_N: tl.constexpr):
    d_ok = offs_d[None, :] < HEAD_DIM
    k_ptrs = K + lo.to(tl.int64) * stride_ks + offs_n[:, None] * stride_ks + offs_d[None, :]
    v_ptrs = V + lo.to(tl.int64) * stride_vs + offs_n[:, None] * stride_vs + offs_d[None, :]
    for start_n in range(lo, hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        if MASK:
            kv_ok = ((start_n + offs_n)[:, None] < Lk) & d_ok
        else:
            kv_ok = d_ok
        if BLOCK_D == HEAD_DIM and not MASK:
            k = tl.load(k_ptrs)
            v = tl.load(v_ptrs)
        else:
            k = tl.load(k_ptrs, mask=kv_ok, other=0.0)
            v = tl.load(v_ptrs, mask=kv_ok, other=0.0)
        qk = _dot(q, tl.trans(k), None, IEEE)
        if HAS_SOFTCAP:
            t = _tanh(qk * score_mul)
            s = cap_mul * t - lse2[:, None]
        else:
            s = qk * qk_scale2 - lse2[:, None]
        if IEEE:  # (fp32: lse's low part, see the forward's epilogue)
            s = s - lse_lo[:, None]
        p = tl.math.exp2(s)
        if MASK:
            ok = _allowed(offs_m[:, None], (start_n + offs_n)[None, :], Lq, Lk, off, window_left, window_right,
                          HAS_LEFT, HAS_RIGHT)
            p = tl.where(ok, p, 0.0)
        dp = _dot(do, tl.trans(v), None, IEEE)
        ds = p * (dp - delta[:, None])
        if HAS_SOFTCAP:
            ds = ds * (1.0 - t * t)
        dq = _dot(ds.to(k.dtype), k, dq, IEEE)
        k_ptrs += BLOCK_N * stride_ks
        v_ptrs += BLOCK_N * stride_vs
    return dq


@triton.jit
def _attn_bwd_dq_kernel(
    Q, K, V, DO, LSE, LSE_LO, DELTA,  # as in _attn_bwd_dkdv_kernel
    DQ,  # *T output dQ like Q
    CU_Q, CU_K,
    stride_qb, stride_qs, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_dob, stride_dos, stride_doh,
    stride_lb, stride_lh,
    stride_dqb, stride_dqs, stride_dqh,
    seqlen_q, seqlen_k, num_seqs, group,
    qk_scale2, score_mul, cap_mul, dq_scale,
    window_left, window_right,
    seq_key,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    IS_VARLEN: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr,  # queries owned by the program
    BLOCK_N: tl.constexpr,  # keys per inner step
):
    pid_m = tl.program_id(0)
    h = tl.program_id(1)
    hk = h // group
    if IS_VARLEN:
        seq, m_blk = _seq_lookup(CU_Q, num_seqs, seqlen_q, pid_m, BLOCK_M, LOOKUP_CHUNK)
        if seq >= num_seqs:
            return
        q_start, k_start, Lq, Lk = _seq_spans(CU_Q, CU_K, seq, seqlen_q, seqlen_k)
        q_tok = q_start.to(tl.int64)
        k_tok = k_start.to(tl.int64)
        Q += q_tok * stride_qs
        DO += q_tok * stride_dos
        DQ += q_tok * stride_dqs
        K += k_tok * stride_ks
        V += k_tok * stride_vs
        LSE += q_tok
        LSE_LO += q_tok
        DELTA += q_tok
    else:
        b = tl.program_id(2).to(tl.int64)
        if HAS_RIGHT:
            m_blk = tl.num_programs(0) - 1 - pid_m
        else:
            m_blk = pid_m
        Lq = seqlen_q
        Lk = seqlen_k
        Q += b * stride_qb
        DO += b * stride_dob
        DQ += b * stride_dqb
        K += b * stride_kb
        V += b * stride_vb
        LSE += b * stride_lb
        LSE_LO += b * stride_lb
        DELTA += b * stride_lb
    off = Lk - Lq
    m0 = m_blk * BLOCK_M
    h64 = h.to(tl.int64)
    Q += h64 * stride_qh
    DO += h64 * stride_doh
    DQ += h64 * stride_dqh
    K += hk.to(tl.int64) * stride_kh
    V += hk.to(tl.int64) * stride_vh
    LSE += h64 * stride_lh
    LSE_LO += h64 * stride_lh
    DELTA += h64 * stride_lh

    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < Lq
    tile_ok = row_ok[:, None] & (offs_d[None, :] < HEAD_DIM)
    rows = offs_m.to(tl.int64)
    q = tl.load(Q + rows[:, None] * stride_qs + offs_d[None, :], mask=tile_ok, other=0.0)
    do = tl.load(DO + rows[:, None] * stride_dos + offs_d[None, :], mask=tile_ok, other=0.0)
    lse = tl.load(LSE + offs_m, mask=row_ok, other=0.0)
    delta = tl.load(DELTA + offs_m, mask=row_ok, other=0.0)
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
    if IEEE:
        lse_lo = tl.load(LSE_LO + offs_m, mask=row_ok, other=0.0)
    else:
        lse_lo = lse2  # (unused)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    i_last = tl.minimum(m0 + BLOCK_M, Lq) - 1
    lo, full_lo, full_hi, hi = _kv_range(m0, i_last, Lk, off, window_left, window_right,
                                         HAS_LEFT, HAS_RIGHT, BLOCK_N)
    if HAS_LEFT:
        dq = _bwd_dq_inner(dq, q, do, lse2, lse_lo, delta, K, V, stride_ks, stride_vs, lo, full_lo,
                           offs_m, offs_n, offs_d, Lq, Lk, off, window_left, window_right, qk_scale2,
                           score_mul, cap_mul, True, HEAD_DIM, BLOCK_D, HAS_LEFT, HAS_RIGHT, HAS_SOFTCAP,
                           IEEE, BLOCK_N)
    dq = _bwd_dq_inner(dq, q, do, lse2, lse_lo, delta, K, V, stride_ks, stride_vs, full_lo, full_hi,
                       offs_m, offs_n, offs_d, Lq, Lk, off, window_left, window_right, qk_scale2,
                       score_mul, cap_mul, False, HEAD_DIM, BLOCK_D, HAS_LEFT, HAS_RIGHT, HAS_SOFTCAP,
                       IEEE, BLOCK_N)
    dq = _bwd_dq_inner(dq, q, do, lse2, lse_lo, delta, K, V, stride_ks, stride_vs, full_hi, hi,
                       offs_m, offs_n, offs_d, Lq, Lk, off, window_left, window_right, qk_scale2,
                       score_mul, cap_mul, True, HEAD_DIM, BLOCK_D, HAS_LEFT, HAS_RIGHT, HAS_SOFTCAP,
                       IEEE, BLOCK_N)
    dq = dq * dq_scale
    tl.store(DQ + rows[:, None] * stride_dqs + offs_d[None, :], dq.to(DQ.dtype.element_ty), mask=tile_ok)


@triton.jit
def _attn_bwd_dkdv_ws_kernel(
    DESC_Q, DESC_DO,  # TMA descriptors (tokens, heads * D) of Q and dO (tile BLOCK_M x D)
    DESC_K, DESC_V,  # of K and V (tile BLOCK_N x D)
    LSE, DELTA,  # *fp32 (B, Hq, Sq): forward lse (natural log), rowsum(dO * O) - dlse
    DK, DV,  # *T or *fp32: (splits, B, Sk, Hk, D) strided; fp32 partials when several splits
    stride_lb, stride_lh,
    stride_dkp, stride_dkb, stride_dks, stride_dkh,
    stride_dvp, stride_dvb, stride_dvs, stride_dvh,
    seqlen_q, seqlen_k,  # multiples of BLOCK_M and BLOCK_N
    group, n_splits, heads_per_split,
    qk_scale2,  # softmax_scale * log2(e)
    score_mul, cap_mul,  # as in the forward (softcap)
    dk_scale,  # softmax_scale
    window_left, window_right,  # >= 0 when HAS_LEFT / HAS_RIGHT (causal: right = 0)
    seq_key,
    HEAD_DIM: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """dK, dV of one key block (BLOCK_N keys of kv head hk, split across the two consumer
    warpgroups) over the query heads [h_begin, h_end) of its group and their query blocks, as
    ONE flattened loop (the form the Hopper warp specialization takes: no branch, no second
    loop); a causal or window mask applies to every tile of the query blocks that see a key of
    this block."""
    pid_n = tl.program_id(0)
    pid_h = tl.program_id(1)
    b = tl.program_id(2)
    hk = pid_h // n_splits
    split = pid_h % n_splits
    off = seqlen_k - seqlen_q
    n0 = pid_n * BLOCK_N
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_mb = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    k = DESC_K.load([b * seqlen_k + n0, hk * HEAD_DIM])
    v = DESC_V.load([b * seqlen_k + n0, hk * HEAD_DIM])
    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    q_lo, _, _, q_hi = _q_range(n0, n0 + BLOCK_N - 1, seqlen_q, seqlen_k, off, window_left, window_right,
                                HAS_LEFT, HAS_RIGHT, BLOCK_N, BLOCK_M)
    first = q_lo // BLOCK_M
    cnt = (q_hi - q_lo) // BLOCK_M
    h_begin = hk * group + split * heads_per_split
    n_heads = tl.minimum(heads_per_split, (hk + 1) * group - h_begin)
    q_row0 = b * seqlen_q
    L = LSE + b.to(tl.int64) * stride_lb
    DL = DELTA + b.to(tl.int64) * stride_lb
    for t in tl.range(0, n_heads * cnt, warp_specialize=True):
        h = h_begin + t // cnt
        m0 = (first + t % cnt) * BLOCK_M
        q = DESC_Q.load([q_row0 + m0, h * HEAD_DIM])
        do = DESC_DO.load([q_row0 + m0, h * HEAD_DIM])
        lse = tl.load(L + h * stride_lh + m0 + offs_mb)
        delta = tl.load(DL + h * stride_lh + m0 + offs_mb)
        # log2-domain lse; rows that saw no key (lse = -inf) get +inf so that p = 0.
        lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
        qkT = tl.dot(k, tl.trans(q))  # (BLOCK_N, BLOCK_M)
        if HAS_SOFTCAP:
            t = _tanh(qkT * score_mul)
            pT = tl.math.exp2(cap_mul * t - lse2[None, :])
        else:
            pT = tl.math.exp2(qkT * qk_scale2 - lse2[None, :])
        if HAS_LEFT or HAS_RIGHT:
            ok = _window_ok((m0 + offs_mb)[None, :], offs_n[:, None], off, window_left, window_right,
                            HAS_LEFT, HAS_RIGHT)
            pT = tl.where(ok, pT, 0.0)
        dv = tl.dot(pT.to(do.dtype), do, dv)
        dpT = tl.dot(v, tl.trans(do))
        dsT = pT * (dpT - delta[None, :])
        if HAS_SOFTCAP:
            dsT = dsT * (1.0 - t * t)
        dk = tl.dot(dsT.to(q.dtype), q, dk)
    dk = dk * dk_scale
    rows = offs_n.to(tl.int64)[:, None]
    bb = b.to(tl.int64)
    split = split.to(tl.int64)  # (a partial's stride is the whole dK's element count)
    tl.store(DK + split * stride_dkp + bb * stride_dkb + hk.to(tl.int64) * stride_dkh + rows * stride_dks
             + offs_d[None, :], dk.to(DK.dtype.element_ty))
    tl.store(DV + split * stride_dvp + bb * stride_dvb + hk.to(tl.int64) * stride_dvh + rows * stride_dvs
             + offs_d[None, :], dv.to(DV.dtype.element_ty))


@triton.jit
def _attn_bwd_dq_ws_kernel(
    DESC_Q, DESC_DO,  # TMA descriptors as in _attn_bwd_dkdv_ws_kernel
    DESC_K, DESC_V,
    DESC_L, DESC_DL,  # TMA descriptors of lse and delta as 2-D (B * Hq, Sq) views, tile 1 x BLOCK_M
    DQ,  # *T (B, Sq, Hq, D)
    stride_dqb, stride_dqs, stride_dqh,
    seqlen_q, seqlen_k,  # multiples of BLOCK_M and BLOCK_N
    group,
    qk_scale2, score_mul, cap_mul, dq_scale,
    window_left, window_right,
    seq_key,
    HEAD_DIM: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """dQ of one query block (BLOCK_M rows of head h, split across the two consumer
    warpgroups): one loop over the key blocks it sees, as the forward's WS kernel.  The rows'
    lse and delta come through TMA inside the loop as (BLOCK_M, 1) columns: a (BLOCK_M,) vector
    loaded before the loop stops triton 3.6's consumer split (every consumer then computed the
    whole tile)."""
    h, b, hk, m0, off = _ws_query_block(seqlen_q, seqlen_k, group, HAS_RIGHT, BLOCK_M)
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    q = DESC_Q.load([b * seqlen_q + m0, h * HEAD_DIM])
    do = DESC_DO.load([b * seqlen_q + m0, h * HEAD_DIM])
    lrow = b * tl.num_programs(1) + h
    lo, _, _, hi = _kv_range(m0, m0 + BLOCK_M - 1, seqlen_k, off, window_left, window_right,
                             HAS_LEFT, HAS_RIGHT, BLOCK_N)
    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    k_row = b * seqlen_k
    for n0 in tl.range(lo, hi, BLOCK_N, warp_specialize=True):
        k = DESC_K.load([k_row + n0, hk * HEAD_DIM])
        v = DESC_V.load([k_row + n0, hk * HEAD_DIM])
        lse = tl.trans(DESC_L.load([lrow, m0]))  # (BLOCK_M, 1)
        delta = tl.trans(DESC_DL.load([lrow, m0]))
        # log2-domain lse; rows that saw no key (lse = -inf) get +inf so that p = 0.
        lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
        qk = tl.dot(q, tl.trans(k))
        if HAS_SOFTCAP:
            t = _tanh(qk * score_mul)
            p = tl.math.exp2(cap_mul * t - lse2)
        else:
            p = tl.math.exp2(qk * qk_scale2 - lse2)
        if HAS_LEFT or HAS_RIGHT:
            ok = _window_ok(offs_m[:, None], (n0 + offs_n)[None, :], off, window_left, window_right,
                            HAS_LEFT, HAS_RIGHT)
            p = tl.where(ok, p, 0.0)
        dp = tl.dot(do, tl.trans(v))
        ds = p * (dp - delta)
        if HAS_SOFTCAP:
            ds = ds * (1.0 - t * t)
        dq = tl.dot(ds.to(k.dtype), k, dq)
    dq = dq * dq_scale
    tl.store(DQ + b.to(tl.int64) * stride_dqb + h.to(tl.int64) * stride_dqh
             + offs_m.to(tl.int64)[:, None] * stride_dqs + offs_d[None, :], dq.to(DQ.dtype.element_ty))


# ------------------------------------------------------------------------------ launchers


def _block_d(d):
    return max(16, next_pow2(d))


def _d_class(block_d):
    return 64 if block_d <= 64 else (128 if block_d <= 128 else 256)


def _seq_key(n):
    """Autotune bucket of a sequence length (powers of two, 64 .. 16384)."""
    return min(max(next_pow2(max(int(n), 1)), 64), 16384)


# Tile configs (BLOCK_M, BLOCK_N, num_warps, num_stages), per head-dim class, for sm_80/sm_90.
# Chosen from ptxas register/spill reports of sm_90a builds (2-3 per class, so a new variant
# compiles few kernels); the autotuner picks among them per sequence-length bucket.
# Forward: BLOCK_M query rows per program (a Hopper warpgroup = 4 warps per 64 rows),
# BLOCK_N keys per pipelined step.  Larger D shrinks the tiles to stay inside registers
# (the fp32 accumulator is BLOCK_M x D) and shared memory (num_stages K/V tiles in flight).
# Candidates for the autotuner not yet timed on a GPU (triton 3.6, sm_90, no spills): D=64
# (128, 64) over 8 warps with 4 stages (113 registers: 2 CTAs per SM), D=128 (128, 64) with 4
# stages (231 registers, 160 KiB), D=256 (128, 32) with 3 stages (214 registers, 160 KiB; the
# first D=256 config spills 24 bytes).
_FWD_CONFIGS = {
    64: [(128, 128, 8, 3), (128, 64, 4, 3), (128, 64, 8, 4)],
    128: [(128, 128, 8, 3), (128, 64, 8, 3), (128, 64, 8, 4)],
    256: [(128, 64, 8, 2), (64, 32, 4, 2), (128, 32, 8, 3)],
}
# dK/dV kernel: BLOCK_N keys owned by the program (dK, dV accumulators: 2 x BLOCK_N x D fp32),
# BLOCK_M queries per step.  Register-bound: small BLOCK_M keeps the score tiles small.  At D=128
# (sm_90, triton 3.6 and 3.8 alike) (32, 128) and (64, 64) hit 255 registers and spill 100-600
# bytes (more with the atomic dQ; (64, 128), 800-1100 bytes, is left out); (16, 128) and (32, 64)
# with 8 warps spill nothing (atomic dQ: 50-150 bytes).  The autotuner tries them all; (16, 128) is first because the
# untuned paths (deterministic=True, FASTLM_ATTENTION_AUTOTUNE=0) take the first: no spills
# without the atomic dQ, the fewest with it, and the 128-key tile.  Three stages (a deeper Q/dO
# pipeline) fit without spills at (16, 128) (48 bytes with the atomic dQ) and (16, 64) (none with
# it either; triton 3.6, sm_90): candidates for the autotuner, not yet timed on a GPU.
_DKDV_CONFIGS = {
    64: [(32, 128, 8, 2), (64, 128, 8, 2)],
    128: [(16, 128, 8, 2), (32, 128, 8, 2), (64, 64, 8, 2), (32, 64, 8, 2), (16, 128, 8, 3), (16, 64, 8, 3)],
    256: [(32, 64, 8, 2), (64, 32, 8, 2)],
}
# dQ kernel: BLOCK_M queries owned, BLOCK_N keys per step ((128, 32) at 3 stages: 176 registers,
# no spills, 112 KiB).
_DQ_CONFIGS = {
    64: [(128, 64, 8, 2), (64, 64, 4, 3)],
    128: [(128, 64, 8, 2), (128, 32, 8, 2), (128, 32, 8, 3)],
    256: [(64, 64, 8, 2), (32, 32, 4, 2)],
}
# Fallbacks when none of the above fits the device's shared memory.
_FALLBACK_CONFIGS = [(64, 32, 4, 2), (32, 32, 4, 1)]

# Under TRITON_INTERPRET=1 (CPU tests) one small fixed config per kernel, chosen so short
# test sequences still span several blocks; BLOCK_M != BLOCK_N exercises the mask logic.
# Tests may monkeypatch this dict to try other block shapes.
INTERPRET_CONFIGS = {"fwd": (32, 16), "dkdv": (16, 32), "dq": (32, 16)}


@functools.lru_cache(maxsize=None)
def _smem_limit(device_index):
    props = torch.cuda.get_device_properties(device_index)
    return getattr(props, "shared_memory_per_block_optin", 166912)


@functools.lru_cache(maxsize=None)
def _num_sms(device_index):
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _smem_estimate(kind, bm, bn, stages, block_d, esize, atomic=False):
    """Shared memory of a config: pipelined operands (stages copies) + operands kept for the
    whole loop (+ the transposed dS and K copies of the atomic-dQ product).  Matches the
    sm_90a builds of triton 3.9 to within the few hundred bytes of lse/delta staging."""
    if kind == "fwd":
        return (stages * 2 * bn + bm) * block_d * esize
    if kind == "dkdv":
        extra = (bn * block_d + bm * bn) * esize if atomic else 0
        return (stages * 2 * bm + 2 * bn) * block_d * esize + extra + 1024
    return (stages * 2 * bn + 2 * bm) * block_d * esize + 1024


def _configs(kind, block_d, esize, device_index, atomic=False):
    if esize == 4:
        # fp32 inputs: exact fp32 dots run on FMA units, where big tiles only add compile time
        # (minutes) and spills; one small config.  No fit check: without MMA operand staging it
        # needs far less shared memory than _smem_estimate models (triton 3.6, D=256: 102-135 KB
        # on sm_90 and sm_80, against estimates of 164-234 KB).
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32}, num_warps=4, num_stages=2)]
    table = {"fwd": _FWD_CONFIGS, "dkdv": _DKDV_CONFIGS, "dq": _DQ_CONFIGS}[kind]
    limit = _smem_limit(device_index)

    def fit(c):
        return _smem_estimate(kind, c[0], c[1], c[3], block_d, esize, atomic) <= limit

    fits = [c for c in table[_d_class(block_d)] if fit(c)]
    if not fits:
        fits = [c for c in _FALLBACK_CONFIGS if fit(c)]
    if not fits:
        fits = [_FALLBACK_CONFIGS[-1]]
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s) for bm, bn, w, s in fits]


_KERNELS = {"fwd": _attn_fwd_kernel, "dkdv": _attn_bwd_dkdv_kernel, "dq": _attn_bwd_dq_kernel}
_TUNE_KEY = ["seq_key", "HEAD_DIM", "IS_VARLEN", "HAS_LEFT", "HAS_RIGHT", "HAS_SOFTCAP", "IEEE"]


@functools.lru_cache(maxsize=None)
def _tuned(kind, block_d, esize, device_index, atomic=False):
    """Autotuned launcher of one kernel for one head-dim class / element size / device."""
    cfgs = _configs(kind, block_d, esize, device_index, atomic)
    if kind == "fwd":
        return triton.autotune(cfgs, key=_TUNE_KEY)(_attn_fwd_kernel)
    if kind == "dkdv":
        # The atomic variant accumulates into DQ: zero it before every tuning run.
        return triton.autotune(cfgs, key=_TUNE_KEY + ["ATOMIC_DQ"], reset_to_zero=["DQ"] if atomic else None)(
            _attn_bwd_dkdv_kernel)
    return triton.autotune(cfgs, key=_TUNE_KEY)(_attn_bwd_dq_kernel)


# dQ with deterministic=False: either the dK/dV kernel also accumulates it with fp32 atomics (5
# matmuls per tile instead of 7, but more registers: at D=128 on sm_90 every atomic config spills
# a little), or a separate dQ kernel computes it (as deterministic=True does).  Which is faster
# depends on the GPU and shape, so by default (None) the first backward of each autotuning key
# times both and keeps the faster (_pick_atomic).  FASTLM_ATTENTION_DQ_ATOMIC=1 / 0 forces one
# (benchmarks/bench_attention.py times the default and fastlm-triton-det).
DQ_ATOMIC = (None if os.environ.get("FASTLM_ATTENTION_DQ_ATOMIC", "auto").strip().lower() in ("", "auto")
             else _env.flag("FASTLM_ATTENTION_DQ_ATOMIC"))
_ATOMIC_PICKS = {}  # autotuning key -> atomic dQ won the timing

# FASTLM_ATTENTION_AUTOTUNE=0: skip autotuning and take the first config that fits (each
# variant then compiles once instead of len(configs) times; the GPU tests use this).
# deterministic=True calls always do.
AUTOTUNE = _env.flag("FASTLM_ATTENTION_AUTOTUNE", True)


@functools.lru_cache(maxsize=None)
def _first_fit(kind, block_d, esize, device_index, atomic=False):
    """Launch kwargs of the first config that fits (no autotuning)."""
    cfg = _configs(kind, block_d, esize, device_index, atomic)[0]
    return dict(cfg.kwargs, num_warps=cfg.num_warps, num_stages=cfg.num_stages)


# FASTLM_ATTENTION_TMA=1: the forward loads its Q/K/V tiles with the Hopper tensor memory
# accelerator (host-built descriptors) instead of per-thread pointers, on sm_90+ for fp16/bf16
# with a power-of-2 head dim and token-major tensors (see _tma_ok).  Off by default until GPU
# runs show it faster; benchmarks/bench_attention.py times it as fastlm-triton-tma.  (Tried and
# left out, triton 3.6 sm_90: TMA Q/dO tiles in the dK/dV kernel raised its spills 2-5x; TMA K/V
# tiles in the dQ kernel cut 246 registers to 215 where neither spills nor gains occupancy.)
TMA = _env.flag("FASTLM_ATTENTION_TMA")

# Per kernel: descriptor argument -> the config's tile size along its rows.
_TMA_TILES = {"fwd": {"DESC_Q": "BLOCK_M", "DESC_K": "BLOCK_N", "DESC_V": "BLOCK_N"},
              "bwd": {"DESC_Q": "BLOCK_M", "DESC_DO": "BLOCK_M", "DESC_K": "BLOCK_N", "DESC_V": "BLOCK_N"}}
# Row-vector descriptors (lse, delta as (B * H, S)): a 1 x BLOCK_M tile.
_TMA_ROW_TILES = {"bwd": {"DESC_L": "BLOCK_M", "DESC_DL": "BLOCK_M"}}


def _set_tma_blocks(kind, nargs):
    """The descriptors' tile shapes follow the config's BLOCK_M / BLOCK_N (an autotune
    pre-hook; called directly for a fixed config)."""
    d = nargs["HEAD_DIM"]
    for name, block in _TMA_TILES[kind].items():
        nargs[name].block_shape = [nargs[block], d]
    for name, block in _TMA_ROW_TILES.get(kind, {}).items():
        if name in nargs:
            nargs[name].block_shape = [1, nargs[block]]


@functools.lru_cache(maxsize=None)
def _tuned_tma(kind, block_d, esize, device_index):
    hook = functools.partial(_set_tma_blocks, kind)
    cfgs = [triton.Config(c.kwargs, num_warps=c.num_warps, num_stages=c.num_stages, pre_hook=hook)
            for c in _configs(kind, block_d, esize, device_index)]
    return triton.autotune(cfgs, key=_TUNE_KEY)(_KERNELS[kind])


# FASTLM_ATTENTION_WS=1: the warp-specialized kernels (a TMA producer warpgroup and two wgmma
# consumer warpgroups, Triton's Hopper warp specialization) where _ws_ok allows them: sm_90,
# triton 3.6 (3.8 rejects the forward's TMA loads after the consumer split; other versions
# untried), dense fp16/bf16, causal, windowed or full, softcap or not, seqlen_k a multiple of 128;
# the forward at head_dim 64/128/256, the backward at 64/128 with seqlen_q a multiple of 128.
# Off by default until a GPU run has checked and timed them (benchmarks/bench_attention.py:
# fastlm-triton-ws).
WS = _env.flag("FASTLM_ATTENTION_WS")
# The CUDA C++ Hopper forward (csrc/sm90/attention.cu: TMA + wgmma, warp-specialized; in
# fastlm._C_sm90) for the dense shapes it takes (_sm90_ok), the backward staying with the Triton
# kernels (it reads the same out and lse).  Off by default until a GPU run checks and times it.
SM90 = _env.flag("FASTLM_ATTENTION_SM90")
# Its consumer loop (FASTLM_ATTENTION_SM90_OVERLAP): 1, the softmax overlapped with the previous
# tile's P V; 2, that and the two consumer warpgroups taking turns at the GEMMs (ping-pong);
# 0, each wgmma waited for in turn.
SM90_OVERLAP = _env.integer("FASTLM_ATTENTION_SM90_OVERLAP", 1, lo=0, hi=2)
# The CUDA Hopper backward (the same file: dK/dV per 128-key block, dQ by TMA reduce-adds, so not
# with deterministic=True), FASTLM_ATTENTION_SM90_BWD=1; off by default until a GPU run checks it.
SM90_BWD = _env.flag("FASTLM_ATTENTION_SM90_BWD")
WS_TRITON = tuple(int(x) for x in triton.__version__.split(".")[:2]) == (3, 6)
# (BLOCK_M, BLOCK_N, num_warps of each of the 3 warpgroups' partitions, num_stages): sm_90
# builds (triton 3.6) spill nothing and take 65-213 KiB of shared memory; the kernel runs 12
# warps (setmaxnreg: 232 registers for each consumer, 40 for the producer).
_WS_CONFIGS = {
    64: [(128, 128, 4, 3), (128, 64, 4, 3)],
    128: [(128, 128, 4, 2), (128, 64, 4, 3), (128, 64, 4, 4)],
    256: [(128, 64, 4, 2)],
}
# The backward's WS kernels (dK/dV: BLOCK_N keys split between the consumers, BLOCK_M queries
# streamed; dQ: BLOCK_M queries split, BLOCK_N keys streamed) at head_dim 64 and 128 (256 spills
# kilobytes): no spills (sm_90, triton 3.6) but the causal dK/dV 64x128 (184 bytes), kept for
# the non-causal one.
_WS_BWD_CONFIGS = {
    "dkdv": {64: [(64, 128, 4, 2), (32, 128, 4, 2)], 128: [(32, 128, 4, 2), (32, 128, 4, 3), (64, 128, 4, 2)]},
    "dq": {64: [(128, 128, 4, 2), (128, 64, 4, 3)], 128: [(128, 64, 4, 2), (128, 64, 4, 3)]},
}
WS_KEY_MULTIPLE = 128  # seqlen_k (and for the backward seqlen_q) a multiple of every config's tiles

def _ws_smem(bm, bn, stages, block_d, esize):
    """Shared memory of a WS config: _smem_estimate's plus a copy of one consumer's half of the
    Q tile (at least 16 KiB) and barriers; within 1 KiB above the sm_90 builds (triton 3.6:
    D=64 128x128x3 131360, D=128 128x128x2 180384, D=256 128x64x2 229536 bytes)."""
    return _smem_estimate("fwd", bm, bn, stages, block_d, esize) + max(16384, bm // 2 * block_d * esize) + 1024


def _sm90_shape_ok(tensors, varlen, d, window_left, window_right, softcap):
    """The shapes the CUDA Hopper kernels handle: dense fp16/bf16 on an sm_90 GPU with
    fastlm._C_sm90 loaded, head_dim 64 or 128, full or causal, no softcap, TMA-able strides."""
    q = tensors[0]
    if varlen or not q.is_cuda or d not in (64, 128) or q.dtype not in (torch.float16, torch.bfloat16):
        return False
    if window_left != -1 or window_right not in (-1, 0) or softcap > 0:
        return False
    from fastlm import _C_loader

    return (_C_loader.HAVE_SM90 and _capability(q.device.index) == (9, 0)
            and _tma_layout_ok(tensors, varlen, d, d) and q.shape[0] <= 65535 and q.shape[2] <= 65535)


def _sm90_ok(q, k, v, varlen, d, window_left, window_right, softcap):
    """Whether attention_fwd takes the CUDA Hopper forward (SM90 and _sm90_shape_ok)."""
    return SM90 and _sm90_shape_ok((q, k, v), varlen, d, window_left, window_right, softcap)


def _sm90_bwd_ok(q, k, v, dout, varlen, d, window_left, window_right, softcap, deterministic):
    """Whether attention_bwd takes the CUDA Hopper backward (SM90_BWD, not deterministic: dQ is
    summed by TMA reduce-adds in no set order, and _sm90_shape_ok)."""
    return (SM90_BWD and not deterministic
            and _sm90_shape_ok((q, k, v, dout), varlen, d, window_left, window_right, softcap))


def _ws_ok(q, k, v, varlen, d, block_d, window_left, window_right, softcap, dout=None):
    """Whether attention_fwd (dout None) or attention_bwd takes the warp-specialized kernels
    (WS and the shapes they handle)."""
    if not WS or varlen:
        return False
    if not _tma_layout_ok((q, k, v) if dout is None else (q, k, v, dout), varlen, d, block_d):
        return False
    sq, sk = q.shape[1], k.shape[1]
    if _interpreting():
        if dout is None:
            return sk % INTERPRET_CONFIGS["fwd"][1] == 0
        return sq % 32 == 0 and sk % 32 == 0  # the dK/dV (16, 32) and dQ (32, 16) tiles
    if not WS_TRITON or sk % WS_KEY_MULTIPLE or _capability(q.device.index)[0] != 9:
        return False
    if dout is None:
        return d in _WS_CONFIGS and bool(_ws_configs(d, 2, q.device.index))
    return (d in _WS_BWD_CONFIGS["dq"] and sq % WS_KEY_MULTIPLE == 0
            and all(_ws_configs(d, 2, q.device.index, kind) for kind in ("dkdv", "dq")))


@functools.lru_cache(maxsize=None)  # (_ws_ok asks on every call)
def _ws_configs(block_d, esize, device_index, kind="fwd"):
    """The WS configs of `kind` ("fwd", "dkdv", "dq") that fit the device's shared memory."""
    limit = _smem_limit(device_index)
    table = _WS_CONFIGS if kind == "fwd" else _WS_BWD_CONFIGS[kind]
    # (the dK/dV kernel keeps K and V, streams Q and dO: the same count as _ws_smem's with the
    # roles of the two tiles swapped; the dQ kernel keeps Q and dO, streams K and V and the rows'
    # lse and delta; each within 2 KiB above the sm_90 builds)
    fits = {"fwd": lambda bm, bn, st: _ws_smem(bm, bn, st, block_d, esize),
            "dkdv": lambda bm, bn, st: _ws_smem(bn, bm, st, block_d, esize) + bn * block_d * esize,
            "dq": lambda bm, bn, st: _ws_smem(bm, bn, st, block_d, esize) + bm * block_d * esize + st * 2 * bm * 4,
            }[kind]
    tiles = "fwd" if kind == "fwd" else "bwd"
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=st,
                          pre_hook=functools.partial(_set_tma_blocks, tiles))
            for bm, bn, w, st in table[block_d] if fits(bm, bn, st) <= limit]


_WS_KERNELS = {"fwd": _attn_fwd_ws_kernel, "dkdv": _attn_bwd_dkdv_ws_kernel, "dq": _attn_bwd_dq_ws_kernel}


@functools.lru_cache(maxsize=None)
def _tuned_ws(block_d, esize, device_index, kind="fwd"):
    return triton.autotune(_ws_configs(block_d, esize, device_index, kind),
                           key=["seq_key", "HEAD_DIM", "HAS_LEFT", "HAS_RIGHT", "HAS_SOFTCAP"])(_WS_KERNELS[kind])


def _ws_launcher(t, block_d, deterministic, kind="fwd"):
    """(kernel, launch kwargs) of a warp-specialized kernel, as _launcher."""
    if t.is_cuda and not _interpreting():
        if AUTOTUNE and not deterministic:
            return _tuned_ws(block_d, t.element_size(), t.device.index, kind), {}
        cfg = _ws_configs(block_d, t.element_size(), t.device.index, kind)[0]
        return _WS_KERNELS[kind], dict(cfg.kwargs, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    bm, bn = INTERPRET_CONFIGS[kind]
    return _WS_KERNELS[kind], {"BLOCK_M": bm, "BLOCK_N": bn, "num_warps": 4}


def _launcher(kind, t, block_d, atomic=False, deterministic=False, tma=False):
    """(kernel to index with a grid, extra launch kwargs).  deterministic: a fixed config, never
    the autotuner's pick (it is timed, so it can differ from process to process, and each tile
    shape sums in another order: different bits).  tma: the forward's TMA variant (the caller
    sets the descriptors' tile shapes from the returned BLOCK_M / BLOCK_N when not autotuned)."""
    if t.is_cuda and not _interpreting():
        if AUTOTUNE and not deterministic:
            if tma:
                return _tuned_tma(kind, block_d, t.element_size(), t.device.index), {}
            return _tuned(kind, block_d, t.element_size(), t.device.index, atomic), {}
        return _KERNELS[kind], _first_fit(kind, block_d, t.element_size(), t.device.index, atomic)
    bm, bn = INTERPRET_CONFIGS[kind]
    return _KERNELS[kind], {"BLOCK_M": bm, "BLOCK_N": bn, "num_warps": 4}


@functools.lru_cache(maxsize=None)
def _capability(device_index):
    return torch.cuda.get_device_capability(device_index)


def _tma_ok(tensors, varlen, d, block_d):
    """The forward's TMA variant: on (TMA) and the layout allows it (_tma_layout_ok)."""
    return TMA and _tma_layout_ok(tensors, varlen, d, block_d)


def _tma_layout_ok(tensors, varlen, d, block_d):
    """Can a kernel read these tensors through 2-D (tokens, heads * D) TMA descriptors?  Needs
    sm_90+ (or the interpreter), 2-byte elements, D a power of 2 (a tile holds exactly one
    head), each head's D contiguous and heads adjacent within a token, batches evenly spaced
    (dense), 16-byte aligned bases and token strides, and no empty tensor."""
    t0 = tensors[0]
    if TensorDescriptor is None or t0.element_size() != 2 or d != block_d:
        return False
    if not _interpreting() and (not t0.is_cuda or _capability(t0.device.index)[0] < 9):
        return False
    for t in tensors:
        ss = t.stride(0) if varlen else t.stride(1)
        if t.numel() == 0 or t.stride(-1) != 1 or t.stride(-2) != d or ss < t.shape[-2] * d:
            return False
        if (ss * t.element_size()) % 16 or t.data_ptr() % 16:
            return False
        if not varlen and t.shape[0] > 1 and t.stride(0) != t.shape[1] * ss:
            return False
    return True


def _tma_descs(kind, extra, d, varlen, **tensors):
    """Descriptors of `tensors` (argument name -> tensor), tile shapes set when `extra` is a
    fixed config (an autotuned launch sets them in its pre-hook)."""
    descs = {name: _tma_desc(t, varlen, d) for name, t in tensors.items()}
    if extra:
        _set_tma_blocks(kind, dict(extra, HEAD_DIM=d, **descs))
    return descs


def _tma_desc(t, varlen, d):
    """2-D descriptor of t as (tokens, heads * D); tile shape set at launch."""
    rows = t.shape[0] if varlen else t.shape[0] * t.shape[1]
    ss = t.stride(0) if varlen else t.stride(1)
    return TensorDescriptor(t, [rows, t.shape[-2] * d], [ss, 1], [16, d])


def _empty(shape, dtype, device):
    """Allocation of every output the kernels fully overwrite (tests poison it with NaN)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _unit_last(t):
    """t as the kernels can address it: unit stride in D, and a token stride small enough that
    the in-tile offsets (row < 256) * stride stay int32 (they are computed in int32; a larger
    stride wrapped them and read the wrong memory).  Otherwise a contiguous copy."""
    if (t.stride(-1) == 1 or t.shape[-1] == 1) and t.stride(-3) * 256 < 2**31:
        return t
    return t.contiguous()


def _strides3(t, varlen):
    """(batch, seq, head) strides; a packed tensor has batch stride 0."""
    if varlen:
        return 0, t.stride(0), t.stride(1)
    return t.stride(0), t.stride(1), t.stride(2)


@functools.lru_cache(maxsize=None)
def _dummy_cu_on(device):
    return torch.zeros(2, dtype=torch.int32, device=device)


def _dummy_cu(t):
    """Placeholder cu_seqlens for dense launches (never read)."""
    return _dummy_cu_on(t.device)


def _common(q, k, cu_seqlens_q, max_seqlen_q, max_seqlen_k, softmax_scale, softcap):
    varlen = cu_seqlens_q is not None
    d = q.shape[-1]
    if d > MAX_HEAD_DIM:
        raise ValueError(f"head_dim {d} exceeds the attention kernel's limit of {MAX_HEAD_DIM}")
    block_d = _block_d(d)
    if varlen:
        num_seqs = cu_seqlens_q.shape[0] - 1
        sq, sk = q.shape[0], k.shape[0]
        hint = max(max_seqlen_q or 0, max_seqlen_k or 0) or max(sq, sk) // max(num_seqs, 1)
    else:
        num_seqs = q.shape[0]
        sq, sk = q.shape[1], k.shape[1]
        hint = max(sq, sk)
    if softcap > 0:
        score_mul, cap_mul = softmax_scale / softcap, softcap * LOG2E
    else:
        score_mul, cap_mul = softmax_scale * LOG2E, 1.0
    return varlen, d, block_d, num_seqs, sq, sk, _seq_key(hint), score_mul, cap_mul


@on_tensor_device
def attention_fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale,
                  window_left, window_right, softcap, deterministic=False):
    """Forward.  Returns (out like q (contiguous), lse fp32 (B, Hq, Sq) or packed (Hq, Tq), lse_lo):
    lse_lo, for fp32 inputs, is like lse and holds the part of the exact log-sum-exp (in log2
    units) that lse's rounding loses, for attention_bwd; for fp16/bf16 it is empty.

    window_left / window_right: -1 = unbounded; causal is window_right = 0.  Inputs are
    validated by fastlm.ops.attention; only their last dim must have unit stride here.
    deterministic: a fixed tile config instead of the autotuned one (bitwise-reproducible).
    """
    q, k, v = _unit_last(q), _unit_last(k), _unit_last(v)
    varlen, d, block_d, num_seqs, sq, sk, seq_key, score_mul, cap_mul = _common(
        q, k, cu_seqlens_q, max_seqlen_q, max_seqlen_k, softmax_scale, softcap)
    hq, hk = q.shape[-2], k.shape[-2]
    ieee = q.dtype == torch.float32
    if varlen:
        # Tokens past cu_seqlens[-1] belong to no sequence: they keep out = 0, lse = -inf (lse_lo 0).
        out = torch.zeros(q.shape, dtype=q.dtype, device=q.device)
        lse = torch.full((hq, sq), float("-inf"), dtype=torch.float32, device=q.device)
        lse_lo = torch.zeros_like(lse) if ieee else lse.new_empty(0)
        stride_l = (0, lse.stride(0))
    else:
        out = _empty(q.shape, q.dtype, q.device)
        lse = _empty((q.shape[0], hq, sq), torch.float32, q.device)
        lse_lo = _empty(lse.shape, torch.float32, q.device) if ieee else lse.new_empty(0)
        stride_l = (lse.stride(0), lse.stride(1))
    if sq == 0 or num_seqs == 0 or out.numel() == 0:
        return out, lse, lse_lo
    if _sm90_ok(q, k, v, varlen, d, window_left, window_right, softcap):  # (fp16 / bf16)
        return (*torch.ops.fastlm.attention_fwd_sm90_cuda(q, k, v, softmax_scale, window_right == 0, SM90_OVERLAP),
                lse_lo)
    if _ws_ok(q, k, v, varlen, d, block_d, window_left, window_right, softcap):
        kern, extra = _ws_launcher(q, block_d, deterministic)
        descs = _tma_descs("fwd", extra, d, False, DESC_Q=q, DESC_K=k, DESC_V=v)
        kern[lambda meta: (cdiv(sq, meta["BLOCK_M"]), hq, num_seqs)](
            descs["DESC_Q"], descs["DESC_K"], descs["DESC_V"], out, lse, *_strides3(out, False), *stride_l,
            sq, sk, hq // hk, score_mul, cap_mul, window_left, window_right, seq_key, HEAD_DIM=d,
            HAS_LEFT=window_left >= 0, HAS_RIGHT=window_right >= 0, HAS_SOFTCAP=softcap > 0, **extra)
        return out, lse, lse_lo
    cu_q = cu_seqlens_q if varlen else _dummy_cu(q)
    cu_k = cu_seqlens_k if varlen else cu_q
    tma = _tma_ok((q, k, v), varlen, d, block_d)
    kern, extra = _launcher("fwd", q, block_d, deterministic=deterministic, tma=tma)
    descs = _tma_descs("fwd", extra, d, varlen, DESC_Q=q, DESC_K=k, DESC_V=v) if tma else {}

    def grid(meta):
        if varlen:
            return (cdiv(sq, meta["BLOCK_M"]) + num_seqs, hq, 1)
        return (cdiv(sq, meta["BLOCK_M"]), hq, num_seqs)

    kern[grid](
        q, k, v, out, lse, lse_lo if ieee else lse, cu_q, cu_k, descs.get("DESC_Q"), descs.get("DESC_K"),
        descs.get("DESC_V"),
        *_strides3(q, varlen), *_strides3(k, varlen), *_strides3(v, varlen), *_strides3(out, varlen),
        *stride_l,
        sq, sk, num_seqs, hq // hk, score_mul, cap_mul, window_left, window_right, seq_key,
        HEAD_DIM=d, BLOCK_D=block_d, IS_VARLEN=varlen, HAS_LEFT=window_left >= 0, HAS_RIGHT=window_right >= 0,
        HAS_SOFTCAP=softcap > 0, IEEE=ieee, USE_TMA=tma, **extra,
    )
    return out, lse, lse_lo


def _group_splits(q, k, varlen, num_seqs, sk, group):
    """How many programs share one kv head's query-head group in the dK/dV kernel."""
    if group == 1 or not q.is_cuda or _interpreting():
        return 1
    hk = k.shape[-2]
    blocks = cdiv(sk, 128) + num_seqs if varlen else cdiv(sk, 128) * num_seqs
    programs = max(blocks * hk, 1)
    target = 2 * _num_sms(q.device.index)
    if programs >= target:
        return 1
    return min(group, cdiv(target, programs))


@on_tensor_device
def attention_bwd(dout, dlse, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                  softmax_scale, window_left, window_right, softcap, deterministic, group_splits=None, lse_lo=None):
    """Backward.  Returns (dq, dk, dv) like q, k, v (contiguous).

    lse_lo: attention_fwd's third output (fp32 inputs: the probabilities are then recomputed
    without lse's rounding); None or empty: from lse alone.

    dlse: gradient of the returned lse or None.  deterministic=False computes dQ with fp32
    atomics inside the dK/dV kernel or with a separate dQ kernel (DQ_ATOMIC; by default the
    faster, timed once per key); True runs the separate dQ kernel, and both kernels with fixed
    tile configs (bitwise reproducible).
    group_splits: programs per GQA group in the dK/dV kernel (None: by occupancy).
    """
    q, k, v, out, dout = (_unit_last(t) for t in (q, k, v, out, dout))
    varlen, d, block_d, num_seqs, sq, sk, seq_key, score_mul, cap_mul = _common(
        q, k, cu_seqlens_q, max_seqlen_q, max_seqlen_k, softmax_scale, softcap)
    hq, hk = q.shape[-2], k.shape[-2]
    group = hq // hk
    ieee = q.dtype == torch.float32
    if lse_lo is None or lse_lo.numel() == 0 or not ieee:
        lse_lo = torch.zeros_like(lse) if ieee else lse  # (no low part: 0; not read without IEEE)
    elif lse_lo.stride() != lse.stride():  # (the kernels index both with lse's strides)
        lse, lse_lo = lse.contiguous(), lse_lo.contiguous()
    if num_seqs == 0 or q.numel() == 0 or k.numel() == 0:
        return tuple(torch.zeros(t.shape, dtype=t.dtype, device=t.device) for t in (q, k, v))
    batch = 1 if varlen else num_seqs

    # delta = rowsum(dO * O) - dlse, fp32, in lse's layout.
    delta = _empty(lse.shape, torch.float32, lse.device) if not varlen else torch.zeros_like(lse)
    stride_l = (0, lse.stride(0)) if varlen else (lse.stride(0), lse.stride(1))
    if dlse is not None:
        stride_dl = (0, dlse.stride(0), dlse.stride(1)) if varlen else tuple(dlse.stride())
    else:
        stride_dl = (0, 0, 0)
    pre_bm = max(16, min(128, 8192 // block_d))
    _attn_bwd_preprocess_kernel[(cdiv(sq, pre_bm), hq, batch)](
        out, dout, dlse if dlse is not None else delta, delta,
        *_strides3(out, varlen), *_strides3(dout, varlen), *stride_dl, *stride_l, sq,
        HEAD_DIM=d, BLOCK_D=block_d, HAS_DLSE=dlse is not None, BLOCK_M=pre_bm, num_warps=4,
    )
    if _sm90_bwd_ok(q, k, v, dout, varlen, d, window_left, window_right, softcap, deterministic):
        dq_acc = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        dk, dv = torch.ops.fastlm.attention_bwd_sm90_cuda(dout, q, k, v, lse.contiguous(), delta, dq_acc,
                                                          softmax_scale, window_right == 0)
        return dq_acc.to(q.dtype), dk, dv

    # Packed tokens past cu_seqlens[-1] belong to no sequence: their gradients stay 0.
    alloc = (lambda shape, dtype, device: torch.zeros(shape, dtype=dtype, device=device)) if varlen else _empty
    dq = alloc(q.shape, q.dtype, q.device)
    dk = alloc(k.shape, k.dtype, k.device)
    dv = alloc(v.shape, v.dtype, v.device)
    ws = _ws_ok(q, k, v, varlen, d, block_d, window_left, window_right, softcap, dout=dout)
    cu_q = cu_seqlens_q if varlen else _dummy_cu(q)
    cu_k = cu_seqlens_k if varlen else cu_q
    flags = dict(HEAD_DIM=d, BLOCK_D=block_d, IS_VARLEN=varlen, HAS_LEFT=window_left >= 0,
                 HAS_RIGHT=window_right >= 0, HAS_SOFTCAP=softcap > 0, IEEE=ieee)
    splits = group_splits if group_splits is not None else _group_splits(q, k, varlen, num_seqs, sk, group)
    splits = max(1, min(int(splits), group))
    heads_per_split = cdiv(group, splits)
    splits = cdiv(group, heads_per_split)
    if splits > 1:
        dk_buf = alloc((splits,) + tuple(k.shape), torch.float32, k.device)
        dv_buf = alloc((splits,) + tuple(v.shape), torch.float32, v.device)
    else:
        dk_buf, dv_buf = dk.unsqueeze(0), dv.unsqueeze(0)

    def dk_strides(t):
        return (t.stride(0),) + ((0, t.stride(1), t.stride(2)) if varlen else (t.stride(1), t.stride(2), t.stride(3)))

    def grid_kv(meta):
        if varlen:
            return (cdiv(sk, meta["BLOCK_N"]) + num_seqs, hk * splits, 1)
        return (cdiv(sk, meta["BLOCK_N"]), hk * splits, num_seqs)

    def grid_q(meta):
        if varlen:
            return (cdiv(sq, meta["BLOCK_M"]) + num_seqs, hq, 1)
        return (cdiv(sq, meta["BLOCK_M"]), hq, num_seqs)

    def run(atomic):
        """dK, dV (and dQ): every launch after the preprocess; writes all of dq, dk, dv, so
        running it again (the timed pick) recomputes the same gradients."""
        dq_acc = torch.zeros(q.shape, dtype=torch.float32, device=q.device) if atomic else dq
        kern, extra = _launcher("dkdv", q, block_d, atomic, deterministic)
        kern[grid_kv](
            q, k, v, dout, lse, lse_lo, delta, dk_buf, dv_buf, dq_acc, cu_q, cu_k,
            *_strides3(q, varlen), *_strides3(k, varlen), *_strides3(v, varlen), *_strides3(dout, varlen),
            *stride_l, *dk_strides(dk_buf), *dk_strides(dv_buf), *_strides3(dq_acc, varlen),
            sq, sk, num_seqs, group, splits, heads_per_split,
            softmax_scale * LOG2E, score_mul, cap_mul, softmax_scale, window_left, window_right, seq_key,
            ATOMIC_DQ=atomic, **flags, **extra,
        )
        if splits > 1:
            dk.copy_(dk_buf.sum(0))
            dv.copy_(dv_buf.sum(0))
        if atomic:
            dq.copy_(dq_acc)
            return
        kern, extra = _launcher("dq", q, block_d, deterministic=deterministic)
        kern[grid_q](
            q, k, v, dout, lse, lse_lo, delta, dq, cu_q, cu_k,
            *_strides3(q, varlen), *_strides3(k, varlen), *_strides3(v, varlen), *_strides3(dout, varlen),
            *stride_l, *_strides3(dq, varlen),
            sq, sk, num_seqs, group, softmax_scale * LOG2E, score_mul, cap_mul, softmax_scale,
            window_left, window_right, seq_key, **flags, **extra,
        )

    def run_ws():
        """The warp-specialized dK/dV and dQ kernels (no atomics: deterministic)."""
        ws_flags = dict(HEAD_DIM=d, HAS_LEFT=window_left >= 0, HAS_RIGHT=window_right >= 0, HAS_SOFTCAP=softcap > 0)
        kern, extra = _ws_launcher(q, block_d, deterministic, "dkdv")
        descs = _tma_descs("bwd", extra, d, False, DESC_Q=q, DESC_DO=dout, DESC_K=k, DESC_V=v)
        kern[lambda meta: (sk // meta["BLOCK_N"], hk * splits, num_seqs)](
            descs["DESC_Q"], descs["DESC_DO"], descs["DESC_K"], descs["DESC_V"], lse, delta, dk_buf, dv_buf,
            *stride_l, *dk_strides(dk_buf), *dk_strides(dv_buf), sq, sk, group, splits, heads_per_split,
            softmax_scale * LOG2E, score_mul, cap_mul, softmax_scale, window_left, window_right, seq_key,
            **ws_flags, **extra)
        if splits > 1:
            dk.copy_(dk_buf.sum(0))
            dv.copy_(dv_buf.sum(0))
        kern, extra = _ws_launcher(q, block_d, deterministic, "dq")
        rows = {name: TensorDescriptor(t.contiguous().view(-1, sq), [num_seqs * hq, sq], [sq, 1], [1, 16])
                for name, t in (("DESC_L", lse), ("DESC_DL", delta))}
        descs = _tma_descs("bwd", extra, d, False, DESC_Q=q, DESC_DO=dout, DESC_K=k, DESC_V=v)
        if extra:
            _set_tma_blocks("bwd", dict(extra, HEAD_DIM=d, **descs, **rows))
        kern[lambda meta: (sq // meta["BLOCK_M"], hq, num_seqs)](
            descs["DESC_Q"], descs["DESC_DO"], descs["DESC_K"], descs["DESC_V"], rows["DESC_L"], rows["DESC_DL"], dq,
            *_strides3(dq, False), sq, sk, group, softmax_scale * LOG2E, score_mul, cap_mul, softmax_scale,
            window_left, window_right, seq_key, **ws_flags, **extra)

    if ws:
        run_ws()
    elif deterministic:
        run(False)
    elif DQ_ATOMIC is not None:
        run(DQ_ATOMIC)
    else:
        key = (q.device, q.dtype, seq_key, splits > 1, *flags.values())
        _pick_atomic(key, run, q)
    return dq, dk, dv


def _pick_atomic(key, run, t):
    """Run the backward with atomic or separate dQ: the one that was faster on the first call
    with this key (timed here, after each variant's own autotuning).  Untimed (atomic) where a
    timing cannot or should not run: no autotuning, the interpreter, a CUDA graph capture."""
    picked = _ATOMIC_PICKS.get(key)
    if picked is not None:
        return run(picked)
    if not _can_time(t):
        return run(True)
    # (each timed run writes all of dq, dk, dv: the last one leaves the gradients in place)
    ms = {a: _time_ms(lambda a=a: run(a)) for a in (True, False)}
    _ATOMIC_PICKS[key] = ms[True] <= ms[False]


def _can_time(t):
    return AUTOTUNE and t.is_cuda and not _interpreting() and not torch.cuda.is_current_stream_capturing()


def _time_ms(fn, reps=3):
    """Median milliseconds of fn on the current stream, after one untimed call (its autotuning)."""
    fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]
