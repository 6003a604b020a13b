"""Several post-training deltas of one base, Σ wᵢΔᵢ, and the ``PATH[:WEIGHT]`` arguments that name them.

``graft``, ``graft_expanded`` and ``inspect`` open their deltas here (:func:`open_deltas`): one
(B, P) pair or artifact at weight 1 is the original, single-delta form; several are summed in
float32 in the order given, and the first (the primary) brings the tokenizer, the config changes
and any added vocabulary rows.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch

from deltamoe.io import Checkpoint, open_checkpoint
from deltamoe.arith import f32
from deltamoe.engine import Read
from deltamoe.errors import ArchitectureError, CheckpointError, UsageError
from deltamoe.ops.common import natural_key
from deltamoe.ops.sources import STRUCTURAL, ArtifactDelta, DeltaSource, PairDelta, Reads, RowsOfBase, added_rows

WeightedInput = str | os.PathLike[str] | tuple[str | os.PathLike[str], float | None]


def check_weight(weight: Any, what: str) -> float:
    """``weight`` as a finite float, or a UsageError naming ``what`` (the flag and its value)."""
    try:
        w = float(weight)
    except (TypeError, ValueError):
        raise UsageError(f"{what}: the weight {weight!r} is not a number; give it as PATH:0.5") from None
    if w != w or abs(w) == float("inf"):
        raise UsageError(f"{what}: the weight must be a finite number, got {weight!r}")
    return w


def parse_weight_arg(text: str, flag: str) -> tuple[str, float | None]:
    """``PATH[:WEIGHT]`` given to ``flag`` -> (path, weight or None).

    A text that names an existing path is that path, ':' and all; so is one whose last ':' is
    followed by a '/' (``hf://owner/name``). Otherwise what follows the last ':' must be a
    finite number: ``D:abc`` is an error, not a model called ``D:abc``.
    """
    path, sep, tail = text.rpartition(":")
    if not sep or "/" in tail or Path(text).expanduser().exists():
        return text, None
    if not path:
        raise UsageError(f"{flag} {text}: no path before ':'; write {flag} PATH or {flag} PATH:WEIGHT")
    try:
        weight = float(tail)
    except ValueError:
        raise UsageError(
            f"{flag} {text}: the weight {tail!r} is not a number (and no path {text!r} exists); "
            f"write {flag} {path}:0.5, or {flag} {path} for weight 1"
        ) from None
    return path, check_weight(weight, f"{flag} {text}")


def weighted_inputs(given: WeightedInput | list[WeightedInput] | None, flag: str) -> list[tuple[str, float | None]]:
    """One input or a list of them, each a path, ``"PATH:WEIGHT"`` or ``(path, weight)``."""
    if given is None:
        return []
    out: list[tuple[str, float | None]] = []
    for item in given if isinstance(given, list) else [given]:
        if isinstance(item, tuple):
            path, w = item
            out.append((os.fspath(path), None if w is None else check_weight(w, f"{flag} {os.fspath(path)}")))
        elif isinstance(item, os.PathLike):
            out.append((os.fspath(item), None))
        else:
            out.append(parse_weight_arg(str(item), flag))
    return out


def weight_of(w: float | None) -> float:
    """A weight as given; 1 where none was."""
    return 1.0 if w is None else w


def _tensor_file(src: DeltaSource, name: str) -> str:
    info = src.aux.tensors.get(name)
    return str(info.file) if info is not None else str(src.aux.path)


def check_same_delta(first: DeltaSource, other: DeltaSource) -> None:
    """``other`` must be a delta of the same base as ``first``: same architecture, same tensors and
    the same shapes over the base's rows."""
    for key in STRUCTURAL:
        if first.base_config.get(key) != other.base_config.get(key):
            raise ArchitectureError(
                f"{other.label}: its base has {key} = {other.base_config.get(key)!r}, but the base of {first.label} "
                f"has {key} = {first.base_config.get(key)!r}; deltas are added only when they come from one base model"
            )
    missing = sorted(set(first.shapes) - set(other.shapes), key=natural_key)
    extra = sorted(set(other.shapes) - set(first.shapes), key=natural_key)
    if missing or extra:
        what = f"has no tensor(s) {missing[:5]} that {first.label} has" if missing else \
            f"has tensor(s) {extra[:5]} that {first.label} lacks"
        raise CheckpointError(f"{other.label}: {what}; every delta must have the same tensors (made from one base)")
    for name in sorted(first.shapes, key=natural_key):
        want, got = first.base_shape(name), other.base_shape(name)
        if got != want:
            raise CheckpointError(
                f"tensor {name!r} has shape {list(got)} in {_tensor_file(other, name)} but {list(want)} in "
                f"{first.label}; every delta must have the base's shapes"
            )


class WeightedDelta(RowsOfBase):
    """Σ wᵢ Δᵢ over several deltas of one base. The first is the primary: its tokenizer files,
    config and added vocabulary rows are used (the others may add none)."""

    def __init__(self, terms: Sequence[tuple[DeltaSource, float]]):
        if not terms:
            raise UsageError("no delta given")
        first = terms[0][0]
        for src, _ in terms[1:]:
            check_same_delta(first, src)
            grown = next(iter(added_rows(src)), None)
            if grown is not None:
                raise CheckpointError(
                    f"{_tensor_file(src, grown)}: tensor {grown!r} has {src.shapes[grown][0]} rows where the base has "
                    f"{src.rows[grown]} (added vocabulary), but only the first delta may add rows (its tokenizer is "
                    "used); list the delta that adds tokens first"
                )
        self.terms = tuple(terms)
        self.aux, self.base_config, self.post_config = first.aux, first.base_config, first.post_config
        self.shapes, self.rows = first.shapes, first.rows
        self.label = " + ".join(f"{w:g} * ({src.label})" for src, w in terms)

    def delta(self, name: str, a: int | None, b: int | None) -> Reads:
        reads: list[Read] = []
        parts: list[tuple[int, int, Callable[[list[torch.Tensor]], torch.Tensor], float]] = []
        for src, w in self.terms:
            r, fn = src.delta(name, a, b)
            parts.append((len(reads), len(reads) + len(r), fn, w))
            reads.extend(r)
        return reads, partial(_weighted_sum, parts=tuple(parts))

    def added(self, name: str, a: int, b: int) -> Reads:
        return self.terms[0][0].added(name, a, b)


def _weighted_sum(ts: list[torch.Tensor], *, parts: tuple[tuple[int, int, Any, float], ...]) -> torch.Tensor:
    """float32: w₀Δ₀, then + wᵢΔᵢ in the order given (a new tensor; the inputs are not modified)."""
    acc: torch.Tensor | None = None
    for i, j, fn, w in parts:
        d = f32(fn(ts[i:j]))
        if acc is None:
            acc = torch.mul(d, w)
        else:
            acc.add_(d, alpha=w)
    assert acc is not None
    return acc


@dataclass(frozen=True)
class DeltaTerm:
    """One weighted Δ and its name in the provenance."""

    src: PairDelta | ArtifactDelta
    weight: float
    role: str  # "post_<i>" for a (B, Pᵢ) pair, "delta_<i>" for an artifact; merge's "model_<i>" too


@dataclass(frozen=True)
class DeltaSet:
    """The deltas of one graft: (B, P₀), (B, P₁), ... or artifacts D₀, D₁, ... with their weights."""

    terms: tuple[DeltaTerm, ...]
    base: Checkpoint | None  # B of the pairs; None for artifacts

    @property
    def single(self) -> bool:
        """One delta at weight 1: the original form, whose output and provenance are unchanged."""
        return len(self.terms) == 1 and self.terms[0].weight == 1.0

    def source(self) -> DeltaSource:
        if self.single:
            return self.terms[0].src
        return WeightedDelta([(t.src, t.weight) for t in self.terms])

    def checkpoints(self) -> list[Checkpoint]:
        """What to hash, in the order :meth:`record` expects."""
        if self.base is not None:
            return [self.base, *(t.src.post for t in self.terms if isinstance(t.src, PairDelta))]
        return [t.src.ckpt for t in self.terms if isinstance(t.src, ArtifactDelta)]

    def artifacts(self) -> list[ArtifactDelta]:
        return [t.src for t in self.terms if isinstance(t.src, ArtifactDelta)]

    def weights(self) -> dict[str, float]:
        return {t.role: t.weight for t in self.terms}

    def record(self, described: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
        """Provenance inputs from the digests of :meth:`checkpoints`."""
        if self.base is not None:
            if self.single:
                return {"base": described[0], "post": described[1]}
            return {"base": described[0], **{t.role: d for t, d in zip(self.terms, described[1:])}}
        arts = self.artifacts()
        if self.single:
            return {"delta": described[0], **arts[0].recorded_inputs}
        out = {t.role: d for t, d in zip(self.terms, described)}
        out["base"] = arts[0].recorded_inputs["base"]
        for i, art in enumerate(arts):
            out[f"post_{i}"] = art.recorded_inputs["post"]
            if art.base_sha256 != arts[0].base_sha256:  # only with --no-check-base
                out[f"base_{i}"] = art.recorded_inputs["base"]
        return out


def open_deltas(
    base: str | os.PathLike[str] | None,
    post: WeightedInput | list[WeightedInput] | None,
    delta: WeightedInput | list[WeightedInput] | None,
) -> DeltaSet:
    """``--base B --post P[:W] ...`` or ``--delta D[:W] ...`` (one of the two), opened and checked."""
    posts, deltas = weighted_inputs(post, "--post"), weighted_inputs(delta, "--delta")
    if deltas:
        if base is not None or posts:
            raise UsageError("give either --delta D or both --base B and --post P, not both")
        terms = [DeltaTerm(ArtifactDelta(open_checkpoint(p)), weight_of(w), f"delta_{i}")
                 for i, (p, w) in enumerate(deltas)]
        return DeltaSet(tuple(terms), None)
    if base is None or not posts:
        raise UsageError("the post-training delta needs both --base B and --post P (or a delta artifact: --delta D)")
    b = open_checkpoint(base)
    return DeltaSet(tuple(pair_terms(b, posts)), b)


def pair_terms(base: Checkpoint, posts: list[tuple[str, float | None]]) -> list[DeltaTerm]:
    """The (B, Pᵢ) pairs of ``--post Pᵢ[:W]``, opened and checked against B: roles post_0, post_1, ..."""
    return [DeltaTerm(PairDelta(base, open_checkpoint(p)), weight_of(w), f"post_{i}") for i, (p, w) in enumerate(posts)]


def check_artifact_bases(arts: Sequence[ArtifactDelta], upcycled_from: dict[str, Any] | None = None,
                         moe: Path | None = None) -> None:
    """Every delta artifact was extracted against M's dense model, and all against the same base."""
    for art in arts:
        if upcycled_from and upcycled_from["sha256"] != art.base_sha256:
            raise CheckpointError(
                f"{art.label}: this delta was extracted against the base {art.recorded_inputs['base']['path']} "
                f"(sha256 {art.base_sha256[:16]}...), but {moe} was upcycled from {upcycled_from['path']} "
                f"(sha256 {upcycled_from['sha256'][:16]}...); extract the delta against the base M was upcycled from"
            )
    first = arts[0] if arts else None
    for art in arts[1:]:
        assert first is not None
        if art.base_sha256 != first.base_sha256:
            raise CheckpointError(
                f"{art.label}: this delta was extracted against the base {art.recorded_inputs['base']['path']} "
                f"(sha256 {art.base_sha256[:16]}...), but {first.label} against "
                f"{first.recorded_inputs['base']['path']} (sha256 {first.base_sha256[:16]}...); deltas are added "
                "only when they share one base: extract them all against the same base"
            )
