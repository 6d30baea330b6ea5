#!/usr/bin/env bash
# Builds the tensor-core CUDA kernels as host C++ under the emulator and runs their checks:
#   tests/cuda_emu/run.sh [filter]        e.g. tests/cuda_emu/run.sh gram
# Needs only g++ (C++17); no GPU, no CUDA toolkit. Binary in build/cuda_emu/.
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${SSSE_EMU_BUILD:-build/cuda_emu}
mkdir -p "$OUT"
CXX=${CXX:-g++}
SRC=(csrc/cuda/gram_tc.cu csrc/cuda/inverse_tc.cu csrc/cuda/sherman_morrison_tc.cu csrc/cuda/apply_tc.cu)
OBJS=()
for f in "${SRC[@]}" tests/cuda_emu/emu.cpp tests/cuda_emu/check_tc.cpp; do
  [[ -f $f ]] || continue
  o="$OUT/$(basename "${f%.*}").o"
  if [[ ! -f $o || $f -nt $o || -n $(find csrc/cuda tests/cuda_emu -newer "$o" -name '*.cuh' -o -newer "$o" -name '*.h' | head -1) ]]; then
    lang=c++
    "$CXX" -std=c++17 -O2 -g -DSSSE_CUDA_EMULATE -Itests/cuda_emu/include -Icsrc \
      -Wall -Wextra -Wno-unknown-pragmas -Wno-unused-parameter -x "$lang" -c "$f" -o "$o"
  fi
  OBJS+=("$o")
done
"$CXX" "${OBJS[@]}" -o "$OUT/check_tc"
exec "$OUT/check_tc" "$@"
