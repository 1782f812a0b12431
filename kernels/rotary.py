"""Rotary position embeddings in Triton: q and k rotated by one launch, forward and backward.

Traffic: every element of q and k is read once and written once (the cos/sin rows of a token
are shared by all its heads and stay in L1/L2), so the floor is 2 * bytes(q, k) at copy
bandwidth.  In place, dims past rotary_dim are not touched at all.

Grid: (token blocks, head blocks of q followed by head blocks of k).  A program computes the
positions of its BLOCK_T tokens once (arange + offset, per-sequence offsets, explicit
positions, or a binary search in cu_seqlens for packed sequences), loads their cos/sin rows
once, and rotates a [BLOCK_T, BLOCK_H, rotary_dim] tile of q or of k.

Backward is the same kernel with CONJ=True: the rotation by -θ (sin negated) is the inverse
and the transpose of the rotation by θ.

A token whose position is outside [0, max_positions) (or, packed, that lies in no sequence
of cu_seqlens) reads no table memory: its cos/sin are NaN, so its rotated dims come out NaN
instead of a silently wrapped position.  The op layer raises before launching when it can
check the values without a host sync.
"""
import triton
import triton.language as tl

from fastlm.kernels import cdiv, next_pow2, on_tensor_device

# Positions: arange within each sequence + an int offset, + a per-sequence offset tensor, or
# read per token from an explicit positions tensor.
POS_ARANGE, POS_PER_SEQ, POS_EXPLICIT = 0, 1, 2


@triton.jit
def _rotate_tile(
    X,  # *T  input rows (q or k): element (b, s, h, d) at b*sxb + s*sxs + h*sxh + d
    Y,  # *T  output rows (may equal X: in place)
    sxb, sxs, sxh,  # strides of X (elements)
    syb, sys_, syh,  # strides of Y
    ab, as_,  # [BLOCK_T] int64 batch / token index of each token in the address space
    tmask,  # [BLOCK_T] token exists
    h0,  # first head of this tile
    n_heads,
    c, s,  # [BLOCK_T, 1, BLOCK_HALF] fp32 cos / sin (sin already negated for CONJ)
    half,  # rotary_dim // 2
    head_dim,
    INTERLEAVED: tl.constexpr,
    COPY_PASS: tl.constexpr,  # copy dims [rotary_dim, head_dim) to Y (out of place only)
    BLOCK_T: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
    BLOCK_PASS: tl.constexpr,
):
    h = h0 + tl.arange(0, BLOCK_H)
    m2 = tmask[:, None] & (h < n_heads)[None, :]  # [BLOCK_T, BLOCK_H]
    h64 = h.to(tl.int64)
    rx = (ab * sxb + as_ * sxs)[:, None] + h64[None, :] * sxh  # [BLOCK_T, BLOCK_H] row starts
    ry = (ab * syb + as_ * sys_)[:, None] + h64[None, :] * syh
    i = tl.arange(0, BLOCK_HALF)
    m3 = m2[:, :, None] & (i < half)[None, None, :]  # [BLOCK_T, BLOCK_H, BLOCK_HALF]
    if INTERLEAVED:
        # Pairs (2i, 2i+1): load the contiguous row [0, 2*BLOCK_HALF) and split even/odd.
        d = tl.arange(0, 2 * BLOCK_HALF)
        md = m2[:, :, None] & (d < 2 * half)[None, None, :]
        x = tl.load(X + rx[:, :, None] + d[None, None, :], mask=md, other=0.0).to(tl.float32)
        x1, x2 = tl.split(tl.reshape(x, [BLOCK_T, BLOCK_H, BLOCK_HALF, 2]))
        y = tl.join(x1 * c - x2 * s, x2 * c + x1 * s)
        y = tl.reshape(y, [BLOCK_T, BLOCK_H, 2 * BLOCK_HALF])
        tl.store(Y + ry[:, :, None] + d[None, None, :], y.to(Y.dtype.element_ty), mask=md)
    else:
        # Pairs (i, i + half): two contiguous half-rows.
        px = X + rx[:, :, None] + i[None, None, :]
        py = Y + ry[:, :, None] + i[None, None, :]
        x1 = tl.load(px, mask=m3, other=0.0).to(tl.float32)
        x2 = tl.load(px + half, mask=m3, other=0.0).to(tl.float32)
        tl.store(py, (x1 * c - x2 * s).to(Y.dtype.element_ty), mask=m3)
        tl.store(py + half, (x2 * c + x1 * s).to(Y.dtype.element_ty), mask=m3)
    if COPY_PASS:
        p = 2 * half + tl.arange(0, BLOCK_PASS)
        mp = m2[:, :, None] & (p < head_dim)[None, None, :]
        v = tl.load(X + rx[:, :, None] + p[None, None, :], mask=mp)
        tl.store(Y + ry[:, :, None] + p[None, None, :], v, mask=mp)


@triton.jit
def token_tables(
    t,  # [BLOCK_T] token indices (in [0, n_tokens) where tmask)
    tmask,
    COS, SIN, POS, CU,  # as _rotary_kernel's
    s_cos, spos_b, spos_s, seqlen, half, max_pos, offset, num_seqs, search_iters,
    POS_MODE: tl.constexpr,
    IS_VARLEN: tl.constexpr,
    CONJ: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
):
    """-> (ab, as_, c, s): each token's batch / token index in the (B, S, H, D) address space
    (packed: 0 / t), and its cos / sin rows [BLOCK_T, 1, BLOCK_HALF] in fp32 (sin negated for
    CONJ; NaN for a position outside the tables or a token in no sequence)."""
    # ---- token -> (sequence, index in sequence, address indices, position)
    if IS_VARLEN:
        # seq = number of cu_seqlens[1:] entries <= t (upper bound), clamped to the last sequence.
        lo = tl.zeros_like(t)
        hi = tl.zeros_like(t) + num_seqs
        for _ in range(search_iters):
            go = lo < hi
            mid = (lo + hi) // 2
            cm = tl.load(CU + mid + 1, mask=go & tmask, other=0)
            right = go & (cm <= t)
            lo = tl.where(right, mid + 1, lo)
            hi = tl.where(go & (cm > t), mid, hi)
        seq = tl.minimum(lo, num_seqs - 1)
        start = tl.load(CU + seq, mask=tmask, other=0)
        end = tl.load(CU + num_seqs)
        inside = (t >= start) & (t < end)  # False only for malformed cu_seqlens
        loc = t - start
        as_ = t.to(tl.int64)
        ab = as_ * 0
    else:
        seq = t // seqlen
        loc = t - seq * seqlen
        inside = tmask
        ab = seq.to(tl.int64)
        as_ = loc.to(tl.int64)
    if POS_MODE == 0:
        pos = loc.to(tl.int64) + offset
    elif POS_MODE == 1:
        pos = loc.to(tl.int64) + tl.load(POS + seq.to(tl.int64) * spos_b, mask=tmask, other=0).to(tl.int64)
    else:
        pos = tl.load(POS + ab * spos_b + as_ * spos_s, mask=tmask, other=0).to(tl.int64)
    valid = tmask & inside & (pos >= 0) & (pos < max_pos)
    pos = tl.where(valid, pos, 0)

    # ---- the cos/sin rows of these tokens, shared by every head (NaN for invalid positions)
    i = tl.arange(0, BLOCK_HALF)
    cmask = valid[:, None] & (i < half)[None, :]
    coff = pos[:, None] * s_cos + i[None, :]
    c = tl.load(COS + coff, mask=cmask, other=float("nan")).to(tl.float32)[:, None, :]
    s = tl.load(SIN + coff, mask=cmask, other=float("nan")).to(tl.float32)[:, None, :]
    if CONJ:
        s = -s
    return ab, as_, c, s


@triton.jit
def _rotary_kernel(
    Q,  # *T  q: (batch, seqlen, heads_q, head_dim) (packed: batch stride 0), unit last stride
    K,  # *T  k: same with heads_k
    QO,  # *T q output (QO == Q in place)
    KO,  # *T k output (KO == K in place)
    COS,  # *Tc cos table (max_pos, half), row stride s_cos, unit column stride
    SIN,  # *Tc sin table, same shape and strides as COS
    POS,  # *int32|int64 positions (POS_PER_SEQ: [b*spos_b]; POS_EXPLICIT: [b*spos_b + s*spos_s])
    CU,  # *int32 cu_seqlens (num_seqs + 1,) (IS_VARLEN only)
    sqb, sqs, sqh,
    skb, sks, skh,
    sqob, sqos, sqoh,
    skob, skos, skoh,
    s_cos,
    spos_b, spos_s,
    n_tokens,  # batch * seqlen, or total_tokens when packed
    seqlen,  # tokens per sequence (dense layout only)
    n_heads_q, n_heads_k,
    head_dim,
    half,  # rotary_dim // 2
    max_pos,  # rows of the tables
    offset,  # int added to the arange positions (POS_ARANGE)
    num_seqs,  # IS_VARLEN: len(cu_seqlens) - 1
    search_iters,  # IS_VARLEN: binary-search steps, >= ceil(log2(num_seqs + 1))
    n_qblocks,  # head blocks of q; program_id(1) >= n_qblocks works on k
    POS_MODE: tl.constexpr,  # POS_ARANGE | POS_PER_SEQ | POS_EXPLICIT
    IS_VARLEN: tl.constexpr,  # packed sequences described by CU
    INTERLEAVED: tl.constexpr,  # GPT-J pairs (2i, 2i+1) instead of rotate_half (i, i+half)
    CONJ: tl.constexpr,  # rotate by -θ (the backward pass)
    COPY_PASS: tl.constexpr,  # copy the dims past rotary_dim (out of place, rotary_dim < head_dim)
    BLOCK_T: tl.constexpr,  # tokens per program
    BLOCK_H: tl.constexpr,  # heads per program
    BLOCK_HALF: tl.constexpr,  # power of two >= half
    BLOCK_PASS: tl.constexpr,  # power of two >= head_dim - rotary_dim (COPY_PASS only)
):
    pid_t = tl.program_id(0)
    pid_h = tl.program_id(1)
    t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    tmask = t < n_tokens
    ab, as_, c, s = token_tables(t, tmask, COS, SIN, POS, CU, s_cos, spos_b, spos_s, seqlen, half, max_pos, offset,
                                 num_seqs, search_iters, POS_MODE, IS_VARLEN, CONJ, BLOCK_HALF)

    if pid_h < n_qblocks:
        _rotate_tile(Q, QO, sqb, sqs, sqh, sqob, sqos, sqoh, ab, as_, tmask, pid_h * BLOCK_H, n_heads_q,
                     c, s, half, head_dim, INTERLEAVED, COPY_PASS, BLOCK_T, BLOCK_H, BLOCK_HALF, BLOCK_PASS)
    else:
        _rotate_tile(K, KO, skb, sks, skh, skob, skos, skoh, ab, as_, tmask, (pid_h - n_qblocks) * BLOCK_H,
                     n_heads_k, c, s, half, head_dim, INTERLEAVED, COPY_PASS, BLOCK_T, BLOCK_H, BLOCK_HALF, BLOCK_PASS)


def _as4d(x):
    """(tokens, heads, dim) -> (1, tokens, heads, dim) view; 4-D unchanged."""
    return x.unsqueeze(0) if x.dim() == 3 else x


def _strides(x4):
    # Strides of size-1 dims never matter (index 0); pass 0 so they do not spoil specialization.
    return [st if n > 1 else 0 for st, n in zip(x4.stride()[:3], x4.shape[:3])]


@on_tensor_device
def rotary_fwd(q, k, cos, sin, q_out, k_out, positions, cu_seqlens, offset, pos_mode, interleaved, conj):
    """Launch the rotary kernel: q_out/k_out <- rotate(q/k).  q_out may be q and k_out k (in place).

    q, k: (B, S, H, D) or packed (T, H, D), unit stride in the last dim (other strides free).
    cos, sin: (max_pos, half), unit column stride.  positions: None or an int tensor laid out
    for pos_mode (POS_PER_SEQ: (num_seqs,); POS_EXPLICIT: (B, S) or (T,)).  cu_seqlens: None
    or int32 (num_seqs + 1,) for packed q/k.  The op layer validates everything.
    """
    q4, k4, qo4, ko4 = _as4d(q), _as4d(k), _as4d(q_out), _as4d(k_out)
    B, S, Hq, D = q4.shape
    Hk = k4.shape[2]
    T = B * S
    half = cos.shape[1]
    if T == 0 or Hq + Hk == 0:
        return
    # In place means the very same tensors (as the op layer passes them), not equal data
    # pointers: an empty q and its fresh output both report 0, and then k's pass-through dims
    # were never copied.  (A different view of q's memory as q_out only costs the extra copy.)
    inplace = q_out is q and k_out is k
    copy_pass = (not inplace) and 2 * half < D
    block_half = next_pow2(half)
    block_pass = next_pow2(D - 2 * half) if copy_pass else 1
    # Heads per program: the k head count (a divisor of q's when it is a power of two), so
    # q and k tiles are both full; tokens per program: ~4096 rotary elements per tile.
    block_h = min(next_pow2(max(Hk if Hk else Hq, 1)), 16)
    block_t = max(1, min(64, 4096 // (block_h * 2 * block_half)))
    if q.device.type == "cpu":  # the interpreter: fewer, larger programs run faster
        block_t = max(block_t, min(16, next_pow2(T)))
    block_t = min(block_t, next_pow2(T))
    n_qb, n_kb = cdiv(Hq, block_h), cdiv(Hk, block_h)
    varlen = cu_seqlens is not None
    num_seqs = cu_seqlens.numel() - 1 if varlen else B
    pos_t = positions if positions is not None else q
    if positions is None:
        spos_b = spos_s = 0
    elif positions.dim() == 2:
        spos_b, spos_s = positions.stride()
    elif pos_mode == POS_EXPLICIT:  # packed (T,)
        spos_b, spos_s = 0, positions.stride(0)
    else:
        spos_b, spos_s = positions.stride(0), 0
    grid = (cdiv(T, block_t), n_qb + n_kb)
    _rotary_kernel[grid](
        q4, k4, qo4, ko4, cos, sin, pos_t, cu_seqlens if varlen else q4,
        *_strides(q4), *_strides(k4), *_strides(qo4), *_strides(ko4),
        cos.stride(0), spos_b, spos_s,
        T, S, Hq, Hk, D, half, cos.shape[0], offset, num_seqs, max(num_seqs, 1).bit_length(), n_qb,
        POS_MODE=pos_mode, IS_VARLEN=varlen, INTERLEAVED=interleaved, CONJ=conj, COPY_PASS=copy_pass,
        BLOCK_T=block_t, BLOCK_H=block_h, BLOCK_HALF=block_half, BLOCK_PASS=block_pass,
        num_warps=4,
    )
