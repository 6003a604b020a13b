"""The two budgets of the quick start: `deltamoe demo` (about 20 minutes on 2 cores) and the test
suite (about 15 minutes).

    python -m bench.bench_demo [--demo] [--suite] [--workdir DIR]

``--demo`` runs ``deltamoe demo`` into a new, empty work directory (no cache hit: every stage runs,
the toy from the shipped set) and records its wall time, CPU time and peak RSS, with the wall time
of each stage as the demo logged it. ``--suite`` runs ``python -m pytest -q`` from the repository
root, the command `.ci/run` runs. Both by default. Each runs as a fresh process; run it on a quiet
machine, since anything beside it inflates the wall times. Results go to ``bench/out/demo.json``.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
from pathlib import Path

from bench.common import machine, measure

ROOT = Path(__file__).resolve().parent.parent
_STAGE = re.compile(r"^\[\d+/\d+\] (\S+): done in (\d+) s$", re.MULTILINE)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--demo", action="store_true", help="time `deltamoe demo` from an empty work directory")
    ap.add_argument("--suite", action="store_true", help="time the test suite (python -m pytest -q)")
    ap.add_argument("--workdir", default=None, help="the demo's work directory (default: a new temp dir)")
    ap.add_argument("--json", default="bench/out/demo.json")
    args = ap.parse_args()
    both = not (args.demo or args.suite)
    report: dict = {"machine": machine()}
    if args.demo or both:
        work = Path(args.workdir or tempfile.mkdtemp(prefix="deltamoe-bench-demo-")) / "demo"
        if work.exists():
            print(f"{work}: exists; give a new --workdir", file=sys.stderr)
            return 1
        print(f"deltamoe demo --workdir {work}", flush=True)
        r = measure([str(Path(sys.executable).with_name("deltamoe")), "demo", "--workdir", str(work)], capture=True)
        stages = {name: int(s) for name, s in _STAGE.findall(r.get("stdout", ""))}
        report["demo"] = {"wall_s": round(r["wall"], 1), "cpu_s": round(r.get("cpu", 0.0), 1),
                          "peak_rss_mib": round(r["peak_rss"] / 2**20), "stages_s": stages, "workdir": str(work)}
        print(f"  {r['wall']:.0f} s wall, peak RSS {r['peak_rss'] / 2**20:.0f} MiB", flush=True)
    if args.suite or both:
        print("python -m pytest -q", flush=True)
        r = measure([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(ROOT / "tests")])
        report["suite"] = {"wall_s": round(r["wall"], 1), "cpu_s": round(r.get("cpu", 0.0), 1),
                           "peak_rss_mib": round(r["peak_rss"] / 2**20)}
        print(f"  {r['wall']:.0f} s wall", flush=True)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
