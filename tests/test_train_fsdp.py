"""FSDP2 (fully_shard per decoder layer + root) on 2 CPU processes (torchrun, gloo).

Against one process with the same global batch: the trained weights agree to float32 rounding,
every frozen tensor is bit-identical to the input, and the output is the same stock HF checkpoint
(names, order, dtypes, shapes, config). Checkpoint + resume under FSDP2 (sharded through
torch.distributed.checkpoint) ends with the same bytes as an uninterrupted FSDP2 run, and a
checkpoint of 2 processes resumes on 1.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from train_world import base_config, get_world, torchrun_train

import deltamoe
from deltamoe.io import open_checkpoint
from deltamoe.errors import UsageError

# FSDP2 reduces gradients and the clipping norm over shards in another order than one process
# accumulating micro-batches: float32 rounding only (measured: 3.5e-7).
TOLERANCE = 1e-6


def _cfg(world, out, stage="post_pretrain", engine="fsdp2", steps=8, **sections):
    sources = [{"path": str(world.xx), "lang": "xx"}, {"path": str(world.en), "lang": "en", "weight": 0.5}]
    cfg = base_config(
        world.moe if stage != "dense_cpt" else world.moe.parent / "dense",
        out,
        sources,
        stage=stage,
        train={"steps": steps, "micro_batch_size": 2, "global_batch": 4, "experts_implementation": "eager"},
        distributed={"engine": engine},
        checkpoint={"every": 4},
        **sections,
    )
    del cfg["train"]["grad_accum"]  # derived from global_batch: 2 on one process, 1 on two
    if stage == "dense_cpt":
        del cfg["train"]["experts_implementation"]
    return cfg


def _compare(one, two, base, tolerance):
    """Max |one - two| over tensors; number of tensors trained; frozen tensors must equal base's bytes."""
    a, b, ref = open_checkpoint(one), open_checkpoint(two), open_checkpoint(base)
    assert list(a.keys()) == list(b.keys()) == list(ref.keys())  # same names, same order
    worst, trained = 0.0, 0
    for k in a.keys():
        x, y, r = a.read(k), b.read(k), ref.read(k)
        assert x.dtype == y.dtype == r.dtype and x.shape == y.shape, k
        if torch.equal(x, r):  # frozen in the one-process run: bit-identical in the FSDP2 run too
            assert torch.equal(y.view(torch.uint8), r.view(torch.uint8)), k
            continue
        trained += 1
        worst = max(worst, (x - y).abs().max().item())
    assert worst <= tolerance
    assert (one / "config.json").read_bytes() == (two / "config.json").read_bytes()
    return worst, trained


def _files(path):
    return {p.name: p.read_bytes() for p in sorted(path.glob("*.safetensors"))}


def _run(cfg, path, nproc, *args):
    proc = torchrun_train(cfg, path, nproc, *args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return get_world(tmp_path_factory)


@pytest.mark.slow
def test_fsdp2_matches_one_process_and_resumes_to_the_same_bytes(world, tmp_path) -> None:
    deltamoe.train(_cfg(world, tmp_path / "one", engine="ddp"))
    full = _cfg(world, tmp_path / "full")
    _run(full, tmp_path / "full.yaml", 2)
    worst, trained = _compare(tmp_path / "one", tmp_path / "full", world.moe, TOLERANCE)
    assert trained == 14  # 2 layers x 2 new experts x (gate, up, down) + the 2 routers
    log = [json.loads(x) for x in (tmp_path / "full.run" / "logs" / "train.jsonl").read_text().splitlines()]
    assert log[0]["engine"] == "fsdp2" and log[0]["processes"] == 2
    from transformers import AutoModelForCausalLM  # stock transformers loads the output as it is

    stock = AutoModelForCausalLM.from_pretrained(tmp_path / "full", dtype=torch.float32)
    assert type(stock).__name__ == json.loads((world.moe / "config.json").read_text())["architectures"][0]

    # interrupted after step 3 (a sharded checkpoint: one file per process), resumed on 2 processes
    part = _cfg(world, tmp_path / "part")
    _run(part, tmp_path / "part.yaml", 2, "--stop-after", "3")
    ckpt = tmp_path / "part.run" / "checkpoints" / "step-0000003"
    assert sorted(p.name for p in ckpt.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    shutil.copytree(tmp_path / "part.run", tmp_path / "one-proc.run")
    _run(part, tmp_path / "part.yaml", 2)
    assert _files(tmp_path / "part") == _files(tmp_path / "full")

    # the same checkpoint resumed on ONE process (DCP reshards; grad_accum becomes 2)
    _run(_cfg(world, tmp_path / "one-proc"), tmp_path / "one-proc.yaml", 1)
    worst, trained = _compare(tmp_path / "full", tmp_path / "one-proc", world.moe, TOLERANCE)
    assert trained == 14
    log = (tmp_path / "one-proc.run" / "logs" / "train.jsonl").read_text()
    assert "step-0000003" in log


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["router_review", "dense_cpt"])
def test_fsdp2_other_stages_match_one_process(world, tmp_path, stage) -> None:
    deltamoe.train(_cfg(world, tmp_path / "one", stage=stage, engine="ddp", steps=4))
    _run(_cfg(world, tmp_path / "two", stage=stage, steps=4), tmp_path / "two.yaml", 2)
    base = world.moe if stage != "dense_cpt" else world.moe.parent / "dense"
    _, trained = _compare(tmp_path / "one", tmp_path / "two", base, TOLERANCE)
    # router review: the 2 routers; dense CPT: every tensor of the 2-layer dense model
    assert trained == (2 if stage == "router_review" else len(open_checkpoint(base).keys()))


def test_a_checkpoint_of_another_engine_is_refused(world, tmp_path) -> None:
    cfg = _cfg(world, tmp_path / "x", engine="ddp", steps=4)
    assert deltamoe.train(cfg, stop_after=1) is None
    cfg["distributed"] = {"engine": "fsdp2"}
    with pytest.raises(UsageError, match="written by distributed.engine ddp, this run uses fsdp2"):
        deltamoe.train(cfg)


def test_engine_and_batch_errors_come_before_any_step(world, tmp_path, monkeypatch) -> None:
    import importlib.util

    cfg = _cfg(world, tmp_path / "x", engine="zero3", steps=2)
    if importlib.util.find_spec("deepspeed") is None:
        with pytest.raises(UsageError, match=r"^distributed.engine zero3: DeepSpeed is not installed"):
            deltamoe.train(cfg)
    else:  # installed, but not launched through accelerate's DeepSpeed config
        with pytest.raises(UsageError, match=r"^distributed.engine zero3 needs DeepSpeed through accelerate"):
            deltamoe.train(cfg)
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(UsageError, match="set distributed.engine: fsdp2"):
        deltamoe.train(_cfg(world, tmp_path / "x", engine="fsdp2", steps=2))
    monkeypatch.delenv("ACCELERATE_USE_FSDP")
    with pytest.raises(UsageError, match="give train.grad_accum or train.global_batch, not both"):
        deltamoe.train({**cfg, "train": {**cfg["train"], "grad_accum": 2}})
    with pytest.raises(UsageError, match=r"global_batch \(5\) is not a multiple of train.micro_batch_size \(2\)"):
        deltamoe.train({**cfg, "train": {**cfg["train"], "global_batch": 5}})
    monkeypatch.setenv("WORLD_SIZE", "4")  # 2 x 4 processes do not divide a global batch of 4
    with pytest.raises(UsageError, match=r"micro_batch_size x processes \(2 x 4\)"):
        deltamoe.train(_cfg(world, tmp_path / "x", engine="ddp", steps=2))
    with pytest.raises(UsageError, match="engine"):
        deltamoe.train({**cfg, "distributed": {"engine": "fsdp1"}})
    assert not (tmp_path / "x.run").exists()  # nothing ran


@pytest.mark.slow
def test_ddp_checkpoint_of_two_processes_resumes_on_one(world, tmp_path) -> None:
    deltamoe.train(_cfg(world, tmp_path / "one", engine="ddp"))
    part = _cfg(world, tmp_path / "part", engine="ddp")
    _run(part, tmp_path / "part.yaml", 2, "--stop-after", "3")
    assert deltamoe.train(part) == tmp_path / "part"  # one process, grad_accum 2 instead of 1
    _, trained = _compare(tmp_path / "one", tmp_path / "part", world.moe, TOLERANCE)
    assert trained == 14
    assert "step-0000003" in (tmp_path / "part.run" / "logs" / "train.jsonl").read_text()
