"""Scenario ``upcycle``: dense -> E experts, deltamoe against ``mergekit-moe`` against the I/O floor.

Both tools copy every FFN of the same bf16 checkpoint into E experts with a random router and
write bf16. The I/O floor reads every input byte once and writes the output's byte count once,
fsync'd. mergekit runs from its own virtual environment when there is one.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from bench.common import Models, alternate, deltamoe_exe, io_floor_argv, measure, mergekit_exe, weight_bytes, weights


def run(models: Models, work: Path, *, repeats: int, mergekit_venv: str, experts: int = 4) -> dict:
    dense = models.dense("B")
    in_bytes = weight_bytes(dense)
    out = {k: work / f"upcycle-{k}" for k in ("deltamoe", "floor", "mergekit")}

    def deltamoe() -> dict:
        r = measure([deltamoe_exe(), "upcycle", dense, out["deltamoe"], "-e", str(experts), "-k", "2", "--force", "-q"])
        r["out_bytes"] = weight_bytes(out["deltamoe"])
        shutil.rmtree(out["deltamoe"])
        return r

    first = deltamoe()  # warms the page cache and gives the output size
    out_bytes = first["out_bytes"]

    def floor() -> dict:
        r = measure(io_floor_argv(weights(dense), out["floor"], out_bytes))
        shutil.rmtree(out["floor"])
        return r

    commands = {"deltamoe upcycle": deltamoe, "I/O floor": floor}
    mk = mergekit_exe(mergekit_venv, "mergekit-moe")
    if mk is not None:
        cfg = work / "mergekit-moe.yaml"
        cfg.write_text(json.dumps({  # JSON is YAML
            "base_model": str(dense), "gate_mode": "random", "dtype": "bfloat16",
            "experts": [{"source_model": str(dense), "positive_prompts": [""]} for _ in range(experts)],
        }))

        def mergekit() -> dict:
            r = measure([mk, cfg, out["mergekit"], "--i-understand-this-is-not-useful-without-training", "--quiet",
                         "--no-copy-tokenizer"])
            shutil.rmtree(out["mergekit"], ignore_errors=True)
            return r

        commands["mergekit-moe"] = mergekit
    else:
        print("mergekit-moe not found; run bench/setup_mergekit.sh to compare", flush=True)
    res = alternate(commands, repeats)
    moved = in_bytes + out_bytes
    for v in res.values():
        v["gb_per_s"] = round(moved / v["wall"] / 1e9, 2)
    d = res["deltamoe upcycle"]["wall"]
    ratios = [{"what": "deltamoe / I/O floor (time)", "value": d / res["I/O floor"]["wall"], "goal": "<= 1.5",
               "met": d / res["I/O floor"]["wall"] <= 1.5}]
    if "mergekit-moe" in res:
        x = res["mergekit-moe"]["wall"] / d
        ratios.insert(0, {"what": "mergekit-moe / deltamoe (time)", "value": x, "goal": "> 1", "met": x > 1})
        ratios.append({"what": "mergekit-moe / deltamoe (peak RSS)",
                       "value": res["mergekit-moe"]["peak_rss"] / res["deltamoe upcycle"]["peak_rss"]})
    return {
        "title": f"upcycle to {experts} experts",
        "setup": (f"dense {in_bytes / 1e9:.2f} GB bf16 ({models.shape.describe()}) -> {experts} experts top-2, "
                  f"output {out_bytes / 1e9:.2f} GB"),
        "rows": res,
        "ratios": ratios,
    }
