"""RMSNorm / LayerNorm benchmark: forward, backward, forward+backward.

Reports achieved GB/s (bytes that must move / time), % of the copy bandwidth measured in this
run, and the ratio to torch eager (F.rms_norm / F.layer_norm, residual added separately), to
torch.compile of the reference, and to Liger-Kernel and apex when installed (they have no fused
residual: theirs is added by a separate torch add, as their users do).

Bytes moved (T = element size, rows x N): forward reads x (+ residual) and writes out (+ h);
backward reads dy, h (+ grad of h) and writes dx; weight/bias and per-row stats are included.
"""

import torch
import torch.nn.functional as F

from benchmarks.common import (Results, bench, compiled, copy_bandwidth_gbs, optional_module, parser, require_cuda,
                               run_module, speedups)

import fastlm
from fastlm import reference

CASES = [("rms", True), ("rms", False), ("ln", True), ("ln", False)]  # (kind, fused residual)


def nbytes(kind, residual, rows, n, esize, mode):
    stats = rows * 4 * (1 if kind == "rms" else 2)
    params = n * esize * (1 if kind == "rms" else 2)
    fwd = rows * n * esize * (2 + 2 * residual) + params + stats
    bwd = rows * n * esize * (3 + residual) + params * 2 + stats
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[mode]


def make_impls(kind, residual, eps):
    """name -> f(x, w, b, r) returning the tensors to differentiate (or None if unavailable)."""
    impls = {}

    def ours(backend):
        if kind == "rms":
            return lambda x, w, b, r: fastlm.ops.rms_norm(x, w, eps, residual=r, backend=backend)
        return lambda x, w, b, r: fastlm.ops.layer_norm(x, w, b, eps, residual=r, backend=backend)

    impls["fastlm-triton"] = ours("triton")
    from fastlm import _C_loader

    impls["fastlm-cuda"] = ours("cuda") if _C_loader.HAVE_CUDA_KERNELS else "skipped: fastlm._C built without CUDA"

    def eager(x, w, b, r):
        h = x + r if r is not None else x
        y = F.rms_norm(h, (h.shape[-1],), w, eps) if kind == "rms" else F.layer_norm(h, (h.shape[-1],), w, b, eps)
        return (y, h) if r is not None else y

    impls["torch-eager"] = eager
    if kind == "rms":
        ref = lambda x, w, b, r: reference.rms_norm(x, w, eps, residual=r)  # noqa: E731
    else:
        ref = lambda x, w, b, r: reference.layer_norm(x, w, b, eps, residual=r)  # noqa: E731
    impls["torch-compile"] = compiled(ref)

    # Peers without a fused residual add it the way their users do: a separate torch add.
    def with_residual(norm):
        def fn(x, w, b, r):
            if r is None:
                return norm(x, w, b)
            h = x + r
            return norm(h, w, b), h

        return fn

    liger = optional_module("liger_kernel.ops.rms_norm") if kind == "rms" else optional_module("liger_kernel.ops.layer_norm")
    if liger is None:
        impls["liger"] = "skipped: not installed"
    elif kind == "rms":
        impls["liger"] = with_residual(lambda x, w, b: liger.LigerRMSNormFunction.apply(x, w, eps))
    else:
        impls["liger"] = with_residual(lambda x, w, b: liger.LigerLayerNormFunction.apply(x, w, b, eps))
    apex = optional_module("apex.normalization.fused_layer_norm")
    if apex is None:
        impls["apex"] = "skipped: not installed"
    elif kind == "rms":
        impls["apex"] = with_residual(lambda x, w, b: apex.fused_rms_norm_affine(x, w, (x.shape[-1],), eps))
    else:
        impls["apex"] = with_residual(lambda x, w, b: apex.fused_layer_norm_affine(x, w, b, (x.shape[-1],), eps))
    return impls


def run_one(fn, mode, x, w, b, r):
    leaves = [t for t in (x, w, b, r) if t is not None]
    if mode == "fwd":
        with torch.no_grad():
            return bench(lambda: fn(x, w, b, r), warmup=10, rep=40)
    for t in leaves:
        t.requires_grad_(True)
    out = fn(x, w, b, r)
    outs = list(out) if isinstance(out, tuple) else [out]
    grads = [torch.randn_like(o) for o in outs]
    try:
        if mode == "bwd":
            return bench(lambda: torch.autograd.grad(outs, leaves, grads, retain_graph=True), warmup=10, rep=40)

        def step():
            o = fn(x, w, b, r)
            os_ = list(o) if isinstance(o, tuple) else [o]
            torch.autograd.grad(os_, leaves, grads)

        return bench(step, warmup=10, rep=40)
    finally:
        for t in leaves:
            t.requires_grad_(False)


def main(argv=None):
    args = parser(__doc__.splitlines()[0]).parse_args(argv)
    if not require_cuda("norm"):
        return
    res = Results("norm", args.out)
    copy_bw = copy_bandwidth_gbs()
    res.add(impl="device", metric="copy_bandwidth_GBps", value=copy_bw)
    shapes = [(dt, rows, n) for dt in (torch.bfloat16,) for rows in (4096, 32768) for n in (1024, 2048, 4096, 8192, 16384)]
    shapes += [(torch.float16, 16384, 4096)]
    if args.quick:
        shapes = [(torch.bfloat16, 16384, 4096), (torch.bfloat16, 4096, 16384)]
    for kind, residual in CASES:
        impls = make_impls(kind, residual, 1e-6 if kind == "rms" else 1e-5)
        for dtype, rows, n in shapes:
            x = torch.randn(rows, n, device="cuda", dtype=dtype)
            r = torch.randn_like(x) if residual else None
            w = torch.randn(n, device="cuda", dtype=dtype)
            b = torch.randn(n, device="cuda", dtype=dtype) if kind == "ln" else None
            for mode in ("fwd", "bwd", "fwd+bwd"):
                base = dict(kind=kind, residual=residual, dtype=str(dtype).split(".")[-1], rows=rows, hidden=n, mode=mode)
                times = {}
                for name, fn in impls.items():
                    if isinstance(fn, str):
                        res.skipped(name, fn.split(": ", 1)[1], **base)
                        continue
                    try:
                        ms, p20, p80 = run_one(fn, mode, x, w, b, r)
                    except Exception as e:  # a peer failing must not hide the others
                        res.add(**base, impl=name, status=f"error: {type(e).__name__}: {e}"[:200])
                        continue
                    times[name] = ms
                    gbs = nbytes(kind, residual, rows, n, x.element_size(), mode) / ms / 1e6
                    row = dict(base, impl=name, ms=ms, p20=p20, p80=p80, GBps=gbs, pct_copy_bw=100 * gbs / copy_bw)
                    res.add(**row)
                for name in ("fastlm-triton", "fastlm-cuda"):
                    if name in times:  # a peer that did not run: None ("not measured")
                        res.add(**base, impl=name, metric="speedup",
                                **speedups(times, name, ("torch-eager", "torch-compile", "liger", "apex")))
            del x, r, w, b
    res.write()


if __name__ == "__main__":
    run_module(main)
