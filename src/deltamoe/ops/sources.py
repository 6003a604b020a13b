"""One post-training delta Δ = P − B (docs/design.md#step-3-graft), from a (B, P) pair or a delta artifact.

A :class:`DeltaSource` gives, for any row range of any tensor, the reads and the function that
make Δ there; the engine reads and computes. When P has embedding/LM-head rows that B lacks
(added special tokens), ``rows`` says how many rows Δ has (those shared with B) and ``added``
gives P's values of the others.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import torch

from deltamoe import arch
from deltamoe.io import Checkpoint, TensorSpec
from deltamoe.arith import diff32
from deltamoe.engine import Read, is_float
from deltamoe.errors import ArchitectureError, CheckpointError
from deltamoe.io.provenance import read_manifest

# Config fields that fix tensor shapes or weight sharing: B and P must agree on them.
STRUCTURAL = (
    "model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "tie_word_embeddings",
)
# What a source's ``delta`` and ``added`` return: the reads, and what makes the values from them.
Reads = tuple[list[Read], Callable[[list[torch.Tensor]], torch.Tensor]]


class DeltaSource(Protocol):
    """Where Δ = P − B comes from: a (B, P) pair or a delta artifact."""

    label: str
    base_config: dict[str, Any]
    post_config: dict[str, Any]
    aux: Checkpoint  # tokenizer files, chat template, generation config (P's)
    # tensor name -> P's shape; rows[name] = rows shared with B (< shape[0] when P added tokens)
    shapes: dict[str, tuple[int, ...]]
    rows: dict[str, int]

    def delta(self, name: str, a: int | None, b: int | None) -> Reads:
        """Reads and a function giving Δ[a:b] in float32 (rows shared with B)."""
        ...

    def added(self, name: str, a: int, b: int) -> Reads:
        """Reads and a function giving P's values of rows a:b that B lacks."""
        ...

    def base_shape(self, name: str) -> tuple[int, ...]:
        ...


class RowsOfBase:
    """``base_shape`` from ``shapes`` and ``rows``: what every source derives the same way."""

    shapes: dict[str, tuple[int, ...]]
    rows: dict[str, int]

    def base_shape(self, name: str) -> tuple[int, ...]:
        s = self.shapes[name]
        return (self.rows[name], *s[1:]) if s else s


def added_rows(src: DeltaSource) -> dict[str, int]:
    """Tensor -> rows shared with B, for the tensors where P added vocabulary rows (in ``src.rows`` order)."""
    return {n: r for n, r in src.rows.items() if src.shapes[n] and r < src.shapes[n][0]}


def check_configs(base: dict[str, Any], post: dict[str, Any], base_src: str, post_src: str) -> None:
    """B and P must be the same architecture with the same shapes (vocabulary may grow)."""
    for key in STRUCTURAL:
        if base.get(key) != post.get(key):
            raise ArchitectureError(
                f"{post_src}: {key} = {post.get(key)!r}, but {base_src} has {key} = {base.get(key)!r}; "
                "the post-trained model must have the base model's architecture and shapes"
            )


def pair_rows(
    base_path: Path,
    base_specs: dict[str, TensorSpec],
    base_config: dict[str, Any],
    other: Checkpoint,
) -> dict[str, int]:
    """Check that ``other`` has exactly the base's tensors, with its shapes or more vocabulary rows.

    Returns, for every tensor, the number of leading rows shared with the base.
    """
    missing = sorted(set(base_specs) - set(other.tensors))
    if missing:
        raise CheckpointError(
            f"{other.path}: missing tensor(s) {missing[:5]}{' ...' if len(missing) > 5 else ''} "
            f"that the base {base_path} has"
        )
    extra = sorted(set(other.tensors) - set(base_specs))
    if extra:
        raise CheckpointError(
            f"{other.tensors[extra[0]].file}: tensor(s) {extra[:5]}{' ...' if len(extra) > 5 else ''} "
            f"are not in the base {base_path}"
        )
    vb, vo = base_config.get("vocab_size"), other.config.get("vocab_size")
    rows: dict[str, int] = {}
    for name, bs in base_specs.items():
        os_ = other.spec(name)
        if not is_float(os_.dtype) or not is_float(bs.dtype):
            raise CheckpointError(
                f"{other.tensors[name].file}: tensor {name!r} is {os_.dtype} (base: {bs.dtype}); "
                "deltas are defined for floating-point tensors only"
            )
        if os_.shape == bs.shape:
            rows[name] = bs.shape[0] if bs.shape else 0
            continue
        grown = (
            len(os_.shape) == len(bs.shape) >= 1
            and os_.shape[1:] == bs.shape[1:]
            and bs.shape[0] == vb
            and os_.shape[0] == vo
            and vo > vb
        )
        if not grown:
            raise CheckpointError(
                f"tensor {name!r} has shape {list(os_.shape)} in {other.tensors[name].file} but "
                f"{list(bs.shape)} in the base {base_path}; shapes must match, except that embedding/LM-head rows "
                f"may be added beyond the base's vocab_size ({vb})"
            )
        rows[name] = bs.shape[0]
    return rows


class PairDelta(RowsOfBase):
    """Δ = P − B read from two checkpoints (validated against each other on construction)."""

    def __init__(self, base: Checkpoint, post: Checkpoint):
        self.base, self.post, self.aux = base, post, post
        self.label = f"{post.path} - {base.path}"
        self.base_config, self.post_config = base.config, post.config
        check_configs(base.config, post.config, str(base.path / "config.json"), str(post.path / "config.json"))
        self.rows = pair_rows(base.path, {n: base.spec(n) for n in base.keys()}, base.config, post)
        self.shapes = {n: post.spec(n).shape for n in post.keys()}

    def delta(self, name: str, a: int | None, b: int | None) -> Reads:
        return [Read(self.post, name, a, b), Read(self.base, name, a, b)], _pair_diff

    def added(self, name: str, a: int, b: int) -> Reads:
        return [Read(self.post, name, a, b)], _first


def _pair_diff(ts: list[torch.Tensor]) -> torch.Tensor:
    return diff32(ts[0], ts[1])


def _first(ts: list[torch.Tensor]) -> torch.Tensor:
    return ts[0]


class ArtifactDelta(RowsOfBase):
    """Δ read from a delta artifact written by :func:`deltamoe.ops.extract.extract_delta`."""

    def __init__(self, ckpt: Checkpoint):
        manifest = read_manifest(ckpt.path)
        block = (manifest or {}).get("delta")
        if not isinstance(block, dict):
            raise CheckpointError(
                f"{ckpt.path}: not a delta artifact (its deltamoe.json has no 'delta' block); "
                "make one with: deltamoe delta extract --base B --post P OUT"
            )
        self.ckpt = self.aux = ckpt
        self.manifest = manifest
        self.label = str(ckpt.path)
        self.base_sha256: str = block["base"]["sha256"]
        self.post_sha256: str = block["post"]["sha256"]
        self.recorded_inputs = {"base": block["base"], "post": block["post"]}
        self.base_config: dict[str, Any] = block["base_config"]
        self.post_config = ckpt.config
        self.shapes = {n: ckpt.spec(n).shape for n in ckpt.keys()}
        added = block.get("added_rows", {})
        self.rows = {n: int(added.get(n, s[0] if s else 0)) for n, s in self.shapes.items()}
        for n, spec in ckpt.tensors.items():
            if not is_float(spec.spec.dtype):
                raise CheckpointError(f"{spec.file}: tensor {n!r} of a delta artifact is not floating point")

    def delta(self, name: str, a: int | None, b: int | None) -> Reads:
        return [Read(self.ckpt, name, a, b)], _first

    def added(self, name: str, a: int, b: int) -> Reads:
        return [Read(self.ckpt, name, a, b)], _first



def refuse_new_rows(src: DeltaSource, new_rows: str) -> None:
    """With ``--new-rows error``, refuse a Δ whose P added vocabulary rows."""
    if new_rows != "error":
        return
    grown = added_rows(src)
    if grown:
        n, r = next(iter(grown.items()))
        raise CheckpointError(
            f"{src.label}: tensor {n!r} has {src.shapes[n][0]} rows where the base has {r} (the post-trained model "
            f"added vocabulary) and --new-rows is 'error'; use --new-rows post or mean to accept them"
        )


def check_counterparts(src: DeltaSource, consumed: set[str], target: Path, mismatch: str) -> None:
    """Every tensor of Δ reaches the output (``consumed``), but those that the base's config lets be
    absent (a tied LM head); else the model ``target`` was not made from this base (``mismatch``)."""
    left = sorted(set(src.shapes) - consumed)
    if left:
        _, optional = arch.expected_dense_tensors(src.base_config, source=f"{src.label} (base config)")
        bad = sorted(set(left) - optional)
        if bad:
            raise CheckpointError(
                f"{target}: has no counterpart for tensor(s) {bad[:5]} of the base/post models ({src.label}); "
                f"{mismatch}"
            )
