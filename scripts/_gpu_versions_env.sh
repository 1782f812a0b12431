# Sourced by scripts/test_gpu_versions.sh and scripts/prebuild_for_device.sh: the GPU machine's
# package versions on this machine.
#   gpu_versions_venv   creates or reuses $VENV (default /tmp/fastlm-venv-gpu-versions) with torch
#                       $TORCH (2.11.0: the GPU machine's, a CUDA 13.0 build), transformers
#                       $TRANSFORMERS, triton $TRITON (3.8: triton 3.6's interpreter breaks on
#                       numpy >= 2.4; its compiles are checked by tests/test_triton_compile.py)
#   checkout_copy       sets WORK to a new temporary folder (removed on exit) holding a clone of
#                       the checkout in $WORK/src with its uncommitted changes: the editable
#                       build of fastlm._C is per torch version, so it must not land in the checkout
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${VENV:-/tmp/fastlm-venv-gpu-versions}
TORCH=${TORCH:-2.11.0} TRANSFORMERS=${TRANSFORMERS:-5.17.*} TRITON=${TRITON:-3.8.0}

gpu_versions_venv() {
  if [[ ! -x $VENV/bin/python ]] || [[ $($VENV/bin/python -c "import torch; print(torch.__version__)" 2>/dev/null) != $TORCH* ]]; then
    python3 -m venv "$VENV"
    "$VENV/bin/python" -m pip install -q "setuptools>=64" wheel
    "$VENV/bin/python" -m pip install -q "torch==$TORCH" numpy pytest pytest-xdist ninja "transformers==$TRANSFORMERS" \
      safetensors tokenizers tqdm
  fi
  "$VENV/bin/python" -m pip install -q --no-deps "triton==$TRITON"
}

checkout_copy() {
  WORK=$(mktemp -d /tmp/fastlm-gpu-versions.XXXXXX)
  trap 'rm -rf "$WORK"' EXIT
  git clone -q "$ROOT" "$WORK/src"
  (cd "$ROOT" && git diff HEAD --binary) | (cd "$WORK/src" && git apply --allow-empty)
}

# The key a prebuilt fastlm._C must match (scripts/gpu_check.sh): the sources it is compiled from.
prebuilt_sources_hash() {
  (cd "${1:-$ROOT}" && find setup.py csrc -type f -print0 | LC_ALL=C sort -z | xargs -0 sha256sum | sha256sum | cut -c1-16)
}
