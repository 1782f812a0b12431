"""Rotary embedding benchmark: q and k together, forward and backward.

Reports achieved GB/s and % of the copy bandwidth measured in this run, beside torch eager
(fastlm.reference.apply_rotary), torch.compile of that reference and Liger-Kernel's rope when
installed, for the Llama-3-8B (32 q heads, 8 kv heads, head_dim 128) and Llama-3.2-1B
(32 / 8, head_dim 64) head shapes at 1 to 64k tokens, bf16.

Bytes moved, the floor of any implementation: read q and k once and write them once,
2 * (Hq + Hk) * head_dim * element_size per token (the cos/sin rows, ~1-2% more, stay in L2
and are not counted).  Forward is out of place (fresh outputs) and in place for fastlm;
backward is the gradient kernel alone (autograd of an already-computed forward).
Target on an H100: >= 85% of the copy bandwidth at >= 16k tokens and >= 1.2x torch.compile.

Rows with op=qk_norm_rotary: Qwen3-8B's per-head q/k RMSNorm + rotary (fastlm.ops.qk_norm_rotary,
one launch each way, q and k read in place from views of the qkv projection) beside what the
fused model ran before it (fastlm-unfused: two ops.rms_norm launches, which copy the strided
views, then ops.apply_rotary), HF Qwen3's eager arithmetic and torch.compile of it; the same
byte floor (the weights and the fp32 rstd, < 1%, are not counted).
"""

import torch

from benchmarks.common import (Results, bench, compiled, copy_bandwidth_gbs, optional_module, parser, require_cuda,
                               run_module, speedups)

import fastlm
from fastlm import reference

MODELS = {"llama3-8b": (32, 8, 128), "llama3.2-1b": (32, 8, 64)}
QK_NORM_MODELS = {"qwen3-8b": (32, 8, 128)}
TOKENS = [1, 1024, 4096, 16384, 65536]


def layout(tokens):
    """(batch, seqlen) for a token count: sequences of at most 4096 tokens."""
    batch = max(1, tokens // 4096)
    return batch, tokens // batch


def nbytes(tokens, hq, hk, d, esize):
    return 2 * tokens * (hq + hk) * d * esize


def make_impls():
    """name -> f(q, k, cos, sin) -> (q_out, k_out), or a 'skipped: why' string."""
    from fastlm import _C_loader

    impls = {
        "fastlm-triton": lambda q, k, c, s: fastlm.ops.apply_rotary(q, k, c, s, backend="triton"),
        "fastlm-triton-inplace": lambda q, k, c, s: fastlm.ops.apply_rotary(q, k, c, s, inplace=True,
                                                                            backend="triton"),
    }
    if _C_loader.HAVE_CUDA_KERNELS and hasattr(torch.ops.fastlm, "rotary_cuda"):
        impls["fastlm-cuda"] = lambda q, k, c, s: fastlm.ops.apply_rotary(q, k, c, s, backend="cuda")
        impls["fastlm-cuda-inplace"] = lambda q, k, c, s: fastlm.ops.apply_rotary(q, k, c, s, inplace=True,
                                                                                  backend="cuda")
    else:
        impls["fastlm-cuda"] = "skipped: fastlm._C built without the rotary CUDA kernel"

    def eager(q, k, c, s):
        return reference.apply_rotary(q, k, c, s)

    impls["torch-eager"] = eager
    impls["torch-compile"] = compiled(eager)  # at every size (decode's 1 token too); --quick runs one size
    liger = optional_module("liger_kernel.ops.rope")
    if liger is None:
        impls["liger"] = "skipped: not installed"
    else:
        full = {}  # Liger's tables, built once per shape outside the timed region

        def liger_rope(q, k, c, s):
            # Liger takes (batch, heads, seqlen, dim) views of (batch, seqlen, heads, dim) memory
            # and full-width (1, seqlen, dim) tables in the input dtype.
            S = q.shape[1]
            if (S, q.dtype) not in full:
                full[(S, q.dtype)] = tuple(torch.cat([t[:S], t[:S]], -1)[None].to(q.dtype) for t in (c, s))
            cf, sf = full[(S, q.dtype)]
            qo, ko = liger.LigerRopeFunction.apply(q.transpose(1, 2), k.transpose(1, 2), cf, sf)
            return qo.transpose(1, 2), ko.transpose(1, 2)

        impls["liger"] = liger_rope
    return impls


def make_qk_norm_impls(qw, kw, eps=1e-6):
    """name -> f(q, k, cos, sin): q/k RMSNorm with weights qw/kw, then rotary."""
    def fused(q, k, c, s):
        return fastlm.ops.qk_norm_rotary(q, k, qw, kw, c, s, eps=eps, backend="triton")

    def unfused(q, k, c, s):
        qn = fastlm.ops.rms_norm(q, qw, eps, backend="triton")
        kn = fastlm.ops.rms_norm(k, kw, eps, backend="triton")
        return fastlm.ops.apply_rotary(qn, kn, c, s, backend="triton")

    def eager(q, k, c, s):  # HF Qwen3RMSNorm, then apply_rotary_pos_emb in the input dtype
        def norm(x, w):
            xf = x.float()
            return w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)

        return reference.apply_rotary(norm(q, qw), norm(k, kw), c, s, upcast=False)

    return {"fastlm-triton": fused, "fastlm-unfused": unfused, "torch-eager": eager, "torch-compile": compiled(eager)}


def run_one(name, fn, mode, q, k, cos, sin):
    if mode == "fwd":
        if name.endswith("inplace"):
            # Rotating the same buffers over and over keeps the values finite (|rotation| = 1).
            return bench(lambda: fn(q, k, cos, sin), warmup=10, rep=40)
        with torch.no_grad():
            return bench(lambda: fn(q, k, cos, sin), warmup=10, rep=40)
    if name.endswith("inplace"):
        return "skipped: the in-place backward is the out-of-place rotation, one launch per tensor"
    qq, kk = q.detach().requires_grad_(True), k.detach().requires_grad_(True)
    qo, ko = fn(qq, kk, cos, sin)
    gq, gk = torch.randn_like(qo), torch.randn_like(ko)
    return bench(lambda: torch.autograd.grad((qo, ko), (qq, kk), (gq, gk), retain_graph=True), warmup=10, rep=40)


def main(argv=None):
    args = parser(__doc__.splitlines()[0]).parse_args(argv)
    if not require_cuda("rotary"):
        return
    res = Results("rotary", args.out)
    copy_bw = copy_bandwidth_gbs()
    res.add(impl="device", metric="copy_bandwidth_GBps", value=copy_bw)
    tokens_list = [16384] if args.quick else TOKENS
    dtype = torch.bfloat16
    sections = [("rotary", m, shape) for m, shape in MODELS.items()]
    sections += [("qk_norm_rotary", m, shape) for m, shape in QK_NORM_MODELS.items()]
    for op, model, (hq, hk, d) in sections:
        cos, sin = fastlm.ops.rotary_tables(d, 8192, 500000.0, device="cuda")
        for tokens in tokens_list:
            B, S = layout(tokens)
            if op == "rotary":
                impls = make_impls()
                q = torch.randn(B, S, hq, d, device="cuda", dtype=dtype)
                k = torch.randn(B, S, hk, d, device="cuda", dtype=dtype)
            else:  # views of one qkv projection, as the model has them
                impls = make_qk_norm_impls(*(torch.rand(d, device="cuda", dtype=dtype) + 0.5 for _ in range(2)))
                q, k, _ = torch.randn(B, S, hq + 2 * hk, d, device="cuda", dtype=dtype).split([hq, hk, hk], dim=2)
            for mode in ("fwd", "bwd"):
                base = dict(op=op, model=model, tokens=B * S, batch=B, seqlen=S, heads_q=hq, heads_k=hk, head_dim=d,
                            dtype="bfloat16", mode=mode)
                times = {}
                for name, fn in impls.items():
                    if isinstance(fn, str):
                        res.skipped(name, fn.split(": ", 1)[1], **base)
                        continue
                    try:
                        t = run_one(name, fn, mode, q, k, cos, sin)
                    except Exception as e:  # a peer failing must not hide the others
                        res.add(**base, impl=name, status=f"error: {type(e).__name__}: {e}"[:200])
                        continue
                    if isinstance(t, str):
                        res.skipped(name, t.split(": ", 1)[1], **base)
                        continue
                    ms, p20, p80 = t
                    times[name] = ms
                    gbs = nbytes(B * S, hq, hk, d, q.element_size()) / ms / 1e6
                    res.add(**base, impl=name, ms=ms, p20=p20, p80=p80, GBps=gbs, pct_copy_bw=100 * gbs / copy_bw)
                for name in ("fastlm-triton", "fastlm-cuda"):
                    if name in times:
                        peers = ("torch-eager", "torch-compile", "liger" if op == "rotary" else "fastlm-unfused")
                        res.add(**base, impl=name, metric="speedup", **speedups(times, name, peers))
            del q, k
        torch.cuda.empty_cache()
    res.write()


if __name__ == "__main__":
    run_module(main)
