#!/usr/bin/env bash
# Upcycled checkpoints must load in transformers 4.x as well as 5.x. This builds tiny dense models
# of every family with the project's environment, upcycles them (all layers and a layer subset),
# then loads dense and MoE in a separate transformers-4 venv and compares logits.
#   scripts/check_transformers4.sh [VENV]      (default VENV: /tmp/venv-tf4, created if missing)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${1:-/tmp/venv-tf4}
WORK=$(mktemp -d)
if [ ! -x "$VENV/bin/python" ]; then
  python3.11 -m venv "$VENV"
  "$VENV/bin/pip" install -q torch==2.13.0
  "$VENV/bin/pip" install -q "transformers<5" safetensors
fi
python scripts/_tf4_models.py "$WORK"
"$VENV/bin/python" scripts/_tf4_check.py "$WORK"
rm -rf "$WORK"
