"""KV-cache append and split-KV decode attention (Flash-Decoding) in Triton.

Layouts: contiguous caches (batch, max_seqlen, n_kv_heads, head_dim), or paged caches
(num_blocks, block_size, n_kv_heads, head_dim) with an int32 block_table (batch, max_blocks):
token t of sequence b lives in block block_table[b, t // block_size], slot t % block_size.
Any block size works: tiles of BLOCK_N tokens gather their block ids token by token, so a tile
may straddle block boundaries (block_size is a constexpr: the divisions become shifts).

Append: one program per new token copies its (n_kv_heads, head_dim) slice of k and v to the
cache slot at position cache_seqlens[b] + s.  Positions outside the cache capacity and block ids
outside [0, num_blocks) are skipped: the kernel never writes out of bounds (the op layer checks
these on the host in debug mode; the cache objects check them before anything is written).

Decode (memory-bound: every byte of the visible K/V is read once):
- grid (split, kv_head x row_tile, batch).  A program owns one KV head and BLOCK_M "query rows",
  the n_heads_q / n_kv_heads query heads of the GQA group times seqlen_q (row r = s * G + g), so
  each K/V tile is loaded once for all of them and the tile math is a small matmul (tl.dot,
  rows padded to 16; the FLOPs are free in this memory-bound kernel, and the dot keeps Triton's
  software pipelining of the loads).
- Split-KV: the visible keys of each sequence are cut into num_splits chunks of whole tiles;
  each program runs an online softmax over its chunk and writes the normalized partial output
  and its log2-sum-exp (fp32 workspace), and `_combine_kernel` merges the splits.  With one
  split the program writes the output directly.
- Fused combine (given zeroed counters): no combine launch.  Each program, after writing its
  partials, takes a ticket from an int32 counter of its (batch, kv head, row tile) (a barrier,
  then one thread's acq_rel atomic at GPU scope: the pattern of a cooperative-groups grid sync);
  the program that draws the last ticket merges the splits (`_merge_splits`, which
  `_combine_kernel` also uses: vectorized over the splits, so the merge is a few wide loads, not
  a chain of one L2 round trip per split) and zeroes the counter again (every ticket is drawn by
  then).  The counters come zeroed either from the append kernel launched just before on the
  same stream, or from a workspace the caller keeps between calls (the previous launch left it
  zeroed: no memset launch, CUDA-graph safe).  A tile whose partials exceed
  MAX_FUSED_MERGE_BYTES is left to `_combine_kernel` (too much for one program to merge).
- New tokens in the decode launch (NEW_KV, the model's decode step: no append launch): every
  program normalizes (q/k norms) and rotates its query rows itself at the new tokens' positions
  (a few hundred bytes of q, read by each split); the keys read from the cache end where the
  new tokens start, and the last split also takes the new keys and values as one more tile:
  normalized and rotated in registers, attended to from there, and written to the cache (by
  the KV head's first row tile).  No program reads a slot another one writes in the launch.
- Masks: query row at position p = L - seqlen_q + s sees key t iff t < L, t <= p (causal) and
  t >= p - window (window >= 0), and t >= cache_leftpad[b] when given (the split range starts
  there, so padding keys are never read).  Rows that see no key give 0.  Block ids out of range are
  masked (never read).  Forward only.
"""
import functools

import torch
import triton
import triton.language as tl

from fastlm import _env

from fastlm.kernels import cdiv, next_pow2, on_tensor_device
from fastlm.kernels.qk_norm import norm_rotate
from fastlm.kernels.rotary import _rotate_tile

LOG2E = 1.4426950408889634
MAX_SPLITS = 128
# The fused combine merges in one program what _combine_kernel spreads over one program per
# row: above this many bytes of partials per tile (merged rows x head_dim x splits x 4) the
# separate combine is used (at batch 1 with 8 KV heads a Llama tile of 4 rows at 33 splits reads
# 34 KiB at head_dim 64, 68 KiB at 128; an MQA tile of 32 rows at 64 splits, 1 MiB).  A first
# guess, to be set from bench_decode's decode_step rows on a GPU; csrc/kv_cache.cu's
# kMaxFusedMergeBytes is the same limit.
MAX_FUSED_MERGE_BYTES = 128 * 1024
# The new tokens' tile of the one-launch decode step: fp32 products summed over head_dim (False:
# a decode step's one key needs no 16-key tile), or tl.dot over the tile padded to 16 keys (True,
# or FASTLM_TRITON_NEW_KV_DOT=1: the main loop's layouts, and its rounding of P to the cache
# dtype).  The H200 run of 2026-12-04 found the one-launch step wrong on the GPU while it passed
# under the interpreter: the products' sum over the keys had become a K = 1 tensor-core dot in
# triton 3.6 (the new token's P V counted 8 times; see _few_keys_pv, which replaced that sum).
NEW_KV_DOT = _env.flag("FASTLM_TRITON_NEW_KV_DOT")


@triton.jit
def _tanh(x):
    # tanh without libdevice (not available in the interpreter): an odd Taylor polynomial near
    # 0 (keeps the relative accuracy that 1 - 2/(e^2x + 1) loses there), the exp form elsewhere.
    a = tl.abs(x)
    e = tl.exp(-2.0 * a)
    big = (1.0 - e) / (1.0 + e)
    x2 = a * a
    small = a * (1.0 + x2 * (-0.3333333333333333 + x2 * (0.13333333333333333 + x2 * (
        -0.05396825396825397 + x2 * (0.021869488536155203 + x2 * (-0.008863235529902197 + x2 * (
            0.003592128036572481 + x2 * -0.0014558343870513183)))))))
    t = tl.where(a < 0.5, small, big)
    return tl.where(x < 0, -t, t)


# ----------------------------------------------------------------------------- append
@triton.jit
def _cache_row(pos, b64, BT, s_bt, n_pages, capacity, PAGED: tl.constexpr, PAGE: tl.constexpr):
    """(first index, slot, ok) of the cache row of position `pos` (a tensor) of sequence b: ok
    is False past the capacity or where the block id is outside [0, n_pages)."""
    ok = (pos >= 0) & (pos < capacity)
    pos = tl.where(ok, pos, 0)
    if PAGED:
        phys = tl.load(BT + b64 * s_bt + pos // PAGE, mask=ok, other=-1)
        ok = ok & (phys >= 0) & (phys < n_pages)
        return tl.where(ok, phys, 0).to(tl.int64), (pos % PAGE).to(tl.int64), ok
    return b64 + pos.to(tl.int64) * 0, pos.to(tl.int64), ok


@triton.jit
def _append_kernel(
    K_CACHE,  # *T  (num_blocks, block_size, H, D) paged, or (batch, max_seqlen, H, D): written in place
    V_CACHE,  # *T  same shape as K_CACHE (its own strides)
    K,  # *T  new keys (batch, seqlen_new, H, D), any strides
    V,  # *T  new values, same shape as K
    SEQLENS,  # *i32 (batch,): write position of each sequence's first new token
    BT,  # *i32 (batch, max_blocks) block table (unused unless PAGED)
    Q,  # *T  (batch, seqlen_new, Hq, D) queries to rotate (ROTARY only)
    QO,  # *T  rotated queries, same shape (ROTARY only)
    COS,  # *Tc (max_pos, half) rotary tables, unit column stride (ROTARY only)
    SIN,
    QW,  # *Tw (D,) RMSNorm weights of the q and k heads (NORM only)
    KW,
    seqlen_new,
    H,
    D,
    Hq,  # query heads (ROTARY only)
    half,  # rotary_dim // 2 (ROTARY only)
    max_pos,  # rows of the tables (ROTARY only)
    eps,  # the norms' epsilon (NORM only)
    w_offset,  # the heads scale by w_offset + weight (NORM only)
    n_pages,  # valid range of the cache's first index: num_blocks (paged) or batch
    capacity,  # tokens a sequence can hold: max_blocks * PAGE (paged) or max_seqlen
    s_kcb, s_kct, s_kch, s_kcd,  # K_CACHE strides (block|batch, slot|token, head, dim)
    s_vcb, s_vct, s_vch, s_vcd,  # V_CACHE strides
    s_kb, s_ks, s_kh, s_kd,  # K strides
    s_vb, s_vs, s_vh, s_vd,  # V strides
    s_qb, s_qs, s_qh,  # Q strides (unit last stride; ROTARY only)
    s_qob, s_qos, s_qoh,  # QO strides
    s_cos,  # table row stride
    s_bt,  # block table row stride
    SEM,  # *i32 (batch, n_sem) fused-combine counters of the decode launched next (ZERO_SEM only)
    n_sem,
    PAGED: tl.constexpr,  # paged layout (else contiguous)
    PAGE: tl.constexpr,  # block size (1 when not PAGED)
    ROTARY: tl.constexpr,  # rotate k (and q into QO) at each token's position before writing
    NORM: tl.constexpr,  # RMS-normalize each head of k (and q into QO) first (Qwen3's q/k norms)
    INTERLEAVED: tl.constexpr,  # GPT-J pairs (ROTARY only)
    COPY_PASS: tl.constexpr,  # rotary_dim < head_dim: copy the dims past it (ROTARY only)
    BLOCK_H: tl.constexpr,  # power of two >= H
    BLOCK_D: tl.constexpr,  # power of two >= D
    BLOCK_HQ: tl.constexpr,  # power of two >= Hq (ROTARY only)
    BLOCK_HALF: tl.constexpr,  # power of two >= half (ROTARY only)
    BLOCK_PASS: tl.constexpr,  # power of two >= D - 2 * half (COPY_PASS only)
    ZERO_SEM: tl.constexpr,  # zero SEM[b, :] (in the program of each sequence's first new token)
    BLOCK_SEM: tl.constexpr,  # power of two >= n_sem (ZERO_SEM only)
):
    pid = tl.program_id(0)
    b = pid // seqlen_new
    s = pid % seqlen_new
    b64 = b.to(tl.int64)
    s64 = s.to(tl.int64)  # (s - 1) * the token stride passes 2**31 in a long prefill of a fused-qkv view
    if ZERO_SEM:
        j = tl.arange(0, BLOCK_SEM)
        tl.store(SEM + b64 * n_sem + j, tl.zeros([BLOCK_SEM], dtype=tl.int32), mask=(j < n_sem) & (s == 0))
    h = tl.arange(0, BLOCK_H)[:, None]
    h64 = h.to(tl.int64)  # head strides of head-major views: (H - 1) * the head stride passes 2**31
    d = tl.arange(0, BLOCK_D)[None, :]
    # The position as a (BLOCK_H, 1) tensor (the same value in every row): the interpreter
    # mishandles masks built from scalar comparisons.
    pos = tl.load(SEQLENS + b + h * 0) + s
    phys64, slot64, ok = _cache_row(pos, b64, BT, s_bt, n_pages, capacity, PAGED, PAGE)
    m = (h < H) & (d < D) & ok
    v = tl.load(V + b64 * s_vb + s64 * s_vs + h64 * s_vh + d * s_vd, mask=m)
    tl.store(V_CACHE + phys64 * s_vcb + slot64 * s_vct + h64 * s_vch + d * s_vcd, v.to(V_CACHE.dtype.element_ty), mask=m)
    if ROTARY or NORM:
        # One token per program: [1]-shaped position, cache row and cos/sin row (NaN past the
        # table, so a bad position shows as NaN, never as a wrapped angle).
        one = tl.zeros([1], dtype=tl.int32)
        pos1 = tl.load(SEQLENS + b + one) + s
        phys1, slot1, ok1 = _cache_row(pos1, b64, BT, s_bt, n_pages, capacity, PAGED, PAGE)
        if ROTARY:
            in_table = (pos1 >= 0) & (pos1 < max_pos)
            i = tl.arange(0, BLOCK_HALF)
            coff = tl.where(in_table, pos1, 0).to(tl.int64)[:, None] * s_cos + i[None, :]
            cmask = in_table[:, None] & (i < half)[None, :]
            c = tl.load(COS + coff, mask=cmask, other=float("nan")).to(tl.float32)[:, None, :]
            sn = tl.load(SIN + coff, mask=cmask, other=float("nan")).to(tl.float32)[:, None, :]
        else:  # (unused: a norm alone)
            c = tl.full([1, 1, BLOCK_HALF], 1.0, tl.float32)
            sn = tl.zeros([1, 1, BLOCK_HALF], tl.float32)
        # k: read at (b, s), written (normalized and) rotated at the cache row; q: read at (b, s),
        # written to QO.
        kx = K + b64 * s_kb + s64 * s_ks
        qx, qy = Q + b64 * s_qb + s64 * s_qs, QO + b64 * s_qob + s64 * s_qos
        if NORM:
            hk = tl.arange(0, BLOCK_H).to(tl.int64)[None, :]  # [1, BLOCK_H]
            hq = tl.arange(0, BLOCK_HQ).to(tl.int64)[None, :]
            norm_rotate(kx, K_CACHE, hk * s_kh, (phys1 * s_kcb + slot1 * s_kct)[:, None] + hk * s_kch,
                        ok1[:, None] & (hk < H), KW, c, sn, eps, w_offset, half, D, ROTARY, INTERLEAVED, True,
                        BLOCK_HALF, BLOCK_PASS)
            norm_rotate(qx, qy, hq * s_qh, hq * s_qoh, (one == 0)[:, None] & (hq < Hq), QW, c, sn, eps, w_offset,
                        half, D, ROTARY, INTERLEAVED, True, BLOCK_HALF, BLOCK_PASS)
        else:
            zero = one.to(tl.int64)
            _rotate_tile(kx, K_CACHE, 0, 0, s_kh, s_kcb, s_kct, s_kch, phys1, slot1, ok1, 0, H,
                         c, sn, half, D, INTERLEAVED, COPY_PASS, 1, BLOCK_H, BLOCK_HALF, BLOCK_PASS)
            _rotate_tile(qx, qy, 0, 0, s_qh, 0, 0, s_qoh, zero, zero,
                         one == 0, 0, Hq, c, sn, half, D, INTERLEAVED, COPY_PASS, 1, BLOCK_HQ, BLOCK_HALF, BLOCK_PASS)
    else:
        k = tl.load(K + b64 * s_kb + s64 * s_ks + h64 * s_kh + d * s_kd, mask=m)
        tl.store(K_CACHE + phys64 * s_kcb + slot64 * s_kct + h64 * s_kch + d * s_kcd, k.to(K_CACHE.dtype.element_ty),
                 mask=m)


@on_tensor_device
def kv_cache_append(k_cache, v_cache, k, v, cache_seqlens, block_table, q=None, q_out=None, cos=None, sin=None,
                    interleaved=False, counters=None, q_weight=None, k_weight=None, eps=1e-6, w_offset=0.0):
    """In place; shapes/dtypes/devices already validated by fastlm.ops.kv_cache.  With cos/sin,
    k is rotated at each token's position (cache_seqlens[b] + s) as it is written, and q (same
    positions) is rotated into q_out, in the same launch.  With q_weight/k_weight, every head of
    q and k is first RMS-normalized over head_dim (fp32, eps) and scaled by w_offset + weight.
    counters: combine_counters() of the decode_attention launched next, zeroed here."""
    B, S, H, D = k.shape
    if B == 0 or S == 0:
        assert counters is None or counters.numel() == 0, "the fused combine's counters need an append to zero them"
        return
    paged = block_table is not None
    page = k_cache.shape[1] if paged else 1
    capacity = block_table.shape[1] * page if paged else k_cache.shape[1]
    block_h, block_d = next_pow2(H), next_pow2(D)
    rotary, norm = cos is not None, k_weight is not None
    if rotary or norm:
        # the rotation reads whole rows: unit stride in head_dim (a free view of a fused qkv)
        q, k = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k))
        Hq, half = q.shape[2], cos.shape[1] if rotary else 0
        block_hq, block_half = next_pow2(Hq), max(next_pow2(half), 1)
        copy_pass = 2 * half < D
        block_pass = next_pow2(D - 2 * half) if copy_pass else 1
        q_args = (q, q_out, cos if rotary else q, sin if rotary else q)
        q_strides = (*q.stride()[:3], *q_out.stride()[:3], cos.stride(0) if rotary else 0)
        tile = max(block_h, block_hq) * block_d
    else:
        Hq = half = 0
        block_hq = block_half = block_pass = 1
        copy_pass = False
        q_args = (k, k, k, k)  # placeholders (never read)
        q_strides = (0,) * 7
        tile = block_h * block_d
    _append_kernel[(B * S,)](
        k_cache, v_cache, k, v, cache_seqlens, block_table if paged else cache_seqlens, *q_args,
        q_weight if norm else k, k_weight if norm else k,
        S, H, D, Hq, half, cos.shape[0] if rotary else 0, float(eps), float(w_offset), k_cache.shape[0], capacity,
        *k_cache.stride(), *v_cache.stride(), *k.stride(), *v.stride(), *q_strides,
        block_table.stride(0) if paged else 0,
        counters if counters is not None else cache_seqlens, counters.shape[1] if counters is not None else 0,
        PAGED=paged, PAGE=page, ROTARY=rotary, NORM=norm, INTERLEAVED=interleaved, COPY_PASS=copy_pass,
        BLOCK_H=block_h, BLOCK_D=block_d, BLOCK_HQ=block_hq, BLOCK_HALF=block_half, BLOCK_PASS=block_pass,
        ZERO_SEM=counters is not None,
        BLOCK_SEM=next_pow2(counters.shape[1]) if counters is not None else 1,
        num_warps=8 if tile >= 8192 else (4 if tile >= 1024 else 2),
    )


# ----------------------------------------------------------------------------- decode
@triton.jit
def _normed_rotated(X, rx, r_ok, pos, d, d_ok, s_d, COS, SIN, s_cos, half, max_pos, W, eps, w_offset, D,
                    ROTARY: tl.constexpr, NORM: tl.constexpr, INTERLEAVED: tl.constexpr):
    """Rows X[rx + d * s_d] as a [rows, BLOCK_D] fp32 tile: RMS-normalized over D (NORM: fp32
    statistics, times w_offset + W), then rotated at positions pos [rows] (ROTARY: the pairs
    (i, i + half) or (2i, 2i+1); a position past the tables gives NaN, never a wrapped angle;
    dims past 2 * half pass through).  The same operations, in the same order, as the append
    kernel's norm_rotate / _rotate_tile (unrounded: the caller rounds as they store)."""
    m = r_ok[:, None] & d_ok[None, :]
    x = tl.load(X + rx[:, None] + d[None, :] * s_d, mask=m, other=0.0).to(tl.float32)
    if ROTARY:
        rot = d < 2 * half
        if INTERLEAVED:  # pairs (2i, 2i+1)
            first = d % 2 == 0
            partner = tl.where(first, d + 1, d - 1)
            i = d // 2
        else:  # pairs (i, i + half)
            first = d < half
            partner = tl.where(first, d + half, d - half)
            i = tl.where(first, d, d - half)
        partner = tl.where(rot, partner, d)
        xp = tl.load(X + rx[:, None] + partner[None, :] * s_d, mask=m & rot[None, :], other=0.0).to(tl.float32)
    if NORM:
        rstd = 1.0 / tl.sqrt(tl.sum(x * x, 1) / D + eps)
        x = x * rstd[:, None] * (tl.load(W + d, mask=d_ok, other=0.0).to(tl.float32) + w_offset)[None, :]
        if ROTARY:
            xp = xp * rstd[:, None] * (tl.load(W + partner, mask=d_ok, other=0.0).to(tl.float32) + w_offset)[None, :]
    if ROTARY:
        in_table = (pos >= 0) & (pos < max_pos)
        coff = tl.where(in_table, pos, 0).to(tl.int64)[:, None] * s_cos + tl.where(rot, i, 0)[None, :]
        cm = (r_ok & in_table)[:, None] & rot[None, :]
        c = tl.load(COS + coff, mask=cm, other=0.0).to(tl.float32)
        sn = tl.load(SIN + coff, mask=cm, other=0.0).to(tl.float32)
        off_table = (r_ok & ~in_table)[:, None]
        c = tl.where(off_table, float("nan"), c)
        sn = tl.where(off_table, float("nan"), sn)
        x = tl.where(rot[None, :], tl.where(first[None, :], x * c - xp * sn, x * c + xp * sn), x)
    return x


@triton.jit
def _softmax_step(q, k, t, t_ok, pos, m_i, l_i, qk_scale, softcap_log2, window,
                  CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, SOFTCAP: tl.constexpr, PRECISION: tl.constexpr,
                  DOT: tl.constexpr = True):
    """One tile of keys k ([BLOCK_N, BLOCK_D], at positions t, t_ok the ones that exist) in the
    online softmax of the query rows q (at positions pos): -> (p, alpha, m_i, l_i), the tile's
    probabilities (unnormalized) and the factor that rescales the accumulator.  DOT=False: the
    scores as fp32 products summed over D, for a tile of a few keys (tl.dot needs 16)."""
    if DOT:
        qk = tl.dot(q, tl.trans(k), input_precision=PRECISION)
    else:
        qk = tl.sum(q.to(tl.float32)[:, None, :] * k.to(tl.float32)[None, :, :], 2)
    if SOFTCAP:
        s = softcap_log2 * _tanh(qk * qk_scale)
    else:
        s = qk * qk_scale
    vis = t_ok[None, :]
    if CAUSAL:
        vis = vis & (t[None, :] <= pos[:, None])
    if HAS_WINDOW:
        vis = vis & (t[None, :] >= pos[:, None] - window)
    s = tl.where(vis, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # no key yet: avoid inf - inf
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(s - m_safe[:, None])
    return p, alpha, m_new, l_i * alpha + tl.sum(p, 1)


@triton.jit
def _few_keys_pv(p, v, j, BLOCK_NEW: tl.constexpr):
    """sum over keys i of p[:, i] (x) v[i, :] for a tile of BLOCK_NEW keys (j = arange(BLOCK_NEW)),
    in fp32: one outer product per key, each key's column of p and row of v picked by a masked
    sum.  Never tl.sum(p[:, :, None] * v[None, :, :], 1): Triton's combine pass rewrites that
    product-and-sum into a tt.dot with K = BLOCK_NEW, and below the mma's K of 8 the dot's
    operand layouts repeat the keys instead of padding with zeros -- the H200 run of 2026-12-04
    got 8 p v for a decode step's one new token (m16n8k8 with the same register in every K
    slot), while the interpreter sums exactly.  tests/test_triton_compile.py fails any kernel
    with a dot of K < 16."""
    acc = tl.zeros([p.shape[0], v.shape[1]], dtype=tl.float32)
    for i in tl.static_range(BLOCK_NEW):
        p_i = tl.sum(tl.where(j[None, :] == i, p, 0.0), 1)
        v_i = tl.sum(tl.where(j[:, None] == i, v, 0.0), 0)
        acc += p_i[:, None] * v_i[None, :]
    return acc


@triton.jit
def _decode_kernel(
    Q,  # *T  (batch, seqlen_q, Hq, D), strides s_q*
    K_CACHE,  # *T  (num_blocks, PAGE, Hkv, D) or (batch, max_seqlen, Hkv, D)
    V_CACHE,  # *T  same shape as K_CACHE
    SEQLENS,  # *i32 (batch,): tokens of each sequence in the cache (+ seqlen_add: the new ones)
    LEFTPAD,  # *i32 (batch,): each sequence's first key (cache_leftpad; read when HAS_LEFTPAD)
    BT,  # *i32 (batch, max_blocks) (unused unless PAGED)
    OUT,  # *T  (batch, seqlen_q, Hq, D), strides s_o* (written when not SPLIT)
    O_PART,  # *fp32 (batch, seqlen_q, Hq, num_splits, D) contiguous (written when SPLIT)
    LSE_PART,  # *fp32 (batch, seqlen_q, Hq, num_splits): log2-sum-exp of each split (SPLIT)
    SEM,  # *i32 (batch, Hkv * n_mtiles) zeroed counters (FUSED_COMBINE; left zeroed)
    KN,  # *T  new keys (batch, seqlen_add, Hkv, D), any strides (NEW_KV)
    VN,  # *T  new values, same shape (NEW_KV)
    COS,  # *Tc (max_pos, half) rotary tables, unit column stride (NEW_KV and ROTARY)
    SIN,
    QW,  # *Tw (D,) RMSNorm weights of the q and k heads (NEW_KV and NORM)
    KW,
    qk_scale,  # softmax_scale * log2(e), or softmax_scale / softcap with SOFTCAP
    softcap_log2,  # softcap * log2(e) (SOFTCAP only)
    seqlen_q,
    seqlen_add,  # added to SEQLENS (tokens appended by this step's fused append, else 0; NEW_KV: those in KN)
    G,  # query heads per KV head
    Hq,
    D,
    n_pages,  # num_blocks (paged) or batch: valid range of the cache's first index
    capacity,  # tokens a sequence can hold
    window,  # left window (keys >= p - window), used when HAS_WINDOW
    num_splits,
    n_mtiles,  # row tiles per KV head
    half,  # rotary_dim // 2 (ROTARY)
    max_pos,  # rows of the tables (ROTARY)
    eps,  # the norms' epsilon (NORM)
    w_offset,  # the heads scale by w_offset + weight (NORM)
    s_qb, s_qs, s_qh, s_qd,
    s_kb, s_kt, s_kh, s_kd,
    s_vb, s_vt, s_vh, s_vd,
    s_ob, s_os, s_oh, s_od,
    s_bt,
    s_knb, s_kns, s_knh, s_knd,  # KN strides (NEW_KV)
    s_vnb, s_vns, s_vnh, s_vnd,  # VN strides (NEW_KV)
    s_cos,  # table row stride (ROTARY)
    PAGED: tl.constexpr,
    PAGE: tl.constexpr,
    NEW_KV: tl.constexpr,  # append KN/VN (normalized, rotated) at SEQLENS[b] + j, attend to them: no append launch
    ROTARY: tl.constexpr,  # NEW_KV: rotate q and the new keys at their positions
    NORM: tl.constexpr,  # NEW_KV: RMS-normalize every head of q and of the new keys first
    INTERLEAVED: tl.constexpr,  # GPT-J pairs (ROTARY)
    BLOCK_NEW: tl.constexpr,  # power of two >= seqlen_add (NEW_KV; >= 16 with NEW_DOT)
    NEW_DOT: tl.constexpr,  # NEW_KV: the new tokens' tile through tl.dot (NEW_KV_DOT), else fp32 products
    CAUSAL: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
    HAS_LEFTPAD: tl.constexpr,
    SOFTCAP: tl.constexpr,
    SPLIT: tl.constexpr,  # write partials to O_PART/LSE_PART (else the final output to OUT)
    FUSED_COMBINE: tl.constexpr,  # SPLIT: the last program of each (b, hkv, mtile) merges the splits
    BLOCK_S: tl.constexpr,  # power of two >= num_splits (FUSED_COMBINE)
    MERGE_M: tl.constexpr,  # rows merged: min(BLOCK_M, power of two >= seqlen_q * G) (FUSED_COMBINE)
    CHUNK_S: tl.constexpr,  # splits merged per step (FUSED_COMBINE; merge_chunk)
    PRECISION: tl.constexpr,  # tl.dot input precision: "ieee" for fp32 caches (no tf32 rounding)
    BLOCK_M: tl.constexpr,  # query rows per program (power of two >= 16: tl.dot's minimum)
    BLOCK_N: tl.constexpr,  # keys per tile
    BLOCK_D: tl.constexpr,  # power of two >= D
):
    pid_split = tl.program_id(0)
    pid_hm = tl.program_id(1)
    b = tl.program_id(2)
    hkv = pid_hm // n_mtiles
    mtile = pid_hm % n_mtiles
    b64 = b.to(tl.int64)
    hkv64 = hkv.to(tl.int64)  # a head-major cache view: (Hkv - 1) * max_len * D can pass 2**31

    # Query rows of this program: row = s * G + g -> query position s, head hkv * G + g.
    rows = mtile * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < seqlen_q * G
    qs = tl.where(row_ok, rows // G, 0)
    head = hkv * G + rows % G
    d = tl.arange(0, BLOCK_D)
    d_ok = d < D
    L_raw = tl.load(SEQLENS + b)
    if NEW_KV and (ROTARY or NORM):  # q normalized and rotated here, at the new tokens' positions
        q = _normed_rotated(Q, b64 * s_qb + qs * s_qs + head.to(tl.int64) * s_qh, row_ok, L_raw + qs, d, d_ok, s_qd,
                            COS, SIN, s_cos, half, max_pos, QW, eps, w_offset, D, ROTARY, NORM, INTERLEAVED)
        q = q.to(Q.dtype.element_ty)
    else:
        q = tl.load(
            Q + b64 * s_qb + qs[:, None] * s_qs + head[:, None] * s_qh + d[None, :] * s_qd,
            mask=row_ok[:, None] & d_ok[None, :], other=0.0,
        )

    L = tl.minimum(tl.maximum(L_raw + seqlen_add, 0), capacity)
    # The keys read from the cache end at L_old (NEW_KV: the new ones come from KN/VN), else at L.
    L_old = tl.minimum(tl.maximum(L_raw, 0), capacity) if NEW_KV else L
    pos = L - seqlen_q + qs  # position of each query row
    lo = 0
    if HAS_WINDOW:
        lo = tl.maximum(L - seqlen_q - window, 0)
    if HAS_LEFTPAD:  # keys before the sequence's first one (a left-padded prompt's padding)
        lo = tl.maximum(lo, tl.minimum(tl.load(LEFTPAD + b), L))
    # This program's chunk of the visible keys: a run of whole tiles.
    n_tiles = (tl.maximum(L_old - lo, 0) + BLOCK_N - 1) // BLOCK_N
    per_split = (n_tiles + num_splits - 1) // num_splits
    start = lo + pid_split * per_split * BLOCK_N
    end = tl.minimum(start + per_split * BLOCK_N, L_old)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for t0 in range(start, end, BLOCK_N):
        t = t0 + tl.arange(0, BLOCK_N)
        t_ok = t < end
        if PAGED:
            phys = tl.load(BT + b64 * s_bt + t // PAGE, mask=t_ok, other=-1)
            t_ok = t_ok & (phys >= 0) & (phys < n_pages)
            k_row = tl.where(t_ok, phys, 0).to(tl.int64) * s_kb + (t % PAGE).to(tl.int64) * s_kt
            v_row = tl.where(t_ok, phys, 0).to(tl.int64) * s_vb + (t % PAGE).to(tl.int64) * s_vt
        else:
            k_row = b64 * s_kb + t.to(tl.int64) * s_kt
            v_row = b64 * s_vb + t.to(tl.int64) * s_vt
        kv_mask = t_ok[:, None] & d_ok[None, :]
        k = tl.load(K_CACHE + k_row[:, None] + hkv64 * s_kh + d[None, :] * s_kd, mask=kv_mask, other=0.0)
        p, alpha, m_i, l_i = _softmax_step(q, k, t, t_ok, pos, m_i, l_i, qk_scale, softcap_log2, window,
                                           CAUSAL, HAS_WINDOW, SOFTCAP, PRECISION)
        v = tl.load(V_CACHE + v_row[:, None] + hkv64 * s_vh + d[None, :] * s_vd, mask=kv_mask, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    if NEW_KV:
        if pid_split == num_splits - 1:  # the new tokens: one more tile, from KN/VN, in the last split
            j = tl.arange(0, BLOCK_NEW)
            j_ok = j < seqlen_add
            t = L_raw + j  # their positions
            kn = _normed_rotated(KN, b64 * s_knb + j.to(tl.int64) * s_kns + hkv64 * s_knh, j_ok, t, d, d_ok, s_knd,
                                 COS, SIN, s_cos, half, max_pos, KW, eps, w_offset, D, ROTARY, NORM, INTERLEAVED)
            kn = kn.to(K_CACHE.dtype.element_ty)
            nmask = j_ok[:, None] & d_ok[None, :]
            vn = tl.load(VN + b64 * s_vnb + j.to(tl.int64)[:, None] * s_vns + hkv64 * s_vnh + d[None, :] * s_vnd,
                         mask=nmask, other=0.0).to(V_CACHE.dtype.element_ty)
            phys64, slot64, ok = _cache_row(t, b64, BT, s_bt, n_pages, capacity, PAGED, PAGE)
            if mtile == 0:  # (another row tile of this KV head holds the same values)
                wmask = (j_ok & ok)[:, None] & d_ok[None, :]
                tl.store(K_CACHE + (phys64 * s_kb + slot64 * s_kt)[:, None] + hkv64 * s_kh + d[None, :] * s_kd, kn,
                         mask=wmask)
                tl.store(V_CACHE + (phys64 * s_vb + slot64 * s_vt)[:, None] + hkv64 * s_vh + d[None, :] * s_vd, vn,
                         mask=wmask)
            new_ok = j_ok & ok & (t < L) & (t >= lo)
            if NEW_DOT:  # the tile padded to 16 keys (BLOCK_NEW >= 16), through tl.dot like the loop's
                p, alpha, m_i, l_i = _softmax_step(q, kn, t, new_ok, pos, m_i, l_i, qk_scale, softcap_log2, window,
                                                   CAUSAL, HAS_WINDOW, SOFTCAP, PRECISION)
                acc = acc * alpha[:, None] + tl.dot(p.to(vn.dtype), vn, input_precision=PRECISION)
            else:
                # (a few keys, the decode step's one: products and sums in fp32, not tl.dot, whose
                # 16-key minimum tile would hold registers for 16 prepared keys)
                p, alpha, m_i, l_i = _softmax_step(q, kn, t, new_ok, pos, m_i, l_i, qk_scale, softcap_log2, window,
                                                   CAUSAL, HAS_WINDOW, SOFTCAP, PRECISION, False)
                pv = _few_keys_pv(p.to(vn.dtype).to(tl.float32), vn.to(tl.float32), j, BLOCK_NEW)
                acc = acc * alpha[:, None] + pv

    has = l_i > 0
    o = acc / tl.where(has, l_i, 1.0)[:, None]
    omask = row_ok[:, None] & d_ok[None, :]
    optr = OUT + b64 * s_ob + qs[:, None] * s_os + head[:, None] * s_oh + d[None, :] * s_od
    if SPLIT:
        prow = ((b64 * seqlen_q + qs) * Hq + head) * num_splits
        tl.store(O_PART + (prow + pid_split)[:, None] * D + d[None, :], o, mask=omask)
        lse = tl.where(has, m_i + tl.log2(tl.where(has, l_i, 1.0)), float("-inf"))
        tl.store(LSE_PART + prow + pid_split, lse, mask=row_ok)
        if FUSED_COMBINE:
            tl.debug_barrier()  # every thread's partials are written before the ticket is taken
            sem = SEM + b64 * tl.num_programs(1) + pid_hm
            ticket = tl.atomic_add(sem, 1, sem="acq_rel", scope="gpu")
            if ticket == num_splits - 1:  # the last split of this (b, hkv, mtile) to finish
                # Every split has drawn its ticket: the counter is free again.  Zeroed, it is
                # ready for the next launch (a workspace kept between calls needs no memset).
                tl.store(sem, 0)
                # Its first MERGE_M rows (all the real ones: MERGE_M < BLOCK_M only for a single
                # row tile of fewer than 16 rows, padded for tl.dot), so no padding row is merged.
                mr = mtile * BLOCK_M + tl.arange(0, MERGE_M)
                mr_ok = mr < seqlen_q * G
                mqs = tl.where(mr_ok, mr // G, 0)
                mhead = hkv * G + mr % G
                mprow = ((b64 * seqlen_q + mqs) * Hq + mhead) * num_splits
                out = _merge_splits(O_PART, LSE_PART, mprow, mr_ok, d, d_ok, D, num_splits, BLOCK_S, CHUNK_S)
                mptr = OUT + b64 * s_ob + mqs[:, None] * s_os + mhead[:, None] * s_oh + d[None, :] * s_od
                tl.store(mptr, out.to(OUT.dtype.element_ty), mask=mr_ok[:, None] & d_ok[None, :])
    else:
        tl.store(optr, o.to(OUT.dtype.element_ty), mask=omask)


@triton.jit
def _merge_splits(O_PART, LSE_PART, prow, row_ok, d, d_ok, D, num_splits,
                  BLOCK_S: tl.constexpr, CHUNK_S: tl.constexpr):
    """(rows, BLOCK_D) fp32: the splits' partial outputs O_PART[prow + i] weighted by
    2^(lse_i - max lse) / sum of those weights (rows with no visible key give 0).
    Vectorized over the splits (a loop with one split per step would chain num_splits L2
    round trips): all log-sum-exps in one (rows, BLOCK_S) load, then the partials CHUNK_S splits
    at a time as one (rows, CHUNK_S, BLOCK_D) load.  Reads with .cg (L2, never a stale L1
    line: other programs wrote them)."""
    sp = tl.arange(0, BLOCK_S)
    lse = tl.load(LSE_PART + prow[:, None] + sp[None, :], mask=row_ok[:, None] & (sp < num_splits)[None, :],
                  other=float("-inf"), cache_modifier=".cg")
    m = tl.max(lse, 1)
    m = tl.where(m == float("-inf"), 0.0, m)
    denom = tl.sum(tl.exp2(lse - m[:, None]), 1)
    c = tl.arange(0, CHUNK_S)
    acc = tl.zeros([m.shape[0], d.shape[0]], dtype=tl.float32)
    for s0 in range(0, num_splits, CHUNK_S):
        ok = row_ok[:, None] & (s0 + c < num_splits)[None, :]  # (rows, CHUNK_S)
        w = tl.exp2(tl.load(LSE_PART + prow[:, None] + s0 + c[None, :], mask=ok, other=float("-inf"),
                            cache_modifier=".cg") - m[:, None])
        ptr = O_PART + ((prow[:, None] + s0 + c[None, :]) * D)[:, :, None] + d[None, None, :]
        o = tl.load(ptr, mask=ok[:, :, None] & d_ok[None, None, :], other=0.0, cache_modifier=".cg")
        acc += tl.sum(w[:, :, None] * o, 1)
    return acc / tl.where(denom > 0, denom, 1.0)[:, None]


def merge_chunk(rows, block_d, num_warps, num_splits):
    """CHUNK_S of _merge_splits: partials loaded per step, (rows, CHUNK_S, BLOCK_D) fp32 at most
    32 per thread (more lifts the decode kernel's registers: 94 at llama-3.2-1b's 4 rows x
    D 64, CHUNK_S 16; 128 at 64 per thread), and no more splits than there are."""
    fit = max(1, 32 * 32 * num_warps // (rows * block_d))
    return max(1, min(next_pow2(num_splits), 1 << (fit.bit_length() - 1)))


@triton.jit
def _combine_kernel(
    O_PART,  # *fp32 (rows, num_splits, D): normalized partial outputs, rows = batch*seqlen_q*Hq
    LSE_PART,  # *fp32 (rows, num_splits): their log2-sum-exp (-inf for an empty split)
    OUT,  # *T (batch, seqlen_q, Hq, D), strides s_o*
    n_rows,
    seqlen_q,
    Hq,
    D,
    num_splits,
    s_ob, s_os, s_oh, s_od,
    BLOCK_R: tl.constexpr,  # rows per program
    BLOCK_D: tl.constexpr,  # power of two >= D
    BLOCK_S: tl.constexpr,  # power of two >= num_splits
    CHUNK_S: tl.constexpr,  # splits merged per step (merge_chunk)
):
    row = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = row < n_rows
    d = tl.arange(0, BLOCK_D)
    d_ok = d < D
    out = _merge_splits(O_PART, LSE_PART, row * num_splits, row_ok, d, d_ok, D, num_splits, BLOCK_S, CHUNK_S)
    h = row % Hq
    s = (row // Hq) % seqlen_q
    b = row // (Hq * seqlen_q)
    optr = OUT + (b * s_ob + s * s_os + h * s_oh)[:, None] + d[None, :] * s_od
    tl.store(optr, out.to(OUT.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])


@functools.lru_cache(maxsize=None)  # (called several times per decode launch with the same shapes)
def decode_config(n_rows, head_dim):
    """(BLOCK_M, BLOCK_N, BLOCK_D, num_warps, num_stages) by a deterministic rule.
    BLOCK_M: the GQA group x seqlen_q rows, padded to tl.dot's minimum of 16, at most 64 (more
    rows are split into row tiles, which re-read K/V, mostly from L2).  BLOCK_N: 64 keys per
    tile (32 at head_dim > 128) keeps a K and a V tile (16 KiB each in bf16) per stage.
    num_stages 3: Triton's pipeliner then keeps two K/V buffers, one tile loading while the
    other is used (every head dim: at 2 the loads and the math would take turns)."""
    block_m = min(64, max(16, next_pow2(n_rows)))
    block_d = max(16, next_pow2(head_dim))
    block_n = 64 if block_d <= 128 else 32
    num_warps = 8 if block_m * block_d >= 8192 else 4
    return block_m, block_n, block_d, num_warps, 3


# Stages a paged cache adds: the block-table load that the K/V addresses depend on takes
# pipeline stages of its own.  Read from the TTGIR of sm_90 builds (triton 3.6 and 3.8): with
# num_stages n a contiguous cache gets n - 1 K/V buffers, a paged one max(1, n - 3), so at 3
# the paged loop had one buffer and waited for every tile's loads (the H200 run of 2026-12-04:
# paged 32 us against contiguous 24.5 us at batch 1, 32 heads, 4k context).
PAGED_EXTRA_STAGES = 2


def launch_config(n_rows, head_dim, dtype, paged=False):
    """decode_config for a cache of `dtype` (paged: PAGED_EXTRA_STAGES more stages, the same K/V
    buffers).  Exact fp32 dots run on the FMA units: at BLOCK_N 64 with 4 warps the D=80 case
    needs 255 registers and spills ~850 bytes (triton 3.6, sm_90); half the keys per tile over
    8 warps fits in 76 without a spill, at 2 stages (one buffer: a second one, or the paged
    form's extra stages, spill again at 32+ rows)."""
    block_m, block_n, block_d, num_warps, num_stages = decode_config(n_rows, head_dim)
    if dtype == torch.float32:
        return block_m, max(16, block_n // 2), block_d, 8, 2
    return block_m, block_n, block_d, num_warps, num_stages + (PAGED_EXTRA_STAGES if paged else 0)


def fused_merge_rows(rows, head_dim):
    """Query rows one program merges in the fused combine (MERGE_M of _decode_kernel)."""
    return min(decode_config(rows, head_dim)[0], next_pow2(rows))


def combine_counters_shape(q, k_cache, num_splits):
    """Shape of the fused combine's counters of decode_attention(q, k_cache, ..., num_splits):
    (batch, Hkv * row tiles), at most batch * n_heads_q * seqlen_q of them; None when there is
    nothing to combine, or when a tile's partials exceed MAX_FUSED_MERGE_BYTES (the combine
    kernel then merges them)."""
    B, Sq, Hq, D = q.shape
    Hkv = k_cache.shape[2]
    rows = Hq // Hkv * Sq
    if num_splits <= 1 or q.numel() == 0 or fused_merge_rows(rows, D) * D * num_splits * 4 > MAX_FUSED_MERGE_BYTES:
        return None
    return B, Hkv * cdiv(rows, decode_config(rows, D)[0])


def combine_counters(q, k_cache, num_splits):
    """The fused combine's counters (combine_counters_shape), to be zeroed by the
    kv_cache_append launched just before the decode (uninitialized here); or None."""
    shape = combine_counters_shape(q, k_cache, num_splits)
    return None if shape is None else torch.empty(shape, dtype=torch.int32, device=q.device)


def takes_new_kv(q, k_cache, seqlen_new):
    """Whether decode_attention(new_kv=) takes seqlen_new new tokens per sequence in its own
    launch: their scores are fp32 products (BLOCK_M, BLOCK_NEW, BLOCK_D), which must fit in 64
    registers a thread (always for a decode step's one token; a few draft tokens at small head
    dims).  More go through kv_cache_append first (a 16-key tl.dot tile of prepared keys, on
    top of q's preparation, spilled registers)."""
    B, Sq, Hq, D = q.shape
    block_m, _, block_d, num_warps, _ = launch_config(Hq // k_cache.shape[2] * Sq, D, q.dtype)
    return 1 <= seqlen_new and block_m * next_pow2(seqlen_new) * block_d <= 64 * 32 * num_warps


@on_tensor_device
def decode_attention(q, k_cache, v_cache, cache_seqlens, block_table, softmax_scale, causal, window, softcap,
                     num_splits, seqlen_add=0, counters=None, cache_leftpad=None, new_kv=None, out=None):
    """Shapes/dtypes/devices validated by fastlm.ops.kv_cache; num_splits >= 1 resolved there.
    Sequence b attends to its first cache_seqlens[b] + seqlen_add tokens (from cache_leftpad[b]
    on, when given).  counters: zeroed int32 of combine_counters_shape() (by the
    kv_cache_append launched just before, or left zeroed by the previous decode launch): the
    splits merge without a combine launch, and the counters are zeroed again.
    new_kv: (k, v, cos, sin, interleaved, q_weight, k_weight, eps, w_offset), the new tokens
    (takes_new_kv) that this one launch normalizes (q/k weights given) and
    rotates (cos/sin given) with q, appends at cache_seqlens[b] + i and attends to; then
    cache_seqlens counts the tokens before them and seqlen_add is seqlen_new.
    out: the output tensor (q's shape and dtype), else allocated like q."""
    B, Sq, Hq, D = q.shape
    Hkv = k_cache.shape[2]
    G = Hq // Hkv
    out = torch.empty_like(q) if out is None else out
    if out.numel() == 0:
        return out
    if new_kv is not None:
        kn, vn, cos, sin, interleaved, qw, kw, eps, w_offset = new_kv
        assert kn.shape[1] == seqlen_add and takes_new_kv(q, k_cache, seqlen_add)
        rotary, norm = cos is not None, kw is not None
        kv_args = (kn, vn, cos if rotary else kn, sin if rotary else kn, qw if norm else kn, kw if norm else kn)
        nk_args = (cos.shape[1] if rotary else 0, cos.shape[0] if rotary else 0, float(eps), float(w_offset))
        nk_strides = (*kn.stride(), *vn.stride(), cos.stride(0) if rotary else 0)
    else:
        rotary = norm = interleaved = False
        kv_args = (q,) * 6  # placeholders (never read)
        nk_args = (0, 0, 0.0, 0.0)
        nk_strides = (0,) * 9
    paged = block_table is not None
    page = k_cache.shape[1] if paged else 1
    capacity = block_table.shape[1] * page if paged else k_cache.shape[1]
    block_m, block_n, block_d, num_warps, num_stages = launch_config(G * Sq, D, q.dtype, paged)
    n_mtiles = cdiv(G * Sq, block_m)
    split = num_splits > 1
    fused = split and counters is not None  # (the merge constexprs stay 1 otherwise: no recompiles)
    merge_m = fused_merge_rows(G * Sq, D)
    if split:
        o_part = torch.empty((B, Sq, Hq, num_splits, D), dtype=torch.float32, device=q.device)
        lse_part = torch.empty((B, Sq, Hq, num_splits), dtype=torch.float32, device=q.device)
    else:
        o_part = lse_part = out  # unused
    if softcap > 0:
        qk_scale, softcap_log2 = softmax_scale / softcap, softcap * LOG2E
    else:
        qk_scale, softcap_log2 = softmax_scale * LOG2E, 0.0
    _decode_kernel[(num_splits, Hkv * n_mtiles, B)](
        q, k_cache, v_cache, cache_seqlens, cache_leftpad if cache_leftpad is not None else cache_seqlens,
        block_table if paged else cache_seqlens,
        out, o_part, lse_part, counters if split and counters is not None else cache_seqlens, *kv_args,
        qk_scale, softcap_log2,
        Sq, seqlen_add, G, Hq, D, k_cache.shape[0], capacity, window, num_splits, n_mtiles, *nk_args,
        *q.stride(), *k_cache.stride(), *v_cache.stride(), *out.stride(),
        block_table.stride(0) if paged else 0, *nk_strides,
        PAGED=paged, PAGE=page, NEW_KV=new_kv is not None, ROTARY=rotary, NORM=norm, INTERLEAVED=bool(interleaved),
        BLOCK_NEW=(max(next_pow2(seqlen_add), 16 if NEW_KV_DOT else 1) if new_kv is not None else 1),
        NEW_DOT=new_kv is not None and NEW_KV_DOT, CAUSAL=causal, HAS_WINDOW=window >= 0,
        HAS_LEFTPAD=cache_leftpad is not None, SOFTCAP=softcap > 0, SPLIT=split,
        FUSED_COMBINE=fused, BLOCK_S=next_pow2(num_splits) if fused else 1,
        MERGE_M=merge_m if fused else 1, CHUNK_S=merge_chunk(merge_m, block_d, num_warps, num_splits) if fused else 1,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, num_warps=num_warps, num_stages=num_stages,
    )
    if split and counters is None:
        rows, block_r, bd = B * Sq * Hq, 1, next_pow2(D)
        warps = 8 if bd >= 256 else 4  # up to 32 splits x BLOCK_D 128 per step
        _combine_kernel[(cdiv(rows, block_r),)](
            o_part, lse_part, out, rows, Sq, Hq, D, num_splits, *out.stride(),
            BLOCK_R=block_r, BLOCK_D=bd, BLOCK_S=next_pow2(num_splits),
            CHUNK_S=merge_chunk(block_r, bd, warps, num_splits), num_warps=warps,
        )
    return out
