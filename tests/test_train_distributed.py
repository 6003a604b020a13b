"""Two CPU processes (torchrun, gloo, DDP) give the same weights as one process with the same global batch."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from train_world import base_config, get_world

import deltamoe
from deltamoe.io import open_checkpoint

# Same data per optimizer step, same micro-batches; only the order of the gradient sums differs
# (DDP all-reduce vs accumulation), so the weights may differ by float rounding at most.
TOLERANCE = 1e-6


@pytest.mark.slow
def test_two_processes_match_one(tmp_path_factory, tmp_path) -> None:
    world = get_world(tmp_path_factory)
    sources = [{"path": str(world.xx), "lang": "xx"}, {"path": str(world.en), "lang": "en", "weight": 0.5}]
    stage = {"stage": "router_review", "trainable": {"new_experts": True}, "checkpoint": {"every": 4}}
    one = base_config(
        world.moe, tmp_path / "one", sources, train={"steps": 8, "micro_batch_size": 2, "grad_accum": 2}, **stage
    )
    two = base_config(
        world.moe, tmp_path / "two", sources, train={"steps": 8, "micro_batch_size": 2, "grad_accum": 1}, **stage
    )
    deltamoe.train(one)
    cfg = tmp_path / "two.yaml"
    cfg.write_text(yaml.safe_dump(two))
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or "torchrun"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [
            torchrun,
            "--standalone",
            "--nproc_per_node",
            "2",
            "--no-python",
            str(Path(sys.executable).parent / "deltamoe"),
            "train",
            str(cfg),
            "--quiet",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("wrote ") == 1  # only rank 0 writes and reports
    a, b, base = open_checkpoint(tmp_path / "one"), open_checkpoint(tmp_path / "two"), open_checkpoint(world.moe)
    trained = 0
    for k in a.keys():
        assert (a.read(k) - b.read(k)).abs().max().item() <= TOLERANCE, k
        trained += not torch.equal(a.read(k), base.read(k))
    assert trained == 14  # new experts and routers of both layers
    assert len(list((tmp_path / "two.run" / "checkpoints").iterdir())) == 1  # step 4 (the run ended at 8)
