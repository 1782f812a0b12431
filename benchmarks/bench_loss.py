"""Cross-entropy benchmark: the loss kernel alone, and the lm_head fused with its loss.

cross_entropy (bf16 logits, rows x vocab): forward and forward+backward GB/s (bytes that must
move: forward reads the logits once; forward + backward reads them once and writes their
gradient once, 2 x rows x vocab -- a floor, below fastlm's own 3 x of two kernels) and %
of the copy bandwidth measured in this run, beside the eager reference (fp32 upcast, as the
model's reference does), torch.compile of it and Liger-Kernel when installed.

linear_cross_entropy (the training head: bf16 h (tokens x dim), weight (vocab x dim)): forward
+ backward time, TFLOP/s of its three GEMMs (6 x tokens x dim x vocab) and % of the matmul rate
measured in this run, and the peak memory above the inputs, beside the eager reference (F.linear
+ fp32 cross-entropy), torch.compile of it and Liger's fused linear cross-entropy.
Shapes: the Llama-3.2-1B head (dim 2048, vocab 128256, 8k tokens) and GPT-2's (768, 50257, 32k);
and that 1B head with the loss options on (label smoothing 0.1, z-loss 1e-4, softcap 30: Gemma 2's
final-logit cap), beside the same reference and Liger's loss module with the same options; and
with reduction="none" (per-token losses, here summed with per-token weights: fastlm and Liger
both recompute the logits in the backward, four GEMMs instead of three), rows options=reduction-none.
"""

import torch

from benchmarks.common import (Results, bench, compiled, copy_bandwidth_gbs, matmul_tflops, optional_module, parser,
                               require_cuda, run_module, speedups)

import fastlm
from fastlm import reference

CE_SHAPES = [(8192, 128256), (32768, 50257)]
LCE_SHAPES = [("llama-3.2-1b", 8192, 2048, 128256), ("gpt2-124m", 32768, 768, 50257)]
OPTIONS = dict(label_smoothing=0.1, z_loss=1e-4, softcap=30.0)  # the "options" head


def ce_bytes(M, V, esize, mode):
    """The floor of what must move: forward reads the logits once (+ targets, loss); forward +
    backward reads them once and writes their gradient once (2 M V -- what one kernel computing
    the loss and the gradient together could reach; a separate backward re-reads them)."""
    fwd = M * V * esize + M * 8 + M * 4
    return fwd if mode == "fwd" else fwd + M * V * esize + M * 4


def _liger(module, cls):
    mod = optional_module(module)
    if mod is None:
        return "skipped: not installed"
    fn = getattr(mod, cls, None)
    return fn if fn is not None else f"skipped: {module}.{cls} not found"


def ce_impls():
    impls = {
        "fastlm-triton": lambda x, t: fastlm.ops.cross_entropy(x, t, backend="triton"),
        "torch-eager": lambda x, t: reference.cross_entropy(x, t),
        "torch-compile": compiled(reference.cross_entropy),
    }
    liger = _liger("liger_kernel.ops.cross_entropy", "LigerCrossEntropyFunction")
    impls["liger"] = liger if isinstance(liger, str) else (lambda x, t: liger.apply(x, t)[0])
    return impls


def _weighted(t):
    """Per-token weights in {0.5, 1, 1.5} (from the targets: no extra state) for reduction="none"."""
    return (t.remainder(3).float() + 1.0) * 0.5


def lce_impls(options=False, reduction="mean"):
    """options: the loss options of OPTIONS on, for every implementation.  reduction "none": each
    returns its per-token losses summed with _weighted's weights (a scalar to differentiate)."""
    kw = OPTIONS if options else {}

    def ref(h, w, t):
        return reference.linear_cross_entropy(h, w, t, None, -100, reduction, kw.get("label_smoothing", 0.0),
                                              kw.get("z_loss", 0.0), kw.get("softcap", 0.0))

    impls = {
        "fastlm-triton": lambda h, w, t: fastlm.ops.linear_cross_entropy(h, w, t, reduction=reduction,
                                                                         backend="triton", **kw),
        "torch-eager": ref,
        "torch-compile": compiled(ref),
    }
    if reduction == "none":
        liger = _liger("liger_kernel.transformers", "LigerFusedLinearCrossEntropyLoss")
        if isinstance(liger, str):
            impls["liger"] = liger
        else:
            loss = liger(ignore_index=-100, reduction="none")
            impls["liger"] = lambda h, w, t: loss(w, h, t)
        return {name: fn if isinstance(fn, str) else (lambda h, w, t, f=fn: (f(h, w, t) * _weighted(t)).sum())
                for name, fn in impls.items()}
    if not options:
        liger = _liger("liger_kernel.ops.fused_linear_cross_entropy", "LigerFusedLinearCrossEntropyFunction")
        impls["liger"] = liger if isinstance(liger, str) else (lambda h, w, t: liger.apply(h, w, t)[0])
        return impls
    liger = _liger("liger_kernel.transformers", "LigerFusedLinearCrossEntropyLoss")
    if isinstance(liger, str):
        impls["liger"] = liger
    else:
        loss = liger(ignore_index=-100, lse_square_scale=OPTIONS["z_loss"], label_smoothing=OPTIONS["label_smoothing"],
                     softcap=OPTIONS["softcap"])
        impls["liger"] = lambda h, w, t: loss(w, h, t)
    return impls


def time_grad(fn, inputs, t, mode):
    """(ms, p20, p80) of fn forward (no grad) or forward + backward."""
    if mode == "fwd":
        with torch.no_grad():
            return bench(lambda: fn(*inputs, t), warmup=5, rep=30)
    for x in inputs:
        x.requires_grad_(True)
    try:
        return bench(lambda: torch.autograd.grad(fn(*inputs, t), inputs), warmup=5, rep=30)
    finally:
        for x in inputs:
            x.requires_grad_(False)


def peak_gb(fn, inputs, t):
    """Peak memory (GB) of one forward + backward above what was allocated before it."""
    for x in inputs:
        x.requires_grad_(True)
    try:
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        grads = torch.autograd.grad(fn(*inputs, t), inputs)
        torch.cuda.synchronize()
        del grads
        return (torch.cuda.max_memory_allocated() - base) / 1e9
    finally:
        for x in inputs:
            x.requires_grad_(False)


def _targets(M, V):
    t = torch.randint(0, V, (M,), device="cuda")
    t[::97] = -100  # some ignored positions, as with padding
    return t


def main(argv=None):
    args = parser(__doc__.splitlines()[0]).parse_args(argv)
    if not require_cuda("loss"):
        return
    res = Results("loss", args.out)
    copy_bw, mm = copy_bandwidth_gbs(), matmul_tflops()
    res.add(impl="device", metric="copy_bandwidth_GBps", value=copy_bw)
    res.add(impl="device", metric="matmul_bf16_TFLOPs", value=mm)
    ce_shapes = CE_SHAPES[:1] if args.quick else CE_SHAPES
    lce_shapes = LCE_SHAPES[:1] if args.quick else LCE_SHAPES

    impls = ce_impls()
    for M, V in ce_shapes:
        x = torch.randn(M, V, device="cuda", dtype=torch.bfloat16) * 2
        t = _targets(M, V)
        for mode in ("fwd", "fwd+bwd"):
            base = dict(op="cross_entropy", rows=M, vocab=V, dtype="bfloat16", mode=mode)
            times = {}
            for name, fn in impls.items():
                if isinstance(fn, str):
                    res.skipped(name, fn.split(": ", 1)[1], **base)
                    continue
                try:
                    ms, p20, p80 = time_grad(fn, [x], t, mode)
                except Exception as e:  # a peer failing must not hide the others
                    res.add(**base, impl=name, status=f"error: {type(e).__name__}: {e}"[:200])
                    continue
                times[name] = ms
                gbs = ce_bytes(M, V, 2, mode) / ms / 1e6
                res.add(**base, impl=name, ms=ms, p20=p20, p80=p80, GBps=gbs, pct_copy_bw=100 * gbs / copy_bw)
            if "fastlm-triton" in times:
                res.add(**base, impl="fastlm-triton", metric="speedup",
                        **speedups(times, "fastlm-triton", ("torch-eager", "torch-compile", "liger")))
        del x
        torch.cuda.empty_cache()

    variants = [(*s, False, "mean") for s in lce_shapes] + [(*LCE_SHAPES[0], True, "mean"),
                                                             (*LCE_SHAPES[0], False, "none")]
    for preset, M, D, V, options, reduction in variants:
        impls = lce_impls(options, reduction)
        h = torch.randn(M, D, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(V, D, device="cuda", dtype=torch.bfloat16) * D**-0.5
        t = _targets(M, V)
        label = ",".join(f"{k}={v}" for k, v in OPTIONS.items()) if options else "none"
        base = dict(op="linear_cross_entropy", head=preset, tokens=M, dim=D, vocab=V, dtype="bfloat16", mode="fwd+bwd",
                    options="reduction-none" if reduction == "none" else label)
        times = {}
        for name, fn in impls.items():
            if isinstance(fn, str):
                res.skipped(name, fn.split(": ", 1)[1], **base)
                continue
            try:
                ms, p20, p80 = time_grad(fn, [h, w], t, "fwd+bwd")
                gb = peak_gb(fn, [h, w], t)
            except Exception as e:
                res.add(**base, impl=name, status=f"error: {type(e).__name__}: {e}"[:200])
                torch.cuda.empty_cache()
                continue
            times[name] = ms
            tflops = 6 * M * D * V / ms / 1e9
            res.add(**base, impl=name, ms=ms, p20=p20, p80=p80, TFLOPs=tflops, pct_matmul=100 * tflops / mm,
                    peak_extra_GB=gb)
            torch.cuda.empty_cache()
        if "fastlm-triton" in times:
            res.add(**base, impl="fastlm-triton", metric="speedup",
                    **speedups(times, "fastlm-triton", ("torch-eager", "torch-compile", "liger")))
        del h, w
        torch.cuda.empty_cache()
    res.write()


if __name__ == "__main__":
    run_module(main)
