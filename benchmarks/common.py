"""Benchmark harness shared by every benchmark script.

- timing: triton.testing.do_bench (median, with p20/p80), after warm-up, on random inputs;
- device roofs measured in the same run: copy bandwidth (GB/s) and bf16 matmul TFLOP/s;
- peers: torch eager reference, torch.compile of the reference, optional libraries (reported
  as "skipped: not installed" when missing, never dropped silently);
- results: rows tagged with GPU name, torch/triton versions, git commit and date, written as
  JSON and CSV under the output folder, and printed as a table.
"""
import argparse
import csv
import datetime
import functools
import importlib
import json
import os
import subprocess
import sys

import torch

from fastlm import _env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def env_info():
    info = {
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        # fastlm's attention tile configs are autotuned per shape unless this is 0
        "attention_autotune": os.environ.get("FASTLM_ATTENTION_AUTOTUNE", "1"),
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    try:
        info["commit"] = subprocess.check_output(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, stderr=subprocess.DEVNULL, text=True
        ).strip()
        dirty = subprocess.check_output(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, text=True)
        if dirty.strip():
            info["commit"] += "-dirty"
    except Exception:
        info["commit"] = os.environ.get("FASTLM_COMMIT", "unknown")
    return info


def bench(fn, warmup=25, rep=100):
    """Median, p20, p80 runtime of fn() in milliseconds."""
    import triton.testing

    ms, p20, p80 = triton.testing.do_bench(fn, warmup=warmup, rep=rep, quantiles=[0.5, 0.2, 0.8])
    return ms, p20, p80


@functools.lru_cache(maxsize=None)
def copy_bandwidth_gbs(nbytes=1 << 30):
    """Device-to-device copy bandwidth in GB/s (read + write bytes / time), measured now."""
    x = torch.empty(nbytes // 2, dtype=torch.bfloat16, device="cuda").normal_()
    y = torch.empty_like(x)
    ms, _, _ = bench(lambda: y.copy_(x))
    return 2 * nbytes / ms / 1e6


@functools.lru_cache(maxsize=None)
def matmul_tflops(n=8192, dtype=torch.bfloat16):
    """Dense bf16 matmul rate in TFLOP/s (torch.matmul, n x n x n), measured now."""
    a = torch.randn(n, n, device="cuda", dtype=dtype)
    b = torch.randn(n, n, device="cuda", dtype=dtype)
    ms, _, _ = bench(lambda: a @ b)
    return 2 * n**3 / ms / 1e9


def optional_module(name):
    """Import a peer library, or None (reported as skipped: not installed)."""
    try:
        return importlib.import_module(name)
    except Exception:
        return None


def speedups(times, name, peers):
    """{"vs_<label>": time(peer) / time(name)}, None for a peer that did not run (a missing peer
    is "not measured", never a number).  peers: names (label = the name without "torch-") or
    a {label: name} dict."""
    pairs = peers.items() if isinstance(peers, dict) else ((p.removeprefix("torch-"), p) for p in peers)
    return {f"vs_{label}": times[p] / times[name] if p in times else None for label, p in pairs}


def lift_recompile_limit(limit=4096):
    """torch.compile falls back to EAGER, silently, once a function has been recompiled
    recompile_limit (8) times -- which a shape x dtype x grad sweep reaches: the rows labelled
    torch-compile / flex-attention would then time eager PyTorch.  Lifted for every benchmark."""
    import torch._dynamo

    for name in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit", "accumulated_cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, max(getattr(torch._dynamo.config, name), limit))


def compiled(fn, dynamic=False):
    """torch.compile of a reference function (the strongest 'plain PyTorch' peer), specialized to
    every shape (dynamic=False: what a user compiling for a fixed shape gets; a dynamic-shape
    kernel, e.g. a norm looping over a symbolic hidden size, can be slower and would flatter the
    comparison).  Every shape compiles once, outside the timed region (the first call)."""
    lift_recompile_limit()
    return torch.compile(fn, dynamic=dynamic)


# fastlm's own implementations (the rest are peers: torch-*, reference*, liger, flash_attn, ...)
OWN_IMPLS = ("fastlm", "fused", "triton", "cuda", "compile(fused")
FAILURES = []  # "benchmark: impl: status" of every own row that errored, and every failed check


def is_failure(row):
    """A row that must fail the run: one of fastlm's implementations erroring (or out of memory),
    or any check reporting FAIL.  A peer that errors is reported in its row, not a failure."""
    status, impl = str(row.get("status", "")), str(row.get("impl", ""))
    return status.startswith("FAIL") or (impl.startswith(OWN_IMPLS) and status.startswith(("error", "OOM")))


def run_module(main):
    """`python -m benchmarks.bench_x` entry: exit 1 when any of fastlm's rows failed (the rows
    are all written; the failures are listed last)."""
    rc = main(sys.argv[1:]) or 0
    if FAILURES:
        print(f"[bench] {len(FAILURES)} fastlm failure(s):\n  " + "\n  ".join(FAILURES), flush=True)
        rc = rc or 1
    sys.exit(rc)


class Results:
    """Collects benchmark rows and writes them as JSON + CSV tagged with the environment."""

    def __init__(self, name, out_dir=None):
        self.name = name
        self.env = env_info()
        self.rows = []
        self.out_dir = out_dir

    def add(self, **row):
        self.rows.append(row)
        if is_failure(row):
            FAILURES.append(f"{self.name}: {row.get('impl')}: {row.get('status')}")
        cols = " ".join(f"{k}={_fmt(v)}" for k, v in row.items())
        print(f"[{self.name}] {cols}", flush=True)
        self._save()  # after every row: a run cut short by its time budget keeps what it measured

    def _save(self):
        if not self.out_dir:
            return None
        os.makedirs(self.out_dir, exist_ok=True)
        # written to a temporary name and renamed: a run interrupted mid-write (its time budget)
        # leaves the previous complete file, never a truncated one
        path = os.path.join(self.out_dir, f"{self.name}.json")
        with open(path + ".tmp", "w") as f:
            json.dump({"benchmark": self.name, "env": self.env, "rows": self.rows}, f, indent=1)
        os.replace(path + ".tmp", path)
        keys = []
        for r in self.rows:
            keys += [k for k in r if k not in keys]
        csv_path = os.path.join(self.out_dir, f"{self.name}.csv")
        with open(csv_path + ".tmp", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(self.env) + keys)
            w.writeheader()
            for r in self.rows:
                w.writerow({**self.env, **r})
        os.replace(csv_path + ".tmp", csv_path)
        return path

    def skipped(self, peer, why, **row):
        self.add(**row, impl=peer, status=f"skipped: {why}")

    def write(self):
        path = self._save()
        if path:
            print(f"[{self.name}] wrote {path}", flush=True)
        return path


def _fmt(v):
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def parser(description):
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--out", default=None, help="folder for JSON/CSV results (default: print only)")
    p.add_argument("--quick", action="store_true", help="fewer shapes (smoke run)")
    return p


def require_cuda(name):
    if not torch.cuda.is_available():
        print(f"[{name}] skipped: no CUDA GPU on this machine; the benchmarks time GPU kernels "
              "(run scripts/gpu_check.sh on a GPU machine)", flush=True)
        return False
    return True


def main_guard():
    if _env.triton_interpret():
        sys.exit("benchmarks must not run under TRITON_INTERPRET=1")
