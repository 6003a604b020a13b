"""`deltamoe run` of the micro recipe on 2 CPU processes (torchrun, DDP) against 1 process: the same
results.json numbers and the same checkpoint hashes.

Both runs use one compute thread per process (OMP_NUM_THREADS=1): CPU matrix kernels sum in an
order that depends on the thread count. With a global batch of 4 = 2 processes x micro-batch 2
(grad_accum 1) = 1 process x micro-batch 2 x grad_accum 2, each micro-batch's gradient is computed
alike and halved exactly (a power of two), and a 2-way sum is the same in either order, so the
trained weights are bit-identical (README, "Several GPUs or nodes").
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from micro_demo import micro_demo

from deltamoe.pipeline.graph import build_plan
from deltamoe.recipe import load_recipe


def _recipe(work: Path, toy_micro: Path) -> Path:
    r = micro_demo()
    # every kind of training stage (MoE stage 1, router review, dense CPT, new-block CPT) and one
    # system built on each; the merges, the ceiling and the evaluations run on rank 0 only
    r["baselines"] = ["post", "dense_cpt", "paramdelta", "moe_lpr", "block_expansion"]
    for stage in ("post_pretrain", "router_review"):
        train = r["train"][stage]["train"]
        train.pop("grad_accum", None)
        train.update(steps=6, micro_batch_size=2, global_batch=4, warmup_steps=1)
        r["train"][stage]["data"]["seq_len"] = 32
    r["eval"]["max_items"] = 6
    r["eval"]["batch_size"] = 8
    work.mkdir()
    p = work / "recipe.yaml"
    p.write_text(yaml.safe_dump(r))
    stages, _, _ = build_plan(*load_recipe(p))
    shutil.copytree(toy_micro, stages[0].out)  # the toy stage: the session's micro build
    return p


def _run(recipe: Path, nproc: int) -> dict:
    bindir = Path(sys.executable).parent
    exe = [str(bindir / "deltamoe"), "run", str(recipe), "-q"]
    if nproc > 1:
        torchrun = shutil.which("torchrun", path=str(bindir)) or "torchrun"
        exe = [torchrun, "--standalone", "--nproc_per_node", str(nproc), "--no-python", *exe]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(exe, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = (recipe.parent / "results.json").read_text()
    return json.loads(text.replace(str(recipe.parent), "WORK"))


@pytest.mark.slow
def test_two_processes_give_the_same_results_and_hashes(tmp_path, toy_micro) -> None:
    one = _run(_recipe(tmp_path / "one", toy_micro), 1)
    two = _run(_recipe(tmp_path / "two", toy_micro), 2)
    assert list(one["systems"]) == ["post", "dense_cpt", "paramdelta", "block_expansion", "moe_lpr", "deltamoe"]
    assert list(one["systems"]) == list(two["systems"])
    for name in one["systems"]:
        assert one["systems"][name]["sha256"] == two["systems"][name]["sha256"], name
        assert one["systems"][name] == two["systems"][name], name
    assert one == two
