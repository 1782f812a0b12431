"""Gated activation benchmark (SwiGLU, GeGLU): forward, backward, forward+backward.

The Llama MLP's activation silu(gate) * up on the stacked (rows, 2F) [gate | up] projection,
bf16, rows 4k-32k tokens, F = 2816 (GPT-2-size MLP), 5632, 8192, 14336 (Llama-3-8B); and
Gemma's GeGLU, gelu_tanh(gate) * up, at F = 9216 (Gemma-2-2B) and 16384 (Gemma-7B), beside
the same peers with gelu (Liger: LigerGELUMulFunction).  Rows carry act=swiglu|geglu.

Reports achieved GB/s and % of the copy bandwidth measured in this run, beside:
  torch-eager      F.silu(gate) * up on the chunks in bf16 (what HF Llama runs)
  reference-eager  fastlm.reference.swiglu (fp32 math, one rounding: fastlm's numerics)
  torch-compile    torch.compile(fastlm.reference.swiglu)
  liger            Liger-Kernel's LigerSiLUMulFunction (split gate / up tensors) when installed
and a sweep of the kernel's column tile (kernels/activation.MAX_BLOCK) on one large shape, so
the tile rule can be checked against measurements.

Bytes moved, the floor of any implementation (T = element size): forward reads gate and up,
writes out: 3 rows F T; backward reads dy, gate, up and writes dgate, dup: 5 rows F T
(recomputing silu from the saved input); forward+backward 8 rows F T.
Target on an H100: >= 90% of the copy bandwidth at the large shapes.
"""

import torch
import torch.nn.functional as F

from benchmarks.common import (Results, bench, compiled, copy_bandwidth_gbs, optional_module, parser, require_cuda,
                               run_module, speedups)

import fastlm
from fastlm import reference

ROWS = (4096, 32768)
WIDTHS = (2816, 5632, 8192, 14336)
SWEEP_SHAPE = (32768, 14336)
SWEEP_BLOCKS = (256, 512, 1024, 2048, 4096)
MODES = ("fwd", "bwd", "fwd+bwd")


GEGLU_SHAPES = ((16384, 9216), (4096, 16384))


def shapes(quick=False):
    """(act, dtype, rows, F) of every measured case."""
    if quick:
        return [("swiglu", torch.bfloat16, 16384, 14336), ("swiglu", torch.bfloat16, 4096, 2816),
                ("geglu", torch.bfloat16, *GEGLU_SHAPES[0])]
    return ([("swiglu", torch.bfloat16, rows, f) for rows in ROWS for f in WIDTHS]
            + [("geglu", torch.bfloat16, rows, f) for rows, f in GEGLU_SHAPES])


def nbytes(rows, f, esize, mode):
    return {"fwd": 3, "bwd": 5, "fwd+bwd": 8}[mode] * rows * f * esize


def make_impls(act="swiglu"):
    """name -> (layout, f(*inputs) -> out) or a 'skipped: why' string, for act "swiglu" or
    "geglu" (gelu's tanh approximation, as Gemma and Liger).

    layout "stacked": inputs = (x,) with x (rows, 2F); "split": inputs = (gate, up), each a
    contiguous (rows, F) tensor (what Liger expects)."""
    if act == "swiglu":
        ours, activation = fastlm.ops.swiglu, F.silu
        ref = reference.swiglu
        liger_mod, liger_fn = "liger_kernel.ops.swiglu", "LigerSiLUMulFunction"
    else:
        def ours(x, up=None, backend=None):
            return fastlm.ops.geglu(x, up, approximate="tanh", backend=backend)

        def activation(g):
            return F.gelu(g, approximate="tanh")

        def ref(x):
            return reference.geglu(x, approximate="tanh")
        liger_mod, liger_fn = "liger_kernel.ops.geglu", "LigerGELUMulFunction"

    def eager(x):
        g, u = x.chunk(2, -1)
        return activation(g) * u

    impls = {
        "fastlm-triton": ("stacked", lambda x: ours(x, backend="triton")),
        "fastlm-triton-split": ("split", lambda g, u: ours(g, u, backend="triton")),
        "torch-eager": ("stacked", eager),
        "reference-eager": ("stacked", ref),
        "torch-compile": ("stacked", compiled(ref)),
    }
    liger = optional_module(liger_mod)
    if liger is None:
        impls["liger"] = "skipped: not installed"
    else:
        impls["liger"] = ("split", lambda g, u: getattr(liger, liger_fn).apply(g, u))
    return impls


def run_one(fn, mode, inputs):
    """Median/p20/p80 ms of fn(*inputs) in `mode` (the backward alone reuses one graph)."""
    if mode == "fwd":
        with torch.no_grad():
            return bench(lambda: fn(*inputs), warmup=10, rep=40)
    for t in inputs:
        t.requires_grad_(True)
    try:
        out = fn(*inputs)
        dy = torch.randn_like(out)
        if mode == "bwd":
            return bench(lambda: torch.autograd.grad(out, inputs, dy, retain_graph=True), warmup=10, rep=40)
        return bench(lambda: torch.autograd.grad(fn(*inputs), inputs, dy), warmup=10, rep=40)
    finally:
        for t in inputs:
            t.requires_grad_(False)


def sweep_tiles(res, copy_bw):
    """GB/s of the kernel for each column tile MAX_BLOCK on one large shape (fwd and bwd)."""
    from fastlm.kernels import activation as K

    rows, f = SWEEP_SHAPE
    x = torch.randn(rows, 2 * f, device="cuda", dtype=torch.bfloat16)
    saved = K.MAX_BLOCK
    try:
        for block in SWEEP_BLOCKS:
            K.MAX_BLOCK = block
            for mode in ("fwd", "bwd"):
                ms, p20, p80 = run_one(lambda t: fastlm.ops.swiglu(t, backend="triton"), mode, (x,))
                gbs = nbytes(rows, f, 2, mode) / ms / 1e6
                res.add(impl="fastlm-triton", sweep="MAX_BLOCK", max_block=block,
                        warps=K.launch_config(rows, f, 2)[2], rows=rows, F=f, mode=mode, ms=ms, p20=p20, p80=p80,
                        GBps=gbs, pct_copy_bw=100 * gbs / copy_bw)
    finally:
        K.MAX_BLOCK = saved


def main(argv=None):
    args = parser(__doc__.splitlines()[0]).parse_args(argv)
    if not require_cuda("activation"):
        return
    res = Results("activation", args.out)
    copy_bw = copy_bandwidth_gbs()
    res.add(impl="device", metric="copy_bandwidth_GBps", value=copy_bw)
    impls = {act: make_impls(act) for act in ("swiglu", "geglu")}
    for act, dtype, rows, f in shapes(args.quick):
        x = torch.randn(rows, 2 * f, device="cuda", dtype=dtype) * 3
        split = tuple(t.contiguous() for t in x.chunk(2, -1))
        for mode in MODES:
            base = dict(act=act, dtype=str(dtype).split(".")[-1], rows=rows, F=f, mode=mode)
            times = {}
            for name, impl in impls[act].items():
                if isinstance(impl, str):
                    res.skipped(name, impl.split(": ", 1)[1], **base)
                    continue
                layout, fn = impl
                try:
                    ms, p20, p80 = run_one(fn, mode, (x,) if layout == "stacked" else split)
                except Exception as e:  # a peer failing must not hide the others
                    res.add(**base, impl=name, status=f"error: {type(e).__name__}: {e}"[:200])
                    continue
                times[name] = ms
                gbs = nbytes(rows, f, x.element_size(), mode) / ms / 1e6
                res.add(**base, impl=name, layout=layout, ms=ms, p20=p20, p80=p80, GBps=gbs,
                        pct_copy_bw=100 * gbs / copy_bw)
            for name in ("fastlm-triton", "fastlm-triton-split"):
                if name in times:
                    res.add(**base, impl=name, metric="speedup", **speedups(times, name, {
                        "eager": "torch-eager", "reference": "reference-eager", "compile": "torch-compile",
                        "liger": "liger"}))
        del x, split
    if not args.quick:
        sweep_tiles(res, copy_bw)
    res.write()


if __name__ == "__main__":
    run_module(main)
