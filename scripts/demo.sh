#!/usr/bin/env bash
# Set up the environment and train + evaluate a demo on the embedded synthetic data:
#   bash scripts/demo.sh                                  RGB-D segmentation (configs/demo.py)
#   bash scripts/demo.sh configs/demo_translation.py      multi-domain translation
#   bash scripts/demo.sh configs/demo.py:rgb               a single-input baseline
# Extra arguments go to main.py (e.g. --config.train.batch_size=4).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/venv.sh"
cd "$ROOT"
CONFIG=configs/demo.py
if [ $# -gt 0 ] && [ "${1#--}" = "$1" ]; then CONFIG="$1"; shift; fi
NAME="$(basename "${CONFIG%%:*}" .py)"
case "$CONFIG" in *:*) NAME="${NAME}_${CONFIG#*:}" ;; esac  # configs/demo.py:rgb -> demo_rgb
python main.py --config "$CONFIG" --workdir "${WORKDIR:-workdirs/$NAME}" "$@"
if [ $# -eq 0 ]; then  # the config as shipped: are the figures where they should be?
  python main.py --config "$CONFIG" --workdir "${WORKDIR:-workdirs/$NAME}" --mode check || true
fi
