#!/usr/bin/env bash
# Creates (once) and activates .venv with the project's requirements and cen_jax installed
# (editable).
# Python: $PYTHON if set, else Python 3.12 (JAX 0.12 is much faster on CPU), else python3.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-$ROOT/.venv}"

pick_python() {
  if [ -n "${PYTHON:-}" ]; then echo "$PYTHON"; return; fi
  for v in $(pyenv versions --bare 2>/dev/null | grep -E '^3\.12' | sort -V | tail -1); do
    if PYENV_VERSION="$v" python3.12 --version >/dev/null 2>&1; then
      echo "env PYENV_VERSION=$v python3.12"; return
    fi
  done
  if command -v python3.12 >/dev/null 2>&1; then echo python3.12; return; fi
  echo python3
}

if [ ! -x "$VENV/bin/python" ]; then
  PY="$(pick_python)"
  echo "creating $VENV with $($PY --version 2>&1)"
  $PY -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install -q --upgrade pip >/dev/null
"$VENV/bin/python" -m pip install -q -r "$ROOT/requirements.txt"
# cen_jax itself, editable: `import cen_jax` (with data/ as cen_jax.datasets, configs/ as
# cen_jax.configs) and the `cen-jax` command, from this checkout.
"$VENV/bin/python" -m pip install -q --no-deps -e "$ROOT" >/dev/null
export PATH="$VENV/bin:$PATH"
