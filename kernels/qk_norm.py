"""Per-head RMSNorm of q and k, optionally followed by rotary, in one launch each way (Triton).

Qwen3, Gemma 3 and OLMo-2-style models RMS-normalize every q and k head over head_dim, then
rotate them.  Unfused that is three launches (two norms, one rotary) that each read and write
q and k, after the norms copied the strided q/k views of the qkv projection.  Here q and k
are read once (any strides: views of the qkv buffer) and written once, so the floor is
2 * bytes(q, k) at copy bandwidth, as for rotary alone.

Forward, grid (token blocks, head blocks of q followed by head blocks of k): a program loads
a [BLOCK_T, BLOCK_H, head_dim] tile as the rotary pairs' two halves (a: dims i, b: dims
i + rotary_dim/2, or 2i and 2i+1 interleaved) and the pass-through dims p past rotary_dim,
forms rstd = 1/sqrt(mean(x^2) + eps) per (token, head) in fp32, scales by the weight,
rotates (a, b) with the token's cos/sin rows and stores; rstd is kept for the backward.
Without tables the whole head is "pass-through" (a norm of q and k in one launch).

Backward, grid (G, head blocks): G programs walk the token blocks pid, pid + G, ...; each
un-rotates dy (the rotation by -θ), then forms dx = rstd * (g*w - xhat * mean(g*w * xhat))
and accumulates the weight gradient sum(g * xhat) of its head block in fp32 registers, writing
one partial row; the launcher sums the G partial rows (deterministic, no atomics).
"""
import torch
import triton
import triton.language as tl

from fastlm.kernels import cdiv, next_pow2, on_tensor_device
from fastlm.kernels import norm as _norm
from fastlm.kernels.rotary import POS_ARANGE, _as4d, _strides, token_tables


@triton.jit
def _addresses(t, tmask, COS, SIN, POS, CU, s_cos, spos_b, spos_s, seqlen, half, max_pos, offset, num_seqs,
               search_iters, POS_MODE: tl.constexpr, IS_VARLEN: tl.constexpr, HAS_ROTARY: tl.constexpr,
               BLOCK_HALF: tl.constexpr):
    """-> (ab, as_, c, s) as rotary's token_tables; without tables c = 1, s = 0 (unused)."""
    if HAS_ROTARY:
        ab, as_, c, s = token_tables(t, tmask, COS, SIN, POS, CU, s_cos, spos_b, spos_s, seqlen, half, max_pos,
                                     offset, num_seqs, search_iters, POS_MODE, IS_VARLEN, False, BLOCK_HALF)
    else:
        seq = t // seqlen
        ab = seq.to(tl.int64)
        as_ = (t - seq * seqlen).to(tl.int64)
        c = tl.full([1, 1, BLOCK_HALF], 1.0, tl.float32)
        s = tl.zeros([1, 1, BLOCK_HALF], tl.float32)
    return ab, as_, c, s


@triton.jit
def norm_rotate(
    X, Y,  # *T  input / output base pointers (unit stride in head_dim)
    rx, ry,  # [BLOCK_T, BLOCK_H] int64 offsets of the rows (one head of one token each) in X / Y
    m2,  # [BLOCK_T, BLOCK_H] the row exists
    W,  # *Tw  (head_dim,) weight (unused unless HAS_WEIGHT)
    c, s,  # [BLOCK_T, 1, BLOCK_HALF] fp32 cos / sin (unused unless HAS_ROTARY)
    eps, w_offset, half, head_dim,
    HAS_ROTARY: tl.constexpr, INTERLEAVED: tl.constexpr, HAS_WEIGHT: tl.constexpr,
    BLOCK_HALF: tl.constexpr,  # power of two >= half
    BLOCK_PASS: tl.constexpr,  # power of two >= head_dim - 2 * half
):
    """RMS-normalize rows of head_dim (fp32 statistics), scale by w_offset + W, rotate the
    pairs (i, i + half) or (2i, 2i+1) with (c, s) and store to Y; dims past 2 * half (all of
    them without tables: half = 0) pass through normalized.  -> rstd [BLOCK_T, BLOCK_H]."""
    p = 2 * half + tl.arange(0, BLOCK_PASS)
    pm = p < head_dim
    mp = m2[:, :, None] & pm[None, None, :]
    xp = tl.load(X + rx[:, :, None] + p[None, None, :], mask=mp, other=0.0).to(tl.float32)
    ss = tl.sum(xp * xp, axis=2)
    i = tl.arange(0, BLOCK_HALF)
    im = i < half
    m3 = m2[:, :, None] & im[None, None, :]
    ia = 2 * i if INTERLEAVED else i  # the pair (a, b): (2i, 2i+1) or (i, i + half)
    ib = ia + 1 if INTERLEAVED else i + half
    if HAS_ROTARY:
        xa = tl.load(X + rx[:, :, None] + ia[None, None, :], mask=m3, other=0.0).to(tl.float32)
        xb = tl.load(X + rx[:, :, None] + ib[None, None, :], mask=m3, other=0.0).to(tl.float32)
        ss += tl.sum(xa * xa + xb * xb, axis=2)
    rstd = 1.0 / tl.sqrt(ss / head_dim + eps)  # [BLOCK_T, BLOCK_H]
    r3 = rstd[:, :, None]
    yp = xp * r3
    if HAS_WEIGHT:
        yp = yp * (tl.load(W + p, mask=pm, other=0.0).to(tl.float32) + w_offset)[None, None, :]
    tl.store(Y + ry[:, :, None] + p[None, None, :], yp.to(Y.dtype.element_ty), mask=mp)
    if HAS_ROTARY:
        na = xa * r3
        nb = xb * r3
        if HAS_WEIGHT:
            na = na * (tl.load(W + ia, mask=im, other=0.0).to(tl.float32) + w_offset)[None, None, :]
            nb = nb * (tl.load(W + ib, mask=im, other=0.0).to(tl.float32) + w_offset)[None, None, :]
        tl.store(Y + ry[:, :, None] + ia[None, None, :], (na * c - nb * s).to(Y.dtype.element_ty), mask=m3)
        tl.store(Y + ry[:, :, None] + ib[None, None, :], (nb * c + na * s).to(Y.dtype.element_ty), mask=m3)
    return rstd


@triton.jit
def _fwd_tile(
    X, Y, W, R,  # q or k, its output, weight, rstd
    sxb, sxs, sxh, n_heads, h0, pid_t,
    COS, SIN, POS, CU, s_cos, spos_b, spos_s,
    n_tokens, seqlen, head_dim, half, max_pos, offset, num_seqs, search_iters, eps, w_offset,
    POS_MODE: tl.constexpr, IS_VARLEN: tl.constexpr, HAS_ROTARY: tl.constexpr, INTERLEAVED: tl.constexpr,
    HAS_WEIGHT: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr,
    BLOCK_PASS: tl.constexpr,
):
    t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    tmask = t < n_tokens
    ab, as_, c, s = _addresses(t, tmask, COS, SIN, POS, CU, s_cos, spos_b, spos_s, seqlen, half, max_pos, offset,
                               num_seqs, search_iters, POS_MODE, IS_VARLEN, HAS_ROTARY, BLOCK_HALF)
    h = h0 + tl.arange(0, BLOCK_H)
    m2 = tmask[:, None] & (h < n_heads)[None, :]  # [BLOCK_T, BLOCK_H]
    rx = (ab * sxb + as_ * sxs)[:, None] + h.to(tl.int64)[None, :] * sxh
    ry = t.to(tl.int64)[:, None] * (n_heads * head_dim) + h[None, :] * head_dim
    rstd = norm_rotate(X, Y, rx, ry, m2, W, c, s, eps, w_offset, half, head_dim, HAS_ROTARY, INTERLEAVED, HAS_WEIGHT,
                       BLOCK_HALF, BLOCK_PASS)
    tl.store(R + t.to(tl.int64)[:, None] * n_heads + h[None, :], rstd, mask=m2)


@triton.jit
def _qk_norm_rotary_fwd_kernel(
    Q, K,  # *T  (batch, seqlen, heads, head_dim) (packed: batch stride 0), unit last stride
    QO, KO,  # *T  outputs, contiguous (batch, seqlen, heads, head_dim)
    QW, KW,  # *Tw  weights (head_dim,) (unused unless HAS_WEIGHT)
    QR, KR,  # *fp32  rstd, (tokens, heads) contiguous
    COS, SIN, POS, CU,  # the rotary tables and positions (HAS_ROTARY only), as kernels/rotary.py's
    sqb, sqs, sqh, skb, sks, skh,
    s_cos, spos_b, spos_s,
    n_tokens, seqlen, n_heads_q, n_heads_k, head_dim,
    half,  # rotary_dim // 2 (0 without tables)
    max_pos, offset, num_seqs, search_iters,
    eps,
    w_offset,  # the heads scale by w_offset + weight (Gemma 3's 1 + w)
    n_qblocks,  # head blocks of q; program_id(1) >= n_qblocks works on k
    POS_MODE: tl.constexpr,
    IS_VARLEN: tl.constexpr,
    HAS_ROTARY: tl.constexpr,
    INTERLEAVED: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_HALF: tl.constexpr,  # power of two >= half
    BLOCK_PASS: tl.constexpr,  # power of two >= head_dim - 2 * half
):
    pid_t = tl.program_id(0)
    pid_h = tl.program_id(1)
    if pid_h < n_qblocks:
        _fwd_tile(Q, QO, QW, QR, sqb, sqs, sqh, n_heads_q, pid_h * BLOCK_H, pid_t,
                  COS, SIN, POS, CU, s_cos, spos_b, spos_s, n_tokens, seqlen, head_dim, half, max_pos, offset,
                  num_seqs, search_iters, eps, w_offset, POS_MODE, IS_VARLEN, HAS_ROTARY, INTERLEAVED, HAS_WEIGHT,
                  BLOCK_T, BLOCK_H, BLOCK_HALF, BLOCK_PASS)
    else:
        _fwd_tile(K, KO, KW, KR, skb, sks, skh, n_heads_k, (pid_h - n_qblocks) * BLOCK_H, pid_t,
                  COS, SIN, POS, CU, s_cos, spos_b, spos_s, n_tokens, seqlen, head_dim, half, max_pos, offset,
                  num_seqs, search_iters, eps, w_offset, POS_MODE, IS_VARLEN, HAS_ROTARY, INTERLEAVED, HAS_WEIGHT,
                  BLOCK_T, BLOCK_H, BLOCK_HALF, BLOCK_PASS)


@triton.jit
def _bwd_tile(
    DY, X, DX, W, R, PART_ROW,  # grad of q's (k's) output, q (k), grad of q (k), weight, rstd, partial row
    sdb, sds, sdh, sxb, sxs, sxh, n_heads, h0, pid_g, G, n_tblocks,
    COS, SIN, POS, CU, s_cos, spos_b, spos_s,
    n_tokens, seqlen, head_dim, half, max_pos, offset, num_seqs, search_iters, w_offset,
    POS_MODE: tl.constexpr, IS_VARLEN: tl.constexpr, HAS_ROTARY: tl.constexpr, INTERLEAVED: tl.constexpr,
    HAS_WEIGHT: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr,
    BLOCK_PASS: tl.constexpr,
):
    h = h0 + tl.arange(0, BLOCK_H)
    hm = h < n_heads
    p = 2 * half + tl.arange(0, BLOCK_PASS)
    pm = p < head_dim
    i = tl.arange(0, BLOCK_HALF)
    im = i < half
    ia = 2 * i if INTERLEAVED else i
    ib = ia + 1 if INTERLEAVED else i + half
    if HAS_WEIGHT:
        wp = (tl.load(W + p, mask=pm, other=0.0).to(tl.float32) + w_offset)[None, None, :]
        wa = (tl.load(W + ia, mask=im, other=0.0).to(tl.float32) + w_offset)[None, None, :]
        wb = (tl.load(W + ib, mask=im, other=0.0).to(tl.float32) + w_offset)[None, None, :]
    else:
        wp = tl.full([1, 1, BLOCK_PASS], 1.0, tl.float32)
        wa = tl.full([1, 1, BLOCK_HALF], 1.0, tl.float32)
        wb = tl.full([1, 1, BLOCK_HALF], 1.0, tl.float32)
    acc_p = tl.zeros([BLOCK_PASS], tl.float32)
    acc_a = tl.zeros([BLOCK_HALF], tl.float32)
    acc_b = tl.zeros([BLOCK_HALF], tl.float32)
    for tb in range(pid_g, n_tblocks, G):
        t = tb * BLOCK_T + tl.arange(0, BLOCK_T)
        tmask = t < n_tokens
        ab, as_, c, s = _addresses(t, tmask, COS, SIN, POS, CU, s_cos, spos_b, spos_s, seqlen, half, max_pos,
                                   offset, num_seqs, search_iters, POS_MODE, IS_VARLEN, HAS_ROTARY, BLOCK_HALF)
        m2 = tmask[:, None] & hm[None, :]
        h64 = h.to(tl.int64)[None, :]
        rx = (ab * sxb + as_ * sxs)[:, None] + h64 * sxh
        rd = (ab * sdb + as_ * sds)[:, None] + h64 * sdh
        ry = t.to(tl.int64)[:, None] * (n_heads * head_dim) + h[None, :] * head_dim
        rstd = tl.load(R + t.to(tl.int64)[:, None] * n_heads + h[None, :], mask=m2, other=0.0)[:, :, None]
        mp = m2[:, :, None] & pm[None, None, :]
        xp = tl.load(X + rx[:, :, None] + p[None, None, :], mask=mp, other=0.0).to(tl.float32) * rstd
        gp = tl.load(DY + rd[:, :, None] + p[None, None, :], mask=mp, other=0.0).to(tl.float32)
        dp = gp * wp
        dot = tl.sum(dp * xp, axis=2)
        acc_p += tl.sum(tl.sum(gp * xp, axis=1), axis=0)
        if HAS_ROTARY:
            m3 = m2[:, :, None] & im[None, None, :]
            dya = tl.load(DY + rd[:, :, None] + ia[None, None, :], mask=m3, other=0.0).to(tl.float32)
            dyb = tl.load(DY + rd[:, :, None] + ib[None, None, :], mask=m3, other=0.0).to(tl.float32)
            # the rotation by -θ; masked lanes zeroed (a padding token's cos/sin are NaN)
            ga = tl.where(m3, dya * c + dyb * s, 0.0)
            gb = tl.where(m3, dyb * c - dya * s, 0.0)
            xa = tl.load(X + rx[:, :, None] + ia[None, None, :], mask=m3, other=0.0).to(tl.float32) * rstd
            xb = tl.load(X + rx[:, :, None] + ib[None, None, :], mask=m3, other=0.0).to(tl.float32) * rstd
            da = ga * wa
            db = gb * wb
            dot += tl.sum(da * xa + db * xb, axis=2)
            acc_a += tl.sum(tl.sum(ga * xa, axis=1), axis=0)
            acc_b += tl.sum(tl.sum(gb * xb, axis=1), axis=0)
        dot3 = (dot / head_dim)[:, :, None]
        tl.store(DX + ry[:, :, None] + p[None, None, :], (rstd * (dp - xp * dot3)).to(DX.dtype.element_ty), mask=mp)
        if HAS_ROTARY:
            tl.store(DX + ry[:, :, None] + ia[None, None, :], (rstd * (da - xa * dot3)).to(DX.dtype.element_ty),
                     mask=m3)
            tl.store(DX + ry[:, :, None] + ib[None, None, :], (rstd * (db - xb * dot3)).to(DX.dtype.element_ty),
                     mask=m3)
    if HAS_WEIGHT:
        tl.store(PART_ROW + p, acc_p, mask=pm)
        if HAS_ROTARY:
            tl.store(PART_ROW + ia, acc_a, mask=im)
            tl.store(PART_ROW + ib, acc_b, mask=im)


@triton.jit
def _qk_norm_rotary_bwd_kernel(
    DQ, DK,  # *T  grads of the outputs, (batch, seqlen, heads, head_dim), unit last stride
    Q, K,  # *T  the forward's inputs, unit last stride
    DQI, DKI,  # *T  grads of the inputs, contiguous (batch, seqlen, heads, head_dim)
    QW, KW,  # *Tw  weights (head_dim,) (unused unless HAS_WEIGHT)
    QR, KR,  # *fp32 rstd (tokens, heads)
    PART,  # *fp32 (G, n_qblocks + n_kblocks, head_dim) weight-gradient partial sums (HAS_WEIGHT)
    COS, SIN, POS, CU,
    sdqb, sdqs, sdqh, sdkb, sdks, sdkh,
    sqb, sqs, sqh, skb, sks, skh,
    s_cos, spos_b, spos_s,
    n_tokens, seqlen, n_heads_q, n_heads_k, head_dim,
    half, max_pos, offset, num_seqs, search_iters,
    w_offset,
    n_qblocks,
    n_tblocks,  # token blocks; program (g, .) takes blocks g, g + G, ...
    POS_MODE: tl.constexpr,
    IS_VARLEN: tl.constexpr,
    HAS_ROTARY: tl.constexpr,
    INTERLEAVED: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
    BLOCK_PASS: tl.constexpr,
):
    pid_g = tl.program_id(0)
    pid_h = tl.program_id(1)
    G = tl.num_programs(0)
    part_row = PART + (pid_g * tl.num_programs(1) + pid_h).to(tl.int64) * head_dim
    if pid_h < n_qblocks:
        _bwd_tile(DQ, Q, DQI, QW, QR, part_row, sdqb, sdqs, sdqh, sqb, sqs, sqh, n_heads_q, pid_h * BLOCK_H,
                  pid_g, G, n_tblocks, COS, SIN, POS, CU, s_cos, spos_b, spos_s, n_tokens, seqlen, head_dim, half,
                  max_pos, offset, num_seqs, search_iters, w_offset, POS_MODE, IS_VARLEN, HAS_ROTARY, INTERLEAVED,
                  HAS_WEIGHT, BLOCK_T, BLOCK_H, BLOCK_HALF, BLOCK_PASS)
    else:
        _bwd_tile(DK, K, DKI, KW, KR, part_row, sdkb, sdks, sdkh, skb, sks, skh, n_heads_k,
                  (pid_h - n_qblocks) * BLOCK_H, pid_g, G, n_tblocks, COS, SIN, POS, CU, s_cos, spos_b, spos_s,
                  n_tokens, seqlen, head_dim, half, max_pos, offset, num_seqs, search_iters, w_offset, POS_MODE,
                  IS_VARLEN, HAS_ROTARY, INTERLEAVED, HAS_WEIGHT, BLOCK_T, BLOCK_H, BLOCK_HALF, BLOCK_PASS)


def _plan(q, k, half, device, tile=4096):
    """Block sizes: BLOCK_H = the k head count (a divisor of q's when a power of two, so both
    tiles are full), capped at 16; BLOCK_T for ~`tile` elements per tile."""
    q4, k4 = _as4d(q), _as4d(k)
    B, S, Hq, D = q4.shape
    Hk = k4.shape[2]
    T = B * S
    block_half = next_pow2(half) if half else 1
    block_pass = next_pow2(D - 2 * half) if D > 2 * half else 1
    block_h = min(next_pow2(max(Hk, 1)), 16)
    block_t = max(1, min(64, tile // (block_h * next_pow2(D))))
    if device.type == "cpu":  # the interpreter: fewer, larger programs run faster
        block_t = max(block_t, min(16, next_pow2(T)))
    block_t = min(block_t, next_pow2(max(T, 1)))
    return q4, k4, B, S, Hq, Hk, D, T, block_half, block_pass, block_h, block_t


def _positions_args(positions, pos_mode, cu_seqlens, B, fallback):
    varlen = cu_seqlens is not None
    num_seqs = cu_seqlens.numel() - 1 if varlen else B
    if positions is None:
        spos_b = spos_s = 0
    elif positions.dim() == 2:
        spos_b, spos_s = positions.stride()
    elif pos_mode == 2:  # explicit, packed (T,)
        spos_b, spos_s = 0, positions.stride(0)
    else:
        spos_b, spos_s = positions.stride(0), 0
    return (positions if positions is not None else fallback, cu_seqlens if varlen else fallback,
            spos_b, spos_s, num_seqs, max(num_seqs, 1).bit_length(), varlen)


def _weights(q_weight, k_weight, fallback):
    """Both weights in one dtype (the kernel picks q's or k's pointer at run time): fp32 when they differ."""
    if q_weight is None:
        return fallback, fallback, False
    if q_weight.dtype != k_weight.dtype:
        q_weight, k_weight = q_weight.float(), k_weight.float()
    return q_weight.contiguous(), k_weight.contiguous(), True


@on_tensor_device
def qk_norm_rotary_fwd(q, k, q_weight, k_weight, cos, sin, positions, cu_seqlens, eps, offset, pos_mode,
                       interleaved, w_offset=0.0):
    """-> (q_out, k_out, q_rstd, k_rstd).  q, k: (B, S, H, D) or packed (T, H, D), unit last
    stride; weights: both (D,) or both None; cos/sin (max_pos, half) unit column stride, or None
    (norm only).  The heads scale by w_offset + weight.  The op layer validates everything."""
    q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    k_out = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    q_rstd = torch.empty(q.shape[:-1], dtype=torch.float32, device=q.device)
    k_rstd = torch.empty(k.shape[:-1], dtype=torch.float32, device=k.device)
    half = cos.shape[1] if cos is not None else 0
    q4, k4, B, S, Hq, Hk, D, T, block_half, block_pass, block_h, block_t = _plan(q, k, half, q.device)
    if T == 0:
        return q_out, k_out, q_rstd, k_rstd
    qw, kw, has_w = _weights(q_weight, k_weight, q_rstd)
    pos_t, cu_t, spos_b, spos_s, num_seqs, iters, varlen = _positions_args(positions, pos_mode, cu_seqlens, B, q4)
    n_qb, n_kb = cdiv(Hq, block_h), cdiv(Hk, block_h)
    tables = (cos, sin) if cos is not None else (q4, q4)
    _qk_norm_rotary_fwd_kernel[(cdiv(T, block_t), n_qb + n_kb)](
        q4, k4, q_out, k_out, qw, kw, q_rstd, k_rstd, *tables, pos_t, cu_t,
        *_strides(q4), *_strides(k4), cos.stride(0) if cos is not None else 0, spos_b, spos_s,
        T, S, Hq, Hk, D, half, cos.shape[0] if cos is not None else 0, offset, num_seqs, iters, eps, float(w_offset),
        n_qb,
        POS_MODE=pos_mode, IS_VARLEN=varlen and cos is not None, HAS_ROTARY=cos is not None,
        INTERLEAVED=interleaved, HAS_WEIGHT=has_w,
        BLOCK_T=block_t, BLOCK_H=block_h, BLOCK_HALF=block_half, BLOCK_PASS=block_pass, num_warps=4,
    )
    return q_out, k_out, q_rstd, k_rstd


@on_tensor_device
def qk_norm_rotary_bwd(dq, dk, q, k, q_weight, k_weight, q_rstd, k_rstd, cos, sin, positions, cu_seqlens, offset,
                       pos_mode, interleaved, w_offset=0.0, max_programs=None):
    """-> (dq_in, dk_in, dq_weight fp32 (D,) or empty, dk_weight likewise).  max_programs caps
    the token-walking programs per head block (tests use it to make each walk several blocks)."""
    dq_in = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dk_in = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    half = cos.shape[1] if cos is not None else 0
    # half the forward's tile: x, dy and their products are live at once (registers)
    q4, k4, B, S, Hq, Hk, D, T, block_half, block_pass, block_h, block_t = _plan(q, k, half, q.device, 2048)
    qw, kw, has_w = _weights(q_weight, k_weight, q_rstd)
    n_qb, n_kb = cdiv(Hq, block_h), cdiv(Hk, block_h)
    n_tb = cdiv(T, block_t)
    programs = max_programs or _norm._num_programs(q.device.index if q.is_cuda else None)  # ~4 per SM
    G = max(1, min(n_tb, cdiv(programs, n_qb + n_kb)))
    part = torch.empty((G, n_qb + n_kb, D) if has_w else (0,), dtype=torch.float32, device=q.device)
    if T > 0:
        dq4, dk4 = _as4d(dq), _as4d(dk)
        pos_t, cu_t, spos_b, spos_s, num_seqs, iters, varlen = _positions_args(positions, pos_mode, cu_seqlens, B, q4)
        tables = (cos, sin) if cos is not None else (q4, q4)
        _qk_norm_rotary_bwd_kernel[(G, n_qb + n_kb)](
            dq4, dk4, q4, k4, dq_in, dk_in, qw, kw, q_rstd, k_rstd, part if has_w else q_rstd, *tables, pos_t, cu_t,
            *_strides(dq4), *_strides(dk4), *_strides(q4), *_strides(k4),
            cos.stride(0) if cos is not None else 0, spos_b, spos_s,
            T, S, Hq, Hk, D, half, cos.shape[0] if cos is not None else 0, offset, num_seqs, iters, float(w_offset),
            n_qb, n_tb,
            POS_MODE=pos_mode, IS_VARLEN=varlen and cos is not None, HAS_ROTARY=cos is not None,
            INTERLEAVED=interleaved, HAS_WEIGHT=has_w,
            BLOCK_T=block_t, BLOCK_H=block_h, BLOCK_HALF=block_half, BLOCK_PASS=block_pass,
            num_warps=8 if block_t * block_h * next_pow2(D) > 2048 else 4,
        )
    if not has_w:
        empty = q_rstd.new_empty(0)
        return dq_in, dk_in, empty, empty
    if T == 0:
        return dq_in, dk_in, part.new_zeros(D), part.new_zeros(D)
    return dq_in, dk_in, part[:, :n_qb].sum((0, 1)), part[:, n_qb:].sum((0, 1))


__all__ = ["qk_norm_rotary_fwd", "qk_norm_rotary_bwd", "POS_ARANGE"]
