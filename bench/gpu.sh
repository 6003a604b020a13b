#!/usr/bin/env bash
# The GPU check (bench/gpu_check.py): ~1B dense bf16 -> 8 experts top-2 -> ~50 stage-1 training
# steps (deltamoe vs stock transformers' default and eager experts) -> graft -> one forward pass.
# Also the deltamoe step under FSDP2 (fully_shard, world size 1, DTensor parameters; variant
# deltamoe-fsdp2): the grouped-GEMM experts path as `distributed.engine: fsdp2` runs it.
# One command on one H100/H200 with PyTorch, transformers and CUDA and no network; results in
# $OUT (gpu_check.json, gpu_check.md, gpu_check.log). Well within 8 minutes.
#
#   bench/gpu.sh                      # on the GPU machine
#   GPU_CHECK_SMOKE=1 bench/gpu.sh    # tiny sizes on the CPU: proves the script end to end
#
# deltamoe runs from src/ (PYTHONPATH); nothing is installed except, when the machine lacks
# pydantic (deltamoe's architecture tables and configs use it), the wheels that
# bench/gpu_wheels.sh put in .whl/ (carry .whl along). Overrides: GPU_CHECK_STEPS, GPU_CHECK_MB,
# GPU_CHECK_SEQ, GPU_CHECK_WORKDIR, GPU_CHECK_TIMEOUT (seconds, default 450), PYTHON.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/out/gpu}
mkdir -p "$OUT"
export OUT
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD/src:$PWD${PYTHONPATH:+:$PYTHONPATH}"
if ! "$PY" -c "import pydantic" 2>/dev/null; then
  if compgen -G ".whl/*.whl" >/dev/null; then
    site=$(mktemp -d /tmp/deltamoe-site.XXXXXX)
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" .whl/*.whl
    export PYTHONPATH="$site:$PYTHONPATH"
  else
    echo "gpu.sh: pydantic is not installed and .whl/ holds no wheels; run bench/gpu_wheels.sh on a" \
         "machine with network first and carry .whl along" >&2
    exit 2
  fi
fi
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
set +e
timeout "${GPU_CHECK_TIMEOUT:-450}" "$PY" -m bench.gpu_check "$@" 2>&1 | tee "$OUT/gpu_check.log"
rc=${PIPESTATUS[0]}
[ "$rc" = 124 ] && echo "gpu.sh: timed out after ${GPU_CHECK_TIMEOUT:-450} s (partial results in $OUT)" >&2
exit "$rc"
