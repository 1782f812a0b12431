#!/usr/bin/env bash
# Download the wheels of the peer libraries the benchmarks compare against and that the GPU
# machine lacks (it has no network), into .whl/ (git-ignored).  Run it on a machine with a
# package index, then let .whl travel with the GPU check (device tool: carry [".whl"]);
# scripts/gpu_check.sh installs whatever it finds there into a private folder on PYTHONPATH.
#   scripts/fetch_peer_wheels.sh [PYTHON_VERSION]      (default 3.12, the GPU machine's)
set -euo pipefail
cd "$(dirname "$0")/.."
PYV=${1:-3.12}
mkdir -p .whl
# liger-kernel: pure Python + Triton (needs only torch and triton, both on the GPU machine).
python3 -m pip download --no-deps --only-binary=:all: --python-version "$PYV" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl "liger-kernel>=0.5"
ls -la .whl
