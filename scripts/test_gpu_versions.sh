#!/usr/bin/env bash
# The test suite on the CPU with the GPU machine's torch and transformers (torch 2.11, transformers
# 5.17): what differs between versions (dynamo's tracing, opcheck, the HF integrations) fails here
# instead of in the GPU check's scarce minutes.  Triton stays 3.8 (triton 3.6's interpreter breaks
# on numpy >= 2.4; its compiles are checked by tests/test_triton_compile.py's aot36).
#   scripts/test_gpu_versions.sh [pytest args]       (default: -q -n 2 tests)
# The checkout (with uncommitted changes) is copied to a temporary folder, since the editable build
# of fastlm._C is per torch version; the venv is kept in $VENV (default /tmp/fastlm-venv-gpu-versions).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
VENV=${VENV:-/tmp/fastlm-venv-gpu-versions}
TORCH=${TORCH:-2.11.0} TRANSFORMERS=${TRANSFORMERS:-5.17.*} TRITON=${TRITON:-3.8.0}
if [[ ! -x $VENV/bin/python ]] || [[ $($VENV/bin/python -c "import torch; print(torch.__version__)" 2>/dev/null) != $TORCH* ]]; then
  python3 -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q "setuptools>=64" wheel
  "$VENV/bin/python" -m pip install -q "torch==$TORCH" numpy pytest pytest-xdist ninja "transformers==$TRANSFORMERS" \
    safetensors tokenizers tqdm
fi
"$VENV/bin/python" -m pip install -q --no-deps "triton==$TRITON"
WORK=$(mktemp -d /tmp/fastlm-gpu-versions.XXXXXX)
trap 'rm -rf "$WORK"' EXIT
git clone -q "$ROOT" "$WORK/src"
(cd "$ROOT" && git diff HEAD --binary) | (cd "$WORK/src" && git apply --allow-empty)
cd "$WORK/src"
FASTLM_SKIP_CUDA_BUILD=1 "$VENV/bin/python" -m pip install -q --no-build-isolation --no-deps -e . >/dev/null
"$VENV/bin/python" -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
if (( $# )); then
  "$VENV/bin/python" -m pytest -p no:cacheprovider "$@"
else
  "$VENV/bin/python" -m pytest -p no:cacheprovider -q -n 2 tests
fi
