"""The toy world's costs, and the check that the shipped set reproduces byte for byte.

    python -m bench.bench_toy [--rebuild] [--seed 0] [--workdir DIR]

Always: ``deltamoe toy build`` of the shipped size from the shipped set (the demo's and the
tests' first step) and ``deltamoe toy measure`` of it (every model evaluated, the regime
targets checked). With ``--rebuild``: ``deltamoe toy build --train`` of the shipped size from
scratch (about 22 minutes on 2 cores), then every file's sha256 compared with the shipped
manifest; the command exits 1 if any differs. Each command runs as a fresh process into a new
directory (no cache hit); peak RSS is that process tree's.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from bench.common import machine, measure


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="small")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rebuild", action="store_true", help="also train the shipped size from scratch and compare")
    ap.add_argument("--workdir", default=None, help="where to build (default: a temp dir)")
    ap.add_argument("--json", default="bench/out/toy.json")
    args = ap.parse_args()

    from deltamoe.toy.shipped import shipped_dir

    shipped = shipped_dir(args.size, args.seed)
    if shipped is None:
        print(f"no shipped set for size {args.size} seed {args.seed}", file=sys.stderr)
        return 1
    manifest = json.loads((shipped / "toy.json").read_text())
    work = Path(args.workdir or tempfile.mkdtemp(prefix="deltamoe-bench-toy-"))
    deltamoe = str(Path(sys.executable).with_name("deltamoe"))
    report: dict = {"machine": machine(), "size": args.size, "seed": args.seed}

    def run(name: str, cmd: list[str]) -> dict:
        print(f"{name}: {' '.join(cmd[1:])}", flush=True)
        r = measure(cmd)
        entry = {"wall_s": round(r["wall"], 1), "peak_rss_mib": round(r["peak_rss"] / 2**20)}
        print(f"  {entry['wall_s']:.0f} s, peak RSS {entry['peak_rss_mib']} MiB", flush=True)
        report[name] = entry
        return entry

    out = work / "from-shipped"
    run("from_shipped", [deltamoe, "toy", "build", str(out), "--size", args.size, "--seed", str(args.seed), "-q"])
    run("measure", [deltamoe, "toy", "measure", str(out), "-q"])
    regime = json.loads((out / "toy.json").read_text())["regime"]
    report["regime_all_ok"] = regime["all_ok"]
    from deltamoe.toy.regime import regime_differences

    report["regime_differences"] = regime_differences(manifest.get("regime", {}).get("checks"), regime["checks"])
    report["regime_same_as_shipped"] = not report["regime_differences"]
    status = 0
    if args.rebuild:
        rebuilt = work / "rebuilt"
        run("rebuild", [deltamoe, "toy", "build", str(rebuilt), "--size", args.size, "--seed", str(args.seed),
                        "--train", "-q"])
        files = json.loads((rebuilt / "toy.json").read_text())["files"]
        differ = sorted(f for f in set(files) | set(manifest["files"]) if files.get(f) != manifest["files"].get(f))
        report["rebuild"].update(files=len(files), differ=differ)
        print(f"  {len(files)} files, {len(differ)} differ from the shipped manifest{': ' if differ else ''}"
              f"{', '.join(differ[:5])}", flush=True)
        status = 1 if differ else 0
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    return status


if __name__ == "__main__":
    raise SystemExit(main())
