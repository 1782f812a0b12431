"""Reference KV-cache append and decode attention (plain PyTorch).

Cache layouts (shared with fastlm.ops.kv_cache):
  contiguous  k_cache, v_cache: (batch, max_seqlen, n_kv_heads, head_dim)       block_table None
  paged       k_cache, v_cache: (num_blocks, block_size, n_kv_heads, head_dim)  block_table int32
              (batch, max_blocks_per_seq): token t of sequence b lives in block
              block_table[b, t // block_size] at slot t % block_size.

Masking of decode_attention (query row i of seqlen_q, sequence b of length L = cache_seqlens[b]):
the row sits at position p = L - seqlen_q + i (aligned to the end of the cache) and sees key j
iff j < L, and j <= p when causal, and j >= p - window when window >= 0, and j >=
cache_leftpad[b] when a cache_leftpad is given (the slots before it are a left-padded prompt's
padding: FlashAttention's cache_leftpad).  A row that sees no key gives 0.  softcap > 0 maps
scores s (already scaled) to softcap * tanh(s / softcap).

Everything here is vectorized (no host syncs), so the reference also runs under torch.compile
and CUDA graphs; ``gather_kv`` is the host-side per-sequence gather the tests use.
"""
import math

import torch

from fastlm.reference.rotary import apply_rotary, qk_norm_rotary


def _up(t, upcast):
    return t.float() if upcast and t.dtype in (torch.float16, torch.bfloat16) else t


def _token_index(cache_seqlens, seqlen_new, block_table, block_size):
    """(batch, seqlen_new) positions, and for paged caches the (block, slot) they live in."""
    pos = cache_seqlens.long()[:, None] + torch.arange(seqlen_new, device=cache_seqlens.device)
    if block_table is None:
        return pos, None, None
    blk = torch.gather(block_table.long(), 1, pos // block_size)
    return pos, blk, pos % block_size


def _put_where(cache, blk, slot, has, new):
    """cache[blk, slot] = new for the tokens where ``has``, without a host sync (a boolean
    index would need one, and CUDA-graph capture forbids it).  The other tokens all write
    (block 0, slot 0) the value it must end with: the new token aimed there, if any, else its
    old value; duplicate writes of one value leave no race."""
    new = new.to(cache.dtype)
    hit = (has & (blk == 0) & (slot == 0)).flatten()
    first = hit.int().argmax().view(1)  # the (unique) token aimed at (0, 0), when hit.any()
    at0 = torch.where(hit.any(), new.flatten(0, 1).index_select(0, first)[0], cache[0, 0])
    vals = torch.where(has[..., None, None], new, at0)
    cache[torch.where(has, blk, 0), torch.where(has, slot, 0)] = vals


def kv_cache_append(k_cache, v_cache, k, v, cache_seqlens, *, block_table=None, advance=False):
    """Writes k, v (batch, seqlen_new, n_kv_heads, head_dim) at positions cache_seqlens[b] ...
    cache_seqlens[b] + seqlen_new - 1 of each sequence, in place.  advance=True then adds
    seqlen_new to cache_seqlens.  Tokens whose block-table entry is negative (no block) are
    skipped, as the kernels skip them; other indices must be in range (PyTorch indexing raises)."""
    B, S = k.shape[:2]
    if B * S > 0:  # (an empty batch has nothing to write: _put_where's argmax needs a token)
        if block_table is None:
            pos, _, _ = _token_index(cache_seqlens, S, None, None)
            b = torch.arange(B, device=k.device)[:, None].expand(B, S)
            k_cache[b, pos] = k.to(k_cache.dtype)
            v_cache[b, pos] = v.to(v_cache.dtype)
        else:
            _, blk, slot = _token_index(cache_seqlens, S, block_table, k_cache.shape[1])
            has = blk >= 0  # -1: no block (a padding row or a finished sequence), never block -1
            _put_where(k_cache, blk, slot, has, k)
            _put_where(v_cache, blk, slot, has, v)
    if advance:
        cache_seqlens.add_(S)


def padded_kv(k_cache, v_cache, block_table=None):
    """The caches as (batch, capacity, n_kv_heads, head_dim) (a gather for paged caches)."""
    if block_table is None:
        return k_cache, v_cache
    B, nb = block_table.shape
    idx = block_table.long().clamp(0, k_cache.shape[0] - 1)
    k = k_cache[idx].reshape(B, nb * k_cache.shape[1], *k_cache.shape[2:])
    v = v_cache[idx].reshape(B, nb * v_cache.shape[1], *v_cache.shape[2:])
    return k, v


def _used_part(k_cache, v_cache, cache_seqlens, block_table):
    """On CPU, the caches cut to the longest sequence (whole blocks): the mask hides the rest, and
    a pool-sized capacity (PagedKVCache's default) would otherwise cost O(capacity) per call.  On
    a GPU reading the lengths would be a host sync (and no capturable shape), so nothing is cut."""
    if cache_seqlens.device.type != "cpu" or torch.compiler.is_compiling() or cache_seqlens.numel() == 0:
        return k_cache, v_cache, block_table
    longest = max(int(cache_seqlens.max()), 1)
    if block_table is None:
        n = min(longest, k_cache.shape[1])
        return k_cache[:, :n], v_cache[:, :n], None
    n = min(-(-longest // k_cache.shape[1]), block_table.shape[1])
    return k_cache, v_cache, block_table[:, :n]


def gather_kv(k_cache, v_cache, cache_seqlens, block_table=None):
    """Host-side: a list of (k, v), each (cache_seqlens[b], n_kv_heads, head_dim), one per sequence."""
    out = []
    lens = cache_seqlens.tolist()
    for b, L in enumerate(lens):
        if block_table is None:
            out.append((k_cache[b, :L], v_cache[b, :L]))
        else:
            bs = k_cache.shape[1]
            blocks = block_table[b, : (L + bs - 1) // bs].long()
            out.append(
                (k_cache[blocks].flatten(0, 1)[:L], v_cache[blocks].flatten(0, 1)[:L])
            )
    return out


def decode_mask(cache_seqlens, seqlen_q, seqlen_k, *, causal=True, window=-1, cache_leftpad=None):
    """(batch, seqlen_q, seqlen_k) bool: which keys each query row sees."""
    L = cache_seqlens.long()[:, None, None]
    i = torch.arange(seqlen_q, device=cache_seqlens.device)[None, :, None]
    j = torch.arange(seqlen_k, device=cache_seqlens.device)[None, None, :]
    p = L - seqlen_q + i
    mask = j < L
    if causal:
        mask = mask & (j <= p)
    if window >= 0:
        mask = mask & (j >= p - window)
    if cache_leftpad is not None:
        mask = mask & (j >= cache_leftpad.long()[:, None, None])
    return mask


def attention_with_mask(q, k, v, mask, softmax_scale, softcap=0.0):
    """q (B, Sq, Hq, D); k, v (B, Sk, Hkv, D); mask (B, Sq, Sk).  Rows without keys give 0, and
    masked keys never contribute (not even NaN from unused cache slots)."""
    B, Sq, Hq, D = q.shape
    Sk, Hkv = k.shape[1], k.shape[2]
    G = Hq // Hkv
    # The G query heads of a KV head times the Sq queries form the rows (s, g) of one matmul.
    qh = q.reshape(B, Sq, Hkv, G, D).permute(0, 2, 1, 3, 4).reshape(B, Hkv, Sq * G, D)
    m = mask[:, None, :, None, :].expand(B, 1, Sq, G, Sk).reshape(B, 1, Sq * G, Sk)
    used = mask.any(1)[:, None, :, None]  # (B, 1, Sk, 1): keys some row sees
    kh = k.transpose(1, 2)  # (B, Hkv, Sk, D)
    vh = torch.where(used, v.transpose(1, 2), torch.zeros((), dtype=v.dtype, device=v.device))
    s = (qh @ kh.transpose(-1, -2)) * softmax_scale
    if softcap > 0:
        s = softcap * torch.tanh(s / softcap)
    s = s.masked_fill(~m, float("-inf"))
    p = torch.softmax(s, dim=-1)
    p = torch.where(m.any(-1, keepdim=True), p, torch.zeros((), dtype=p.dtype, device=p.device))
    o = p @ vh  # (B, Hkv, Sq * G, D)
    return o.reshape(B, Hkv, Sq, G, D).permute(0, 2, 1, 3, 4).reshape(B, Sq, Hq, D)


def decode_attention(
    q, k_cache, v_cache, cache_seqlens, *, block_table=None, softmax_scale=None, causal=True, window=-1,
    softcap=0.0, cache_leftpad=None, upcast=True,
):
    """Attention of q (batch, seqlen_q, n_heads_q, head_dim) over the first cache_seqlens[b] cached
    tokens of each sequence (the gather + attention baseline).  Output like q.  upcast computes
    fp16/bf16 in fp32 (upcast=False: in the input dtype, the same-dtype baseline of the tests)."""
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    k_cache, v_cache, block_table = _used_part(k_cache, v_cache, cache_seqlens, block_table)
    k, v = padded_kv(k_cache, v_cache, block_table)
    mask = decode_mask(cache_seqlens, q.shape[1], k.shape[1], causal=causal, window=window,
                       cache_leftpad=cache_leftpad)
    if block_table is not None:  # keys in no valid block are never seen (as in the kernels)
        blk = block_table.long().repeat_interleave(k_cache.shape[1], dim=1)  # (B, capacity)
        mask = mask & ((blk >= 0) & (blk < k_cache.shape[0]))[:, None, :]
    out = attention_with_mask(_up(q, upcast), _up(k, upcast), _up(v, upcast), mask, scale, softcap)
    return out.to(q.dtype)


def decode_attention_with_kv(
    q, k_cache, v_cache, k, v, cache_seqlens, *, rotary_cos=None, rotary_sin=None, rotary_interleaved=False,
    block_table=None, softmax_scale=None, causal=True, window=-1, softcap=0.0, cache_leftpad=None, upcast=True,
    q_norm_weight=None, k_norm_weight=None, qk_norm_eps=1e-6, qk_norm_offset=0.0,
):
    """flash_attn_with_kvcache's form: q and k rotated at positions cache_seqlens[b] + i (when
    rotary tables are given; cache_leftpad does not shift them), k and v appended at those
    positions (in place; cache_seqlens is not changed), then decode attention over the first
    cache_seqlens[b] + seqlen_new tokens (from cache_leftpad[b] on, when given).  With
    q_norm_weight/k_norm_weight, the heads of q and k are RMS-normalized (fastlm.reference's
    qk_norm_rotary: fp32 or float64) before the rotation."""
    if q_norm_weight is not None:
        q, k = qk_norm_rotary(q, k, q_norm_weight, k_norm_weight, rotary_cos, rotary_sin, eps=qk_norm_eps,
                              positions=cache_seqlens.long(), interleaved=rotary_interleaved,
                              weight_offset=qk_norm_offset)
    elif rotary_cos is not None:
        q, k = apply_rotary(q, k, rotary_cos, rotary_sin, positions=cache_seqlens.long(),
                            interleaved=rotary_interleaved, upcast=upcast)
    kv_cache_append(k_cache, v_cache, k, v, cache_seqlens, block_table=block_table)
    return decode_attention(q, k_cache, v_cache, cache_seqlens + k.shape[1], block_table=block_table,
                            softmax_scale=softmax_scale, causal=causal, window=window, softcap=softcap,
                            cache_leftpad=cache_leftpad, upcast=upcast)
