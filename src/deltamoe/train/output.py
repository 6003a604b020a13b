"""The trained model's output directory, written like every weight operation's: through
:func:`deltamoe.io.output.write_output`.

The shards hold the trained tensors in the input's names, order and dtypes (frozen ones copied
from the input after a bitwise check, :func:`deltamoe.train.model.write_trained_tensors`); beside
them the input's ``config.json`` byte for byte (training changes no architecture), its tokenizer
files, ``deltamoe.json`` with this stage appended (its config and result) and the model card. The
free disk was checked and the input's hashes started before the first step.
"""

from __future__ import annotations

from concurrent.futures import Future
from pathlib import Path
from typing import Any

import torch

from deltamoe.io import Checkpoint, ShardedWriter
from deltamoe.io.output import Finished, write_output
from deltamoe.io.provenance import new_manifest, read_manifest
from deltamoe.train.model import Layout, write_trained_tensors


def write_trained_model(
    out: Path,
    ckpt: Checkpoint,
    layout: Layout,
    state: dict[str, torch.Tensor],
    trainable: set[str],
    *,
    hashes: Future[list[dict[str, Any]]],
    stage: str,
    config: dict[str, Any],
    result: dict[str, Any],
    command: list[str] | None,
    force: bool,
) -> Path:
    """Write the trained model ``state`` to ``out``; ``config`` and ``result`` (with the tensor
    counts added) are recorded as the stage's parameters in ``deltamoe.json``."""
    counts: dict[str, int] = {}

    def tensors(writer: ShardedWriter) -> None:
        counts.update(write_trained_tensors(writer, ckpt, layout, state, trainable))

    def finish(described: list[dict[str, Any]]) -> Finished:
        manifest = new_manifest(
            read_manifest(ckpt.path),
            stage=stage,
            params={"config": config, "result": {**result, "tensors": counts}},
            inputs={"model": described[0]},
            command=command,
        )
        return Finished(ckpt.path / "config.json", manifest)

    specs = [ckpt.spec(n) for n in ckpt.keys()]
    return write_output(out, specs, inputs=hashes, aux=ckpt, tensors=tensors, finish=finish, force=force,
                        disk_checked=True)
