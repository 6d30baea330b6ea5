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
# The CPU kernels are the reference for the update and the apply.
CPU=(csrc/cpu/dense.cpp csrc/cpu/microkernel.cpp csrc/cpu/microkernel_generic.cpp
     csrc/cpu/gram.cpp csrc/cpu/sherman_morrison.cpp csrc/cpu/apply.cpp)
isa_flags() {
  case $1 in
    *avx2*) echo "-mavx2 -mfma" ;;
    *avx512*) echo "-mavx512f -mfma" ;;
  esac
}
if [[ $(uname -m) == x86_64 ]]; then CPU+=(csrc/cpu/microkernel_avx2.cpp csrc/cpu/microkernel_avx512.cpp); fi
stale() {  # object $1 older than its source $2 or than any header
  [[ ! -f $1 || $2 -nt $1 || -n $(find csrc tests/cuda_emu \( -name '*.cuh' -o -name '*.h' -o -name '*.inc' \) -newer "$1" | head -1) ]]
}
for f in "${SRC[@]}" tests/cuda_emu/emu.cpp tests/cuda_emu/check_tc.cpp "${CPU[@]}"; do
  [[ -f $f ]] || continue
  o="$OUT/$(basename "${f%.*}").o"
  if stale "$o" "$f"; then
    # shellcheck disable=SC2046
    "$CXX" -std=c++17 -O2 -g -fopenmp -DSSSE_CUDA_EMULATE -Itests/cuda_emu/include -Icsrc \
      -Wall -Wextra -Wno-unknown-pragmas -Wno-unused-parameter -Wno-clobbered $(isa_flags "$f") \
      -x c++ -c "$f" -o "$o"
  fi
  OBJS+=("$o")
done
"$CXX" -fopenmp "${OBJS[@]}" -o "$OUT/check_tc"
exec "$OUT/check_tc" "$@"
