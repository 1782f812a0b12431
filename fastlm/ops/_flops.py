"""FLOP formulas of the matmul-bearing fastlm ops, for torch.utils.flop_counter.FlopCounterMode.

FlopCounterMode sees a custom op as one call and counts nothing for it without a formula, so
an MFU figure taken with it would drop the fused backend's attention and its lm_head + loss
(which run inside linear_cross_entropy) and come out far below the same model on SDPA and
nn.Linear.  The formulas follow torch's own (torch/utils/flop_counter.py), so the two backends
count alike: 2 FLOPs per multiply-add; attention counts the whole S_q x S_k product, causal or
windowed alike (torch's SDPA formulas ignore the mask too), and its backward the recomputed
QK^T plus 4 matmuls; norms, rotary and elementwise ops count nothing, as torch's do.
Variable-length inputs read their cu_seqlens / cache_seqlens (a host sync, as torch's varlen
formula does) when the values exist, else assume every sequence at its maximum length.
"""
import torch
from torch.utils.flop_counter import register_flop_formula


def _known(t):
    """t's values can be read: a real tensor (not a fake / functional / meta one), and not on a
    stream capturing a CUDA graph (where reading them would break the capture)."""
    return type(t) is torch.Tensor and not t.is_meta and not (t.is_cuda and torch.cuda.is_current_stream_capturing())


def _pairs(q, k, cu_q, cu_k, max_q, max_k):
    """Query-key pairs summed over sequences: B * Sq * Sk dense, sum(lq * lk) packed."""
    if cu_q is None:
        return q.shape[0] * q.shape[1] * k.shape[1]
    n = cu_q.shape[0] - 1
    lq = cu_q.diff().tolist() if _known(cu_q) else [max_q or q.shape[0]] * n
    lk = cu_k.diff().tolist() if _known(cu_k) else [max_k or k.shape[0]] * n
    return sum(a * b for a, b in zip(lq, lk))


def _cache_keys(cache_seqlens, k_cache, block_table, new=0):
    """Keys attended, summed over the batch: each sequence's cached tokens (+ `new` appended),
    or the cache capacity when the lengths cannot be read."""
    if _known(cache_seqlens):
        return sum(n + new for n in cache_seqlens.tolist())
    cap = k_cache.shape[1] * (block_table.shape[1] if block_table is not None else 1)
    return cap * cache_seqlens.shape[0]


@register_flop_formula(torch.ops.fastlm.attention_fwd, get_raw=True)
def _attention_fwd(q, k, v, cu_q, cu_k, max_q, max_k, *args, out_val=None, **kwargs):
    # QK^T and PV: 2 * (D + Dv) per query-key pair and query head
    return 2 * _pairs(q, k, cu_q, cu_k, max_q, max_k) * q.shape[-2] * (q.shape[-1] + v.shape[-1])


@register_flop_formula(torch.ops.fastlm.attention_bwd, get_raw=True)
def _attention_bwd(dout, dlse, q, k, v, out, lse, lse_lo, cu_q, cu_k, max_q, max_k, *args, out_val=None, **kwargs):
    # QK^T again, dO V^T, P^T dO (dV), dS K (dQ), dS^T Q (dK)
    d, dv = q.shape[-1], v.shape[-1]
    return 2 * _pairs(q, k, cu_q, cu_k, max_q, max_k) * q.shape[-2] * (3 * d + 2 * dv)


@register_flop_formula(torch.ops.fastlm.linear_cross_entropy, get_raw=True)
def _linear_cross_entropy(h, weight, bias, targets, ignore_index, sum_reduction, chunk_rows, need_dh, need_dw,
                          need_db, *args, out_val=None, **kwargs):
    # logits = h W^T, and the gradients it computes during the forward: dh = dlogits W,
    # dW = dlogits^T h (its backward only scales them; nn.Linear counts them in its backward)
    return 2 * h.shape[0] * h.shape[1] * weight.shape[0] * (1 + bool(need_dh) + bool(need_dw))


@register_flop_formula(torch.ops.fastlm.linear_cross_entropy_rows, get_raw=True)
def _linear_cross_entropy_rows(h, weight, *args, out_val=None, **kwargs):
    # reduction="none": only the logits in the forward ...
    return 2 * h.shape[0] * h.shape[1] * weight.shape[0]


@register_flop_formula(torch.ops.fastlm.linear_cross_entropy_rows_backward, get_raw=True)
def _linear_cross_entropy_rows_bwd(h, weight, bias, targets, stats, drows, ignore_index, chunk_rows, need_dh, need_dw,
                                   *args, out_val=None, **kwargs):
    # ... and the backward recomputes them before dh and dW
    return 2 * h.shape[0] * h.shape[1] * weight.shape[0] * (1 + bool(need_dh) + bool(need_dw))


@register_flop_formula(torch.ops.fastlm.fused_linear, get_raw=True)
def _fused_linear(x, weight, *args, out_val=None, **kwargs):
    return 2 * x.shape[0] * x.shape[1] * weight.shape[0]


@register_flop_formula(torch.ops.fastlm.decode_attention, get_raw=True)
def _decode(q, k_cache, v_cache, cache_seqlens, block_table, *args, out_val=None, **kwargs):
    # each of a sequence's Sq new query rows against all its cached keys
    keys = _cache_keys(cache_seqlens, k_cache, block_table)
    return 2 * q.shape[1] * q.shape[2] * (q.shape[-1] + v_cache.shape[-1]) * keys


@register_flop_formula(torch.ops.fastlm.decode_attention_with_kv, get_raw=True)
def _decode_with_kv(q, k_cache, v_cache, k, v, cache_seqlens, block_table, *args, out_val=None, **kwargs):
    # cache_seqlens counts the tokens before this call's k / v are appended
    keys = _cache_keys(cache_seqlens, k_cache, block_table, new=k.shape[1])
    return 2 * q.shape[1] * q.shape[2] * (q.shape[-1] + v_cache.shape[-1]) * keys
