#!/usr/bin/env bash
# Set up the environment and train + evaluate the demo CEN on the embedded synthetic RGB-D data.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/venv.sh"
cd "$ROOT"
python main.py --config configs/demo.py --workdir "${WORKDIR:-workdirs/demo}" "$@"
