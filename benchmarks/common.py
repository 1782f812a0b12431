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

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def env_info():
    info = {
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
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


def compiled(fn, dynamic=None):
    """torch.compile of a reference function (the strongest 'plain PyTorch' peer).

    dynamic=None: the first shape compiles static, a second shape recompiles once with dynamic
    sizes that later shapes reuse; this keeps shape sweeps inside the GPU check's time budget.
    Pass dynamic=False for a peer specialized to every shape."""
    return torch.compile(fn, dynamic=dynamic)


class Results:
    """Collects benchmark rows and writes them as JSON + CSV tagged with the environment."""

    def __init__(self, name, out_dir=None):
        self.name = name
        self.env = env_info()
        self.rows = []
        self.out_dir = out_dir

    def add(self, **row):
        self.rows.append(row)
        cols = " ".join(f"{k}={_fmt(v)}" for k, v in row.items())
        print(f"[{self.name}] {cols}", flush=True)
        self._save()  # after every row: a run cut short by its time budget keeps what it measured

    def _save(self):
        if not self.out_dir:
            return None
        os.makedirs(self.out_dir, exist_ok=True)
        path = os.path.join(self.out_dir, f"{self.name}.json")
        with open(path, "w") as f:
            json.dump({"benchmark": self.name, "env": self.env, "rows": self.rows}, f, indent=1)
        keys = []
        for r in self.rows:
            keys += [k for k in r if k not in keys]
        with open(os.path.join(self.out_dir, f"{self.name}.csv"), "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(self.env) + keys)
            w.writeheader()
            for r in self.rows:
                w.writerow({**self.env, **r})
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
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        sys.exit("benchmarks must not run under TRITON_INTERPRET=1")
