"""Attention benchmark: forward, backward and forward+backward TFLOP/s (bf16).

FLOPs (explicit): forward = 4 * batch * n_heads_q * seqlen_q * seqlen_k * head_dim (QK^T and
PV, 2 FLOPs per multiply-add); causal counts half (the visible pairs, for seqlen_q ==
seqlen_k); backward = 2.5 x forward (dV, dP, dS->dQ, dK, and the recomputed QK^T);
forward+backward = 3.5 x forward.  Varlen sums the per-sequence counts.

Shapes: head_dim 64/128/256 with n_heads = 2048 / head_dim, seqlen 512..16k at batch x seqlen =
16k tokens, causal and not; GQA (16 query heads on 2 kv heads); varlen (random document lengths
packing 16k tokens, causal).  Each figure sits beside the peers measured in the same run: SDPA
with each backend (flash, cuDNN, efficient; on varlen, which SDPA cannot take packed, one call
per document, as its users write it), FlexAttention (compiled), flash_attn (FA2) / FA3
when installed, the math reference (eager and compiled) at small sizes; plus % of the dense
bf16 matmul TFLOP/s measured in this run.  fastlm's backward is timed as its default (dQ by
fp32 atomics in the dK/dV kernel or by a separate kernel, whichever the first call of each
shape bucket timed faster; "dq_pick" rows list the picks) and with deterministic=True; on
sm_90+ its forward also with TMA tile loads (fastlm-triton-tma, FASTLM_ATTENTION_TMA=1) and,
on sm_90 with triton 3.6, warp-specialized (fastlm-triton-ws, FASTLM_ATTENTION_WS=1: the
forward, and the backward at head_dim 64 and 128); on sm_90 the CUDA C++ Hopper forward
(fastlm-cuda-sm90, FASTLM_ATTENTION_SM90=1; head_dim 64 and 128, full or causal) and with its
CUDA backward (fastlm-cuda-sm90-bwd, FASTLM_ATTENTION_SM90_BWD=1 too).
"""
import functools
import random

import torch

from benchmarks.common import (Results, bench, compiled, lift_recompile_limit, matmul_tflops, optional_module, parser,
                               require_cuda, run_module)

import fastlm
from fastlm import reference
from fastlm.kernels import attention as K

TOKENS = 16384
MODEL_DIM = 2048  # n_heads = MODEL_DIM // head_dim
SEQLENS = [512, 1024, 2048, 4096, 8192, 16384]
SMALL_REF = 1024  # the math reference (eager / compiled) only up to this seqlen (memory: B*H*S^2)
FLEX_SEQLENS = (4096, 16384)  # FlexAttention compiles per shape: only these (compile time)


def attn_flops(batch, heads, seqlen_q, seqlen_k, head_dim, causal, mode):
    """FLOPs of one call; causal counts half (the formula of the FlashAttention papers)."""
    f = 4.0 * batch * heads * seqlen_q * seqlen_k * head_dim
    if causal:
        f *= 0.5
    return f * {"fwd": 1.0, "bwd": 2.5, "fwd+bwd": 3.5}[mode]


def varlen_flops(lens, heads, head_dim, causal, mode):
    return sum(attn_flops(1, heads, n, n, head_dim, causal, mode) for n in lens)


def dense_shapes(quick):
    """(head_dim, seqlen, causal) in run order; batch = TOKENS // seqlen."""
    if quick:
        return [(128, s, c) for s in (4096, 16384) for c in (False, True)]  # (the targets: seqlen >= 4k)
    out = [(128, s, c) for s in SEQLENS for c in (False, True)]
    out += [(d, s, c) for d in (64, 256) for s in SEQLENS for c in (False, True)]
    return out


def doc_lengths(total, seed=0, lo=128, hi=4096):
    """Random document lengths summing to `total` (the varlen case)."""
    rng = random.Random(seed)
    lens = []
    while sum(lens) < total:
        lens.append(min(rng.randint(lo, hi), total - sum(lens)))
    return lens


# ------------------------------------------------------------------------------ implementations
def _sdpa(backend_name):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = getattr(SDPBackend, backend_name)

    def f(q, k, v, causal):
        gqa = q.shape[2] != k.shape[2]
        with sdpa_kernel([backend]):
            o = torch.nn.functional.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal,
                **({"enable_gqa": True} if gqa else {}))
        return o.transpose(1, 2)

    return f


@functools.lru_cache(maxsize=None)
def _flex_compiled():
    from torch.nn.attention.flex_attention import flex_attention

    lift_recompile_limit()
    return torch.compile(flex_attention, dynamic=False)


def _flex(q, k, v, causal, block_mask_cache={}):  # noqa: B006 (a cache on purpose)
    from torch.nn.attention.flex_attention import create_block_mask

    B, S, H, D = q.shape
    bm = None
    if causal:
        key = (S, str(q.device))
        if key not in block_mask_cache:
            block_mask_cache[key] = create_block_mask(lambda b, h, qi, ki: qi >= ki, None, None, S, S, device=q.device)
        bm = block_mask_cache[key]
    gqa = q.shape[2] != k.shape[2]
    o = _flex_compiled()(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=bm, enable_gqa=gqa)
    return o.transpose(1, 2)


def _tma_variant(fn):
    """fn with the forward's TMA loads on (FASTLM_ATTENTION_TMA=1), or why it cannot run.
    Only the forward differs, so it is timed in fwd and fwd+bwd."""
    if torch.cuda.get_device_capability()[0] < 9:
        return "skipped: TMA needs sm_90+"

    def f(*args):
        saved, K.TMA = K.TMA, True
        try:
            return fn(*args)
        finally:
            K.TMA = saved
    return f


def _flag_variant(fn, flags, taken, modes):
    """fn with the module switches K.<flag> (a name or a tuple of names) on, declaring the `modes`
    its kernels cover and the shapes they take (taken(q, k, v, causal), asked with the switches
    on).  A shape they do not take raises (the row reports it) instead of timing the usual
    kernels under this name."""
    flags = (flags,) if isinstance(flags, str) else flags

    def on(call):
        saved = [getattr(K, f) for f in flags]
        for f in flags:
            setattr(K, f, True)
        try:
            return call()
        finally:
            for f, old in zip(flags, saved):
                setattr(K, f, old)

    def f(q, k, v, c):
        if not f.applies(q, k, v, c):
            raise RuntimeError(f"the K.{'/'.join(flags)} kernels do not take this shape")
        return on(lambda: fn(q, k, v, c))

    f.applies = lambda q, k, v, c: on(lambda: taken(q, k, v, c))
    f.modes = modes
    return f


def _ws_variant(fn, head_dim):
    """fn with the warp-specialized Triton kernels on (FASTLM_ATTENTION_WS=1), or why it cannot
    run: the forward at every head dim, the backward at 64 and 128."""
    if torch.cuda.get_device_capability()[0] != 9 or not K.WS_TRITON:
        return "skipped: the WS kernels run on sm_90 with triton 3.6 only"
    bwd = head_dim in K._WS_BWD_CONFIGS["dq"]

    def taken(q, k, v, c):
        d = q.shape[-1]
        return all(K._ws_ok(q, k, v, False, d, K._block_d(d), -1, 0 if c else -1, 0.0, dout=dout)
                   for dout in ((None, q) if bwd else (None,)))  # (q: dout's layout, contiguous like it)

    return _flag_variant(fn, "WS", taken, ("fwd", "bwd", "fwd+bwd") if bwd else ("fwd",))


def _sm90_variant(fn, head_dim, bwd=False):
    """fn with the CUDA Hopper forward on (FASTLM_ATTENTION_SM90=1: csrc/sm90/attention.cu; the
    backward stays the Triton one, so fwd+bwd rows time the pair), or with bwd its backward too
    (FASTLM_ATTENTION_SM90_BWD=1: bwd and fwd+bwd rows); or why it cannot run."""
    from fastlm import _C_loader

    if torch.cuda.get_device_capability() != (9, 0):
        return "skipped: the CUDA Hopper forward runs on sm_90 only"
    if not _C_loader.HAVE_SM90:
        return f"skipped: {_C_loader.WHY_NO_SM90}"
    if head_dim not in (64, 128):
        return "skipped: the CUDA Hopper forward takes head_dim 64 and 128"

    def taken(q, k, v, c):
        args = (False, q.shape[-1], -1, 0 if c else -1, 0.0)
        return K._sm90_ok(q, k, v, *args) and (not bwd or K._sm90_bwd_ok(q, k, v, q, *args, False))

    if bwd:
        return _flag_variant(fn, ("SM90", "SM90_BWD"), taken, ("bwd", "fwd+bwd"))
    return _flag_variant(fn, "SM90", taken, ("fwd", "fwd+bwd"))


def dense_impls(head_dim, seqlen, gqa=False):
    """name -> f(q, k, v, causal) or a 'skipped: why' string."""
    triton_fn = lambda q, k, v, c: fastlm.ops.attention(q, k, v, causal=c, backend="triton")  # noqa: E731
    # Run order = what a run cut short by its time budget keeps: fastlm and SDPA (the targets'
    # comparison) first, then fastlm's variants, then the other peers.
    impls = {
        "fastlm-triton": triton_fn,
        "sdpa-flash": _sdpa("FLASH_ATTENTION"),
        "sdpa-cudnn": _sdpa("CUDNN_ATTENTION"),
        "sdpa-efficient": _sdpa("EFFICIENT_ATTENTION"),
        "fastlm-triton-tma": _tma_variant(triton_fn),
        "fastlm-triton-ws": _ws_variant(triton_fn, head_dim),
        "fastlm-cuda-sm90": _sm90_variant(triton_fn, head_dim),
        "fastlm-cuda-sm90-bwd": _sm90_variant(triton_fn, head_dim, bwd=True),
        "fastlm-triton-det": (lambda q, k, v, c: fastlm.ops.attention(q, k, v, causal=c, deterministic=True,
                                                                      backend="triton"))
        if head_dim == 128 else "skipped: deterministic backward timed at head_dim 128 only (compile time)",
    }
    if seqlen in FLEX_SEQLENS and head_dim == 128:
        impls["flex-attention"] = _flex
    else:
        impls["flex-attention"] = f"skipped: only at head_dim 128, seqlen {FLEX_SEQLENS} (compile time)"
    fa2 = optional_module("flash_attn")
    impls["flash_attn"] = ((lambda q, k, v, c: fa2.flash_attn_func(q, k, v, causal=c)) if fa2
                           else "skipped: not installed")
    fa3 = optional_module("flash_attn_interface")
    if fa3 is None:
        impls["flash_attn_3"] = "skipped: not installed"
    else:
        impls["flash_attn_3"] = lambda q, k, v, c: _first(fa3.flash_attn_func(q, k, v, causal=c))
    if seqlen <= SMALL_REF:
        impls["reference-eager"] = lambda q, k, v, c: reference.attention(q, k, v, causal=c)
        if head_dim == 128 and not gqa:
            ref_c = compiled(lambda q, k, v, c: reference.attention(q, k, v, causal=c))
            impls["reference-compiled"] = ref_c
        else:
            impls["reference-compiled"] = "skipped: only at head_dim 128 (compile time)"
    else:
        impls["reference-eager"] = impls["reference-compiled"] = f"skipped: only seqlen <= {SMALL_REF} (O(S^2) memory)"
    return impls


def _first(x):
    return x[0] if isinstance(x, tuple) else x


def time_mode(fn, mode, inputs, warmup=5, rep=30):
    """(ms, p20, p80) of fn(*inputs) in `mode`; inputs[:3] are differentiated."""
    leaves = inputs[:3]
    if mode == "fwd":
        with torch.no_grad():
            return bench(lambda: fn(*inputs), warmup=warmup, rep=rep)
    for t in leaves:
        t.requires_grad_(True)
    try:
        out = fn(*inputs)
        dout = torch.randn_like(out)
        if mode == "bwd":
            return bench(lambda: torch.autograd.grad(out, leaves, dout, retain_graph=True), warmup=warmup, rep=rep)
        return bench(lambda: torch.autograd.grad(fn(*inputs), leaves, dout), warmup=warmup, rep=rep)
    finally:
        for t in leaves:
            t.requires_grad_(False)


def run_case(res, impls, base, inputs, flops, modes, peak, det_modes=("bwd", "fwd+bwd")):
    for mode in modes:
        row0 = dict(base, mode=mode)
        tflops = {}
        for name, fn in impls.items():
            if name.endswith("-det") and mode not in det_modes:
                continue  # deterministic=True only changes the backward
            if name.endswith("-tma") and mode == "bwd":
                continue  # TMA only changes the forward
            if isinstance(fn, str):
                res.skipped(name, fn.split(": ", 1)[1], **row0)
                continue
            if mode not in getattr(fn, "modes", (mode,)):
                res.skipped(name, f"{mode}: not at this head_dim", **row0)
                continue
            if not getattr(fn, "applies", lambda *a: True)(*inputs):
                res.skipped(name, "not taken at this shape", **row0)
                continue
            try:
                ms, p20, p80 = time_mode(fn, mode, inputs)
            except Exception as e:  # a peer failing must not hide the others
                res.add(**row0, impl=name, status=f"error: {type(e).__name__}: {e}"[:200])
                continue
            tf = flops[mode] / ms / 1e9
            tflops[name] = tf
            res.add(**row0, impl=name, ms=ms, p20=p20, p80=p80, TFLOPs=tf, pct_matmul=100 * tf / peak)
        sdpa = {k: v for k, v in tflops.items() if k.startswith("sdpa-")}
        for name in ("fastlm-triton", "fastlm-triton-tma", "fastlm-triton-ws", "fastlm-cuda-sm90",
                     "fastlm-cuda-sm90-bwd"):
            if name in tflops and sdpa:
                best = max(sdpa, key=sdpa.get)
                res.add(**row0, impl=name, metric="vs_best_sdpa", best_sdpa=best, ratio=tflops[name] / sdpa[best])
        torch.cuda.empty_cache()


def main(argv=None):
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--modes", default="fwd,bwd,fwd+bwd", help="comma-separated subset of fwd,bwd,fwd+bwd")
    args = p.parse_args(argv)
    modes = [m for m in args.modes.split(",") if m]
    for m in modes:
        if m not in ("fwd", "bwd", "fwd+bwd"):
            p.error(f"unknown mode {m!r}")
    if not require_cuda("attention"):
        return
    res = Results("attention", args.out)
    peak = matmul_tflops()
    res.add(impl="device", metric="bf16_matmul_TFLOPs", value=peak)
    dtype = torch.bfloat16
    gen = torch.Generator(device="cuda").manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, device="cuda", dtype=dtype, generator=gen)

    for d, s, causal in dense_shapes(args.quick):
        b, h = TOKENS // s, MODEL_DIM // d
        q, k, v = randn(b, s, h, d), randn(b, s, h, d), randn(b, s, h, d)
        base = dict(case="dense", head_dim=d, seqlen=s, batch=b, heads=h, kv_heads=h, causal=causal, dtype="bf16")
        flops = {m: attn_flops(b, h, s, s, d, causal, m) for m in ("fwd", "bwd", "fwd+bwd")}
        run_case(res, dense_impls(d, s), base, (q, k, v, causal), flops, modes, peak)
        del q, k, v

    if not args.quick:
        # GQA: 16 query heads on 2 kv heads, head_dim 128, seqlen 4k.
        d, s, h, hk = 128, 4096, 16, 2
        b = TOKENS // s
        q, k, v = randn(b, s, h, d), randn(b, s, hk, d), randn(b, s, hk, d)
        for causal in (False, True):
            base = dict(case="gqa", head_dim=d, seqlen=s, batch=b, heads=h, kv_heads=hk, causal=causal, dtype="bf16")
            flops = {m: attn_flops(b, h, s, s, d, causal, m) for m in ("fwd", "bwd", "fwd+bwd")}
            run_case(res, dense_impls(d, s, gqa=True), base, (q, k, v, causal), flops, modes, peak)
        del q, k, v
        run_varlen(res, randn, modes, peak)
    else:
        for case in ("gqa", "varlen"):
            res.add(case=case, impl="all", status="skipped: --quick (dense shapes only)")
    for key, atomic in K._ATOMIC_PICKS.items():
        res.add(impl="fastlm-triton", metric="dq_pick", key=str(key), dq="atomic" if atomic else "separate kernel")
    res.write()


def run_varlen(res, randn, modes, peak, device="cuda", tokens=TOKENS, h=16):
    """Packed documents (random lengths, 16k tokens), causal, head_dim 128, 16 heads."""
    d = 128
    lens = doc_lengths(tokens, lo=min(128, tokens), hi=min(4096, tokens))
    cu = torch.tensor([0] + [sum(lens[: i + 1]) for i in range(len(lens))], dtype=torch.int32, device=device)
    q, k, v = randn(tokens, h, d), randn(tokens, h, d), randn(tokens, h, d)
    mx = max(lens)
    impls = {
        "fastlm-triton": lambda q, k, v: fastlm.ops.attention(q, k, v, causal=True, cu_seqlens_q=cu, cu_seqlens_k=cu,
                                                              max_seqlen_q=mx, max_seqlen_k=mx, backend="triton"),
        "fastlm-triton-det": lambda q, k, v: fastlm.ops.attention(q, k, v, causal=True, cu_seqlens_q=cu,
                                                                  cu_seqlens_k=cu, max_seqlen_q=mx, max_seqlen_k=mx,
                                                                  deterministic=True, backend="triton"),
    }
    impls["fastlm-triton-tma"] = _tma_variant(impls["fastlm-triton"])
    fa2 = optional_module("flash_attn")
    impls["flash_attn"] = (lambda q, k, v: fa2.flash_attn_varlen_func(q, k, v, cu, cu, mx, mx, causal=True)) \
        if fa2 else "skipped: not installed"
    try:
        from torch.nn.attention.flex_attention import create_block_mask

        doc = torch.repeat_interleave(torch.arange(len(lens), device=device), torch.tensor(lens, device=device))

        def doc_causal(b, hh, qi, ki):
            return (doc[qi] == doc[ki]) & (qi >= ki)

        bm = create_block_mask(doc_causal, None, None, tokens, tokens, device=device)
        def flex_varlen(q, k, v):
            o = _flex_compiled()(q[None].transpose(1, 2), k[None].transpose(1, 2), v[None].transpose(1, 2),
                                 block_mask=bm)
            return o[0].transpose(0, 1)

        impls["flex-attention"] = flex_varlen
    except Exception as e:
        impls["flex-attention"] = f"skipped: {type(e).__name__}: {e}"[:200]
    # SDPA has no packed form: its users loop over the documents (one launch each).
    bounds = list(zip(cu[:-1].tolist(), cu[1:].tolist()))
    for name in ("FLASH_ATTENTION", "CUDNN_ATTENTION"):
        one = _sdpa(name)

        def per_doc(q, k, v, one=one):
            return torch.cat([one(q[None, a:b], k[None, a:b], v[None, a:b], True)[0] for a, b in bounds])

        impls[f"sdpa-{name.split('_')[0].lower()}-per-doc"] = per_doc
    base = dict(case="varlen", head_dim=d, seqlen=mx, batch=len(lens), heads=h, kv_heads=h, causal=True,
                dtype=str(q.dtype).split(".")[-1], tokens=tokens)
    flops = {m: varlen_flops(lens, h, d, True, m) for m in ("fwd", "bwd", "fwd+bwd")}
    run_case(res, impls, base, (q, k, v), flops, modes, peak)


if __name__ == "__main__":
    run_module(main)
