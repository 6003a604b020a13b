"""The checkpoint layer: lazy reader, planned sharded writer, atomic output, input validation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from deltamoe.io import (
    Checkpoint,
    ShardedWriter,
    TensorSpec,
    atomic_output_dir,
    dtype_code,
    open_checkpoint,
)
from deltamoe.errors import CheckpointError, OutputError


def _sample() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "a.weight": torch.randn(7, 5, generator=g),
        "b.bf16": torch.randn(3, 11, generator=g).bfloat16(),
        "c.half": torch.randn(13, generator=g).half(),
        "d.int": torch.arange(6, dtype=torch.int64).reshape(2, 3),
        "e.scalar": torch.tensor(3.5),
        "f.empty": torch.zeros(0, 4),
    }


def _write(tmp: Path, tensors: dict[str, torch.Tensor], budget: int, order: list[str] | None = None) -> None:
    specs = [TensorSpec(k, dtype_code(v.dtype), tuple(v.shape)) for k, v in tensors.items()]
    w = ShardedWriter(tmp, specs, max_shard_bytes=budget)
    for k in order or list(tensors):
        w.write(k, tensors[k])
    w.close()


@pytest.mark.parametrize("budget", [10**9, 64])
def test_writer_output_is_standard_safetensors(tmp_path: Path, budget: int) -> None:
    ts = _sample()
    (tmp_path / "config.json").write_text("{}")
    _write(tmp_path, ts, budget, order=sorted(ts, reverse=True))  # any write order
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert (len(shards) == 1) == (budget == 10**9)
    seen = {}
    for shard in shards:
        with safe_open(tmp_path / shard, "pt") as f:  # the reference reader accepts our files
            for k in f.keys():
                seen[k] = f.get_tensor(k)
    assert set(seen) == set(ts)
    for k, v in ts.items():
        assert torch.equal(seen[k], v) and seen[k].dtype == v.dtype
    ck = Checkpoint(tmp_path)  # and our reader agrees
    for k, v in ts.items():
        assert torch.equal(ck.read(k), v)
    assert index["metadata"]["total_size"] == sum(v.numel() * v.element_size() for v in ts.values())


def test_reader_reads_library_written_files(tmp_path: Path) -> None:
    ts = _sample()
    save_file(ts, tmp_path / "model.safetensors", metadata={"format": "pt"})
    (tmp_path / "config.json").write_text("{}")
    ck = Checkpoint(tmp_path)
    assert sorted(ck.keys()) == sorted(ts)
    assert ck.largest_tensor_bytes == 7 * 5 * 4
    for k, v in ts.items():
        assert torch.equal(ck.read(k), v)


def test_writer_refuses_plan_violations(tmp_path: Path) -> None:
    w = ShardedWriter(tmp_path, [TensorSpec("x", "F32", (2,))])
    with pytest.raises(ValueError, match="planned F32"):
        w.write("x", torch.zeros(3))
    with pytest.raises(ValueError, match="not in the write plan"):
        w.write("y", torch.zeros(2))
    with pytest.raises(RuntimeError, match="never written"):
        w.close()


def _dir_with(tmp: Path, files: dict[str, bytes]) -> Path:
    tmp.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (tmp / name).write_bytes(data)
    return tmp


def test_missing_config(tmp_path: Path) -> None:
    save_file({"x": torch.zeros(2)}, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match="missing config.json"):
        Checkpoint(tmp_path)


def test_pickle_only_checkpoint_is_refused_with_conversion_hint(tmp_path: Path) -> None:
    _dir_with(tmp_path, {"config.json": b"{}", "pytorch_model.bin": b"not even a pickle"})
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin.*never\s+unpickles.*save_pretrained"):
        Checkpoint(tmp_path)


def test_corrupt_and_truncated_shards(tmp_path: Path) -> None:
    good = tmp_path / "good"
    good.mkdir()
    save_file({"x": torch.zeros(100)}, good / "model.safetensors")
    raw = (good / "model.safetensors").read_bytes()
    bad = _dir_with(tmp_path / "trunc", {"config.json": b"{}", "model.safetensors": raw[:-10]})
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*'x'.*truncated or corrupt"):
        Checkpoint(bad)
    bad2 = _dir_with(tmp_path / "hdr", {"config.json": b"{}", "model.safetensors": b"\xff" * 16})
    with pytest.raises(CheckpointError, match="header length"):
        Checkpoint(bad2)
    bad3 = _dir_with(tmp_path / "cfg", {"config.json": b"{nope", "model.safetensors": raw})
    with pytest.raises(CheckpointError, match="config.json: not valid JSON"):
        Checkpoint(bad3)


def test_index_must_match_shards(tmp_path: Path) -> None:
    save_file({"x": torch.zeros(2)}, tmp_path / "a.safetensors")
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"x": "a.safetensors", "y": "b.safetensors"}})
    )
    with pytest.raises(CheckpointError, match="lists shard b.safetensors, which does not exist"):
        Checkpoint(tmp_path)
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"y": "a.safetensors"}}))
    with pytest.raises(CheckpointError, match="says tensor 'y' is in a.safetensors"):
        Checkpoint(tmp_path)


def test_hub_id_without_network_says_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError, match="Hugging Face Hub failed.*[Ww]ithout network access"):
        open_checkpoint("deltamoe-test-org/no-such-model")
    with pytest.raises(CheckpointError, match="no such directory"):
        open_checkpoint(str(tmp_path / "nothing-here"))


def test_atomic_output_dir(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with atomic_output_dir(out) as tmp:
            (tmp / "half.safetensors").write_bytes(b"x")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []  # neither output nor temporary directory left
    with atomic_output_dir(out) as tmp:
        (tmp / "v1").write_text("1")
    with pytest.raises(OutputError, match="already exists; pass --force"):
        with atomic_output_dir(out):
            pass
    with pytest.raises(KeyboardInterrupt):
        with atomic_output_dir(out, force=True) as tmp:
            (tmp / "v2").write_text("2")
            raise KeyboardInterrupt
    assert [p.name for p in out.iterdir()] == ["v1"]  # the old output survives a failed replacement
    with atomic_output_dir(out, force=True) as tmp:
        (tmp / "v2").write_text("2")
    assert [p.name for p in out.iterdir()] == ["v2"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_unwritable_destination(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    with pytest.raises(OutputError, match="is not a directory"):
        with atomic_output_dir(tmp_path / "file" / "out"):
            pass
    with pytest.raises(OutputError, match="cannot"):
        with atomic_output_dir(Path("/proc/deltamoe-test-out")):
            pass
