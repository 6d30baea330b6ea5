#!/usr/bin/env bash
# On a fresh GPU machine (its own nvcc and torch, nothing downloadable): build the extension with
# the CUDA kernels, run the CUDA tests, run compute-sanitizer (memcheck, racecheck) on a small
# case, run the benchmark, and print a short table last. The whole run stays under 8 minutes:
# every step gets what is left of the budget, capped.
#
#   bash benchmarks/device_check.sh            # logs in $OUT (if set) or /tmp/ssse-device-check
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
LOGS=${OUT:-/tmp/ssse-device-check}
mkdir -p "$LOGS"
BUDGET=${SSSE_CHECK_BUDGET:-470}
START=$(date +%s)
PY=python3
declare -a ROWS

left() { echo $(( BUDGET - ($(date +%s) - START) )); }

# step NAME CAP_SECONDS CMD...: runs CMD with a timeout of min(CAP, budget left - 5 s).
step() {
  local name=$1 cap=$2; shift 2
  local avail=$(( $(left) - 5 )) t0=$(date +%s) rc
  (( avail < cap )) && cap=$avail
  if (( cap < 10 )); then
    ROWS+=("| $name | skipped (out of time) | 0 |"); return 1
  fi
  echo "=== $name (limit ${cap}s)"
  timeout --kill-after=5 "$cap" "$@" > "$LOGS/$name.log" 2>&1
  rc=$?
  tail -n 25 "$LOGS/$name.log"
  local status=ok
  (( rc == 124 || rc == 137 )) && status="timeout" || { (( rc != 0 )) && status="FAILED (rc=$rc)"; }
  ROWS+=("| $name | $status | $(( $(date +%s) - t0 )) |")
  return $rc
}

echo "machine: $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null | head -1)"
echo "nvcc: $(nvcc --version 2>/dev/null | tail -1)"
$PY -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)'

CC=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -1 | tr -d '. ')
export SSSE_CUDA=ON SSSE_CUDA_ARCHITECTURES=${CC:-90}
export CMAKE_BUILD_PARALLEL_LEVEL=$(nproc)

# A virtual environment over the system packages (torch, pybind11, scikit-build-core) keeps the
# system site untouched; where venv is unavailable the package goes to a --target directory.
# The build runs without isolation since nothing can be downloaded.
export PY ROOT VENV=/tmp/ssse-venv SITE=/tmp/ssse-site
build() {
  set -e
  if "$PY" -m venv --system-site-packages "$VENV" 2>/dev/null && [[ -x "$VENV/bin/pip" ]]; then
    "$VENV/bin/python" -m pip install --no-build-isolation --no-deps -q "$ROOT"
    py="$VENV/bin/python"
  else
    rm -rf "$VENV"
    "$PY" -m pip install --no-build-isolation --no-deps -q --target "$SITE" "$ROOT"
    py="$PY"; export PYTHONPATH="$SITE"
  fi
  cd /tmp && "$py" -c 'import ssse_ext, json; i = ssse_ext.build_info()
assert i["cuda_compiled"] and i["cuda_device_count"] > 0, i; print(json.dumps(i))'
}
export -f build
if step build 240 bash -c build; then
  if [[ -x "$VENV/bin/python" ]]; then PY="$VENV/bin/python"; else export PYTHONPATH="$SITE"; fi
  # The tests run from a copy so that ssse_ext is the installed package, not the source tree
  # (which has no built _C).
  rm -rf /tmp/ssse-tests && mkdir -p /tmp/ssse-tests && cp -r tests /tmp/ssse-tests/
  step tests 150 env -C /tmp/ssse-tests "$PY" -m pytest -q -p no:cacheprovider tests/test_cuda.py \
    tests/test_dual.py
  SAN=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
  for tool in memcheck racecheck; do
    step "$tool" 90 env -C /tmp PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$SAN" --tool "$tool" \
      --error-exitcode 1 "$PY" "$ROOT/benchmarks/compute_sanitizer_case.py"
  done
  if [[ -f benchmarks/bench_fisher.py ]]; then
    step bench 300 env -C /tmp "$PY" "$ROOT/benchmarks/bench_fisher.py" --device cuda \
      --json "$LOGS/bench.json"
  else
    ROWS+=("| bench | missing benchmarks/bench_fisher.py | 0 |")
  fi
  if [[ -f benchmarks/bench_dual.py ]]; then
    step bench_dual 120 env -C /tmp "$PY" "$ROOT/benchmarks/bench_dual.py" --device cuda \
      --json "$LOGS/bench_dual.json"
  fi
fi

echo
grep -h '^|' "$LOGS/bench.log" "$LOGS/bench_dual.log" 2>/dev/null
echo
echo "| step | status | s |"
echo "|---|---|---|"
printf '%s\n' "${ROWS[@]}"
echo "total $(( $(date +%s) - START )) s; logs in $LOGS"
