"""flash-attn's function interface on fastlm's kernels: code written against flash_attn 2.x

    from flash_attn import flash_attn_func, flash_attn_varlen_func, flash_attn_with_kvcache

runs unchanged with

    from fastlm.integrations.flash_attn import flash_attn_func, flash_attn_varlen_func, flash_attn_with_kvcache

Same names, argument order, defaults (rotary_interleaved=True, causal=False, ...), layouts
(batch, seqlen, heads, head_dim), log-sum-exp layouts and return forms.  Each call is one
fastlm op: ``fastlm.ops.attention`` (forward and backward) or ``fastlm.ops.decode_attention``
(forward only, as flash_attn_with_kvcache).  What fastlm does not implement is an error naming
the argument, never a silently different result: dropout_p > 0, alibi_slopes, a paged varlen
prefill (block_table in flash_attn_varlen_func), cache_batch_idx,
return_softmax_lse of the KV-cache call, a right window on a non-causal KV-cache call, and
flash_attn's non-causal rotary rule for several query tokens (all of them rotated at position
cache_seqlens).  With return_attn_probs=True the third output (the attention probabilities,
which flash_attn only returns for testing with dropout) is None.
"""
import torch

from fastlm import ops

__all__ = ["flash_attn_func", "flash_attn_qkvpacked_func", "flash_attn_kvpacked_func", "flash_attn_varlen_func",
           "flash_attn_varlen_qkvpacked_func", "flash_attn_varlen_kvpacked_func", "flash_attn_with_kvcache"]


def _unsupported(fn, **args):
    """Raise for the first argument that asks for something fastlm does not compute."""
    for name, value in args.items():
        if name == "dropout_p" and value:
            raise NotImplementedError(f"{fn}: dropout_p={value} (attention dropout) is not supported by fastlm; "
                                      "use dropout_p=0.0")
        if name != "dropout_p" and value is not None and value is not False:
            raise NotImplementedError(f"{fn}: {name} is not supported by fastlm; pass None")


def _attention(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
               return_attn_probs, fn, **varlen):
    _unsupported(fn, dropout_p=dropout_p, alibi_slopes=alibi_slopes)
    out = ops.attention(q, k, v, causal=causal, softmax_scale=softmax_scale, window=tuple(window_size),
                        softcap=softcap, return_lse=return_attn_probs, deterministic=deterministic, **varlen)
    return (*out, None) if return_attn_probs else out


def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                    alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """q (batch, seqlen_q, nheads, headdim), k / v (batch, seqlen_k, nheads_k, headdim) -> out like q;
    with return_attn_probs: (out, softmax_lse (batch, nheads, seqlen_q) fp32, None)."""
    return _attention(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
                      return_attn_probs, "flash_attn_func")


def flash_attn_qkvpacked_func(qkv, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                              softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """qkv (batch, seqlen, 3, nheads, headdim): flash_attn_func on its three slices (views)."""
    q, k, v = qkv.unbind(2)
    return _attention(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
                      return_attn_probs, "flash_attn_qkvpacked_func")


def flash_attn_kvpacked_func(q, kv, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                             softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """kv (batch, seqlen_k, 2, nheads_k, headdim)."""
    k, v = kv.unbind(2)
    return _attention(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
                      return_attn_probs, "flash_attn_kvpacked_func")


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                           softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                           deterministic=False, return_attn_probs=False, block_table=None):
    """Packed sequences: q (total_q, nheads, headdim), k / v (total_k, nheads_k, headdim),
    cu_seqlens_* int32 (batch + 1,); softmax_lse (nheads, total_q)."""
    _unsupported("flash_attn_varlen_func", block_table=block_table)
    return _attention(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
                      return_attn_probs, "flash_attn_varlen_func", cu_seqlens_q=cu_seqlens_q,
                      cu_seqlens_k=cu_seqlens_k, max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k)


def flash_attn_varlen_qkvpacked_func(qkv, cu_seqlens, max_seqlen, dropout_p=0.0, softmax_scale=None, causal=False,
                                     window_size=(-1, -1), softcap=0.0, alibi_slopes=None, deterministic=False,
                                     return_attn_probs=False):
    """qkv (total, 3, nheads, headdim)."""
    q, k, v = qkv.unbind(1)
    return _attention(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
                      return_attn_probs, "flash_attn_varlen_qkvpacked_func", cu_seqlens_q=cu_seqlens,
                      cu_seqlens_k=cu_seqlens, max_seqlen_q=max_seqlen, max_seqlen_k=max_seqlen)


def flash_attn_varlen_kvpacked_func(q, kv, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                                    softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                                    alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """kv (total_k, 2, nheads_k, headdim)."""
    k, v = kv.unbind(1)
    return _attention(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
                      return_attn_probs, "flash_attn_varlen_kvpacked_func", cu_seqlens_q=cu_seqlens_q,
                      cu_seqlens_k=cu_seqlens_k, max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k)


def flash_attn_with_kvcache(q, k_cache, v_cache, k=None, v=None, rotary_cos=None, rotary_sin=None,
                            cache_seqlens=None, cache_batch_idx=None, cache_leftpad=None, block_table=None,
                            softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                            rotary_interleaved=True, alibi_slopes=None, num_splits=0, return_softmax_lse=False):
    """Decoding over a KV cache (contiguous (batch, seqlen_cache, nheads_k, headdim), or paged
    (num_blocks, block_size, nheads_k, headdim) with block_table): k / v, if given, are
    appended in place at cache_seqlens (int or int32 (batch,); None: the whole cache is filled)
    after rotary (q too), and q attends to the first cache_seqlens + seqlen_new tokens, from slot
    cache_leftpad[b] on when that is given (a left-padded batch; positions stay the slots')."""
    fn = "flash_attn_with_kvcache"
    _unsupported(fn, cache_batch_idx=cache_batch_idx, alibi_slopes=alibi_slopes,
                 return_softmax_lse=return_softmax_lse or None)
    left, right = (int(w) for w in window_size)
    if not causal and right >= 0:
        raise NotImplementedError(f"{fn}: a right window (window_size={tuple(window_size)}) without causal=True is "
                                  "not supported by fastlm")
    if rotary_cos is not None and not causal and left < 0 and q.shape[1] > 1:
        raise NotImplementedError(f"{fn}: rotary with causal=False, no window and seqlen_q > 1 (flash_attn rotates "
                                  "every query at position cache_seqlens) is not supported by fastlm")
    batch = q.shape[0]
    if cache_seqlens is None:  # as flash-attn: the whole cache, and new tokens need their positions
        if k is not None:
            raise ValueError(f"{fn}: cache_seqlens must be given with k / v (where to append them), as flash-attn "
                             "requires")
        cache_seqlens = k_cache.shape[1] if block_table is None else block_table.shape[1] * k_cache.shape[1]
    if not torch.is_tensor(cache_seqlens):
        cache_seqlens = torch.full((batch,), int(cache_seqlens), dtype=torch.int32, device=q.device)
    return ops.decode_attention(q, k_cache, v_cache, cache_seqlens, k=k, v=v, rotary_cos=rotary_cos,
                                rotary_sin=rotary_sin, rotary_interleaved=rotary_interleaved, block_table=block_table,
                                cache_leftpad=cache_leftpad, softmax_scale=softmax_scale, causal=causal, window=left,
                                softcap=softcap,
                                num_splits=num_splits)
