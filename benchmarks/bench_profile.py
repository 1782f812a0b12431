"""Where the time goes: per-kernel GPU time of one training step and of decode steps.

The end-to-end benchmarks (bench_train, bench_generate) say how fast; this one says why, so a
GPU session can decide what to fuse or tune next without another run.  torch.profiler records

  train   one fused training step of the Llama-3.2-1B preset (bf16 autocast, fwd + bwd + AdamW)
          at --train-seqlen (default 2048) x --train-batch (default 4) tokens; then the host
          (CPU) time to issue one step beside its wall time, for that step and for the
          GPT-2-124M preset at 1x1024 tokens, fused and reference (a host-bound step shows)
  decode  --decode-steps greedy decode steps of the same preset at batch 1 after a 1024-token
          prompt, run eagerly (cuda_graphs=False, so each kernel is visible; graph replay runs
          the same kernels minus the launch gaps)

and reports, per kernel name, the total GPU time, calls and share of the step, plus the share of
each kernel family (GEMM, attention, norm, rotary, swiglu, loss, KV cache, optimizer, other).
For decode it also replays the same steps from a CUDA graph and reports the step time beside
the kernels' own time and count: the idle share between kernels is what fusing kernels buys.
Rows go to the results JSON; the top kernels are printed.  About 30 s on an H100.

    python -m benchmarks.bench_profile [--quick] [--out DIR] [--what train,decode]
"""

import statistics
import time

import torch

from benchmarks.common import Results, main_guard, parser, require_cuda, run_module

FAMILIES = [  # (family, substrings of kernel names; first match wins)
    ("decode_attention", ("decode", "split_kv", "combine")),
    ("attention", ("_attn_", "flash", "fmha", "sdpa", "attention")),
    ("kv_cache", ("append", "kv_cache")),
    ("norm", ("_norm_", "norm_fwd", "norm_bwd", "reduce_partials", "rms", "layer_norm")),
    ("rotary", ("rotary", "rope")),
    ("swiglu", ("swiglu",)),
    ("loss", ("_ce_kernel", "cross_entropy", "log_softmax", "nll")),
    ("gemm", ("gemm", "gemv", "sm90_xmma", "sm80_xmma", "cutlass", "cublas", "nvjet", "matmul", "dot_kernel")),
    ("optimizer", ("adam", "multi_tensor", "foreach")),
]


def family(name):
    low = name.lower()
    for fam, keys in FAMILIES:
        if any(k in low for k in keys):
            return fam
    return "other"


def kernel_table(prof):
    """[(name, total_us, calls)] of GPU kernels, largest first."""
    rows = {}
    for evt in prof.events():
        if evt.device_type != torch.autograd.DeviceType.CUDA:
            continue
        us = evt.time_range.elapsed_us()  # a kernel's own duration
        t, n = rows.get(evt.name, (0.0, 0))
        rows[evt.name] = (t + us, n + 1)
    return sorted(((k, t, n) for k, (t, n) in rows.items()), key=lambda r: -r[1])


def report(res, what, table, steps, top=25):
    total = sum(t for _, t, _ in table) or float("nan")
    fams = {}
    for name, t, _ in table:
        fams[family(name)] = fams.get(family(name), 0.0) + t
    print(f"\n[profile] {what}: GPU kernel time per step {total / steps / 1e3:.3f} ms over {steps} step(s)")
    for fam, t in sorted(fams.items(), key=lambda kv: -kv[1]):
        res.add(profile=what, family=fam, ms_per_step=t / steps / 1e3, pct=100 * t / total)
    print(f"{'kernel':<90} {'ms/step':>9} {'calls/step':>10} {'%':>6}")
    for name, t, n in table[:top]:
        print(f"{name[:90]:<90} {t / steps / 1e3:>9.3f} {n / steps:>10.1f} {100 * t / total:>6.1f}")
    for name, t, n in table:
        res.add(profile=what, kernel=name[:200], family=family(name), ms_per_step=t / steps / 1e3,
                calls_per_step=n / steps, pct=100 * t / total)


def profile_train(res, seqlen, batch):
    from benchmarks.bench_train import _build, _step

    torch._dynamo.reset()
    cfg, model, opt = _build("llama-3.2-1b", "fused", "cuda")
    data = torch.randint(0, cfg.vocab_size, (batch, seqlen + 1), device="cuda")
    for _ in range(3):  # compile / autotune everything first
        _step(model, opt, data)
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        _step(model, opt, data)
        torch.cuda.synchronize()
    what = f"train llama-3.2-1b fused {batch}x{seqlen}"
    report(res, what, kernel_table(prof), 1)
    host_time(res, what, model, opt, data)
    del model, opt
    torch.cuda.empty_cache()
    # A small model at few tokens is where launch overhead shows: fused beside the reference.
    for impl in ("fused", "reference"):
        cfg, model, opt = _build("gpt2-124m", impl, "cuda")
        data = torch.randint(0, cfg.vocab_size, (1, 1024 + 1), device="cuda")
        for _ in range(3):
            _step(model, opt, data)
        host_time(res, f"train gpt2-124m {impl} 1x1024", model, opt, data)
        del model, opt
        torch.cuda.empty_cache()


def host_time(res, what, model, opt, data, steps=5):
    """The host's time to issue one training step (no sync inside it) beside the step's wall
    time: a host share near 100% means the step waits on Python and kernel launches, not the GPU."""
    from benchmarks.bench_train import _step

    host, wall = [], []
    for _ in range(steps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        _step(model, opt, data)
        t1 = time.perf_counter()
        torch.cuda.synchronize()
        host.append(t1 - t0)
        wall.append(time.perf_counter() - t0)
    h, w = statistics.median(host) * 1e3, statistics.median(wall) * 1e3
    print(f"[profile] {what}: host issue time {h:.2f} ms of a {w:.2f} ms step ({100 * h / w:.0f}%)")
    res.add(profile=what, metric="host", host_ms=h, step_ms=w, host_pct=100 * h / w)


def profile_decode(res, steps, context=1024):
    from fastlm.generation import Generator
    from fastlm.models import Transformer, TransformerConfig

    cfg = TransformerConfig.from_name("llama-3.2-1b")
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = Transformer(cfg, backend="fused")
    model.to(torch.bfloat16).eval()
    gen = Generator(model, cache="static", cuda_graphs=False)
    prompt = [torch.randint(0, cfg.vocab_size, (context,)).tolist()]
    gen.generate(prompt, 4, greedy=True)  # warm-up: compile, autotune, allocate
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        gen.generate(prompt, 1, greedy=True)  # prefill only (plus one sampled token)
        torch.cuda.synchronize()
    base = {n: (t, c) for n, t, c in kernel_table(prof)}
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        gen.generate(prompt, 1 + steps, greedy=True)
        torch.cuda.synchronize()
    # decode steps only: subtract the prefill-only run kernel by kernel
    table = []
    for n, t, c in kernel_table(prof):
        t0, c0 = base.get(n, (0.0, 0))
        if c > c0:
            table.append((n, t - t0, c - c0))
    table.sort(key=lambda r: -r[1])
    what = f"decode llama-3.2-1b fused batch 1 context {context}"
    report(res, what, table, steps)
    # The same steps replayed from a CUDA graph: step time vs the kernels' own time.  The
    # difference is the GPU idling between dependent kernels, which only fewer kernels remove.
    gen_g = Generator(model, cache="static", cuda_graphs=True)
    gen_g.generate(prompt, 4, greedy=True)  # capture
    gen_g.generate(prompt, 1 + steps, greedy=True)
    st = gen_g.stats
    step_ms = st["decode_s"] / st["decode_steps"] * 1e3
    busy_ms = sum(t for _, t, _ in table) / steps / 1e3
    kernels = sum(c for _, _, c in table) / steps
    res.add(profile=what, metric="graph step", graph_step_ms=step_ms, kernel_ms_per_step=busy_ms,
            kernels_per_step=kernels, idle_pct=100 * (1 - busy_ms / step_ms),
            idle_us_per_kernel=1e3 * (step_ms - busy_ms) / kernels)
    del model, gen, gen_g
    torch.cuda.empty_cache()


def main(argv=None):
    main_guard()
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--what", default="train,decode")
    p.add_argument("--train-seqlen", type=int, default=2048)
    p.add_argument("--train-batch", type=int, default=4)
    p.add_argument("--decode-steps", type=int, default=16)
    args = p.parse_args(argv)
    if not require_cuda("profile"):
        return
    res = Results("profile", args.out)
    what = args.what.split(",")
    if "train" in what:
        profile_train(res, args.train_seqlen, args.train_batch // 2 if args.quick else args.train_batch)
    if "decode" in what:
        profile_decode(res, 4 if args.quick else args.decode_steps)
    res.write()


if __name__ == "__main__":
    run_module(main)
