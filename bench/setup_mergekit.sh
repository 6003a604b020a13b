#!/usr/bin/env bash
# A separate virtual environment with mergekit, used only as a reference by the benchmarks.
set -euo pipefail
VENV=${MERGEKIT_VENV:-/work/venv-mergekit}
python3.11 -m venv "$VENV"
"$VENV/bin/pip" install -q torch==2.13.0
"$VENV/bin/pip" install -q mergekit
echo "mergekit installed in $VENV"
