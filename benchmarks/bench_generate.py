"""Decoding benchmark: generation tokens/s, fused vs reference vs HF ``generate``, with the
achieved memory bandwidth.

For each preset (GPT-2-124M and Llama-3.2-1B shapes, bf16, random weights), batch (1, 8, 32)
and context (prompt length 128, 1024, 8192; capped at the preset's max_seqlen) one greedy
generation of ``--new-tokens`` tokens per sequence by

  fused/static   fastlm.Generator on the fused model: packed prefill, static KV cache,
                 decode steps captured in a CUDA graph (kv_cache_append + decode_attention)
  fused/paged    the same with the paged cache (16-token blocks)
  fused/static-nogemv  fused/static with model.decode_gemv_rows = 0: the norms and SwiGLU as
                 their own kernels instead of inside the qkv / w_in / lm_head projections
                 (ops.fused_linear); only at batches where that path is on (<= 4 rows)
  reference      the reference model (torch.nn norms, rotate-half RoPE, SDPA) decoding with
                 a plain PyTorch cache (index_put + SDPA over the filled part), eager
  hf             transformers ``generate`` (greedy, its default dynamic cache, SDPA) on the
                 same weights (``model.to_hf()``)
  hf+fastlm      that HF model after ``fastlm.apply_to_hf`` (HF's own generate loop and cache;
                 the prefill and decode attention, norms, rotary and SwiGLU on fastlm's
                 kernels; Llama-style presets only)

Decode time per step (each step makes ``batch`` tokens): for fastlm, from the generator's own
CUDA-event marks (prefill end -> last decode step, host gaps included) of a call made after a
warm-up call (which compiles, autotunes the prefill and captures the graph); for HF, synchronized
timestamps taken inside its generation loop by a logits processor (first token -> last token).
Prefill tokens/s: prompt tokens / prefill time (start -> first token for HF).  Random prompts,
no EOS.

Bandwidth: a decode step must read every weight once (blocks + lm_head; the embedding lookup
reads ``batch`` rows) plus the visible KV cache of every layer (context + n/2 tokens on
average over the measured steps), so achieved GB/s = (weight bytes + KV bytes) / step time,
reported as % of the device copy bandwidth measured in this run; ``limit_tokens_per_s`` is the
rate at 100% of it.  Speedups: fused/static over reference and over HF at the same shape.
Targets (H100): batch-1 decode of the 1B preset >= 80% of the copy bandwidth, >= 5x HF
generate and >= 3x the reference.  A "targets" row (``target_verdict``) is written for those
shapes only (llama-3.2-1b, batch 1, each context); it says MEETS TARGET only when all three
were measured and met, and TARGET NOT EVALUATED naming what is missing (e.g. "hf: not
measured" when transformers is absent or HF was skipped or failed).  (No torch.compile
peer: the reference cache changes shape every step; HF's compiled static-cache path is not
timed.)

Time (H100, estimated): ~90 s by default; HF runs only where batch x context <= --hf-max-tokens
(its eager loop is slow); --quick: batch 1 and 8, contexts 128 and 1024, 32 tokens.

    python -m benchmarks.bench_generate [--quick] [--out DIR] [--presets gpt2-124m,llama-3.2-1b]
           [--batches 1,8,32] [--contexts 128,1024,8192] [--new-tokens 64] [--impls ...]
    python -m benchmarks.bench_generate --plan     # shapes and bytes per step (no GPU needed)
"""
import argparse
import copy
import gc
import statistics
import time

import torch

from benchmarks.common import Results, copy_bandwidth_gbs, main_guard, optional_module, parser, require_cuda, run_module
import fastlm
from fastlm.generation import Generator
from fastlm.integrations.hf import FAMILIES
from fastlm.models.hf import default_arch
from fastlm.models import Transformer, TransformerConfig

NAME = "generate"
IMPLS = ("fused/static", "fused/paged", "fused/static-nogemv", "reference", "hf", "hf+fastlm")
BLOCK = 16


# ------------------------------------------------------------------------------ accounting
def weight_bytes(cfg, esize=2):
    """Bytes of weights one decode step reads: every block matrix, the norms and the lm_head
    (the tied embedding table counts once, as the lm_head; lookups read a few rows)."""
    n = cfg.num_params(embeddings=False)
    if cfg.tie_embeddings:
        n += cfg.vocab_size * cfg.dim
    return n * esize


def kv_bytes(cfg, batch, context, esize=2):
    """Bytes of K and V one decode step reads at `context` cached tokens per sequence."""
    return 2 * cfg.n_layers * batch * context * cfg.n_kv_heads * cfg.head_dim * esize


def step_bytes(cfg, batch, context, new_tokens, esize=2):
    """Average bytes per measured decode step (the context grows from `context` by new_tokens)."""
    return weight_bytes(cfg, esize) + kv_bytes(cfg, batch, context + new_tokens / 2, esize)


def plan(presets, batches, contexts, new_tokens):
    """[(preset, batch, context)]: contexts capped so that context + new tokens fit max_seqlen."""
    out = []
    for p in presets:
        cfg = TransformerConfig.from_name(p)
        for b in batches:
            for c in contexts:
                c = min(c, cfg.max_seqlen - new_tokens - 1)
                if (p, b, c) not in out:
                    out.append((p, b, c))
    return out


def capacity(context, new_tokens):
    return -(-(context + new_tokens) // 256) * 256


# ------------------------------------------------------------------------------ runners
def _free():
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def build_models(preset, device, dtype, impls, op_backend=None):
    """(config, fused, reference, {"hf": model, "hf+fastlm": model}): the same random weights in
    each (None / absent where not needed or not possible)."""
    cfg = TransformerConfig.from_name(preset)
    torch.manual_seed(0)
    with torch.device(device):
        fused = Transformer(cfg, backend="fused", op_backend=op_backend)
    fused.to(dtype).eval()  # (the RoPE tables stay fp32)
    ref, hf = None, {}
    if "reference" in impls:
        with torch.device("meta"):
            ref = Transformer(cfg, backend="reference").to(dtype)
        ref.to_empty(device=device)
        ref.load_state_dict(fused.state_dict())
        ref.eval()
    if {"hf", "hf+fastlm"} & set(impls) and optional_module("transformers") is not None:
        with torch.device(device):  # HF builds (and randomly initializes) the model where it will run
            model = fused.to_hf().to(device=device, dtype=dtype).eval()
        if "hf+fastlm" in impls and model.config.model_type in FAMILIES:
            hf["hf+fastlm"] = fastlm.apply_to_hf(copy.deepcopy(model), backend=op_backend)
        if "hf" in impls:
            hf["hf"] = model
    return cfg, fused, ref, hf


def time_generator(gen, prompts, new_tokens, reps):
    """-> (ms per decode step [median over reps], p20, p80, prefill tokens/s) from gen.stats."""
    gen.generate(prompts, 2, greedy=True)  # warm-up: prefill autotuning, kernels, CUDA-graph capture
    _sync(gen.device.type)
    steps, prefill = [], []
    for _ in range(reps):
        gen.generate(prompts, new_tokens + 1, greedy=True)
        s = gen.stats
        steps.append(s["decode_s"] / s["decode_steps"] * 1e3)
        prefill.append(s["prefill_tokens_per_s"])
    return _summary(steps) + (statistics.median(prefill),)


def time_hf(hf, prompts, new_tokens, reps, device):
    """HF generate timed from inside its loop: a logits processor (called once per generated
    token, after that step's forward) records a synchronized timestamp, so decode ms/step =
    (last - first) / (calls - 1) and prefill = start -> first call, with no subtraction of two
    noisy wall-clock totals."""
    from transformers import LogitsProcessor, LogitsProcessorList

    class StepClock(LogitsProcessor):
        def __init__(self):
            self.t = []

        def __call__(self, input_ids, scores):
            _sync(device)
            self.t.append(time.perf_counter())
            return scores

    ids = torch.tensor(prompts, device=device)
    mask = torch.ones_like(ids)

    def run(n):
        clock = StepClock()
        _sync(device)
        t0 = time.perf_counter()
        with torch.no_grad():
            out = hf.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                              pad_token_id=0, logits_processor=LogitsProcessorList([clock]))
        _sync(device)
        assert out.shape[1] == ids.shape[1] + n and len(clock.t) == n, (out.shape, len(clock.t))
        return (clock.t[-1] - clock.t[0]) / (n - 1) * 1e3, clock.t[0] - t0

    run(2)  # warm-up
    runs = [run(new_tokens + 1) for _ in range(reps)]
    return _summary([r[0] for r in runs]) + (ids.numel() / statistics.median(r[1] for r in runs),)


def _summary(xs):
    xs = sorted(xs)
    q = statistics.quantiles(xs, n=5) if len(xs) >= 2 else [xs[0]] * 4
    return statistics.median(xs), q[0], q[3]


# ------------------------------------------------------------------------------ targets
TARGET_PRESET, TARGET_BATCH = "llama-3.2-1b", 1  # the issue states its targets for this shape only
TARGET_PCT_BW, TARGET_X_HF, TARGET_X_REFERENCE = 80.0, 5.0, 3.0
TARGET_DEVICE = "H100"


def targets_apply(preset, batch):
    """Whether the issue set a target for this shape (batch-1 decode of the 1B preset); other
    shapes get their speedup rows but no verdict."""
    return preset == TARGET_PRESET and batch == TARGET_BATCH


def target_verdict(pct_copy_bw, x_hf, x_reference, fused_ok=True, device=None):
    """The verdict of one target shape as a status string (pure: no measurement here).

    pct_copy_bw: achieved bandwidth of the fused path as % of the copy bandwidth; x_hf /
    x_reference: the fused path's speedup over HF generate / the reference path; None for
    anything not measured (peer not installed, errored, skipped; no GPU for the copy bandwidth).
    A missing measurement is never counted as met: the verdict is "MEETS TARGET" only when all
    three were measured and met, "BELOW TARGET" when any measured one misses, and otherwise
    "TARGET NOT EVALUATED" with the missing ones named ("hf: not measured").  device: the GPU's
    name; the targets are stated for an H100, so another device is named in the verdict."""
    if not fused_ok:
        pct_copy_bw = None
    checks = []
    for name, v, goal, fmt, goal_s in (
            ("bandwidth", pct_copy_bw, TARGET_PCT_BW, "{:.1f}% of copy bw", f"{TARGET_PCT_BW:g}%"),
            ("hf", x_hf, TARGET_X_HF, "{:.2f}x", f"{TARGET_X_HF:g}x"),
            ("reference", x_reference, TARGET_X_REFERENCE, "{:.2f}x", f"{TARGET_X_REFERENCE:g}x")):
        if v is None or v != v:  # None or NaN: not measured
            why = "fused path failed" if not fused_ok else "not measured"
            checks.append((None, f"{name}: {why} (target >= {goal_s})"))
        else:
            ok = v >= goal
            checks.append((ok, f"{name}: {fmt.format(v)} {'>=' if ok else '<'} {goal_s}"))
    if any(ok is False for ok, _ in checks):
        head = "BELOW TARGET"
    elif any(ok is None for ok, _ in checks):
        head = "TARGET NOT EVALUATED"
    else:
        head = "MEETS TARGET"
    tail = ""
    if device and TARGET_DEVICE not in device:
        tail = f" [targets stated for an {TARGET_DEVICE}; measured on {device}]"
    return f"{head}: " + "; ".join(text for _, text in checks) + tail


def run(res, args, copy_gbs):
    impls = [i.strip() for i in args.impls.split(",")]
    device_name = torch.cuda.get_device_name() if args.device == "cuda" and torch.cuda.is_available() else args.device
    for impl in impls:
        if impl not in IMPLS:
            raise SystemExit(f"bench_generate: unknown impl {impl!r}; choose from {IMPLS}")
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    esize = torch.finfo(dtype).bits // 8
    n = args.new_tokens
    shapes = plan(args.presets.split(","), [int(b) for b in args.batches.split(",")],
                  [int(c) for c in args.contexts.split(",")], n)
    for preset in dict.fromkeys(p for p, _, _ in shapes):
        _free()
        cfg, fused, ref, hf = build_models(preset, args.device, dtype, impls, args.op_backend)
        for name in ("hf", "hf+fastlm"):
            if name in impls and name not in hf:
                why = ("not installed (transformers)" if optional_module("transformers") is None
                       else f"apply_to_hf does not patch the preset's HF architecture ({default_arch(cfg)})")
                res.skipped(name, why, preset=preset)
        wb = weight_bytes(cfg, esize)
        res.add(preset=preset, impl="model", params_m=cfg.num_params() / 1e6, weight_mb_per_step=wb / 1e6,
                status="ok")
        for _, batch, ctx in (s for s in shapes if s[0] == preset):
            g = torch.Generator().manual_seed(batch * 100003 + ctx)
            prompts = torch.randint(0, cfg.vocab_size, (batch, ctx), generator=g).tolist()
            nbytes = step_bytes(cfg, batch, ctx, n, esize)
            reps = 3 if batch * ctx <= 16384 else 1
            base = dict(preset=preset, batch=batch, context=ctx, new_tokens=n)
            got = {}
            for impl in impls:
                if impl == "fused/static-nogemv" and batch > fused.decode_gemv_rows:
                    continue  # the same kernels as fused/static at this batch
                if impl in ("hf", "hf+fastlm") and (impl not in hf or batch * ctx > args.hf_max_tokens):
                    if impl in hf:
                        res.skipped(impl, f"time budget: batch x context > --hf-max-tokens={args.hf_max_tokens}",
                                    **base)
                    continue
                try:
                    if impl in ("hf", "hf+fastlm"):
                        ms, p20, p80, pre = time_hf(hf[impl], prompts, n, min(reps, 2), args.device)
                    else:
                        cap = capacity(ctx, n)
                        if impl == "reference":
                            gen = Generator(ref, max_seqlen=cap)
                        else:
                            kind = impl.split("/")[1].split("-")[0]
                            gen = Generator(fused, cache=kind, max_seqlen=cap, block_size=BLOCK,
                                            num_blocks=batch * -(-cap // BLOCK) if kind == "paged" else None,
                                            cuda_graphs=not args.no_cuda_graphs)
                        rows = fused.decode_gemv_rows
                        if impl.endswith("-nogemv"):
                            fused.decode_gemv_rows = 0
                        try:
                            ms, p20, p80, pre = time_generator(gen, prompts, n, reps)
                        finally:
                            fused.decode_gemv_rows = rows
                        del gen
                except torch.OutOfMemoryError:
                    _free()
                    res.add(**base, impl=impl, status="OOM")
                    continue
                except Exception as e:  # one failing implementation must not hide the others
                    _free()
                    res.add(**base, impl=impl, status=f"error: {type(e).__name__}: {str(e)[:200]}")
                    continue
                _free()
                got[impl] = ms
                gbs = nbytes / (ms / 1e3) / 1e9
                row = dict(**base, impl=impl, ms_per_step=ms, ms_p20=p20, ms_p80=p80, tokens_per_s=batch * 1e3 / ms,
                           prefill_tokens_per_s=pre, gbs=gbs)
                if copy_gbs:
                    row.update(pct_copy_bw=100 * gbs / copy_gbs, limit_tokens_per_s=batch * copy_gbs * 1e9 / nbytes)
                res.add(**row, status="ok")
            lead = "fused/static" if "fused/static" in got else "fused/paged"
            x = {peer: got[peer] / got[lead] for peer in ("reference", "hf", "fused/static-nogemv")
                 if lead in got and peer in got}
            for peer, v in x.items():
                res.add(**base, impl=f"{lead} / {peer}", speedup=v, status="ok")
            if "hf" in got and "hf+fastlm" in got:  # what apply_to_hf buys inside HF's own generate
                res.add(**base, impl="hf+fastlm / hf", speedup=got["hf"] / got["hf+fastlm"], status="ok")
            if targets_apply(preset, batch):  # the targets: batch-1 decode of the 1B preset only
                pct = 100 * nbytes / (got[lead] / 1e3) / 1e9 / copy_gbs if lead in got and copy_gbs else None
                res.add(**base, impl=f"targets ({lead})", pct_copy_bw=pct, x_hf=x.get("hf"),
                        x_reference=x.get("reference"),
                        status=target_verdict(pct, x.get("hf"), x.get("reference"), fused_ok=lead in got,
                                              device=device_name))
        del fused, ref, hf
        _free()


def main(argv=None):
    p = parser("decoding tokens/s and bandwidth: fastlm generation (static/paged, CUDA graphs) vs reference vs HF")
    p.add_argument("--presets", default="gpt2-124m,llama-3.2-1b")
    p.add_argument("--batches", default="1,8,32")
    p.add_argument("--contexts", default="128,1024,8192", help="prompt lengths (capped at the preset's max_seqlen)")
    p.add_argument("--new-tokens", type=int, default=64, help="decode steps timed per call")
    p.add_argument("--impls", default=",".join(IMPLS))
    p.add_argument("--hf-max-tokens", type=int, default=65536, help="run HF generate only where batch x context <= this")
    p.add_argument("--full", action="store_true", help="HF generate at every shape")
    p.add_argument("--no-cuda-graphs", action="store_true", help="fused decode steps eagerly (to see what graphs buy)")
    p.add_argument("--plan", action="store_true", help="print the shapes and bytes per step and exit")
    p.add_argument("--device", default="cuda", help=argparse.SUPPRESS)  # "cpu": smoke test of this script
    p.add_argument("--op-backend", default=None, help=argparse.SUPPRESS)  # for the CPU smoke test
    args = p.parse_args(argv)
    if args.quick:
        args.batches, args.contexts, args.new_tokens = "1,8", "128,1024", 32
        if args.presets == "gpt2-124m,llama-3.2-1b":  # the preset the targets are set on first (a time budget)
            args.presets = "llama-3.2-1b,gpt2-124m"
        args.hf_max_tokens = min(args.hf_max_tokens, 1024)
    if args.full:
        args.hf_max_tokens = 1 << 62
    if args.new_tokens < 1:
        raise SystemExit("bench_generate: --new-tokens must be >= 1")
    if args.plan:
        for preset, batch, ctx in plan(args.presets.split(","), [int(b) for b in args.batches.split(",")],
                                       [int(c) for c in args.contexts.split(",")], args.new_tokens):
            cfg = TransformerConfig.from_name(preset)
            print(f"{preset:14s} batch {batch:3d} context {ctx:5d}: weights {weight_bytes(cfg) / 1e9:.3f} GB + KV "
                  f"{kv_bytes(cfg, batch, ctx + args.new_tokens / 2) / 1e9:.3f} GB read per step (bf16)")
        return 0
    if args.device == "cuda":
        main_guard()
        if not require_cuda(NAME):
            return 0
    res = Results(NAME, args.out)
    t0 = time.perf_counter()
    copy_gbs = copy_bandwidth_gbs() if args.device == "cuda" else None
    res.add(impl="copy bandwidth", gbs=copy_gbs, status="ok" if copy_gbs else "skipped: no GPU")
    run(res, args, copy_gbs)
    res.add(impl="total", time_s=time.perf_counter() - t0, status="ok")
    res.write()
    return 0


if __name__ == "__main__":
    run_module(main)
