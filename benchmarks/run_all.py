"""Run every benchmark (python -m benchmarks.run_all --out DIR)."""
import importlib
import sys
import traceback

from benchmarks.common import main_guard, parser, require_cuda

# Each module has main(argv) -> None; listed in the order of the product card.
MODULES = ["bench_norm", "bench_rotary", "bench_activation", "bench_attention", "bench_loss", "bench_decode", "bench_train", "bench_generate", "bench_profile"]


def main(argv=None):
    main_guard()
    p = parser("run every fastlm benchmark")
    p.add_argument("--only", default=None, help="comma-separated module names")
    args = p.parse_args(argv)
    if not require_cuda("run_all"):
        return 0
    failed = []
    for name in args.only.split(",") if args.only else MODULES:
        try:
            mod = importlib.import_module(f"benchmarks.{name}")
        except ModuleNotFoundError as e:
            if e.name == f"benchmarks.{name}":
                print(f"[run_all] {name}: not written yet", flush=True)
                continue
            raise
        sub = ["--out", args.out] if args.out else []
        if args.quick:
            sub.append("--quick")
        try:
            mod.main(sub)
        except Exception:
            traceback.print_exc()
            failed.append(name)
    if failed:
        print(f"[run_all] FAILED: {failed}", flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
