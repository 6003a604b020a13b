"""The one way a weight operation writes its output directory.

Every operation that writes a checkpoint (upcycle, expand, delta extract, graft, merge) does the
same things in the same order: check the free disk, start hashing its inputs on a spare thread,
open an atomic output directory, write the tensors into shards (aborting the writer on any error),
then, once the hashes are in, the config, the tokenizer files, ``deltamoe.json`` and the model card.
:func:`write_output` is that routine; an operation gives it the planned tensors, a function that
writes them and a function that turns the input hashes into the rest (where it may still refuse,
for example when a base's hash does not match the one recorded: nothing is left behind).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deltamoe.checkpoint import (
    DEFAULT_SHARD_BYTES,
    Checkpoint,
    ShardedWriter,
    TensorSpec,
    atomic_output_dir,
    copy_aux_files,
    write_json,
)
from deltamoe.preflight import check_output_disk
from deltamoe.provenance import hash_in_background, write_manifest, write_model_card


@dataclass(frozen=True)
class Finished:
    """What an output holds besides its tensors, known once the inputs are hashed."""

    config: dict[str, Any]
    manifest: dict[str, Any]
    readme: str | None = None  # instead of the model card (a delta artifact is not a model)


def write_output(
    out: str | os.PathLike[str],
    specs: Sequence[TensorSpec],
    *,
    inputs: Sequence[Checkpoint],
    aux: Checkpoint,
    tensors: Callable[[ShardedWriter], None],
    finish: Callable[[list[dict[str, Any]]], Finished],
    force: bool = False,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    metadata: dict[str, str] | None = None,
) -> Path:
    """Write ``specs`` through ``tensors(writer)`` into ``out`` atomically, then what
    ``finish(hashes)`` returns for the sha256 descriptions of ``inputs`` (in order), with the
    tokenizer and other auxiliary files of ``aux``. Returns ``out``."""
    out_path = Path(out)
    check_output_disk(out_path, specs, aux.aux_files())
    hashes = hash_in_background(*inputs)
    with atomic_output_dir(out_path, force=force) as tmp:
        writer = ShardedWriter(tmp, specs, max_shard_bytes=max_shard_bytes, metadata=metadata)
        try:
            tensors(writer)
            writer.close()
        except BaseException:
            writer.abort()
            raise
        done = finish(hashes.result())
        write_json(tmp / "config.json", done.config)
        copy_aux_files(aux, tmp)
        write_manifest(tmp, done.manifest)
        if done.readme is None:
            write_model_card(tmp, done.manifest)
        else:
            (tmp / "README.md").write_text(done.readme)
    return out_path
