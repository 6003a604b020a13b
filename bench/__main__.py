"""The benchmark harness: every scenario, side by side with its reference, in one run.

    python -m bench [--quick] [--only upcycle,merge,graft,train] [--json PATH] [--markdown PATH]

Scenarios (see each module's docstring):

- ``upcycle`` (bench/upcycle.py): deltamoe vs ``mergekit-moe`` vs the I/O floor;
- ``merge`` (bench/graft.py): dense ParamDelta, deltamoe vs mergekit ``task_arithmetic`` vs the I/O floor;
- ``graft`` (bench/graft.py): onto a 4- and an 8-expert MoE, deltamoe vs the I/O floor;
- ``train`` (bench/train.py): one stage-1 step, deltamoe's training path vs stock transformers'
  MoE (default ``grouped_mm`` and ``eager`` experts implementations), same frozen set;
- and the peak RSS of every command (see bench/common.py for how it is measured).

In each scenario the compared commands run alternately (A B C A B C ...), each in a fresh
process, ``--repeats`` times, and the medians are compared: on a shared machine absolute
times drift, ratios measured side by side in one run much less. Synthetic Llama-shaped bf16
checkpoints are generated once into the work directory (``--workdir`` keeps them for the next
run). ``--quick`` uses ~0.25 GB models, one timed repeat and a short training run (a few
minutes on 2 cores); the default uses ~1.35 GB models (~1B-parameter shape) and 3 repeats;
``--size 8b-layers`` uses two layers of Llama-3-8B's shape with its 1 GB embedding.
mergekit runs from its own virtual environment (``bench/setup_mergekit.sh``) or the current one.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

SCENARIOS = ("upcycle", "merge", "graft", "train")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small models, 1 timed repeat: a few minutes on 2 cores")
    ap.add_argument("--only", default=",".join(SCENARIOS), help=f"comma-separated subset of {','.join(SCENARIOS)}")
    ap.add_argument("--size", choices=["1b", "8b-layers"], default="1b",
                    help="model shape for upcycle/merge/graft without --quick (default 1b: ~1.35 GB in bf16)")
    ap.add_argument("--repeats", type=int, default=None, help="timed repeats per command (default 3, --quick 1)")
    ap.add_argument("--threads", type=int, default=1, help="compute threads of the training variants (default 1)")
    ap.add_argument("--mergekit-venv", default=os.environ.get("MERGEKIT_VENV", "/work/venv-mergekit"))
    ap.add_argument("--workdir", default=None, help="keep the synthetic models here (default: a temp dir, removed)")
    ap.add_argument("--json", default="bench/out/results.json", help="where to write all results")
    ap.add_argument("--markdown", default="bench/out/results.md", help="where to write the result tables")
    args = ap.parse_args(argv)

    only = [s.strip() for s in args.only.split(",") if s.strip()]
    bad = [s for s in only if s not in SCENARIOS]
    if bad:
        ap.error(f"--only: unknown scenario(s) {bad}; choose from {list(SCENARIOS)}")
    from bench import graft, report, train, upcycle
    from bench.common import SHAPES, Models, machine, mergekit_exe, mergekit_version

    repeats = args.repeats or (1 if args.quick else 3)
    shape = SHAPES["quick" if args.quick else args.size]
    work = Path(args.workdir or tempfile.mkdtemp(prefix="deltamoe-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    models = Models(work / ("models-" + ("quick" if args.quick else args.size)), shape)
    mk = mergekit_exe(args.mergekit_venv, "mergekit-yaml")
    result = {
        "command": " ".join(["python -m bench", *(argv if argv is not None else sys.argv[1:])]),
        "mode": "quick" if args.quick else "full",
        "repeats": repeats,
        "machine": {**machine(), "mergekit": mergekit_version(mk) or "not found"},
        "scenarios": {},
    }
    t0 = time.perf_counter()
    try:
        for name in only:
            print(f"== {name}", flush=True)
            t = time.perf_counter()
            if name == "upcycle":
                r = upcycle.run(models, work, repeats=repeats, mergekit_venv=args.mergekit_venv)
            elif name == "merge":
                r = graft.run_merge(models, work, repeats=repeats, mergekit_venv=args.mergekit_venv)
            elif name == "graft":
                r = graft.run_graft(models, work, repeats=repeats)
            else:
                r = train.run(work / "train", names=["small"] if args.quick else ["tiny", "small"], repeats=repeats,
                              steps=4 if args.quick else None, warmup=1 if args.quick else 2, threads=args.threads)
            r["seconds"] = round(time.perf_counter() - t, 1)
            result["scenarios"][name] = r
            _save(args.json, result)  # partial results survive a later failure
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    result["seconds"] = round(time.perf_counter() - t0, 1)
    _save(args.json, result)
    md = report.markdown(result)
    Path(args.markdown).parent.mkdir(parents=True, exist_ok=True)
    Path(args.markdown).write_text(md)
    print(md)
    print(f"wrote {args.json} and {args.markdown} ({result['seconds']:.0f} s)")
    return 0


def _strip(obj):
    """The JSON without the raw per-run records (kept short; medians and run lists stay)."""
    if isinstance(obj, dict):
        return {k: _strip(v) for k, v in obj.items() if k != "runs"}
    if isinstance(obj, list):
        return [_strip(v) for v in obj]
    return obj


def _save(path: str, result: dict) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(_strip(result), indent=2) + "\n")


if __name__ == "__main__":
    sys.exit(main())
