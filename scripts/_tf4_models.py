"""Build tiny dense models of every family and upcycle them (run with the project's Python)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from tiny_models import VARIANTS, make_dense  # noqa: E402

from deltamoe.ops.upcycle import upcycle  # noqa: E402

root = Path(sys.argv[1])
for v in VARIANTS:
    d = make_dense(v, root / "dense" / v)
    upcycle(d, root / "moe" / v, num_experts=4, top_k=2, progress=False)
    upcycle(d, root / "moe-part" / v, num_experts=4, top_k=2, layers="0,2", progress=False)
