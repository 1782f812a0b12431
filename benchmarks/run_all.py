"""Run every benchmark (python -m benchmarks.run_all --out DIR [--quick] [--budget-s S]).

--budget-s S runs each module in its own process with a share of the S seconds that are left
(shares weighted by how heavy the module is), so one slow module cannot starve the rest of a
time-limited GPU session.  A module past its share is interrupted; the rows it had measured are
kept (every benchmark rewrites its JSON/CSV after each row) and the module is reported as timed
out, never as passed.
"""
import importlib
import json
import os
import signal
import subprocess
import sys
import time
import traceback

from benchmarks import common
from benchmarks.common import ROOT, main_guard, parser, require_cuda

# Each module has main(argv) -> None; listed in the order of the product card.
MODULES = ["bench_norm", "bench_rotary", "bench_activation", "bench_attention", "bench_loss", "bench_decode",
           "bench_train", "bench_generate", "bench_profile"]
# Relative share of a --budget-s run (compile-heavy sweeps get more).
WEIGHTS = {"bench_attention": 3, "bench_decode": 2, "bench_train": 2, "bench_generate": 2}


def _run_budgeted(name, sub, seconds):
    """Run one module in a subprocess for at most `seconds`; returns 'ok', 'failed' or 'timed out'."""
    cmd = [sys.executable, "-m", f"benchmarks.{name}", *sub]
    proc = subprocess.Popen(cmd, cwd=ROOT, start_new_session=True)
    try:
        rc = proc.wait(timeout=max(seconds, 1))
        return "ok" if rc == 0 else f"failed (exit {rc}: an error, or a fastlm row that failed; see its log)"
    except subprocess.TimeoutExpired:
        # SIGINT first: the module's finally/atexit paths flush what they measured.
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        return f"timed out after {seconds:.0f} s"


def main(argv=None):
    main_guard()
    p = parser("run every fastlm benchmark")
    p.add_argument("--only", default=None, help="comma-separated module names")
    p.add_argument("--budget-s", type=float, default=0.0,
                   help="total seconds for all modules (each in its own process, with a weighted share of "
                        "what is left); 0 = no limit, all in this process")
    args = p.parse_args(argv)
    if not require_cuda("run_all"):
        return 0
    names = args.only.split(",") if args.only else MODULES
    unknown = [n for n in names if n not in MODULES]
    if unknown:
        p.error(f"--only: unknown module(s) {unknown}; known: {MODULES}")
    sub = ["--out", args.out] if args.out else []
    if args.quick:
        sub.append("--quick")
    status = {}
    deadline = time.monotonic() + args.budget_s
    for i, name in enumerate(names):
        t0 = time.monotonic()
        if args.budget_s > 0:
            left = deadline - t0
            weights = [WEIGHTS.get(n, 1) for n in names[i:]]
            share = left * weights[0] / sum(weights)
            print(f"[run_all] {name}: {share:.0f} s of the {left:.0f} s left", flush=True)
            status[name] = _run_budgeted(name, sub, share)
        else:
            try:
                before = len(common.FAILURES)
                importlib.import_module(f"benchmarks.{name}").main(sub)
                failed = common.FAILURES[before:]
                status[name] = f"failed ({len(failed)} fastlm rows: {failed[0]} ...)" if failed else "ok"
            except Exception:
                traceback.print_exc()
                status[name] = "failed"
        print(f"[run_all] {name}: {status[name]} in {time.monotonic() - t0:.0f} s", flush=True)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "run_all_status.json"), "w") as f:
            json.dump({"benchmark": "run_all", "status": status}, f, indent=1)
    bad = {n: s for n, s in status.items() if s != "ok"}
    if bad:
        print(f"[run_all] NOT OK: {bad}", flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
