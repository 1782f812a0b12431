"""The bookkeeping of a decode step as single launches (Triton).

A CUDA-graph decode step of a small model is bound by its kernel count as much as by bytes:
every kernel costs its launch slot, ramp-up and tail even when it moves a few bytes.  The
bookkeeping around the model used to be seven one-element torch ops per step; here it is two
kernels of one program each:

  advance        the KV cache's positions <- seqlens; seqlens += n * live (n an int), for the
                 batch's sequence slots (fastlm.nn.kv_cache: was a copy and an add);
  record_token   the sampled token into the next step's input, the token and its row's
                 maximum logit into slot ctr of the host-sync rings, then ctr <- (ctr + 1) % K
                 (fastlm.generation: was a copy, two index_copy, an add and a remainder);
  embed          the model's input rows: the token embeddings, times Gemma's scale, plus
                 GPT-2's learned position embeddings (fastlm.models: was up to three launches,
                 an embedding, a mul and an embedding + add).  One program per row and
                 BLOCK_D columns, not one warp: it moves a row of the embedding table.

One program with one warp: the counter is read once and written last by the same instruction
stream, after every store that used it (the written value depends on the read, and a single
warp issues each load and store for all its lanes at once), so no other program races it.
"""
import triton
import triton.language as tl

from fastlm._backend import interpreter_active
from fastlm.kernels import mul_rn, next_pow2, on_tensor_device

MAX_BLOCK = 1024  # batch rows per loop step


@triton.jit
def _advance_kernel(POS, SEQ, LIVE, B, n, BLOCK: tl.constexpr):
    for b0 in range(0, B, BLOCK):
        b = b0 + tl.arange(0, BLOCK)
        m = b < B
        s = tl.load(SEQ + b, mask=m)
        tl.store(POS + b, s, mask=m)
        tl.store(SEQ + b, s + tl.load(LIVE + b, mask=m) * n, mask=m)


@on_tensor_device
def advance(positions, seqlens, live, n):
    """positions <- seqlens; seqlens += n * live.  (B,) int32 contiguous each; n an int."""
    B = seqlens.shape[0]
    if B:
        _advance_kernel[(1,)](positions, seqlens, live, B, n, BLOCK=min(MAX_BLOCK, next_pow2(B)), num_warps=1)


@triton.jit
def _record_token_kernel(NXT, TOP, TOK, RING, ROW_MAX, CTR, B, K, s_tok, BLOCK: tl.constexpr):
    c = tl.load(CTR)
    for b0 in range(0, B, BLOCK):
        b = b0 + tl.arange(0, BLOCK)
        m = b < B
        t = tl.load(NXT + b, mask=m)
        tl.store(TOK + b * s_tok, t, mask=m)
        tl.store(RING + c * B + b, t, mask=m)
        tl.store(ROW_MAX + c * B + b, tl.load(TOP + b, mask=m).to(ROW_MAX.dtype.element_ty), mask=m)
    tl.store(CTR, (c + 1) % K)


@on_tensor_device
def record_token(nxt, top, tok, ring, row_max, ctr):
    """tok[:, 0] <- nxt; ring[ctr] <- nxt; row_max[ctr] <- top (cast); ctr <- (ctr + 1) % K.
    nxt, top (B,) contiguous; tok (B, 1); ring (K, B) and row_max (K, B) contiguous; ctr (1,)."""
    K, B = ring.shape
    if B:
        _record_token_kernel[(1,)](nxt, top, tok, ring, row_max, ctr, B, K, tok.stride(0),
                                   BLOCK=min(MAX_BLOCK, next_pow2(B)), num_warps=1)


@triton.jit
def _embed_kernel(TOK, W, POS, P, OUT, T, V, n_pos, D, scale, s_tb, s_tt, s_w, s_pb, s_pt, s_p,
                  HAS_SCALE: tl.constexpr, HAS_POS: tl.constexpr, BLOCK_D: tl.constexpr, ASM: tl.constexpr):
    r = tl.program_id(0)
    b, t = r // T, r % T
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    dm = d < D
    one = tl.zeros([1], dtype=tl.int32)  # ([1]-shaped loads: the interpreter mishandles scalar masks)
    tok = tl.load(TOK + b * s_tb + t * s_tt + one).to(tl.int64)
    ok = (tok >= 0) & (tok < V)  # an id outside the vocabulary gives a NaN row, never another row
    x = tl.load(W + tl.where(ok, tok, 0)[:, None] * s_w + d[None, :], mask=ok[:, None] & dm[None, :],
                other=float("nan"))
    if HAS_SCALE:  # rounded to the table's dtype, as x * tensor(scale, dtype) stores it (fp32: not
        x = mul_rn(x.to(tl.float32), scale, ASM).to(x.dtype)  # fused with the + pe below)
    if HAS_POS:
        pos = tl.load(POS + b * s_pb + t * s_pt + one).to(tl.int64)
        pok = (pos >= 0) & (pos < n_pos)
        pe = tl.load(P + tl.where(pok, pos, 0)[:, None] * s_p + d[None, :], mask=pok[:, None] & dm[None, :],
                     other=float("nan"))
        x = (x.to(tl.float32) + pe.to(tl.float32)).to(x.dtype)
    tl.store(OUT + r.to(tl.int64) * D + d[None, :], x, mask=dm[None, :])


@on_tensor_device
def embed(tokens, weight, scale=None, positions=None, pos_weight=None):
    """weight[tokens] (* scale, rounded to weight's dtype) (+ pos_weight[positions]): tokens
    (B, T) or (N,) int; weight (V, D) and pos_weight (P, D) with unit column stride, one dtype;
    positions broadcastable to tokens.  -> (*tokens.shape, D), contiguous.  An id outside its
    table gives a NaN row (the model checks ids on the host where it can)."""
    V, D = weight.shape
    out = weight.new_empty(*tokens.shape, D)
    tok = tokens if tokens.dim() == 2 else tokens.view(1, -1)
    B, T = tok.shape
    if out.numel() == 0:
        return out
    if positions is not None:
        pos = positions if positions.shape == tokens.shape else positions.broadcast_to(tokens.shape)
        pos = pos if pos.dim() == 2 else pos.unsqueeze(0)
        p_args = (pos, pos_weight, pos_weight.shape[0], pos.stride(0), pos.stride(1), pos_weight.stride(0))
    else:
        p_args = (tok, weight, 0, 0, 0, 0)
    block_d = min(1024, next_pow2(D))
    _embed_kernel[(B * T, triton.cdiv(D, block_d))](
        tok, weight, p_args[0], p_args[1], out, T, V, p_args[2], D, float(scale) if scale is not None else 1.0,
        tok.stride(0), tok.stride(1), weight.stride(0), p_args[3], p_args[4], p_args[5],
        HAS_SCALE=scale is not None, HAS_POS=positions is not None, BLOCK_D=block_d, ASM=not interpreter_active(),
        num_warps=4 if block_d >= 512 else 1)
    return out
