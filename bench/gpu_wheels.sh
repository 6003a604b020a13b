#!/usr/bin/env bash
# Fetch the wheels bench/gpu.sh needs where the GPU machine lacks them (pydantic and its
# dependencies, with a typing-extensions recent enough for them; the GPU image has torch,
# transformers, safetensors, tokenizers, tqdm, pyyaml) into
# .whl/ (git-ignored through .git/info/exclude), for the Python of that machine (default 3.12).
set -euo pipefail
cd "$(dirname "$0")/.."
PYVER=${GPU_PYTHON_VERSION:-3.12}
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
rm -rf .whl && mkdir -p .whl
# the versions this checkout's environment uses (pydantic pins its pydantic-core exactly)
PY=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
pins=$("$PY" - <<'PYEOF'
import importlib.metadata as m
print(" ".join(f"{n}=={m.version(n)}" for n in ("pydantic", "pydantic-core", "annotated-types", "typing-inspection", "typing-extensions")))
PYEOF
)
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl $pins
ls -l .whl
