#!/usr/bin/env bash
# The GPU check: one command for a GPU machine with no network.
#   scripts/gpu_check.sh [OUT_DIR]        (default: $OUT, else ./out)
# 1. builds fastlm in place (every .cu file), 2. runs the whole test suite including the
# GPU-only tests, 3. runs every benchmark.  Writes into OUT_DIR:
#   gpu_check.log   everything printed        junit.xml     per-test results
#   results.json    all benchmark rows + env  results.tar.gz  per-benchmark JSON/CSV and plots
#   summary.json    exit status of each stage
# STAGES=build,test,bench (default all) selects stages; TEST_FILES / PYTEST_ARGS / BENCH_ARGS
# pass options.
#
# The device tool allows 10 minutes per command, and all of it does not fit in one, so split it
# (the build is kept between calls while the machine stays warm, and is incremental anyway):
#   STAGES=build,test scripts/gpu_check.sh $OUT
# (if the tests alone outgrow one call: TEST_FILES="tests/test_attention.py" in one call and
#  TEST_FILES="tests --ignore=tests/test_attention.py" in the next)
#   STAGES=build,bench BENCH_ARGS="--only bench_norm,bench_rotary,bench_activation,bench_loss" scripts/gpu_check.sh $OUT
#   STAGES=build,bench BENCH_ARGS="--only bench_attention" scripts/gpu_check.sh $OUT
#   STAGES=build,bench BENCH_ARGS="--only bench_decode,bench_train,bench_generate,bench_profile" scripts/gpu_check.sh $OUT
# FASTLM_CUDA_ARCHS defaults to 9.0 here (the GPU in hand) to halve the compile time.
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

echo "== fastlm gpu check $(date -u +%FT%TZ) commit=$(git rev-parse --short HEAD 2>/dev/null || echo ${FASTLM_COMMIT:-unknown})"
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
  # A hung test must not eat the whole call: per-test timeout when pytest-timeout is there.
  TIMEOUT_ARG=""
  $PY -c "import pytest_timeout" 2>/dev/null && TIMEOUT_ARG="--timeout=${TEST_TIMEOUT:-240}"
  # TEST_FILES (default: the whole tests/ folder) lets the suite be split over two calls.
  $PY -m pytest ${TEST_FILES:-tests} -q -rs --durations=15 $TIMEOUT_ARG --junitxml="$OUT_DIR/junit.xml" ${PYTEST_ARGS:-}
  rc_test=$?
  echo "== tests rc=$rc_test in $(( $(date +%s) - start ))s"
fi
if [[ $STAGES == *bench* ]]; then
  start=$(date +%s)
  mkdir -p "$OUT_DIR/results"
  $PY -m benchmarks.run_all --out "$OUT_DIR/results" ${BENCH_ARGS:-}
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
echo "{\"build\": $rc_build, \"test\": $rc_test, \"bench\": $rc_bench}" > "$OUT_DIR/summary.json"
cat "$OUT_DIR/summary.json"
[[ $rc_build -le 0 && $rc_test -le 0 && $rc_bench -le 0 ]]
