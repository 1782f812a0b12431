"""The bookkeeping of a decode step as single launches (Triton).

A CUDA-graph decode step of a small model is bound by its kernel count as much as by bytes:
every kernel costs its launch slot, ramp-up and tail even when it moves a few bytes.  The
bookkeeping around the model used to be seven one-element torch ops per step; here it is two
kernels of one program each:

  advance        the KV cache's positions <- seqlens; seqlens += n * live (n an int), for the
                 batch's sequence slots (fastlm.nn.kv_cache: was a copy and an add);
  record_token   the sampled token into the next step's input, the token and its row's
                 maximum logit into slot ctr of the host-sync rings, then ctr <- (ctr + 1) % K
                 (fastlm.generation: was a copy, two index_copy, an add and a remainder).

One program with one warp: the counter is read once and written last by the same instruction
stream, after every store that used it (the written value depends on the read, and a single
warp issues each load and store for all its lanes at once), so no other program races it.
"""
import triton
import triton.language as tl

from fastlm.kernels import next_pow2, on_tensor_device

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
