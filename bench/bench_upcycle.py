"""Upcycle a synthetic dense checkpoint: deltamoe vs mergekit-moe vs the I/O floor, side by side.

    python -m bench.bench_upcycle [--quick] [--mergekit-venv DIR]

mergekit runs from its own virtual environment (``--mergekit-venv``, default $MERGEKIT_VENV or
/work/venv-mergekit; create one with ``bench/setup_mergekit.sh``); it is never a dependency of
deltamoe. Both tools do the same job: copy every FFN into E experts with a random router, bf16.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

from bench.common import alternate, dir_bytes, io_floor_argv, machine, measure
from deltamoe.synthetic import llama_config, write_dense


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="~300 MB model, 1 repeat")
    ap.add_argument("--experts", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--mergekit-venv", default=os.environ.get("MERGEKIT_VENV", "/work/venv-mergekit"))
    ap.add_argument("--workdir", default=None, help="where to put the models (default: a temp dir)")
    ap.add_argument("--json", default="bench/out/upcycle.json")
    args = ap.parse_args()

    work = Path(args.workdir or tempfile.mkdtemp(prefix="deltamoe-bench-"))
    if args.quick:
        cfg = llama_config(hidden=1024, intermediate=2816, layers=8, vocab=16000, heads=16, kv_heads=4, dtype="bfloat16")
        repeats = 1
    else:  # ~1.5 GB in bf16, Llama-style proportions
        cfg = llama_config(hidden=2048, intermediate=5632, layers=12, vocab=32000, heads=16, kv_heads=4, dtype="bfloat16")
        repeats = args.repeats
    import torch

    dense = write_dense(work / "dense", cfg, dtype=torch.bfloat16)
    in_bytes = dir_bytes(dense)
    print(f"dense checkpoint: {in_bytes / 1e9:.2f} GB at {dense}", flush=True)
    E = args.experts
    exe = Path(sys.executable).parent / "deltamoe"

    def run_deltamoe() -> dict:
        out = work / "out-deltamoe"
        r = measure([str(exe), "upcycle", str(dense), str(out), "-e", str(E), "-k", "2", "--force", "-q"])
        r["out_bytes"] = dir_bytes(out)
        shutil.rmtree(out)
        return r

    out_bytes = {}

    def run_floor() -> dict:
        out = work / "out-floor"
        n = out_bytes.get("n") or 0
        r = measure(io_floor_argv(sorted(dense.glob("*.safetensors")), out, n))
        shutil.rmtree(out)
        return r

    mk = Path(args.mergekit_venv) / "bin" / "mergekit-moe"
    moe_yaml = work / "mergekit-moe.yaml"
    moe_yaml.write_text(json.dumps({  # JSON is YAML
        "base_model": str(dense), "gate_mode": "random", "dtype": "bfloat16",
        "experts": [{"source_model": str(dense), "positive_prompts": [""]} for _ in range(E)],
    }))

    def run_mergekit() -> dict:
        out = work / "out-mergekit"
        r = measure([str(mk), str(moe_yaml), str(out), "--i-understand-this-is-not-useful-without-training",
                     "--quiet", "--no-copy-tokenizer"])
        shutil.rmtree(out, ignore_errors=True)
        return r

    first = run_deltamoe()  # warm the page cache and learn the output size
    out_bytes["n"] = first["out_bytes"]
    commands = {"deltamoe": run_deltamoe, "io_floor": run_floor}
    if mk.exists():
        commands["mergekit-moe"] = run_mergekit
    else:
        print(f"mergekit-moe not found at {mk}; run bench/setup_mergekit.sh to compare", flush=True)
    res = alternate(commands, repeats)
    result = {
        "scenario": f"upcycle dense {in_bytes / 1e9:.2f} GB (bf16) -> {E} experts, output {out_bytes['n'] / 1e9:.2f} GB",
        "machine": machine(),
        "largest_tensor_mb": round(cfg["vocab_size"] * cfg["hidden_size"] * 2 / 2**20, 1),
        "results": res,
        "ratios": {k: round(v["wall"] / res["deltamoe"]["wall"], 2) for k, v in res.items()},
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    if not args.workdir:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
