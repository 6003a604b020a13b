"""Time ``deltamoe toy build`` at sizes tiny and small (budgets: ~3 and ~8 minutes on 2 cores),
and evaluate the models it writes (the sanity pattern's numbers).

    python -m bench.bench_toy [--sizes tiny small] [--seed 0] [--no-eval]

Each build runs as a fresh process (interpreter start-up and imports included) into a new
directory, so no cache is hit; peak RSS is that process's.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.common import machine, measure


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", nargs="+", default=["tiny", "small"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-eval", action="store_true", help="only time the builds")
    ap.add_argument("--workdir", default=None, help="where to build (default: a temp dir)")
    ap.add_argument("--json", default="bench/out/toy.json")
    args = ap.parse_args()

    work = Path(args.workdir or tempfile.mkdtemp(prefix="deltamoe-bench-toy-"))
    deltamoe = str(Path(sys.executable).with_name("deltamoe"))
    report: dict = {"machine": machine(), "builds": {}}
    for size in args.sizes:
        out = work / f"{size}-seed{args.seed}"
        print(f"toy build --size {size} -> {out}", flush=True)
        r = measure([deltamoe, "toy", "build", str(out), "--size", size, "--seed", str(args.seed), "-q"])
        entry = {"wall": round(r["wall"], 1), "peak_rss_mib": round(r["peak_rss"] / 2**20)}
        toy = json.loads((out / "toy.json").read_text())
        entry["pretrain_tokens"] = toy["tokens"]["pretrain"]
        entry["losses"] = toy["losses"]
        print(f"  {r['wall']:.0f} s, peak RSS {entry['peak_rss_mib']} MiB", flush=True)
        if not args.no_eval:
            entry["eval"] = {}
            for model in ("base", "instruct"):
                subprocess.run([deltamoe, "eval", str(out / model), "-q"], check=True)
                res = json.loads((out / model / "eval" / "toy" / "results.json").read_text())
                entry["eval"][model] = {
                    lang: {k: round(v, 3) for k, v in row.items() if k in ("qa_rc", "qa_facts", "qa", "ppl")}
                    for lang, row in res["languages"].items()
                }
        report["builds"][size] = entry
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
