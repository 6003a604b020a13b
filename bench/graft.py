"""Scenarios ``merge`` and ``graft`` on the streaming engine.

- ``merge``: ``deltamoe merge --method paramdelta --base B --model C --model P`` (C + P - B)
  against mergekit ``task_arithmetic`` (base B, C and P at weight 1, float32 arithmetic, bf16
  output: the same model, checked on the first run) against the I/O floor (read B, C, P once,
  write the output's bytes once, fsync'd).
- ``graft``: ``deltamoe graft --moe M --base B --post P`` onto M upcycled to 4 and to 8 experts,
  each against its I/O floor (read M, B, P once, write the output's bytes once).

deltamoe records the sha256 of every input and caches the digest of unchanged files (by stat
identity), so each deltamoe command is measured with the cache warm (a repeated run; grafting
the same B and P onto another M) and off (``DELTAMOE_HASH_CACHE=0``: every input byte is read a
second time and hashed, as on a first run).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from bench.common import (
    Models,
    alternate,
    deltamoe_exe,
    io_floor_argv,
    measure,
    mergekit_exe,
    mib,
    rss_goal_bytes,
    weight_bytes,
    weights,
)

NO_CACHE = "(no hash cache)"


def same_model(a: Path, b: Path) -> dict[str, float]:
    """Compare two checkpoints tensor by tensor: fraction of identical elements, max |difference|."""
    from deltamoe.io import open_checkpoint

    ca, cb = open_checkpoint(a), open_checkpoint(b)
    if set(ca.keys()) != set(cb.keys()):
        raise AssertionError(f"{a} and {b} hold different tensor names")
    same = total = 0
    worst = 0.0
    for n in ca.keys():
        x, y = ca.read(n).float(), cb.read(n).float()
        assert x.shape == y.shape, n
        same += int((x == y).sum())
        total += x.numel()
        worst = max(worst, float((x - y).abs().max()))
    return {"identical_fraction": same / total, "max_abs_diff": worst}


def _largest(*paths: Path) -> int:
    from deltamoe.io import open_checkpoint

    return max(open_checkpoint(p).largest_tensor_bytes for p in paths)


class _Runner:
    def __init__(self, work: Path):
        self.work = work
        self.env = {"DELTAMOE_CACHE_DIR": str(work / "hash-cache")}

    def __call__(self, argv: list, out: Path, cold: bool = False, keep: bool = False) -> dict:
        r = measure(argv, env={**self.env, **({"DELTAMOE_HASH_CACHE": "0"} if cold else {})})
        r["out_bytes"] = weight_bytes(out) if out.exists() else 0
        if not keep:
            shutil.rmtree(out, ignore_errors=True)
        return r


def _rss_ratio(name: str, peak: int, largest: int) -> dict:
    goal = rss_goal_bytes(largest)
    return {"what": f"{name}: peak RSS vs 2 x largest tensor + 300 MB ({mib(goal)} MiB)", "value": peak / goal,
            "goal": "< 1", "met": peak < goal, "abs": f"{mib(peak)} MiB"}


def run_merge(models: Models, work: Path, *, repeats: int, mergekit_venv: str) -> dict:
    b, p, c = models.dense("B"), models.dense("P"), models.dense("C")
    run = _Runner(work)
    out = {k: work / f"merge-{k}" for k in ("deltamoe", "mergekit", "floor")}
    cmd = [deltamoe_exe(), "merge", out["deltamoe"], "--method", "paramdelta", "--base", b, "--model", c,
           "--model", p, "--force", "-q"]
    first = run(cmd, out["deltamoe"], keep=True)  # page cache, hash cache, output size
    out_bytes = first["out_bytes"]
    mk = mergekit_exe(mergekit_venv, "mergekit-yaml")
    equal = None
    if mk is not None:
        cfg = work / "task_arithmetic.yaml"
        cfg.write_text(json.dumps({  # JSON is YAML
            "merge_method": "task_arithmetic", "base_model": str(b), "dtype": "float32", "out_dtype": "bfloat16",
            "models": [{"model": str(c), "parameters": {"weight": 1.0}}, {"model": str(p), "parameters": {"weight": 1.0}}],
        }))
        mk_cmd = [mk, cfg, out["mergekit"], "--quiet", "--no-copy-tokenizer"]
        run(mk_cmd, out["mergekit"], keep=True)
        equal = same_model(out["deltamoe"], out["mergekit"])
        print(f"  deltamoe paramdelta vs mergekit task_arithmetic: {equal}", flush=True)
        shutil.rmtree(out["mergekit"])
    else:
        print("mergekit-yaml not found; run bench/setup_mergekit.sh to compare", flush=True)
    shutil.rmtree(out["deltamoe"])
    inputs = [*weights(b), *weights(c), *weights(p)]
    commands = {
        "deltamoe merge": lambda: run(cmd, out["deltamoe"]),
        f"deltamoe merge {NO_CACHE}": lambda: run(cmd, out["deltamoe"], cold=True),
        "I/O floor": lambda: run(io_floor_argv(inputs, out["floor"], out_bytes), out["floor"]),
    }
    if mk is not None:
        commands["mergekit task_arithmetic"] = lambda: run(mk_cmd, out["mergekit"])
    res = alternate(commands, repeats)
    moved = sum(f.stat().st_size for f in inputs) + out_bytes
    for v in res.values():
        v["gb_per_s"] = round(moved / v["wall"] / 1e9, 2)
    largest = _largest(b, c, p)
    ratios = []
    for k in ("deltamoe merge", f"deltamoe merge {NO_CACHE}"):
        suffix = f" {NO_CACHE}" if NO_CACHE in k else ""
        if mk is not None:
            x = res["mergekit task_arithmetic"]["wall"] / res[k]["wall"]
            ratios.append({"what": f"mergekit task_arithmetic / deltamoe{suffix} (time)", "value": x, "goal": ">= 2",
                           "met": x >= 2})
    for k in ("deltamoe merge", f"deltamoe merge {NO_CACHE}"):
        x = res[k]["wall"] / res["I/O floor"]["wall"]
        ratios.append({"what": f"{k} / I/O floor (time)", "value": x, "goal": "<= 1.5", "met": x <= 1.5})
    ratios.append(_rss_ratio("deltamoe merge", max(res[k]["peak_rss"] for k in res if k.startswith("deltamoe")),
                             largest))
    if mk is not None:
        ratios.append({"what": "mergekit / deltamoe (peak RSS)",
                       "value": res["mergekit task_arithmetic"]["peak_rss"] / res["deltamoe merge"]["peak_rss"]})
    return {
        "title": "dense ParamDelta merge (C + P - B)",
        "setup": (f"B, C, P: {weight_bytes(b) / 1e9:.2f} GB each, bf16 ({models.shape.describe()}); "
                  f"output {out_bytes / 1e9:.2f} GB; largest tensor {mib(largest)} MiB"),
        "same_model_as_mergekit": equal,
        "rows": res,
        "ratios": ratios,
    }


def run_graft(models: Models, work: Path, *, repeats: int, experts: tuple[int, ...] = (4, 8)) -> dict:
    b, p = models.dense("B"), models.dense("P")
    ms = {e: models.moe(e) for e in experts}
    run = _Runner(work)
    out = {e: work / f"graft-{e}" for e in experts}
    floor_out = work / "graft-floor"
    cmds, out_bytes, moved = {}, {}, {}
    for e, m in ms.items():
        cmds[e] = [deltamoe_exe(), "graft", out[e], "--moe", m, "--base", b, "--post", p, "--force", "-q"]
        out_bytes[e] = run(cmds[e], out[e])["out_bytes"]  # page cache, hash cache, output size
        moved[e] = sum(f.stat().st_size for f in [*weights(m), *weights(b), *weights(p)]) + out_bytes[e]
    commands = {}
    for e, m in ms.items():
        inputs = [*weights(m), *weights(b), *weights(p)]
        commands[f"deltamoe graft, {e} experts"] = lambda e=e: run(cmds[e], out[e])
        commands[f"deltamoe graft, {e} experts {NO_CACHE}"] = lambda e=e: run(cmds[e], out[e], cold=True)
        commands[f"I/O floor, {e} experts"] = lambda e=e, inputs=inputs: run(
            io_floor_argv(inputs, floor_out, out_bytes[e]), floor_out)
    res = alternate(commands, repeats)
    for k, v in res.items():
        e = int(k.split(", ")[1].split()[0])
        v["gb_per_s"] = round(moved[e] / v["wall"] / 1e9, 2)
    largest = _largest(b, p, *ms.values())
    ratios = []
    for e in experts:
        floor = res[f"I/O floor, {e} experts"]["wall"]
        for suffix in ("", f" {NO_CACHE}"):
            x = res[f"deltamoe graft, {e} experts{suffix}"]["wall"] / floor
            ratios.append({"what": f"deltamoe graft, {e} experts{suffix} / I/O floor (time)", "value": x,
                           "goal": "<= 1.5", "met": x <= 1.5})
    ratios.append(_rss_ratio("deltamoe graft", max(v["peak_rss"] for k, v in res.items() if k.startswith("deltamoe")),
                             largest))
    sizes = ", ".join(f"M{e} {weight_bytes(m) / 1e9:.2f} GB" for e, m in ms.items())
    return {
        "title": "graft P - B onto the upcycled MoE",
        "setup": (f"B, P: {weight_bytes(b) / 1e9:.2f} GB each, bf16 ({models.shape.describe()}); {sizes}; "
                  f"largest tensor {mib(largest)} MiB"),
        "rows": res,
        "ratios": ratios,
    }
