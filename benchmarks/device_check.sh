#!/usr/bin/env bash
# The whole GPU check in one prepared run, on a fresh GPU machine with its own nvcc and torch and
# nothing downloadable:
#   1. build   the extension there (SSSE_CUDA=ON, architectures from the card)
#   2. tests   the CUDA tests under both kernel sets (simt, tc)
#   3. split   per-kernel time split with CUDA events, each set beside torch's bmm / cholesky /
#              cholesky_inverse (benchmarks/time_split.py), then the ResNet-18-size layout
#   4. bench   the benchmark (both sets, torch's closed forms in the same run and dtype)
#   5. memcheck, racecheck   compute-sanitizer on a small case, every kernel, both sets
# and a summary last. Every step gets what is left of the budget, capped, so the run stays under
# ~8 minutes; a step that cannot run says why and the others go on.
#
#   bash benchmarks/device_check.sh          # logs in $OUT (if set) or /tmp/ssse-device-check
# It leaves 8 files there (build, tests, split, bench, memcheck, racecheck logs; split.json,
# bench.json): the device tool brings back at most 8.
# Environment: PYTHON (default python3), SSSE_CHECK_BUDGET (seconds, default 450),
#   SSSE_CHECK_STEPS (default "build tests split bench model memcheck racecheck bench_dual").
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
LOGS=${OUT:-/tmp/ssse-device-check}
mkdir -p "$LOGS"
BUDGET=${SSSE_CHECK_BUDGET:-450}
STEPS=" ${SSSE_CHECK_STEPS:-build tests split bench model memcheck racecheck bench_dual} "
START=$(date +%s)
PY=${PYTHON:-python3}
SITE=/tmp/ssse-site
declare -a ROWS

left() { echo $(( BUDGET - ($(date +%s) - START) )); }
wanted() { [[ $STEPS == *" $1 "* ]]; }
skip() { ROWS+=("| $1 | skipped: $2 | 0 |"); echo "=== $1: skipped ($2)"; }

# step NAME CAP_SECONDS CMD...: runs CMD with a timeout of min(CAP, budget left - 5 s); its output
# goes to $LOGS/NAME.log, whose tail is printed.
step() {
  local name=$1 cap=$2; shift 2
  local avail=$(( $(left) - 5 )) t0=$(date +%s) rc
  (( avail < cap )) && cap=$avail
  if (( cap < 10 )); then
    skip "$name" "out of time"; return 1
  fi
  echo "=== $name (limit ${cap}s)"
  timeout --kill-after=5 "$cap" "$@" > "$LOGS/$name.log" 2>&1
  rc=$?
  tail -n 25 "$LOGS/$name.log"
  local status=ok
  if (( rc == 124 || rc == 137 )); then status="timeout after ${cap}s"
  elif (( rc != 0 )); then status="FAILED (rc=$rc)"; fi
  ROWS+=("| $name | $status | $(( $(date +%s) - t0 )) |")
  return $rc
}

# ---- what this machine has --------------------------------------------------------------------
GPU=$(nvidia-smi --query-gpu=name,driver_version,compute_cap --format=csv,noheader 2>/dev/null | head -1)
echo "machine: ${GPU:-no NVIDIA GPU visible (nvidia-smi found none)}"
echo "nvcc: $(nvcc --version 2>/dev/null | tail -1 || true)"
if ! command -v "$PY" > /dev/null; then
  echo "no Python interpreter '$PY'"; exit 2
fi
"$PY" - <<'EOF' 2>&1
import importlib, sys
print("python", sys.version.split()[0], "venv" if sys.prefix != sys.base_prefix else "system",
      sys.prefix)
for mod in ("torch", "scikit_build_core", "pybind11", "pytest", "numpy"):
    try:
        m = importlib.import_module(mod)
        extra = f", cuda {m.version.cuda}, gpu {m.cuda.is_available()}" if mod == "torch" else ""
        print(f"  {mod} {getattr(m, '__version__', '?')}{extra}")
    except Exception as exc:
        print(f"  {mod}: MISSING ({type(exc).__name__})")
EOF
HAVE_GPU=$("$PY" -c 'import torch; print(int(torch.cuda.is_available()))' 2>/dev/null || echo 0)
HAVE_DEPS=$("$PY" -c 'import torch, scikit_build_core, pybind11; print(1)' 2>/dev/null || echo 0)
HAVE_NVCC=0; command -v nvcc > /dev/null && HAVE_NVCC=1
CC=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -1 | tr -d '. ')
export SSSE_CUDA=ON SSSE_CUDA_ARCHITECTURES=${CC:-90}
export CMAKE_BUILD_PARALLEL_LEVEL=$(nproc)
export PYTHONUNBUFFERED=1

# ---- 1. build ---------------------------------------------------------------------------------
# Into a --target directory, without build isolation and without dependencies: the machine's
# python3 may itself be a virtual environment (a venv made from it would see the base
# interpreter's packages, not its torch), and nothing can be downloaded. PYTHONPATH then points
# at the build; the tests run from a copy so that ssse_ext is the built package, not the source.
export ROOT SITE PY
build() {
  set -e
  rm -rf "$SITE"
  "$PY" -m pip install --no-build-isolation --no-deps --no-compile -q --target "$SITE" "$ROOT"
  cd /tmp && PYTHONPATH="$SITE" "$PY" -c 'import ssse_ext, json; i = ssse_ext.build_info()
assert i["cuda_compiled"], "built without CUDA: " + json.dumps(i)
print(json.dumps(i))'
}
export -f build
BUILT=0
if ! wanted build; then
  skip build "not asked for (SSSE_CHECK_STEPS)"
elif (( ! HAVE_DEPS )); then
  skip build "$PY lacks torch, scikit-build-core or pybind11 (see env above)"
elif (( ! HAVE_NVCC )); then
  skip build "no nvcc on PATH"
else
  step build 200 bash -c build && BUILT=1
fi
if (( BUILT )); then
  export PYTHONPATH="$SITE"
  rm -rf /tmp/ssse-tests && mkdir -p /tmp/ssse-tests && cp -r tests /tmp/ssse-tests/
fi
ready() {  # ready STEP: whether STEP can run; says why not
  if ! wanted "$1"; then skip "$1" "not asked for (SSSE_CHECK_STEPS)"; return 1; fi
  if (( ! BUILT )); then skip "$1" "no build"; return 1; fi
  if (( ! HAVE_GPU )); then skip "$1" "torch sees no CUDA device"; return 1; fi
  return 0
}

# ---- 2. tests ---------------------------------------------------------------------------------
if ready tests; then
  step tests 180 env -C /tmp/ssse-tests "$PY" -m pytest -q -p no:cacheprovider \
    tests/test_cuda.py tests/test_cuda_tc.py tests/test_dual.py tests/test_scale.py -rf
fi

# ---- 3. per-kernel split and the ResNet-18-size layout -----------------------------------------
if ready split; then
  step split 150 env -C /tmp "$PY" "$ROOT/benchmarks/time_split.py" --resnet18 \
    --json "$LOGS/split.json"
fi

# ---- 4. benchmark -----------------------------------------------------------------------------
if ready bench; then
  step bench 150 env -C /tmp "$PY" "$ROOT/benchmarks/bench_fisher.py" --device cuda \
    --kernels simt,tc --json "$LOGS/bench.json"
fi

# ---- 4b. the real-model benchmark (ResNet-18 size: fit, erase, memory, build rate) ----------------
if ready model; then
  step model 120 env -C /tmp "$PY" "$ROOT/benchmarks/bench_model.py" --device cuda \
    --json "$LOGS/model.json"
fi

# ---- 5. sanitizers ------------------------------------------------------------------------------
SAN=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
for tool in memcheck racecheck; do
  if ready "$tool"; then
    if [[ ! -x $SAN ]]; then skip "$tool" "no compute-sanitizer"; continue; fi
    cap=60; quick=; [[ $tool == racecheck ]] && cap=120 quick=1
    step "$tool" "$cap" env -C /tmp PYTORCH_NO_CUDA_MEMORY_CACHING=1 SSSE_SANITIZER_QUICK=$quick \
      "$SAN" --tool "$tool" --error-exitcode 1 "$PY" "$ROOT/benchmarks/compute_sanitizer_case.py"
  fi
done

# ---- 6. the dual (low-rank) blocks' benchmark ---------------------------------------------------
if ready bench_dual; then
  step bench_dual 60 env -C /tmp "$PY" "$ROOT/benchmarks/bench_dual.py" --device cuda \
    --json "$LOGS/bench_dual.json"
fi

# ---- summary ------------------------------------------------------------------------------------
echo
echo "## summary (${GPU:-no GPU})"
sed -n '/^## split summary/,/^$/p' "$LOGS/split.log" 2>/dev/null
grep -h '^| ResNet\|^| kernels | Gram ms' -A4 "$LOGS/split.log" 2>/dev/null | grep '^|' | head -6
echo
grep -h '^|' "$LOGS/bench.log" 2>/dev/null
echo
grep -h '^|\|^resnet18\|^small_resnet' "$LOGS/model.log" 2>/dev/null
echo
grep -hE 'passed|failed|error' "$LOGS/tests.log" 2>/dev/null | tail -3
grep -hE 'ERROR SUMMARY|RACECHECK SUMMARY' "$LOGS/memcheck.log" "$LOGS/racecheck.log" 2>/dev/null
echo
echo "| step | status | s |"
echo "|---|---|---|"
printf '%s\n' "${ROWS[@]+"${ROWS[@]}"}"
echo "total $(( $(date +%s) - START )) s; logs in $LOGS"
