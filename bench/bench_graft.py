"""Graft and merge on synthetic dense inputs: deltamoe vs mergekit vs the I/O floor, side by side.

    python -m bench.bench_graft [--quick] [--repeats N] [--mergekit-venv DIR]

Inputs: a base B, a post-trained P and a continued-pretrained C (Llama-shaped, bf16, ~1.35 GB
each) and M, B upcycled to 4 experts (3.84 GB). Measured, each command in a fresh process:

- ``deltamoe merge --method paramdelta`` (C + P - B) against mergekit ``task_arithmetic`` with
  base B, C and P at weight 1, computing in float32 and writing bf16: the same model (checked);
- ``deltamoe graft`` of P - B onto M against the I/O floor (read M, B, P once, write the
  output's bytes once, fsync'd);
- the I/O floor of the merge, for reference.

deltamoe records the sha256 of every input and caches the digests of unchanged files (by stat
identity). Each deltamoe command is therefore measured twice: with the cache warm (a repeated
run, or a graft of the same B and P onto another M hashes only what changed) and with it off
(``DELTAMOE_HASH_CACHE=0``: every input byte is read a second time and hashed).

mergekit runs from its own virtual environment when there is one (``bench/setup_mergekit.sh``),
else from the current one.
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


def _weights(path: Path) -> list[Path]:
    return sorted(Path(path).glob("*.safetensors"))


def _same_model(a: Path, b: Path) -> dict[str, float]:
    """Compare two checkpoints tensor by tensor: fraction of identical elements, max |difference|."""
    from deltamoe.checkpoint import open_checkpoint

    ca, cb = open_checkpoint(a), open_checkpoint(b)
    assert set(ca.keys()) == set(cb.keys()), "different tensor names"
    same = total = 0
    worst = 0.0
    for n in ca.keys():
        x, y = ca.read(n).float(), cb.read(n).float()
        assert x.shape == y.shape, n
        same += int((x == y).sum())
        total += x.numel()
        worst = max(worst, float((x - y).abs().max()))
    return {"identical_fraction": same / total, "max_abs_diff": worst}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="~0.3 GB models, 1 repeat")
    ap.add_argument("--experts", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--mergekit-venv", default=os.environ.get("MERGEKIT_VENV", "/work/venv-mergekit"))
    ap.add_argument("--workdir", default=None, help="where to put the models (default: a temp dir)")
    ap.add_argument("--json", default="bench/out/graft.json")
    args = ap.parse_args()

    import torch

    work = Path(args.workdir or tempfile.mkdtemp(prefix="deltamoe-bench-graft-"))
    if args.quick:
        cfg = llama_config(hidden=1024, intermediate=2816, layers=8, vocab=16000, heads=16, kv_heads=4, dtype="bfloat16")
        repeats = 1
    else:  # ~1.35 GB each in bf16, Llama-style proportions
        cfg = llama_config(hidden=2048, intermediate=5632, layers=12, vocab=32000, heads=16, kv_heads=4, dtype="bfloat16")
        repeats = args.repeats
    exe = Path(sys.executable).parent / "deltamoe"
    paths = {}
    for seed, name in enumerate("BPC"):
        paths[name] = work / name
        if not (paths[name] / "config.json").exists():
            write_dense(paths[name], cfg, seed=seed, dtype=torch.bfloat16)
    b, p, c = paths["B"], paths["P"], paths["C"]
    m = work / "M"
    if not (m / "deltamoe.json").exists():
        measure([str(exe), "upcycle", str(b), str(m), "-e", str(args.experts), "-k", "2", "--force", "-q"])
    size = {k: dir_bytes(v) for k, v in {"B": b, "P": p, "C": c, "M": m}.items()}
    print("inputs: " + ", ".join(f"{k} {v / 1e9:.2f} GB" for k, v in size.items()), flush=True)

    mk_venv = Path(args.mergekit_venv)
    mk = mk_venv / "bin" / "mergekit-yaml"
    if not mk.exists():
        mk = Path(sys.executable).parent / "mergekit-yaml"
    ta_yaml = work / "task_arithmetic.yaml"
    ta_yaml.write_text(json.dumps({  # JSON is YAML
        "merge_method": "task_arithmetic", "base_model": str(b), "dtype": "float32", "out_dtype": "bfloat16",
        "models": [{"model": str(c), "parameters": {"weight": 1.0}}, {"model": str(p), "parameters": {"weight": 1.0}}],
    }))
    outs = {k: work / f"out-{k}" for k in ("merge", "mergekit", "graft", "floor")}
    out_bytes: dict[str, int] = {}

    cache_env = {"DELTAMOE_CACHE_DIR": str(work / "hash-cache")}
    cold_env = {"DELTAMOE_HASH_CACHE": "0"}

    def run(key: str, argv: list[str], keep: bool = False, env: dict | None = None) -> dict:
        r = measure(argv, env=env or cache_env)
        r["out_bytes"] = dir_bytes(outs[key]) if outs[key].exists() else 0
        if not keep:
            shutil.rmtree(outs[key], ignore_errors=True)
        return r

    def merge_cmd() -> list[str]:
        return [str(exe), "merge", str(outs["merge"]), "--method", "paramdelta", "--base", str(b), "--model", str(c),
                "--model", str(p), "--force", "-q"]

    def graft_cmd() -> list[str]:
        return [str(exe), "graft", str(outs["graft"]), "--moe", str(m), "--base", str(b), "--post", str(p),
                "--force", "-q"]

    def mergekit_cmd() -> list[str]:
        return [str(mk), str(ta_yaml), str(outs["mergekit"]), "--quiet", "--no-copy-tokenizer"]

    # First runs: warm the page cache, learn output sizes, check that both merges give the same model.
    r = run("merge", merge_cmd(), keep=True)
    out_bytes["merge"] = sum(f.stat().st_size for f in _weights(outs["merge"]))
    have_mk = mk.exists()
    equal = None
    if have_mk:
        run("mergekit", mergekit_cmd(), keep=True)
        equal = _same_model(outs["merge"], outs["mergekit"])
        print(f"deltamoe paramdelta vs mergekit task_arithmetic: {equal}", flush=True)
        shutil.rmtree(outs["mergekit"])
    else:
        print(f"mergekit-yaml not found ({mk}); run bench/setup_mergekit.sh to compare", flush=True)
    shutil.rmtree(outs["merge"])
    run("graft", graft_cmd(), keep=True)
    out_bytes["graft"] = sum(f.stat().st_size for f in _weights(outs["graft"]))
    shutil.rmtree(outs["graft"])

    merge_inputs = [*_weights(b), *_weights(c), *_weights(p)]
    graft_inputs = [*_weights(m), *_weights(b), *_weights(p)]
    commands = {
        "deltamoe merge paramdelta": lambda: run("merge", merge_cmd()),
        "deltamoe merge paramdelta (no hash cache)": lambda: run("merge", merge_cmd(), env=cold_env),
        "I/O floor (merge)": lambda: run("floor", io_floor_argv(merge_inputs, outs["floor"], out_bytes["merge"])),
        "deltamoe graft": lambda: run("graft", graft_cmd()),
        "deltamoe graft (no hash cache)": lambda: run("graft", graft_cmd(), env=cold_env),
        "I/O floor (graft)": lambda: run("floor", io_floor_argv(graft_inputs, outs["floor"], out_bytes["graft"])),
    }
    if have_mk:
        commands["mergekit task_arithmetic"] = lambda: run("mergekit", mergekit_cmd())
    res = alternate(commands, repeats)
    moved = {
        "merge": sum(f.stat().st_size for f in merge_inputs) + out_bytes["merge"],
        "graft": sum(f.stat().st_size for f in graft_inputs) + out_bytes["graft"],
    }
    for name, v in res.items():
        kind = "graft" if "graft" in name else "merge"
        v["gb_per_s"] = round(moved[kind] / v["wall"] / 1e9, 2)
        v["peak_rss_mib"] = round(v["peak_rss"] / 2**20)
    from deltamoe.checkpoint import open_checkpoint

    largest = max(open_checkpoint(x).largest_tensor_bytes for x in (b, p, c, m))
    result = {
        "scenario": (f"B, P, C: {size['B'] / 1e9:.2f} GB each (bf16); M: {args.experts} experts, {size['M'] / 1e9:.2f} GB; "
                     f"merge output {out_bytes['merge'] / 1e9:.2f} GB, graft output {out_bytes['graft'] / 1e9:.2f} GB"),
        "machine": machine(),
        "bytes_moved": moved,
        "largest_tensor_mib": round(largest / 2**20, 1),
        "memory_goal_mib": round((2 * largest + 300 * 2**20) / 2**20),
        "same_model_as_mergekit": equal,
        "results": res,
        "ratios": {
            **({f"mergekit / {k}": round(res["mergekit task_arithmetic"]["wall"] / res[k]["wall"], 2)
                for k in res if k.startswith("deltamoe merge")} if have_mk else {}),
            **{f"{k} / I/O floor": round(res[k]["wall"] / res[f"I/O floor ({k.split()[1]})"]["wall"], 2)
               for k in res if k.startswith("deltamoe")},
        },
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    if not args.workdir:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
