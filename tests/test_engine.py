"""The streaming engine's reader: mapped reads give exactly what ``pread`` gives, the mappings are
released with the tensors that use them, and a file cut short after its header was read is an error
that names it, not a crash."""

from __future__ import annotations

import gc
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from deltamoe.engine import Read, _Reader, row_chunks
from deltamoe.io import ranges
from deltamoe.errors import CheckpointError
from deltamoe.io import Checkpoint

# Large enough that every tensor is mapped (ranges._MAP_MIN_BYTES), odd sizes so that ranges
# start inside pages and end short of them.
_SHAPES = {"a.bf16": ((700, 777), torch.bfloat16), "b.f32": ((333, 901), torch.float32),
           "c.i64": ((129, 515), torch.int64), "d.f16": ((1, 3), torch.float16)}


@pytest.fixture
def ckpt(tmp_path: Path) -> Checkpoint:
    g = torch.Generator().manual_seed(0)
    tensors = {}
    for name, (shape, dt) in _SHAPES.items():
        t = torch.randn(shape, generator=g) * 100
        tensors[name] = t.to(dt)
    save_file(tensors, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text("{}")
    return Checkpoint(tmp_path)


def _ranges(c: Checkpoint) -> list[Read]:
    reads = [Read(c, n) for n in _SHAPES]
    for n, (shape, _) in _SHAPES.items():
        reads += [Read(c, n, a, b) for a, b in row_chunks(shape)]
        reads += [Read(c, n, 1, shape[0]), Read(c, n, shape[0] // 3, shape[0] // 3 + 1)]
    return reads


def _maps(path: Path) -> int:
    return Path("/proc/self/maps").read_text().count(str(path.resolve()))


class _Counting(_Reader):
    maps = 0

    def _map(self, *args: object) -> torch.Tensor | None:
        t = super()._map(*args)  # type: ignore[arg-type]
        self.maps += t is not None
        return t


def test_mapped_reads_equal_pread(ckpt: Checkpoint) -> None:
    mapped, copied = _Counting(), _Reader(mapped=False)
    try:
        reads = _ranges(ckpt)
        for r in reads:
            a, b = mapped.read(r), copied.read(r)
            assert a.dtype == b.dtype and a.shape == b.shape, r
            assert torch.equal(a.view(torch.uint8), b.view(torch.uint8)), r
        # every read of at least _MAP_MIN_BYTES was mapped (safetensors aligns each tensor to its dtype)
        assert mapped.maps == sum(r.nbytes >= ranges._MAP_MIN_BYTES for r in reads) == 9
    finally:
        mapped.close()
        copied.close()


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs /proc/self/maps (Linux)")
def test_mappings_are_released_with_their_tensors(ckpt: Checkpoint) -> None:
    file = ckpt.path / "model.safetensors"
    reader = _Reader()
    try:
        before = _maps(file)
        held = [reader.read(r) for r in _ranges(ckpt)[:8]]
        views = [t[:1] for t in held]  # a view keeps its range mapped, as a pending write would
        assert _maps(file) >= before + 4
        del held
        gc.collect()
        assert _maps(file) >= before + 4
        del views
        gc.collect()
        assert _maps(file) == before
    finally:
        reader.close()


def test_a_file_cut_short_after_its_header_is_named(ckpt: Checkpoint) -> None:
    file = ckpt.path / "model.safetensors"
    info = ckpt.tensors["c.i64"]
    os.truncate(file, info.offset + 4096)  # after Checkpoint checked the sizes: a concurrent truncation
    plain = _Reader(mapped=False)
    for reader in (_Reader(), plain):
        try:
            with pytest.raises(CheckpointError, match=r"model\.safetensors: unexpected end of file reading tensor 'c\.i64'"):
                reader.read(Read(ckpt, "c.i64"))
            assert reader._mapped is (reader is not plain)  # the mapped reader failed mapped, not by falling back
        finally:
            reader.close()


def test_pooled_results_are_reused_only_once_freed() -> None:
    from deltamoe.arith import POOL, diff32

    POOL.clear()
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(300, 77, generator=g).bfloat16(), torch.randn(300, 77, generator=g).bfloat16()
    d = diff32(a, b)
    assert torch.equal(d, a.float() - b.float())
    held = d[5:]  # a view keeps the buffer: the next result must not share it
    del d
    gc.collect()
    e = diff32(b, a)
    assert e.data_ptr() != held.data_ptr() - 5 * 77 * 4
    assert torch.equal(held, (a.float() - b.float())[5:])  # untouched by the second result
    ptr = e.data_ptr()
    del e
    gc.collect()
    assert len(POOL.free) == 1
    f = diff32(a, a)
    assert f.data_ptr() == ptr and not f.any()  # the freed buffer is reused
    big = diff32(torch.ones(2**20 + 1), torch.zeros(2**20 + 1))  # larger than a chunk: allocated
    assert big.shape == (2**20 + 1,) and bool((big == 1).all())
    POOL.clear()
