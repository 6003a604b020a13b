"""``deltamoe delta extract``: write Δ = P − B once, as an artifact that graft and merge read in place of B and P."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from deltamoe.io import DEFAULT_SHARD_BYTES, DTYPE_NAMES, Checkpoint, TensorSpec, dtype_code, open_checkpoint
from deltamoe.engine import Step, row_chunks
from deltamoe.errors import UsageError
from deltamoe.ops.common import natural_key, prepare_output
from deltamoe.ops.sources import PairDelta, added_rows
from deltamoe.ops.steps import added_rows_steps, stream_output
from deltamoe.io.output import Finished
from deltamoe.io.provenance import new_manifest

DELTA_STAGE = "delta"


def extract_delta(
    base: str | os.PathLike[str],
    post: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    dtype: str = "float32",
    force: bool = False,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    buffer_bytes: int | None = None,
    progress: bool = True,
    command: list[str] | None = None,
) -> Path:
    """Write Δ = P − B once, as a sharded safetensors checkpoint at ``out``; return ``out``.

    The artifact holds one tensor per tensor of P (P's names and shapes; rows that P added to
    the vocabulary hold P's values), P's config, tokenizer files and chat template, and in
    ``deltamoe.json`` the sha256 of B and P, B's config and the added rows. ``graft --delta``
    and ``merge --delta`` use it in place of B and P. ``dtype`` float32 (default) stores the
    difference exactly; bfloat16/float16 halve the size and round Δ.
    """
    if dtype not in DTYPE_NAMES:
        raise UsageError(f"--dtype must be one of {sorted(DTYPE_NAMES)}, got {dtype!r}")
    out_path = prepare_output(out, force=force, max_shard_bytes=max_shard_bytes)
    b, p = open_checkpoint(base), open_checkpoint(post)
    src = PairDelta(b, p)
    names = sorted(p.keys(), key=natural_key)
    code = dtype_code(DTYPE_NAMES[dtype])
    specs = [TensorSpec(n, code, src.shapes[n]) for n in names]
    added = added_rows(src)

    def finish(hashes: list[dict[str, Any]]) -> Finished:
        hb, hp = hashes
        manifest = new_manifest(
            None, stage=DELTA_STAGE, params={"dtype": dtype, "max_shard_bytes": max_shard_bytes},
            inputs={"base": hb, "post": hp}, command=command,
        )
        manifest["delta"] = {"base": hb, "post": hp, "base_config": b.config, "added_rows": added, "dtype": dtype}
        return Finished(p.config, manifest, readme=_readme(b, p, dtype))

    stream_output(out_path, specs, _steps(src, names, added), inputs=[b, p], aux=p, finish=finish,
                  desc="delta extract", force=force, max_shard_bytes=max_shard_bytes, buffer_bytes=buffer_bytes,
                  progress=progress, metadata={"deltamoe": "delta"})
    return out_path


def _steps(src: PairDelta, names: list[str], added: dict[str, int]) -> Iterator[Step]:
    """Δ over the rows P shares with B, then P's own values of the rows it added."""
    for n in names:
        for a, bb in row_chunks(src.shapes[n], 0, src.rows[n]):
            reads, fn = src.delta(n, a, bb)
            yield Step(reads, lambda ts, n=n, a=a, fn=fn: [(n, a, fn(ts))])
        if n in added:
            yield from added_rows_steps(src, n, "post", None)


def _readme(b: Checkpoint, p: Checkpoint, dtype: str) -> str:
    return (
        "# deltamoe delta artifact\n\n"
        "This is **not a model**: each tensor is the difference P − B between a post-trained model P\n"
        f"(`{p.path}`) and its base B (`{b.path}`), stored as {dtype}. Rows that P added to the\n"
        "vocabulary hold P's values. Use it with `deltamoe graft --moe M --delta THIS OUT` or\n"
        "`deltamoe merge --delta THIS ...`. Provenance (sha256 of B and P) is in `deltamoe.json`.\n"
    )
