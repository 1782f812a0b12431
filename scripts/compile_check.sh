#!/usr/bin/env bash
# Compile-check CUDA/C++ sources with the same flags as setup.py, without installing:
#   scripts/compile_check.sh csrc/norm.cu [csrc/rotary.cu ...]
# Objects go to a temp dir; exit status is nvcc's.  Use before spending GPU time.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
ARCHS=${FASTLM_CUDA_ARCHS:-"8.0;9.0"}
INC=$($PY - <<'PYEOF'
import os, sys
from torch.utils.cpp_extension import include_paths
paths = include_paths()
print(" ".join("-I" + p for p in paths))
PYEOF
)
# torch >= 2.10 headers need C++20; older ones are fine with it too.
STD=${FASTLM_CXX_STD:-c++20}
PYINC=$($PY -c "import sysconfig; print(sysconfig.get_paths()['include'])")
GENCODE=""
for a in ${ARCHS//;/ }; do n=${a//./}; GENCODE="$GENCODE -gencode=arch=compute_$n,code=sm_$n"; done
GENCODE="$GENCODE -gencode=arch=compute_$n,code=compute_$n"  # PTX of the newest arch, as setup.py
TMP=$(mktemp -d)
for f in "$@"; do
  echo "compiling $f"
  case "$f" in
    *.cu) "$CUDA_HOME/bin/nvcc" -c "$f" -o "$TMP/$(basename "$f").o" -Icsrc $INC -I"$PYINC" -std=$STD -O3 \
            --expt-relaxed-constexpr -U__CUDA_NO_HALF_OPERATORS__ -U__CUDA_NO_HALF_CONVERSIONS__ \
            -U__CUDA_NO_BFLOAT16_OPERATORS__ -U__CUDA_NO_BFLOAT16_CONVERSIONS__ -DFASTLM_WITH_CUDA \
            -D_GLIBCXX_USE_CXX11_ABI=1 --use_fast_math -lineinfo --compiler-options -fPIC $GENCODE -Xptxas=-v \
            2> "$TMP/ptxas.log" \
          || { cat "$TMP/ptxas.log"; exit 1; }
          # One line per kernel: registers, spills, shared memory, then its (demangled) name.
          grep -E "Compiling entry|error|warning|Performance|spill|Used" "$TMP/ptxas.log" | grep -v " 0 bytes spill" \
            | sed -E "s/.*Compiling entry function '([^']*)' for '(sm_[0-9a]+)'.*/== \2 \1/" \
            | { command -v c++filt >/dev/null && c++filt || cat; } \
            | awk '/^== /{name=$0; next} {sub(/^ptxas info *: */, ""); print $0 "   " substr(name, 4, 160)}' \
            | head -${PTXAS_LINES:-60} || true ;;
    *.cpp) g++ -c "$f" -o "$TMP/$(basename "$f").o" -Icsrc $INC -I"$PYINC" -I"$CUDA_HOME/include" -std=$STD -O1 -fPIC -DFASTLM_WITH_CUDA ;;
  esac
done
rm -rf "$TMP"
echo "ok"
