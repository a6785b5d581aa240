#!/usr/bin/env bash
# Set up the environment and run the test suite on CPU (8 forced devices for multi-device tests).
# The PyTorch parity tests (tests/parity/, marker `torch`) need torch; they run in a second venv
# (.venv-torch) with Python 3.11 + torch 2.13.0, where the CPU torch wheel is available.
# That venv is installed while the main suite runs: pip waits on the network and the disk more
# than on the CPU, so the two overlap.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/venv.sh"
cd "$ROOT"
TORCH_VENV="$ROOT/.venv-torch"
TORCH_SETUP_LOG="$(mktemp)"
trap 'rm -f "$TORCH_SETUP_LOG"' EXIT

setup_torch_venv() {
  [ -x "$TORCH_VENV/bin/python" ] || python3.11 -m venv "$TORCH_VENV"
  "$TORCH_VENV/bin/python" -m pip install -q --upgrade pip >/dev/null
  "$TORCH_VENV/bin/python" -m pip install -q -r requirements.txt -r requirements-torch.txt
  "$TORCH_VENV/bin/python" -m pip install -q --no-deps -e . >/dev/null
}

torch_setup=''
if [ "${SKIP_TORCH_TESTS:-0}" != 1 ] && command -v python3.11 >/dev/null 2>&1; then
  setup_torch_venv >"$TORCH_SETUP_LOG" 2>&1 &
  torch_setup=$!
fi

status=0
python -m pytest -q -n "${PYTEST_WORKERS:-2}" --dist loadgroup --no-loadscope-reorder -p no:cacheprovider -m "not torch" \
  tests "$@" ||
  status=$?

if [ -n "$torch_setup" ]; then
  if ! wait "$torch_setup"; then
    cat "$TORCH_SETUP_LOG" >&2
    echo "torch could not be installed for Python 3.11: parity tests not run" >&2
    exit 1
  fi
  "$TORCH_VENV/bin/python" -m pytest -q -n "${PYTEST_WORKERS:-2}" --dist loadgroup --no-loadscope-reorder \
    -p no:cacheprovider -m "torch and not user_compile" tests/parity || status=$?
  # Bounds that are the official float32 run's own rounding: compiled as users compile.
  CEN_JAX_TEST_COMPILE=default "$TORCH_VENV/bin/python" -m pytest -q -p no:cacheprovider \
    -m "torch and user_compile" tests/parity || status=$?
fi
exit "$status"
