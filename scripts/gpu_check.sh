#!/usr/bin/env bash
# The GPU check: one command for a GPU machine with no network.
#   scripts/gpu_check.sh [OUT_DIR]        (default: $OUT, else ./out)
# 1. builds fastlm in place (every .cu file), 2. runs the whole test suite including the
# GPU-only tests, 3. runs every benchmark.  Writes into OUT_DIR (at most 7 files):
#   gpu_check.log   everything printed         junit*.xml      per-test results
#   results.json    all benchmark rows + env   results.tar.gz  per-benchmark JSON/CSV
#   summary.json    exit status of each stage
# STAGES=build,test,bench (default all) selects stages; TEST_FILES / PYTEST_ARGS / BENCH_ARGS
# pass options.
#
# BUDGET_S=<seconds> fits the whole check into one device call (a session has 15 minutes of
# device time, the machine's start included, and 10 minutes per command):
#   BUDGET_S=500 scripts/gpu_check.sh $OUT       (device tool: timeout_s=590)
# The build takes what it needs; the tests then get TEST_SHARE percent (default 55) of what is
# left (all of it when STAGES has no bench): the GPU-only tests (-m gpu: they never run on a CPU machine) first, with 60% of that,
# then the rest; the benchmarks (--quick, each module in its own process with a weighted share,
# see benchmarks/run_all.py --budget-s) get the remainder.  A stage cut short by its share says
# so (pytest is interrupted with SIGINT and still writes its junit XML, rc 2 or 124; a benchmark
# keeps the rows it measured and is reported "timed out"), never passes silently.
# Without BUDGET_S every stage runs to completion.
# Tests run on TEST_WORKERS pytest-xdist workers (default 8; 0 = serial) when pytest-xdist is
# installed, with FASTLM_ATTENTION_AUTOTUNE=0: correctness does not need every tile config timed
# for every shape (tests/test_attention.py runs each config and the autotuned path explicitly).
# FASTLM_CUDA_ARCHS defaults to 9.0 here (the GPU in hand) to halve the compile time.
# With the device tool (a session's whole device time is 15 minutes):
#   here:   scripts/fetch_peer_wheels.sh          (liger-kernel for the peer columns)
#   device: run(command="BUDGET_S=480 bash scripts/gpu_check.sh $OUT", carry=[".whl"], timeout_s=570)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${1:-${OUT:-out}}
mkdir -p "$OUT_DIR"
OUT_DIR=$(cd "$OUT_DIR" && pwd)
LOG="$OUT_DIR/gpu_check.log"
exec > >(tee -a "$LOG") 2>&1
STAGES=${STAGES:-build,test,bench}
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
T0=$(date +%s)
BUDGET_S=${BUDGET_S:-0}
left() { echo $(( BUDGET_S - ($(date +%s) - T0) )); }
# capped SECONDS CMD...: run CMD, interrupted with SIGINT after SECONDS (at least 10) under a budget.
capped() {
  local cap=$1; shift
  if (( BUDGET_S > 0 )); then timeout -s INT -k 30 "$(( cap > 10 ? cap : 10 ))" "$@"; else "$@"; fi
}

# Peer libraries the machine lacks (liger-kernel) travel as wheels in .whl/: see
# scripts/fetch_peer_wheels.sh.  Installed into a private folder, never over the machine's own.
if compgen -G ".whl/*.whl" >/dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/fastlm_peers .whl/*.whl \
    && export PYTHONPATH=/tmp/fastlm_peers${PYTHONPATH:+:$PYTHONPATH} && echo "== peers from .whl: $(ls .whl)"
fi
echo "== fastlm gpu check $(date -u +%FT%TZ) commit=$(git rev-parse --short HEAD 2>/dev/null || echo ${FASTLM_COMMIT:-unknown}) budget=${BUDGET_S}s"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1 || true
$PY -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"

rc_build=-1; rc_test=-1; rc_bench=-1
if [[ $STAGES == *build* ]]; then
  start=$(date +%s)
  MAX_JOBS=${MAX_JOBS:-16} FASTLM_CUDA_ARCHS=${FASTLM_CUDA_ARCHS:-"9.0"} \
    $PY -m pip install --no-build-isolation --no-deps -e . 2>&1 | tail -20
  rc_build=${PIPESTATUS[0]}
  echo "== build rc=$rc_build in $(( $(date +%s) - start ))s"
fi
if [[ $STAGES == *test* ]]; then
  start=$(date +%s)
  export FASTLM_ATTENTION_AUTOTUNE=${FASTLM_ATTENTION_AUTOTUNE:-0}
  ARGS=(-q -rs --durations=15)
  # A hung test must not eat the whole call: per-test timeout when pytest-timeout is there.
  $PY -c "import pytest_timeout" 2>/dev/null && ARGS+=(--timeout=${TEST_TIMEOUT:-240})
  # A worker whose CUDA context a faulting kernel broke exits and is replaced (tests/conftest.py).
  $PY -c "import xdist" 2>/dev/null && [[ ${TEST_WORKERS:-8} != 0 ]] \
    && ARGS+=(-n "${TEST_WORKERS:-8}" --max-worker-restart="${TEST_MAX_RESTARTS:-64}")
  if (( BUDGET_S > 0 )); then
    # Without the bench stage the tests get all that is left (less time to write the results).
    if [[ $STAGES == *bench* ]]; then budget=$(( $(left) * ${TEST_SHARE:-55} / 100 )); else budget=$(( $(left) - 15 )); fi
    echo "== tests: ${budget}s of the $(left)s left, GPU-only tests first"
    capped $(( budget * 6 / 10 )) $PY -m pytest ${TEST_FILES:-tests} "${ARGS[@]}" -m gpu \
      --junitxml="$OUT_DIR/junit_gpu.xml" ${PYTEST_ARGS:-}
    rc1=$?
    capped $(( budget - ($(date +%s) - start) )) $PY -m pytest ${TEST_FILES:-tests} "${ARGS[@]}" -m "not gpu" \
      --junitxml="$OUT_DIR/junit_rest.xml" ${PYTEST_ARGS:-}
    rc2=$?
    # 5 = that half selected no test (e.g. TEST_FILES without GPU tests): fine unless both are empty.
    if (( rc1 == 5 && rc2 != 5 )); then rc1=0; elif (( rc2 == 5 && rc1 != 5 )); then rc2=0; fi
    echo "== tests rc: gpu-only=$rc1 rest=$rc2 (2 or 124 after a 'timeout' line: cut short by the budget)"
    rc_test=$(( rc1 > rc2 ? rc1 : rc2 ))
  else
    $PY -m pytest ${TEST_FILES:-tests} "${ARGS[@]}" --junitxml="$OUT_DIR/junit.xml" ${PYTEST_ARGS:-}
    rc_test=$?
  fi
  echo "== tests rc=$rc_test in $(( $(date +%s) - start ))s"
fi
if [[ $STAGES == *bench* ]]; then
  start=$(date +%s)
  mkdir -p "$OUT_DIR/results"
  if (( BUDGET_S > 0 )); then
    bb=$(( $(left) - 20 ))
    echo "== benchmarks: ${bb}s, --quick"
    $PY -m benchmarks.run_all --out "$OUT_DIR/results" --quick --budget-s $(( bb > 30 ? bb : 30 )) ${BENCH_ARGS:-}
  else
    $PY -m benchmarks.run_all --out "$OUT_DIR/results" ${BENCH_ARGS:-}
  fi
  rc_bench=$?
  echo "== benchmarks rc=$rc_bench in $(( $(date +%s) - start ))s"
  $PY - "$OUT_DIR" <<'PYEOF'
import glob, json, os, sys
out = sys.argv[1]
merged = [json.load(open(p)) for p in sorted(glob.glob(os.path.join(out, "results", "*.json")))]
json.dump(merged, open(os.path.join(out, "results.json"), "w"), indent=1)
PYEOF
  tar -czf "$OUT_DIR/results.tar.gz" -C "$OUT_DIR" results && rm -rf "$OUT_DIR/results"
fi
echo "{\"build\": $rc_build, \"test\": $rc_test, \"bench\": $rc_bench, \"seconds\": $(( $(date +%s) - T0 ))}" > "$OUT_DIR/summary.json"
cat "$OUT_DIR/summary.json"
[[ $rc_build -le 0 && $rc_test -le 0 && $rc_bench -le 0 ]]
