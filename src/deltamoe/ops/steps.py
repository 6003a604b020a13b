"""The engine steps that extract, graft and merge share, and the write that runs them.

A step names the row ranges it reads and a function that turns them into output pieces (see
:mod:`deltamoe.engine`). Steps are planned ahead of their execution (read-ahead), so everything a
step's compute uses is bound to it (``partial`` or default arguments), never looked up in the
planning loop's variables.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import torch

from deltamoe.io import Checkpoint, ShardedWriter, TensorSpec
from deltamoe.arith import add32
from deltamoe.engine import Out, Read, Step, row_chunks, run_steps
from deltamoe.ops.sources import DeltaSource
from deltamoe.io.output import Finished, write_output


def stream_output(
    out: Path,
    specs: list[TensorSpec],
    steps: Iterable[Step],
    *,
    inputs: Sequence[Checkpoint],
    aux: Checkpoint,
    finish: Callable[[list[dict[str, Any]]], Finished],
    desc: str,
    force: bool,
    max_shard_bytes: int,
    buffer_bytes: int | None,
    progress: bool,
    metadata: dict[str, str] | None = None,
) -> Path:
    """:func:`deltamoe.io.output.write_output` of the tensors ``specs`` that the engine computes by ``steps``."""
    planned = {s.name: s for s in specs}

    def tensors(writer: ShardedWriter) -> None:
        run_steps(steps, writer, planned, buffer_bytes=buffer_bytes, progress=progress, desc=desc)

    return write_output(out, specs, inputs=inputs, aux=aux, tensors=tensors, finish=finish, force=force,
                        max_shard_bytes=max_shard_bytes, metadata=metadata)


def add_scaled(m: torch.Tensor, d: torch.Tensor, scale: float) -> torch.Tensor:
    """M + scale · Δ in float32, as an output piece (the engine consumes it at once)."""
    return add32(m, d, scale, scratch=True)


def copy_chunk(ts: list[torch.Tensor], *, name: str, a: int | None) -> list[Out]:
    return [(name, a, ts[0])]


def copy_steps(m: Checkpoint, name: str) -> Iterator[Step]:
    """Tensor ``name`` of ``m``, copied to the output unchanged (in row chunks)."""
    for a, b in row_chunks(m.spec(name).shape):
        yield Step([Read(m, name, a, b)], partial(copy_chunk, name=name, a=a))


def graft_steps(m: Checkpoint, src: DeltaSource, name: str, new_rows: str, m_name: str | None = None) -> Iterator[Step]:
    """M + Δ for Δ's tensor ``name`` and M's tensor ``m_name`` (default the same name), written
    under M's name; the rows that P added to the vocabulary follow ``new_rows``."""
    m_name = m_name or name
    shape = src.shapes[name]
    mean = RowMean() if new_rows == "mean" and shape and src.rows[name] < shape[0] else None
    for a, b in row_chunks(shape, 0, src.rows[name]):
        reads, fn = src.delta(name, a, b)

        def compute(ts: list[torch.Tensor], a=a, fn=fn) -> list[Out]:
            o = add_scaled(ts[-1], fn(ts[:-1]), 1.0)
            if mean is not None:
                mean.add(o)
            return [(m_name, a, o)]

        yield Step([*reads, Read(m, m_name, a, b)], compute)
    if shape and src.rows[name] < shape[0]:
        yield from added_rows_steps(src, name, new_rows, mean, m_name)


class RowMean:
    """Running float64 sum of the rows of one output tensor, for ``new_rows="mean"``."""

    def __init__(self) -> None:
        self.total: torch.Tensor | None = None
        self.count = 0

    def add(self, t: torch.Tensor) -> None:
        s = t.sum(0, dtype=torch.float64)
        self.total = s if self.total is None else self.total.add_(s)
        self.count += t.shape[0]

    def rows(self, n: int) -> torch.Tensor:
        assert self.total is not None and self.count
        return (self.total / self.count).float().expand(n, *self.total.shape).contiguous()


def added_rows_steps(
    src: DeltaSource, name: str, new_rows: str, mean: RowMean | None, out_name: str | None = None
) -> Iterator[Step]:
    """Steps writing rows ``src.rows[name]:`` (vocabulary P added) of output ``out_name``."""
    out_name = out_name or name
    shape = src.shapes[name]
    for a, b in row_chunks(shape, src.rows[name], shape[0] if shape else 0):
        if new_rows == "mean":
            assert mean is not None
            yield Step([], lambda ts, a=a, b=b: [(out_name, a, mean.rows(b - a))])
        else:
            reads, fn = src.added(name, a, b)
            yield Step(reads, lambda ts, a=a, fn=fn: [(out_name, a, fn(ts))])
