"""The one way a weight operation writes its output directory.

Every operation that writes a checkpoint (upcycle, expand, delta extract, graft, merge) does the
same things in the same order: check the free disk, start hashing its inputs on a spare thread,
open an atomic output directory, write the tensors into shards (aborting the writer on any error),
then, once the hashes are in, the config, the tokenizer files, ``deltamoe.json`` and the model card.
:func:`write_output` is that routine; an operation gives it the planned tensors, a function that
writes them and a function that turns the input hashes into the rest (where it may still refuse,
for example when a base's hash does not match the one recorded: nothing is left behind).

A training stage writes its output the same way, from a live model's state dict; it checks the
free disk and starts hashing its input before its first step, hours before it writes, so it
hands :func:`write_output` those hashes (``inputs``) and ``disk_checked``, and keeps its input's
``config.json`` as it is (:attr:`Finished.config` a path).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from deltamoe.io import (
    DEFAULT_SHARD_BYTES,
    Checkpoint,
    ShardedWriter,
    TensorSpec,
    atomic_output_dir,
    copy_aux_files,
    write_json,
)
from deltamoe.preflight import check_output_disk
from deltamoe.io.provenance import cancel_hashing, hash_in_background, write_manifest, write_model_card


@dataclass(frozen=True)
class Finished:
    """What an output holds besides its tensors, known once the inputs are hashed."""

    config: dict[str, Any] | Path  # a path: that config.json, copied byte for byte (a training stage's input's)
    manifest: dict[str, Any]
    readme: str | None = None  # instead of the model card (a delta artifact is not a model)


T = TypeVar("T")


def write_shards(
    directory: str | os.PathLike[str],
    specs: Sequence[TensorSpec],
    tensors: Callable[[ShardedWriter], T],
    *,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    metadata: dict[str, str] | None = None,
) -> T:
    """Write ``specs`` through ``tensors(writer)`` into ``directory``: the shards and their index
    when it returns, none of them when it raises. Returns what ``tensors`` returns."""
    writer = ShardedWriter(directory, specs, max_shard_bytes=max_shard_bytes, metadata=metadata)
    try:
        result = tensors(writer)
        writer.close()
    except BaseException:
        writer.abort()
        raise
    return result


def write_output(
    out: str | os.PathLike[str],
    specs: Sequence[TensorSpec],
    *,
    inputs: Sequence[Checkpoint] | Future[list[dict[str, Any]]],
    aux: Checkpoint,
    tensors: Callable[[ShardedWriter], None],
    finish: Callable[[list[dict[str, Any]]], Finished],
    force: bool = False,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    metadata: dict[str, str] | None = None,
    disk_checked: bool = False,
) -> Path:
    """Write ``specs`` through ``tensors(writer)`` into ``out`` atomically, then what
    ``finish(hashes)`` returns for the sha256 descriptions of ``inputs`` (in order), with the
    tokenizer and other auxiliary files of ``aux``. Returns ``out``.

    ``inputs`` may be the hashes already started (:func:`deltamoe.io.provenance.hash_in_background`),
    and ``disk_checked`` says the caller checked the free disk for this output itself (both: a
    training stage, before its first step)."""
    out_path = Path(out)
    if not disk_checked:
        check_output_disk(out_path, specs, aux.aux_files())
    hashes = inputs if isinstance(inputs, Future) else hash_in_background(*inputs)
    with atomic_output_dir(out_path, force=force) as tmp:
        try:
            write_shards(tmp, specs, tensors, max_shard_bytes=max_shard_bytes, metadata=metadata)
        except BaseException:
            cancel_hashing(hashes)  # an error or a signal: do not wait for the rest of the inputs' hashes
            raise
        done = finish(hashes.result())
        if isinstance(done.config, Path):
            shutil.copyfile(done.config, tmp / "config.json")
        else:
            write_json(tmp / "config.json", done.config)
        copy_aux_files(aux, tmp)
        write_manifest(tmp, done.manifest)
        if done.readme is None:
            write_model_card(tmp, done.manifest)
        else:
            (tmp / "README.md").write_text(done.readme)
    return out_path
