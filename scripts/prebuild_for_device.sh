#!/usr/bin/env bash
# Compiles fastlm._C and fastlm._C_sm90 HERE (no GPU needed: nvcc and a CUDA build of torch) for the
# GPU machine (torch 2.11.0+cu130, sm_90), into .prebuilt/, so that the GPU check spends its scarce
# device minutes on tests and benchmarks instead of a ~100 s compile:
#   scripts/prebuild_for_device.sh                  (about 10 minutes on 2 cores)
#   device: run(command="BUDGET_S=480 bash scripts/gpu_check.sh $OUT", carry=[".whl", ".prebuilt"], timeout_s=570)
# scripts/gpu_check.sh takes .prebuilt/ only when its stamp matches: the machine's torch version,
# the archs asked for (FASTLM_CUDA_ARCHS, default 9.0) and the sources (a hash of setup.py and
# csrc/; any change to them after the prebuild means a normal build); and only if the libraries
# then import with their CUDA kernels.  Otherwise it builds as usual.
# The build runs in a copy of the checkout with the venv of scripts/test_gpu_versions.sh
# ($VENV, torch $TORCH); the libraries use the limited Python API (abi3), so Python 3.11 here
# builds what Python 3.12 there loads.
set -euo pipefail
source "$(dirname "$0")/_gpu_versions_env.sh"
ARCHS=${FASTLM_CUDA_ARCHS:-9.0}
gpu_versions_venv
checkout_copy
cd "$WORK/src"
start=$(date +%s)
FASTLM_CUDA_ARCHS=$ARCHS MAX_JOBS=${MAX_JOBS:-2} "$VENV/bin/python" -m pip install -q --no-build-isolation --no-deps -e .
"$VENV/bin/python" -c "from fastlm._build_info import WITH_CUDA, WHY_NO_CUDA; assert WITH_CUDA, WHY_NO_CUDA"
DEST=$ROOT/.prebuilt
rm -rf "$DEST.tmp" && mkdir -p "$DEST.tmp"
cp fastlm/_C*.so fastlm/_build_info.py "$DEST.tmp/"
torch_version=$("$VENV/bin/python" -c "import torch; print(torch.__version__)")
echo "torch=$torch_version archs=$ARCHS sources=$(prebuilt_sources_hash "$WORK/src")" > "$DEST.tmp/stamp"
rm -rf "$DEST" && mv "$DEST.tmp" "$DEST"
echo "prebuilt in $(( $(date +%s) - start )) s: $(cat "$DEST/stamp")"
ls -la "$DEST"
