"""Interrupt after step k and resume: the same final weights as an uninterrupted run."""

from __future__ import annotations

import pytest
import torch
from train_world import base_config, get_world

import deltamoe
from deltamoe.io import open_checkpoint
from deltamoe.errors import UsageError


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return get_world(tmp_path_factory)


def _cfg(world, out):
    # accumulation, warmup + cosine, weight decay and a shuffle buffer: every piece of state matters
    return base_config(
        world.moe,
        out,
        [{"path": str(world.xx), "lang": "xx", "weight": 2}, {"path": str(world.en), "lang": "en", "weight": 1}],
        stage="router_review",
        data={"shuffle_buffer": 16},
        train={
            "steps": 10,
            "grad_accum": 2,
            "micro_batch_size": 2,
            "lr_schedule": "cosine",
            "warmup_steps": 3,
            "min_lr_ratio": 0.1,
            "weight_decay": 0.1,
        },
        trainable={"new_experts": True, "norms": True},
        checkpoint={"every": 3, "keep_last": 2},
    )


def test_resume_after_interruption_is_bit_identical(world, tmp_path) -> None:
    full = tmp_path / "full"
    deltamoe.train(_cfg(world, full))

    part = tmp_path / "part"
    assert deltamoe.train(_cfg(world, part), stop_after=5) is None
    assert not part.exists()
    ckpts = sorted(p.name for p in (tmp_path / "part.run" / "checkpoints").iterdir())
    assert ckpts == ["step-0000003", "step-0000005"]  # keep_last: 2
    assert deltamoe.train(_cfg(world, part)) == part  # resume: auto picks step 5

    a, b = open_checkpoint(full), open_checkpoint(part)
    changed = 0
    for k in a.keys():
        assert torch.equal(a.read(k), b.read(k)), k
        changed += not torch.equal(a.read(k), open_checkpoint(world.moe).read(k))
    assert changed > 0
    from deltamoe.io.provenance import read_manifest

    result = read_manifest(part)["stages"][-1]["params"]["result"]
    assert result["heldout_loss_before"] == read_manifest(full)["stages"][-1]["params"]["result"]["heldout_loss_before"]
    assert result["heldout_loss_before"] is not None
    log = (tmp_path / "part.run" / "logs" / "train.jsonl").read_text()
    assert '"resumed_from": "' in log and "step-0000005" in log


def test_resume_refuses_a_changed_config(world, tmp_path) -> None:
    out = tmp_path / "x"
    assert deltamoe.train(_cfg(world, out), stop_after=2) is None
    changed = _cfg(world, out)
    changed["train"] = {**changed["train"], "lr": 1e-2}
    with pytest.raises(UsageError, match=r"config changed since this checkpoint \(train\.lr\)"):
        deltamoe.train(changed)
    changed["checkpoint"] = {**changed["checkpoint"], "resume": "never"}
    assert deltamoe.train(changed) == out  # starting over is explicit, and drops the stale checkpoint
    assert sorted(p.name for p in (tmp_path / "x.run" / "checkpoints").iterdir()) == ["step-0000006", "step-0000009"]
