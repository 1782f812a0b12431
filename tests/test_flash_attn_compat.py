"""fastlm.integrations.flash_attn: flash-attn's functions, called the way flash-attn code calls
them (positional arguments in flash-attn's order, its defaults), against an independent float64
implementation of flash-attn's documented semantics; and errors for what fastlm lacks."""
import math

import pytest
import torch

from conftest import DEVICE
from fastlm import ops as fastlm_ops
from fastlm.integrations import flash_attn as fa


def _t(*shape, dtype=torch.float32, grad=False):
    return torch.randn(*shape, device=DEVICE, dtype=dtype).requires_grad_(grad)


def naive(q, k, v, causal=False, window=(-1, -1), softcap=0.0, scale=None):
    """flash-attn's definition in float64: (B, Sq, H, D) x (B, Sk, Hk, D) -> (out, lse (B, H, Sq)).
    Query i sees key j iff i + Sk - Sq - left <= j <= i + Sk - Sq + right (right = 0 when causal;
    -1 = unbounded); rows that see nothing are 0 (lse -inf)."""
    q, k, v = (t.double() for t in (q, k, v))
    B, Sq, H, D = q.shape
    Sk, Hk = k.shape[1], k.shape[2]
    k, v = (t.repeat_interleave(H // Hk, dim=2) for t in (k, v))
    s = torch.einsum("bqhd,bkhd->bhqk", q, k) * (scale if scale is not None else D ** -0.5)
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    left, right = window
    right = 0 if causal else right
    i = torch.arange(Sq, device=q.device)[:, None] + Sk - Sq
    j = torch.arange(Sk, device=q.device)[None, :]
    ok = torch.ones(Sq, Sk, dtype=torch.bool, device=q.device)
    if left >= 0:
        ok &= j >= i - left
    if right >= 0:
        ok &= j <= i + right
    s = s.masked_fill(~ok, -math.inf)
    lse = torch.logsumexp(s, -1)
    p = torch.exp(s - lse[..., None]).nan_to_num(0.0)
    return torch.einsum("bhqk,bkhd->bqhd", p, v), lse


def close(a, b, tol=2e-5):
    torch.testing.assert_close(a.double(), b.double(), rtol=tol, atol=tol)


@pytest.mark.parametrize("causal,window,softcap", [(False, (-1, -1), 0.0), (True, (-1, -1), 0.0),
                                                   (True, (3, 0), 5.0), (False, (2, 1), 0.0)])
def test_flash_attn_func_and_packed_forms(causal, window, softcap):
    q, k, v = _t(2, 7, 4, 16, grad=True), _t(2, 9, 2, 16, grad=True), _t(2, 9, 2, 16, grad=True)
    # flash-attn's positional order: (q, k, v, dropout_p, softmax_scale, causal, window_size, softcap)
    out = fa.flash_attn_func(q, k, v, 0.0, 0.3, causal, window, softcap)
    want, lse = naive(q, k, v, causal, window, softcap, 0.3)
    close(out, want)
    o2, lse2, probs = fa.flash_attn_func(q, k, v, causal=causal, window_size=window, softcap=softcap,
                                         softmax_scale=0.3, return_attn_probs=True)
    assert probs is None and lse2.shape == (2, 4, 7) and lse2.dtype == torch.float32
    close(o2, want)
    close(lse2, lse)
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), g)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    want_grads = torch.autograd.grad(naive(q64, k64, v64, causal, window, softcap, 0.3)[0], (q64, k64, v64),
                                     g.double())
    for a, b in zip(grads, want_grads):
        close(a, b, 1e-4)
    # packed forms: the same numbers
    kv = torch.stack([k, v], 2).detach()
    close(fa.flash_attn_kvpacked_func(q, kv, 0.0, 0.3, causal, window, softcap), want)
    if q.shape[1] == k.shape[1] and q.shape[2] == k.shape[2]:
        close(fa.flash_attn_qkvpacked_func(torch.stack([q, k, v], 2), 0.0, 0.3, causal, window, softcap), want)
    qkv = _t(2, 9, 3, 2, 16)
    close(fa.flash_attn_qkvpacked_func(qkv, causal=causal, window_size=window, softcap=softcap),
          naive(*qkv.unbind(2), causal, window, softcap)[0])


@pytest.mark.parametrize("causal", [False, True])
def test_varlen_forms(causal):
    cu_q = torch.tensor([0, 3, 4, 9], dtype=torch.int32, device=DEVICE)  # lengths 3, 1, 5 (keys 4, 1, 6)
    cu_k = torch.tensor([0, 4, 5, 11], dtype=torch.int32, device=DEVICE)
    q, k, v = _t(9, 4, 8), _t(11, 2, 8), _t(11, 2, 8)
    out, lse, _ = fa.flash_attn_varlen_func(q, k, v, cu_q, cu_k, 5, 6, 0.0, None, causal, return_attn_probs=True)
    assert lse.shape == (4, 9)  # (nheads, total_q), as flash-attn's varlen lse
    for b in range(3):
        sq, sk = slice(cu_q[b], cu_q[b + 1]), slice(cu_k[b], cu_k[b + 1])
        w, wl = naive(q[None, sq], k[None, sk], v[None, sk], causal)
        close(out[sq], w[0])
        close(lse[:, sq], wl[0])
    kv = torch.stack([k, v], 1)
    close(fa.flash_attn_varlen_kvpacked_func(q, kv, cu_q, cu_k, 5, 6, causal=causal), out)
    qkv = _t(11, 3, 2, 8)
    got = fa.flash_attn_varlen_qkvpacked_func(qkv, cu_k, 6, causal=causal)
    for b in range(3):
        s = slice(cu_k[b], cu_k[b + 1])
        close(got[s], naive(*(t[None, s] for t in qkv.unbind(1)), causal)[0][0])


def _rotate_interleaved(x, pos, cos, sin):
    """GPT-J pairs (2i, 2i+1) of the first 2 * cos.shape[1] dims rotated at positions pos (B, S)."""
    rd = 2 * cos.shape[1]
    c, s = cos[pos].double()[:, :, None, :], sin[pos].double()[:, :, None, :]
    x = x.double().clone()
    a, b = x[..., 0:rd:2].clone(), x[..., 1:rd:2].clone()
    x[..., 0:rd:2], x[..., 1:rd:2] = a * c - b * s, a * s + b * c
    return x


@pytest.mark.parametrize("paged", [False, True])
def test_with_kvcache(paged):
    B, Hq, Hk, D, cap = 2, 4, 2, 16, 24
    lens = torch.tensor([5, 11], dtype=torch.int32, device=DEVICE)
    k_cache, v_cache = _t(B, cap, Hk, D), _t(B, cap, Hk, D)
    block_table = None
    if paged:  # blocks of 8 slots, shuffled
        perm = torch.tensor([[4, 0, 2], [1, 5, 3]], dtype=torch.int32, device=DEVICE)
        kp, vp = (torch.empty(6, 8, Hk, D, device=DEVICE) for _ in range(2))
        for b in range(B):
            for i in range(3):
                kp[perm[b, i]] = k_cache[b, 8 * i:8 * i + 8]
                vp[perm[b, i]] = v_cache[b, 8 * i:8 * i + 8]
        block_table = perm

    def caches():
        return (kp.clone(), vp.clone()) if paged else (k_cache.clone(), v_cache.clone())

    # decoding over the cache as it is (k / v None); causal is flash-attn's default False
    q = _t(B, 1, Hq, D)
    kc, vc = caches()
    got = fa.flash_attn_with_kvcache(q, kc, vc, cache_seqlens=lens, block_table=block_table)
    for b in range(B):
        n = int(lens[b])
        close(got[b:b + 1], naive(q[b:b + 1], k_cache[b:b + 1, :n], v_cache[b:b + 1, :n])[0])
    # two new tokens appended in place with rotary (flash-attn's default: interleaved), causal
    q, k, v = _t(B, 2, Hq, D), _t(B, 2, Hk, D), _t(B, 2, Hk, D)
    angles = torch.arange(64, device=DEVICE)[:, None] * 0.1 * torch.arange(1, 5, device=DEVICE)[None, :]
    cos, sin = angles.cos(), angles.sin()  # rotary_dim 8 of head_dim 16
    kc, vc = caches()
    got = fa.flash_attn_with_kvcache(q, kc, vc, k, v, cos, sin, lens, block_table=block_table, causal=True)
    pos = lens[:, None].long() + torch.arange(2, device=DEVICE)
    qr, kr = _rotate_interleaved(q, pos, cos, sin), _rotate_interleaved(k, pos, cos, sin)
    for b in range(B):
        n = int(lens[b])
        keys = torch.cat([k_cache[b:b + 1, :n].double(), kr[b:b + 1]], 1)
        vals = torch.cat([v_cache[b:b + 1, :n].double(), v[b:b + 1].double()], 1)
        close(got[b:b + 1], naive(qr[b:b + 1], keys, vals, causal=True)[0])
        stored = kc if not paged else torch.cat([kc[i] for i in block_table[b].tolist()])[None].expand(B, -1, -1, -1)
        close(stored[b if not paged else 0, n:n + 2], kr[b])  # appended, rotated, in place
    # cache_leftpad (left-padded prompts): sequence b's keys start at that slot; the new tokens
    # still go to (and rotate at) slots cache_seqlens + i
    pad = torch.tensor([3, 0], dtype=torch.int32, device=DEVICE)
    kc, vc = caches()
    got = fa.flash_attn_with_kvcache(q, kc, vc, k, v, cos, sin, lens, cache_leftpad=pad, block_table=block_table,
                                     causal=True)
    for b in range(B):
        n, p = int(lens[b]), int(pad[b])
        keys = torch.cat([k_cache[b:b + 1, p:n].double(), kr[b:b + 1]], 1)
        vals = torch.cat([v_cache[b:b + 1, p:n].double(), v[b:b + 1].double()], 1)
        close(got[b:b + 1], naive(qr[b:b + 1], keys, vals, causal=True)[0])
    # an int cache_seqlens; None: the whole cache
    kc, vc = caches()
    q = _t(B, 1, Hq, D)
    close(fa.flash_attn_with_kvcache(q, kc, vc, cache_seqlens=7, block_table=block_table),
          naive(q, k_cache[:, :7], v_cache[:, :7])[0])
    close(fa.flash_attn_with_kvcache(q, kc, vc, block_table=block_table), naive(q, k_cache, v_cache)[0])


def test_unsupported_arguments_are_errors():
    q, k, v = _t(1, 4, 2, 8), _t(1, 4, 2, 8), _t(1, 4, 2, 8)
    cu = torch.tensor([0, 4], dtype=torch.int32, device=DEVICE)
    kc, vc = _t(1, 8, 2, 8), _t(1, 8, 2, 8)
    lens = torch.tensor([3], dtype=torch.int32, device=DEVICE)
    cos = sin = torch.ones(16, 4, device=DEVICE)
    cases = [
        (lambda: fa.flash_attn_func(q, k, v, 0.1), "dropout_p=0.1"),
        (lambda: fa.flash_attn_func(q, k, v, alibi_slopes=torch.ones(2, device=DEVICE)), "alibi_slopes"),
        (lambda: fa.flash_attn_varlen_func(q[0], k[0], v[0], cu, cu, 4, 4, block_table=cu[None]), "block_table"),
        (lambda: fa.flash_attn_with_kvcache(q[:, :1], kc, vc, cache_seqlens=lens, cache_batch_idx=lens),
         "cache_batch_idx"),
        (lambda: fa.flash_attn_with_kvcache(q[:, :1], kc, vc, cache_seqlens=lens, return_softmax_lse=True),
         "return_softmax_lse"),
        (lambda: fa.flash_attn_with_kvcache(q[:, :1], kc, vc, cache_seqlens=lens, window_size=(2, 1)),
         "a right window"),
        (lambda: fa.flash_attn_with_kvcache(q[:, :2], kc, vc, k[:, :2], v[:, :2], cos, sin, lens),
         "rotary with causal=False"),
        (lambda: fa.flash_attn_with_kvcache(q[:, :1], kc, vc, k[:, :1], v[:, :1]), "cache_seqlens must be given"),
    ]
    for fn, msg in cases:
        with pytest.raises((NotImplementedError, ValueError), match=msg):
            fn()


# flash_attn 2.x's signatures (its flash_attn_interface), which code written against it relies
# on positionally and by default: the same parameter names, order and defaults here.
_ATTN = [("dropout_p", 0.0), ("softmax_scale", None), ("causal", False), ("window_size", (-1, -1)),
         ("softcap", 0.0), ("alibi_slopes", None), ("deterministic", False), ("return_attn_probs", False)]
_VARLEN = [("cu_seqlens_q", None), ("cu_seqlens_k", None), ("max_seqlen_q", None), ("max_seqlen_k", None)]
FLASH_ATTN_SIGNATURES = {
    "flash_attn_func": [("q", None), ("k", None), ("v", None)] + _ATTN,
    "flash_attn_qkvpacked_func": [("qkv", None)] + _ATTN,
    "flash_attn_kvpacked_func": [("q", None), ("kv", None)] + _ATTN,
    "flash_attn_varlen_func": [("q", None), ("k", None), ("v", None)] + _VARLEN + _ATTN + [("block_table", None)],
    "flash_attn_varlen_qkvpacked_func": [("qkv", None), ("cu_seqlens", None), ("max_seqlen", None)] + _ATTN,
    "flash_attn_varlen_kvpacked_func": [("q", None), ("kv", None)] + _VARLEN + _ATTN,
    "flash_attn_with_kvcache": [
        ("q", None), ("k_cache", None), ("v_cache", None), ("k", None), ("v", None), ("rotary_cos", None),
        ("rotary_sin", None), ("cache_seqlens", None), ("cache_batch_idx", None), ("cache_leftpad", None),
        ("block_table", None), ("softmax_scale", None), ("causal", False), ("window_size", (-1, -1)),
        ("softcap", 0.0), ("rotary_interleaved", True), ("alibi_slopes", None), ("num_splits", 0),
        ("return_softmax_lse", False)],
}


@pytest.mark.parametrize("name", sorted(FLASH_ATTN_SIGNATURES))
def test_signatures_are_flash_attns(name):
    import inspect

    params = inspect.signature(getattr(fa, name)).parameters.values()
    got = [(p.name, None if p.default is inspect.Parameter.empty else p.default) for p in params]
    assert got == FLASH_ATTN_SIGNATURES[name]
    assert name in fa.__all__


def test_defaults_compute_flash_attns_defaults():
    # every function with its required arguments only: no mask, no window, no cap, scale
    # 1/sqrt(headdim), the output alone (not a tuple)
    q, k, v = _t(2, 5, 4, 16), _t(2, 7, 2, 16), _t(2, 7, 2, 16)
    want = naive(q, k, v)[0]
    close(fa.flash_attn_func(q, k, v), want)
    close(fa.flash_attn_kvpacked_func(q, torch.stack([k, v], 2)), want)
    qkv = _t(2, 7, 3, 2, 16)
    close(fa.flash_attn_qkvpacked_func(qkv), naive(*qkv.unbind(2))[0])
    cu_q = torch.tensor([0, 5, 10], dtype=torch.int32, device=DEVICE)
    cu_k = torch.tensor([0, 7, 14], dtype=torch.int32, device=DEVICE)
    flat = [t.flatten(0, 1) for t in (q, k, v)]
    close(fa.flash_attn_varlen_func(*flat, cu_q, cu_k, 5, 7), want.flatten(0, 1))
    close(fa.flash_attn_varlen_kvpacked_func(flat[0], torch.stack(flat[1:], 1), cu_q, cu_k, 5, 7), want.flatten(0, 1))
    close(fa.flash_attn_varlen_qkvpacked_func(qkv.flatten(0, 1), cu_k, 7), naive(*qkv.unbind(2))[0].flatten(0, 1))
    kc, vc = _t(2, 9, 2, 16), _t(2, 9, 2, 16)
    close(fa.flash_attn_with_kvcache(q, kc, vc), naive(q, kc, vc)[0])


def test_with_kvcache_edges_of_what_is_supported():
    q, k, v = _t(1, 2, 2, 8), _t(1, 2, 2, 8), _t(1, 2, 2, 8)
    kc, vc = _t(1, 8, 2, 8), _t(1, 8, 2, 8)
    lens = torch.tensor([3], dtype=torch.int32, device=DEVICE)
    cos, sin = torch.cos(torch.randn(16, 4, device=DEVICE)), torch.sin(torch.randn(16, 4, device=DEVICE))
    # a right window of 0 without causal is still a right window
    with pytest.raises(NotImplementedError, match="a right window"):
        fa.flash_attn_with_kvcache(q[:, :1], kc, vc, cache_seqlens=lens, window_size=(2, 0))
    # one query token: non-causal rotary is flash_attn's rule exactly (the row sees the whole
    # cache either way), so it runs, and equals the causal call
    one = [fa.flash_attn_with_kvcache(q[:, :1], kc.clone(), vc.clone(), k[:, :1], v[:, :1], cos, sin, lens,
                                      causal=c) for c in (False, True)]
    close(one[0], one[1])
    # a local window (left >= 0, even 0) rotates every query at cache_seqlens + i in flash_attn too
    got = fa.flash_attn_with_kvcache(q, kc.clone(), vc.clone(), k, v, cos, sin, lens, window_size=(0, -1))
    want = fastlm_ops.decode_attention(q, kc.clone(), vc.clone(), lens, k=k, v=v, rotary_cos=cos, rotary_sin=sin,
                                       rotary_interleaved=True, causal=False, window=0)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
