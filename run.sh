#!/usr/bin/env bash
# One command for everything: sets up ./.venv on first use (torch, then ssse built from this
# source tree with its C++/CUDA extension) and runs
#   ./run.sh demo [options]   the end-to-end erasure demo (default)
#   ./run.sh test [pytest options]   the whole test suite
#   ./run.sh <ssse subcommand> [options]   any `ssse` command, e.g. ./run.sh bench --small
# Environment: PYTHON (interpreter for the venv, default python3), SSSE_VENV (default .venv),
# SSSE_TORCH (the torch requirement installed when the venv has none, default torch==2.13.0).
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
VENV=${SSSE_VENV:-.venv}
TORCH_SPEC=${SSSE_TORCH:-torch==2.13.0}

if [ ! -x "$VENV/bin/python" ]; then
  echo "ssse: creating $VENV" >&2
  "$PYTHON" -m venv "$VENV"
fi
py="$VENV/bin/python"
if ! "$py" -c "import torch" 2>/dev/null; then
  echo "ssse: installing $TORCH_SPEC" >&2
  "$py" -m pip install -q "$TORCH_SPEC"
fi
stamp="$VENV/.ssse-installed"
if [ ! -f "$stamp" ] || [ -n "$(find pyproject.toml CMakeLists.txt csrc ssse_ext python \
    -newer "$stamp" -print -quit)" ]; then
  echo "ssse: building and installing ssse (C++/CUDA extension) into $VENV" >&2
  "$py" -m pip install -q -e ".[test,hf]"
  touch "$stamp"
fi

cmd=${1:-demo}
[ $# -gt 0 ] && shift
case "$cmd" in
  test) exec "$py" -m pytest -q "$@" ;;
  *) exec "$VENV/bin/ssse" "$cmd" "$@" ;;
esac
