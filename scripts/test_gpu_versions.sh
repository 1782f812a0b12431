#!/usr/bin/env bash
# The test suite on the CPU with the GPU machine's torch and transformers (torch 2.11, transformers
# 5.17): what differs between versions (dynamo's tracing, opcheck, the HF integrations) fails here
# instead of in the GPU check's scarce minutes.  Triton stays 3.8 (triton 3.6's interpreter breaks
# on numpy >= 2.4; its compiles are checked by tests/test_triton_compile.py's aot36).
#   scripts/test_gpu_versions.sh [pytest args]       (default: -q -n 2 tests)
# The checkout (with uncommitted changes) is copied to a temporary folder, since the editable build
# of fastlm._C is per torch version; the venv is kept in $VENV (default /tmp/fastlm-venv-gpu-versions).
set -euo pipefail
source "$(dirname "$0")/_gpu_versions_env.sh"
gpu_versions_venv
checkout_copy
cd "$WORK/src"
FASTLM_SKIP_CUDA_BUILD=1 "$VENV/bin/python" -m pip install -q --no-build-isolation --no-deps -e . >/dev/null
"$VENV/bin/python" -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
if (( $# )); then
  "$VENV/bin/python" -m pytest -p no:cacheprovider "$@"
else
  "$VENV/bin/python" -m pytest -p no:cacheprovider -q -n 2 tests
fi
