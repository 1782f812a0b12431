"""Training throughput: fused vs reference vs torch.compile(reference), plus loss parity.

For each preset (GPT-2-124M and Llama-3.2-1B shapes) and sequence length (1k, 2k, 4k): one full
training step (bf16 autocast forward + backward, gradient clipping, fused AdamW step) of

  fused              the fastlm model on the fused ops, eager
  reference          plain PyTorch (torch.nn.RMSNorm/LayerNorm, rotate-half RoPE, SDPA), eager
  compile(reference) the reference with every block and the output head torch.compile'd
  compile(fused)     the fused model compiled the same way (fuses the glue the ops leave:
                     embedding, GELU, dtype casts)
  hf                 transformers' LlamaForCausalLM of the same shape (Llama-style presets only),
                     attn_implementation="sdpa", its own loss over materialized logits
  hf+fastlm          that model after fastlm.apply_to_hf (norms, rotary, SwiGLU, attention and
                     the fused lm_head + loss on fastlm's kernels)
  hf+liger           that model after Liger-Kernel's apply_liger_kernel_to_llama (when installed):
                     Liger's own headline benchmark is exactly this comparison

Reported: step time (median, p20/p80 over timed steps), tokens/s, model TFLOP/s and MFU
(FLOPs per token = 6 x matmul params + causal attention, see TransformerConfig.flops_per_token;
peak = the bf16 matmul rate measured in this run), and peak memory.  Random tokens.  A
"targets" row per (preset, seqlen) says, for each of the issue's H100 targets (>= 1.3x
reference tokens/s, >= 1.1x compile(reference), MFU >= 50% on the 1B preset, peak memory <=
reference), met / missed with the measured value, or "not measured" when a peer did not run.

Loss parity (--parity-steps, default 200; 0 skips): the fused and reference models, same init
and same data (the stdlib byte corpus), trained with fastlm.train for that many steps on the
Llama-style 125M preset; their loss curves must track each other.

    python -m benchmarks.bench_train [--quick | --full] [--out DIR] [--presets gpt2-124m,llama-3.2-1b]
           [--seqlens 1024,2048,4096] [--impls fused,reference,compile(reference),compile(fused)]

Time (estimated, H100): compiling dominates, so by default the compiled peers run at seqlen
2048 only (eager ones at every seqlen) to stay near 150 s; --full compiles at every seqlen
(several minutes); --quick is seqlen 2048 only and a 50-step parity run.
    python -m benchmarks.bench_train --plan      # print the plan and FLOP counts (no GPU needed)
"""
import argparse
import contextlib
import gc
import os
import statistics
import tempfile
import time

import torch

from benchmarks.common import Results, main_guard, matmul_tflops, optional_module, parser, require_cuda, run_module
from fastlm.models import Transformer, TransformerConfig

NAME = "train"
IMPLS = ("fused", "reference", "compile(reference)", "compile(fused)", "hf", "hf+fastlm", "hf+liger")
HF_IMPLS = ("hf", "hf+fastlm", "hf+liger")
# Tokens per step chosen to fit the reference on an 80 GB GPU with headroom (fp32 master
# weights + AdamW: 16 bytes/param; the 1B preset's 128k-vocab logits alone take ~2.5 MB/token).
TOKENS_PER_STEP = {"gpt2-124m": 32768, "llama-125m": 32768, "llama-3.2-1b": 8192}


def plan(presets, seqlens, tokens=None):
    """[(preset, seqlen, batch)] with batch * seqlen = tokens or TOKENS_PER_STEP[preset]."""
    out = []
    for p in presets:
        for s in seqlens:
            out.append((p, s, max(1, (tokens or TOKENS_PER_STEP.get(p, 16384)) // s)))
    return out


def flops_per_step(cfg, batch, seqlen):
    return cfg.flops_per_token(seqlen) * batch * seqlen


def _free():
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def hf_supported(preset):
    """The HF peers need a Llama-shaped preset (RoPE, RMSNorm, SwiGLU, no biases)."""
    cfg = TransformerConfig.from_name(preset)
    return cfg.positional == "rope" and cfg.norm == "rms" and cfg.mlp == "swiglu" and not (
        cfg.qkv_bias or cfg.out_bias or cfg.mlp_bias or cfg.sliding_window or cfg.qk_norm)


def _build_hf(cfg, impl, device):
    from fastlm.models.hf import _hf_config

    hf_cfg = _hf_config(cfg, "llama")
    hf_cfg._attn_implementation = "sdpa"
    import transformers

    with torch.device(device):
        model = transformers.LlamaForCausalLM(hf_cfg)
    if impl == "hf+fastlm":
        import fastlm

        fastlm.apply_to_hf(model)
    elif impl == "hf+liger":
        from liger_kernel.transformers import apply_liger_kernel_to_llama  # ImportError: reported as skipped

        apply_liger_kernel_to_llama(rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                                    fused_linear_cross_entropy=True, model=model)
    return model


@contextlib.contextmanager
def _restore_llama_module():
    """Liger's apply_liger_kernel_to_llama also patches transformers' modeling_llama module and
    its classes (RMSNorm, MLP, rotary, LlamaForCausalLM.forward) for every model built later:
    undo that after its measurement, so the "hf" peer at the next shape is HF's own code."""
    from transformers.models.llama import modeling_llama as m

    saved = dict(vars(m))
    forwards = {c: vars(c).get("forward") for c in saved.values() if isinstance(c, type) and c.__module__ == m.__name__}
    try:
        yield
    finally:
        for k in set(vars(m)) - set(saved):
            delattr(m, k)
        for k, v in saved.items():
            setattr(m, k, v)
        for c, f in forwards.items():
            if f is not None:
                c.forward = f


def _build(preset, impl, device):
    cfg = TransformerConfig.from_name(preset)
    torch.manual_seed(0)
    if impl in HF_IMPLS:
        model = _build_hf(cfg, impl, device)
    else:
        with torch.device(device):
            model = Transformer(cfg, backend="fused" if "fused" in impl else "reference")
    if impl.startswith("compile"):
        model.compile_blocks()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1,
                            fused=device == "cuda")
    return cfg, model, opt


def _step(model, opt, batch):
    with torch.autocast(batch.device.type, dtype=torch.bfloat16, enabled=batch.is_cuda):
        if isinstance(model, Transformer):
            loss = model(batch[:, :-1], batch[:, 1:])
        else:  # a transformers causal LM: labels are shifted inside (the same next-token targets)
            loss = model(input_ids=batch[:, :-1], labels=batch[:, :-1]).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss


def time_training(preset, impl, batch, seqlen, warmup=3, iters=10, device="cuda"):
    """-> dict(step_ms, p20, p80, peak_gb, warmup_s, loss, flops) for one implementation.
    Each step is timed with CUDA events (CPU: wall clock; only for a smoke test)."""
    torch._dynamo.reset()
    _free()
    cuda = device == "cuda"
    cfg, model, opt = _build(preset, impl, device)
    data = [torch.randint(0, cfg.vocab_size, (batch, seqlen + 1), device=device) for _ in range(4)]
    t0 = time.perf_counter()
    for i in range(warmup):
        loss = _step(model, opt, data[i % len(data)])
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    warm_s = time.perf_counter() - t0
    ms = []
    for i in range(iters):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        t = time.perf_counter()
        loss = _step(model, opt, data[i % len(data)])
        if cuda:
            end.record()
            ms.append((start, end))
        else:
            ms.append((time.perf_counter() - t) * 1e3)
    if cuda:
        torch.cuda.synchronize()
        ms = [s.elapsed_time(e) for s, e in ms]
    ms.sort()
    q = statistics.quantiles(ms, n=5) if len(ms) >= 2 else [ms[0]] * 4
    peak_gb = torch.cuda.max_memory_allocated() / 1e9 if cuda else None
    out = dict(step_ms=statistics.median(ms), p20=q[0], p80=q[3], peak_gb=peak_gb,
               warmup_s=warm_s, loss=loss.detach().item(), flops=flops_per_step(cfg, batch, seqlen))
    del model, opt, data, loss
    torch._dynamo.reset()
    _free()
    return out


# The targets on one H100 (MFU on the 1B preset only).
TARGETS = {"x_reference": 1.3, "x_compile_reference": 1.1, "mfu_pct_1b": 50.0}


def target_verdict(preset, got):
    """{target: verdict} for one (preset, seqlen) from got = {impl: row}; a peer that was not
    measured leaves its target "not measured", never met."""
    out = {}
    fused = got.get("fused")
    for key, peer in (("x_reference", "reference"), ("x_compile_reference", "compile(reference)")):
        if fused is None or peer not in got:
            out[key] = "not measured"
        else:
            x = fused["tokens_per_s"] / got[peer]["tokens_per_s"]
            out[key] = f"{'met' if x >= TARGETS[key] else 'missed'} ({x:.2f}x, target >= {TARGETS[key]}x)"
    if preset == "llama-3.2-1b":
        mfu = fused.get("mfu_pct") if fused else None
        out["mfu"] = "not measured" if mfu is None else (
            f"{'met' if mfu >= TARGETS['mfu_pct_1b'] else 'missed'} ({mfu:.1f}%, target >= {TARGETS['mfu_pct_1b']:.0f}%)")
    a = fused.get("peak_mem_gb") if fused else None
    b = got["reference"].get("peak_mem_gb") if "reference" in got else None
    if a is None or b is None:
        out["peak_memory"] = "not measured"
    else:
        out["peak_memory"] = f"{'met' if a <= b else 'missed'} ({a:.2f} GB vs reference {b:.2f} GB)"
    return out


def run_throughput(res, args, peak):
    impls = [i.strip() for i in args.impls.split(",")]
    for impl in impls:
        if impl not in IMPLS:
            raise SystemExit(f"bench_train: unknown impl {impl!r}; choose from {IMPLS}")
    compile_seqlens = None if args.compile_seqlens == "all" else {int(s) for s in args.compile_seqlens.split(",")}
    for preset, seqlen, batch in plan(args.presets.split(","), [int(s) for s in args.seqlens.split(",")], args.tokens):
        got = {}
        for impl in impls:
            row = dict(preset=preset, seqlen=seqlen, batch=batch, impl=impl)
            if impl.startswith("compile") and compile_seqlens is not None and seqlen not in compile_seqlens:
                res.skipped(impl, "time budget: compiled peers run at --compile-seqlens (use --full for all)",
                            preset=preset, seqlen=seqlen, batch=batch)
                continue
            if impl in HF_IMPLS and not hf_supported(preset):
                res.skipped(impl, "the HF peers run on the Llama-style presets", preset=preset, seqlen=seqlen,
                            batch=batch)
                continue
            if impl in HF_IMPLS and optional_module("transformers") is None:
                res.skipped(impl, "not installed (transformers)", preset=preset, seqlen=seqlen, batch=batch)
                continue
            if impl == "hf+liger" and optional_module("liger_kernel") is None:
                res.skipped(impl, "not installed (liger-kernel)", preset=preset, seqlen=seqlen, batch=batch)
                continue
            try:
                with _restore_llama_module() if impl == "hf+liger" else contextlib.nullcontext():
                    r = time_training(preset, impl, batch, seqlen, warmup=args.warmup, iters=args.iters,
                                      device=args.device)
            except torch.OutOfMemoryError:
                _free()
                res.add(**row, status="OOM")
                continue
            except Exception as e:  # a failing implementation must not hide the others
                _free()
                res.add(**row, status=f"error: {type(e).__name__}: {str(e)[:200]}")
                continue
            tps = batch * seqlen / (r["step_ms"] / 1e3)
            tflops = r["flops"] / (r["step_ms"] / 1e3) / 1e12
            extra = {}
            if impl != "reference" and "reference" in got:
                extra["x_reference"] = tps / got["reference"]["tokens_per_s"]
            if impl != "compile(reference)" and "compile(reference)" in got:
                extra["x_compile_reference"] = tps / got["compile(reference)"]["tokens_per_s"]
            got[impl] = dict(tokens_per_s=tps, mfu_pct=100 * tflops / peak if peak else None, peak_mem_gb=r["peak_gb"])
            res.add(**row, step_ms=r["step_ms"], step_ms_p20=r["p20"], step_ms_p80=r["p80"], model_tflops=tflops,
                    **got[impl], warmup_s=r["warmup_s"], loss=r["loss"], **extra, status="ok")
        # speedups of fused against peers measured later in the loop
        if "fused" in got:
            for peer in ("reference", "compile(reference)"):
                if peer in got:
                    res.add(preset=preset, seqlen=seqlen, batch=batch, impl=f"fused / {peer}",
                            speedup=got["fused"]["tokens_per_s"] / got[peer]["tokens_per_s"], status="ok")
            if "compile(fused)" in got and "compile(reference)" in got:
                res.add(preset=preset, seqlen=seqlen, batch=batch, impl="compile(fused) / compile(reference)",
                        speedup=got["compile(fused)"]["tokens_per_s"] / got["compile(reference)"]["tokens_per_s"],
                        status="ok")
        for peer in ("hf", "hf+liger"):  # the HF model patched by fastlm against HF and HF + Liger
            if "hf+fastlm" in got and peer in got:
                res.add(preset=preset, seqlen=seqlen, batch=batch, impl=f"hf+fastlm / {peer}",
                        speedup=got["hf+fastlm"]["tokens_per_s"] / got[peer]["tokens_per_s"],
                        memory_ratio=_ratio(got["hf+fastlm"]["peak_mem_gb"], got[peer]["peak_mem_gb"]), status="ok")
        res.add(preset=preset, seqlen=seqlen, batch=batch, impl="targets", **target_verdict(preset, got),
                device=torch.cuda.get_device_name() if args.device == "cuda" else args.device, status="ok")


def _ratio(a, b):
    return a / b if a is not None and b else None


def run_parity(res, args):
    """Fused and reference trained from the same init on the same data: losses must track."""
    from fastlm.train import TrainConfig, train

    steps = args.parity_steps
    hist = {}
    with tempfile.TemporaryDirectory() as tmp:
        for backend in ("fused", "reference"):
            _free()
            cfg = TrainConfig(model=args.parity_preset, backend=backend, seqlen=args.parity_seqlen,
                              batch_size=args.parity_batch, steps=steps, lr=1e-3, warmup=max(1, steps // 10),
                              eval_every=steps, eval_batches=4, ckpt_every=10**9, log_every=max(1, steps // 10),
                              out_dir=os.path.join(tmp, backend), progress=False, seed=0, device=args.device,
                              cache_dir=os.path.join(tmp, "cache"), data=args.parity_data)
            t0 = time.perf_counter()
            hist[backend] = train(cfg, log=lambda *a: None)
            hist[backend]["time_s"] = time.perf_counter() - t0
            os.remove(os.path.join(tmp, backend, "checkpoint.pt"))
    f, r = hist["fused"]["train_loss"], hist["reference"]["train_loss"]
    diffs = [abs(f[s] - r[s]) for s in sorted(f)]
    tail = max(1, steps // 4)
    f_tail = statistics.mean(f[s] for s in sorted(f)[-tail:])
    r_tail = statistics.mean(r[s] for s in sorted(r)[-tail:])
    for s in sorted(f):
        if s == 1 or s % max(1, steps // 20) == 0 or s == steps:
            res.add(preset=args.parity_preset, impl="parity", step=s, loss_fused=f[s], loss_reference=r[s],
                    abs_diff=abs(f[s] - r[s]), status="ok")
    ok = abs(f_tail - r_tail) < 0.02 + 0.01 * r_tail and f[1] - f_tail > 1.0
    res.add(preset=args.parity_preset, impl="parity summary", steps=steps, first_loss=f[1],
            tail_mean_fused=f_tail, tail_mean_reference=r_tail, tail_mean_diff=f_tail - r_tail,
            max_abs_diff=max(diffs), val_fused=hist["fused"]["val_loss"].get(steps),
            val_reference=hist["reference"]["val_loss"].get(steps),
            time_fused_s=hist["fused"]["time_s"], time_reference_s=hist["reference"]["time_s"],
            status="ok" if ok else "FAIL: the loss curves diverge")


def main(argv=None):
    p = parser("training step throughput, MFU and memory: fused vs reference vs torch.compile(reference)")
    p.add_argument("--presets", default="gpt2-124m,llama-3.2-1b")
    p.add_argument("--seqlens", default="1024,2048,4096")
    p.add_argument("--impls", default=",".join(IMPLS))
    p.add_argument("--compile-seqlens", default="2048",
                   help="seqlens at which the torch.compile peers run ('all' = every one; compiling dominates the run time)")
    p.add_argument("--full", action="store_true", help="compiled peers at every seqlen (several minutes)")
    p.add_argument("--iters", type=int, default=10, help="timed steps per implementation")
    p.add_argument("--tokens", type=int, default=None, help="tokens per step (default: per preset, fits 80 GB)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation happens here)")
    p.add_argument("--parity-steps", type=int, default=200, help="loss-parity run length (0 skips it)")
    p.add_argument("--parity-preset", default="llama-125m")
    p.add_argument("--parity-seqlen", type=int, default=1024)
    p.add_argument("--parity-batch", type=int, default=16)
    p.add_argument("--parity-data", nargs="*", default=None, help="corpus of the parity run (default: stdlib)")
    p.add_argument("--device", default="cuda", help=argparse.SUPPRESS)  # "cpu": smoke test of this script
    p.add_argument("--plan", action="store_true", help="print the shapes and FLOP counts and exit")
    args = p.parse_args(argv)
    if args.full:
        args.compile_seqlens = "all"
    if args.quick:
        args.seqlens, args.iters, args.parity_steps = "2048", 6, min(args.parity_steps, 50)
        if args.presets == "gpt2-124m,llama-3.2-1b":  # the preset the targets are set on first (a time budget)
            args.presets = "llama-3.2-1b,gpt2-124m"
        args.impls = "fused,reference,compile(reference),hf,hf+fastlm,hf+liger"
    if args.plan:
        for preset, seqlen, batch in plan(args.presets.split(","), [int(s) for s in args.seqlens.split(",")], args.tokens):
            cfg = TransformerConfig.from_name(preset)
            print(f"{preset:14s} seqlen {seqlen:5d} batch {batch:3d}: {cfg.num_params() / 1e6:.1f}M params, "
                  f"{cfg.flops_per_token(seqlen) / 1e9:.2f} GFLOP/token, "
                  f"{flops_per_step(cfg, batch, seqlen) / 1e12:.1f} TFLOP/step")
        return 0
    if args.device == "cuda":
        main_guard()
        if not require_cuda(NAME):
            return 0
    res = Results(NAME, args.out)
    t0 = time.perf_counter()
    peak = matmul_tflops() if args.device == "cuda" else None
    res.add(impl="matmul bf16 8192^3", tflops=peak, status="ok" if peak else "skipped: no GPU")
    run_throughput(res, args, peak)
    if args.parity_steps > 0:
        run_parity(res, args)
    res.add(impl="total", time_s=time.perf_counter() - t0, status="ok")
    res.write()
    return 0


if __name__ == "__main__":
    run_module(main)
