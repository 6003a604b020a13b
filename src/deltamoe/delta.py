"""The post-training delta (docs/design.md#step-3-graft): extract Δ = P − B, expand it to the MoE, graft.

``graft`` streams M' = M + expand(Δ): the dense FFN delta of each layer goes to the chosen
experts of that layer (scaled by α), every other tensor (attention, norms, embeddings, LM
head) gets its delta once, and routers and inert tensors are copied untouched. Layers that a
Mixtral upcycle kept dense (``replicated_layers``: E identical experts and a zero router) get
the full delta in every expert, because their experts must stay identical.

Δ comes either from a pair of checkpoints (B, P) or from a delta artifact written once by
:func:`extract_delta`. Both are a :class:`DeltaSource`; ``merge`` uses the same sources.

Vocabulary: when P has embedding/LM-head rows that B lacks (added special tokens), the first
rows of the result are M + Δ and the extra rows take P's values (``new_rows="post"``), the
mean of the grafted rows (``"mean"``), or the run is refused (``"error"``). Any other shape
difference between B, P and M is an error that names the tensors and their shapes.
"""

from __future__ import annotations

import os
from functools import partial
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from deltamoe import arch
from deltamoe.checkpoint import (
    DEFAULT_SHARD_BYTES,
    DTYPE_NAMES,
    Checkpoint,
    ShardedWriter,
    TensorSpec,
    check_output,
    dtype_code,
    open_checkpoint,
)
from deltamoe.choices import NEW_ROWS, NewRows
from deltamoe.engine import Out, Read, Step, add32, diff32, f32, is_float, row_chunks, run_steps
from deltamoe.errors import ArchitectureError, CheckpointError, UsageError
from deltamoe.output import Finished, write_output
from deltamoe.preflight import check_shard_size
from deltamoe.provenance import new_manifest, read_manifest


# Config fields that fix tensor shapes or weight sharing: B and P must agree on them.
_STRUCTURAL = (
    "model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "tie_word_embeddings",
)
_DTYPE_KEYS = ("torch_dtype", "dtype")
DELTA_STAGE = "delta"


# -- sources of Δ -------------------------------------------------------------------------
class DeltaSource(Protocol):
    """Where Δ = P − B comes from: a (B, P) pair or a delta artifact."""

    label: str
    base_config: dict[str, Any]
    post_config: dict[str, Any]
    aux: Checkpoint  # tokenizer files, chat template, generation config (P's)
    # tensor name -> P's shape; rows[name] = rows shared with B (< shape[0] when P added tokens)
    shapes: dict[str, tuple[int, ...]]
    rows: dict[str, int]

    def delta(self, name: str, a: int | None, b: int | None) -> tuple[list[Read], Callable[[list[torch.Tensor]], torch.Tensor]]:
        """Reads and a function giving Δ[a:b] in float32 (rows shared with B)."""
        ...

    def added(self, name: str, a: int, b: int) -> tuple[list[Read], Callable[[list[torch.Tensor]], torch.Tensor]]:
        """Reads and a function giving P's values of rows a:b that B lacks."""
        ...

    def base_shape(self, name: str) -> tuple[int, ...]:
        ...


def _base_shape(shapes: dict[str, tuple[int, ...]], rows: dict[str, int], name: str) -> tuple[int, ...]:
    s = shapes[name]
    return (rows[name], *s[1:]) if s else s


def check_configs(base: dict[str, Any], post: dict[str, Any], base_src: str, post_src: str) -> None:
    """B and P must be the same architecture with the same shapes (vocabulary may grow)."""
    for key in _STRUCTURAL:
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


class PairDelta:
    """Δ = P − B read from two checkpoints (validated against each other on construction)."""

    def __init__(self, base: Checkpoint, post: Checkpoint):
        self.base, self.post, self.aux = base, post, post
        self.label = f"{post.path} - {base.path}"
        self.base_config, self.post_config = base.config, post.config
        check_configs(base.config, post.config, str(base.path / "config.json"), str(post.path / "config.json"))
        self.rows = pair_rows(base.path, {n: base.spec(n) for n in base.keys()}, base.config, post)
        self.shapes = {n: post.spec(n).shape for n in post.keys()}

    def delta(self, name: str, a: int | None, b: int | None) -> tuple[list[Read], Callable[[list[torch.Tensor]], torch.Tensor]]:
        return [Read(self.post, name, a, b), Read(self.base, name, a, b)], _pair_diff

    def added(self, name: str, a: int, b: int) -> tuple[list[Read], Callable[[list[torch.Tensor]], torch.Tensor]]:
        return [Read(self.post, name, a, b)], _first

    def base_shape(self, name: str) -> tuple[int, ...]:
        return _base_shape(self.shapes, self.rows, name)


def _pair_diff(ts: list[torch.Tensor]) -> torch.Tensor:
    return diff32(ts[0], ts[1])


def _first(ts: list[torch.Tensor]) -> torch.Tensor:
    return ts[0]


class ArtifactDelta:
    """Δ read from a delta artifact written by :func:`extract_delta`."""

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

    def delta(self, name: str, a: int | None, b: int | None) -> tuple[list[Read], Callable[[list[torch.Tensor]], torch.Tensor]]:
        return [Read(self.ckpt, name, a, b)], _first

    def added(self, name: str, a: int, b: int) -> tuple[list[Read], Callable[[list[torch.Tensor]], torch.Tensor]]:
        return [Read(self.ckpt, name, a, b)], _first

    def base_shape(self, name: str) -> tuple[int, ...]:
        return _base_shape(self.shapes, self.rows, name)


# -- several deltas: Σ wᵢ Δᵢ ----------------------------------------------------------------
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


def _tensor_file(src: DeltaSource, name: str) -> str:
    info = src.aux.tensors.get(name)
    return str(info.file) if info is not None else str(src.aux.path)


def check_same_delta(first: DeltaSource, other: DeltaSource) -> None:
    """``other`` must be a delta of the same base as ``first``: same architecture, same tensors and
    the same shapes over the base's rows."""
    for key in _STRUCTURAL:
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


class WeightedDelta:
    """Σ wᵢ Δᵢ over several deltas of one base. The first is the primary: its tokenizer files,
    config and added vocabulary rows are used (the others may add none)."""

    def __init__(self, terms: Sequence[tuple[DeltaSource, float]]):
        if not terms:
            raise UsageError("no delta given")
        first = terms[0][0]
        for src, _ in terms[1:]:
            check_same_delta(first, src)
            grown = next((n for n, r in src.rows.items() if src.shapes[n] and r < src.shapes[n][0]), None)
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

    def delta(self, name: str, a: int | None, b: int | None) -> tuple[list[Read], Callable[[list[torch.Tensor]], torch.Tensor]]:
        reads: list[Read] = []
        parts: list[tuple[int, int, Callable[[list[torch.Tensor]], torch.Tensor], float]] = []
        for src, w in self.terms:
            r, fn = src.delta(name, a, b)
            parts.append((len(reads), len(reads) + len(r), fn, w))
            reads.extend(r)
        return reads, partial(_weighted_sum, parts=tuple(parts))

    def added(self, name: str, a: int, b: int) -> tuple[list[Read], Callable[[list[torch.Tensor]], torch.Tensor]]:
        return self.terms[0][0].added(name, a, b)

    def base_shape(self, name: str) -> tuple[int, ...]:
        return _base_shape(self.shapes, self.rows, name)


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
    src: PairDelta | ArtifactDelta
    weight: float
    role: str  # "post_<i>" for a (B, Pᵢ) pair, "delta_<i>" for an artifact


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
        terms = [DeltaTerm(ArtifactDelta(open_checkpoint(p)), 1.0 if w is None else w, f"delta_{i}")
                 for i, (p, w) in enumerate(deltas)]
        return DeltaSet(tuple(terms), None)
    if base is None or not posts:
        raise UsageError("the post-training delta needs both --base B and --post P (or a delta artifact: --delta D)")
    b = open_checkpoint(base)
    terms = [DeltaTerm(PairDelta(b, open_checkpoint(p)), 1.0 if w is None else w, f"post_{i}")
             for i, (p, w) in enumerate(posts)]
    return DeltaSet(tuple(terms), b)


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


# -- helpers shared with merge -------------------------------------------------------------
def out_dtype_code(stored: str, dtype: str) -> str:
    """Output dtype code for a tensor stored as ``stored``: kept for "auto" and non-float tensors."""
    if dtype == "auto" or not is_float(stored):
        return stored
    return dtype_code(DTYPE_NAMES[dtype])


def check_dtype_arg(dtype: str) -> None:
    if dtype != "auto" and dtype not in DTYPE_NAMES:
        raise UsageError(f"--dtype must be 'auto' or one of {sorted(DTYPE_NAMES)}, got {dtype!r}")


def output_config(config: dict[str, Any], changes: dict[str, Any], dtype: str) -> dict[str, Any]:
    """The grafted model's config: M's, with P's config changes (a None value removes the key)
    and the output dtype."""
    cfg = dict(config)
    cfg.update({k: v for k, v in changes.items() if v is not None})
    for k in [k for k, v in changes.items() if v is None]:
        cfg.pop(k, None)
    if dtype != "auto":
        set_config_dtype(cfg, dtype_code(DTYPE_NAMES[dtype]))
    return cfg


def set_config_dtype(cfg: dict[str, Any], code: str | None) -> None:
    name = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}.get(code or "")
    if name is None:
        return
    for key in _DTYPE_KEYS:
        if key in cfg or (key == "torch_dtype" and "dtype" not in cfg):
            cfg[key] = name


def check_new_rows(new_rows: str) -> None:
    if new_rows not in NEW_ROWS:
        raise UsageError(f"--new-rows must be one of {list(NEW_ROWS)}, got {new_rows!r}")


def refuse_new_rows(src: DeltaSource, new_rows: str) -> None:
    if new_rows != "error":
        return
    grown = {n: (r, src.shapes[n][0]) for n, r in src.rows.items() if src.shapes[n] and r < src.shapes[n][0]}
    if grown:
        n, (r, v) = next(iter(grown.items()))
        raise CheckpointError(
            f"{src.label}: tensor {n!r} has {v} rows where the base has {r} (the post-trained model added "
            f"vocabulary) and --new-rows is 'error'; use --new-rows post or mean to accept them"
        )


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


def natural_key(name: str) -> list[Any]:
    import re

    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


def _add(m: torch.Tensor, d: torch.Tensor, scale: float) -> torch.Tensor:
    return add32(m, d, scale, scratch=True)  # an output piece: the engine consumes it at once


# -- extract ------------------------------------------------------------------------------
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
    check_shard_size(max_shard_bytes)
    out_path = check_output(out, force=force)
    b, p = open_checkpoint(base), open_checkpoint(post)
    src = PairDelta(b, p)
    code = dtype_code(DTYPE_NAMES[dtype])
    names = sorted(p.keys(), key=natural_key)
    specs = [TensorSpec(n, code, src.shapes[n]) for n in names]
    added = {n: r for n, r in src.rows.items() if src.shapes[n] and r < src.shapes[n][0]}

    def steps() -> Iterator[Step]:
        for n in names:
            shape = src.shapes[n]
            for a, bb in row_chunks(shape, 0, src.rows[n]):
                reads, fn = src.delta(n, a, bb)
                yield Step(reads, lambda ts, n=n, a=a, fn=fn: [(n, a, fn(ts))])
            if n in added:
                yield from added_rows_steps(src, n, "post", None)

    def tensors(writer: ShardedWriter) -> None:
        run_steps(steps(), writer, {s.name: s for s in specs}, buffer_bytes=buffer_bytes,
                  progress=progress, desc="delta extract")

    def finish(hashes: list[dict[str, Any]]) -> Finished:
        hb, hp = hashes
        manifest = new_manifest(
            None, stage=DELTA_STAGE, params={"dtype": dtype, "max_shard_bytes": max_shard_bytes},
            inputs={"base": hb, "post": hp}, command=command,
        )
        manifest["delta"] = {"base": hb, "post": hp, "base_config": b.config, "added_rows": added, "dtype": dtype}
        readme = (
            "# deltamoe delta artifact\n\n"
            "This is **not a model**: each tensor is the difference P − B between a post-trained model P\n"
            f"(`{p.path}`) and its base B (`{b.path}`), stored as {dtype}. Rows that P added to the\n"
            "vocabulary hold P's values. Use it with `deltamoe graft --moe M --delta THIS OUT` or\n"
            "`deltamoe merge --delta THIS ...`. Provenance (sha256 of B and P) is in `deltamoe.json`.\n"
        )
        return Finished(p.config, manifest, readme=readme)

    write_output(out_path, specs, inputs=[b, p], aux=p, tensors=tensors, finish=finish, force=force,
                 max_shard_bytes=max_shard_bytes, metadata={"deltamoe": "delta"})
    return out_path


# -- graft --------------------------------------------------------------------------------
@dataclass(frozen=True)
class _ExpertTarget:
    name: str
    expert: int
    scale: float


def parse_experts(spec: str | Sequence[int], moe: dict[str, Any]) -> list[int]:
    """``all``, ``original``, ``new`` or a list like ``0,2,3`` -> sorted expert ids."""
    n = int(moe["num_experts"])
    if isinstance(spec, str):
        text = spec.strip().lower()
        if text == "all":
            return list(range(n))
        if text == "original":
            return sorted(int(e) for e in moe["original_experts"])
        if text == "new":
            return sorted(int(e) for e in moe["new_experts"])
        try:
            ids = [int(x) for x in text.split(",") if x.strip()]
        except ValueError:
            raise UsageError(f"--experts: cannot parse {spec!r}; use all, original, new or a list like 0,2,3") from None
    else:
        ids = [int(x) for x in spec]
    if not ids:
        raise UsageError("--experts selects no expert")
    bad = sorted({e for e in ids if not 0 <= e < n})
    if bad:
        raise UsageError(f"--experts: {bad} out of range; the MoE has experts 0..{n - 1}")
    return sorted(set(ids))


def _moe_block(m: Checkpoint) -> tuple[dict[str, Any], dict[str, Any]]:
    manifest = read_manifest(m.path)
    moe = (manifest or {}).get("moe")
    if not manifest or not isinstance(moe, dict):
        raise CheckpointError(
            f"{m.path}: no deltamoe.json with an 'moe' block; graft needs an MoE made by "
            "'deltamoe upcycle' (and trained from it), whose deltamoe.json says which tensors are experts"
        )
    for key in ("family", "num_experts", "top_k", "moe_layers", "replicated_layers", "names"):
        if key not in moe:
            raise CheckpointError(f"{m.path}/deltamoe.json: the 'moe' block lacks {key!r}")
    return manifest, moe


def upcycle_input(manifest: dict[str, Any]) -> dict[str, Any] | None:
    """The dense model an MoE was upcycled from, as recorded in its provenance (or None)."""
    for stage in manifest.get("stages", []):
        if stage.get("stage") == "upcycle":
            dense = (stage.get("inputs") or {}).get("dense")
            if isinstance(dense, dict) and "sha256" in dense:
                return dense
    return None


def _post_config_changes(spec: arch.ArchSpec, src: DeltaSource, moe: dict[str, Any], m: Checkpoint) -> dict[str, Any]:
    """MoE config fields whose value P's config implies differently from B's (e.g. token ids)."""
    def semantic(cfg: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in cfg.items() if k not in _DTYPE_KEYS}

    if semantic(src.base_config) == semantic(src.post_config):
        # The same dense config maps to the same MoE config: skip importing transformers'
        # config machinery (~80 MB of memory and 1.5-3 s on a small machine).
        return {}
    kw = dict(num_experts=int(moe["num_experts"]), top_k=int(moe["top_k"]), moe_layers=list(moe["moe_layers"]),
              dtype_name=None)
    cb = arch.moe_config(spec, src.base_config, source=f"{src.label} (base config)", **kw)
    cp = arch.moe_config(spec, src.post_config, source=f"{src.label} (post config)", **kw)
    changes = {}
    for k in sorted(set(cb) | set(cp)):
        if k in _DTYPE_KEYS or cb.get(k) == cp.get(k):
            continue
        changes[k] = cp.get(k)
    return changes


def graft(
    moe: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    base: str | os.PathLike[str] | None = None,
    post: WeightedInput | list[WeightedInput] | None = None,
    delta: WeightedInput | list[WeightedInput] | None = None,
    experts: str | Sequence[int] = "all",
    scale: float = 1.0,
    new_rows: NewRows = "post",
    dtype: str = "auto",
    check_base: bool = True,
    force: bool = False,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    buffer_bytes: int | None = None,
    progress: bool = True,
    command: list[str] | None = None,
) -> Path:
    """Graft Δ = P − B (or the delta artifact ``delta``) onto the MoE ``moe``; write ``out``.

    Several deltas: ``post`` (with ``base``) or ``delta`` may be a list, each item a path,
    ``"PATH:WEIGHT"`` or ``(path, weight)`` (weight 1 when not given); Δ is then Σ wᵢ Δᵢ,
    computed in float32 in the order given, and everything below applies to that sum. The
    first delta is the primary: tokenizer files, config changes and added vocabulary rows are
    its own, and the others may add no rows.

    A block-expanded dense model (``deltamoe expand``) in place of the MoE is grafted by
    :func:`deltamoe.expand_graft.graft_expanded`.

    Args:
        experts: which experts of each MoE layer get the FFN delta: "all" (default),
            "original" (expert 0), "new", or a list of ids. Layers kept dense in a Mixtral
            upcycle (``replicated_layers``) always get it in every expert, unscaled.
        scale: α, the factor on the FFN delta (the whole weighted sum) in the chosen experts
            (default 1); shared tensors get the delta unscaled.
        new_rows: vocabulary rows that P has and B lacks: "post" (P's values, default),
            "mean" (mean of the grafted rows) or "error".
        dtype: "auto" (keep M's stored dtypes), "float32", "bfloat16" or "float16". The sum
            is computed in float32 and rounded once.
        check_base: refuse a B (or a delta made from a B) whose sha256 differs from the dense
            model that M's deltamoe.json says it was upcycled from, and delta artifacts
            extracted against different bases.
    Returns:
        ``out``: M's config and layout, P's tokenizer files, chat template and generation
        config, and ``deltamoe.json`` with a "graft" stage appended to M's stages.
    """
    check_dtype_arg(dtype)
    check_new_rows(new_rows)
    if not isinstance(scale, (int, float)) or scale != scale or abs(scale) == float("inf"):
        raise UsageError(f"--scale must be a finite number, got {scale!r}")
    check_shard_size(max_shard_bytes)
    out_path = check_output(out, force=force)
    m = open_checkpoint(moe)
    from deltamoe.expand_graft import expand_block, graft_expanded

    if expand_block(m) is not None:  # a block-expanded dense model (deltamoe expand): its own rules
        if experts != "all" or scale != 1:
            raise UsageError(f"{m.path}: --experts and --scale apply to MoEs; this is a block-expanded dense model")
        return graft_expanded(
            moe, out, base=base, post=post, delta=delta, new_rows=new_rows, dtype=dtype, check_base=check_base,
            force=force, max_shard_bytes=max_shard_bytes, buffer_bytes=buffer_bytes, progress=progress,
            command=command,
        )
    m_manifest, moe_info = _moe_block(m)
    chosen = parse_experts(experts, moe_info)
    deltas = open_deltas(base, post, delta)
    src = deltas.source()
    base_src = f"{src.label} (base config)"
    spec = arch.arch_for(src.base_config, source=base_src)
    family_ok = moe_info["family"] in (src.base_config.get("model_type"), spec.family)  # older: the table name
    if not family_ok or m.config.get("model_type") != spec.moe_model_type:
        raise ArchitectureError(
            f"{m.path}: is a {m.config.get('model_type')} MoE upcycled from the {moe_info['family']!r} family, "
            f"but the base is a {src.base_config.get('model_type')} model ({spec.family!r} family -> "
            f"{spec.moe_model_type}); graft onto an MoE upcycled from this base"
        )
    upcycled_from = upcycle_input(m_manifest)
    if check_base:
        check_artifact_bases(deltas.artifacts(), upcycled_from, m.path)
    refuse_new_rows(src, new_rows)
    plan = _plan_graft(m, src, moe_info, chosen, float(scale), dtype)
    changes = _post_config_changes(spec, src, moe_info, m)
    planned = {s.name: s for s in plan.specs}

    def steps() -> Iterator[Step]:
        done_groups: set[str] = set()
        for s in plan.specs:
            kind = plan.kinds[s.name]
            if kind == "expert":
                dense = plan.expert_of[s.name][0]
                if dense not in done_groups:
                    done_groups.add(dense)
                    yield from _expert_steps(m, src, dense, plan.groups[dense])
            elif kind == "copy":
                shape = m.spec(s.name).shape
                for a, b in row_chunks(shape):
                    yield Step([Read(m, s.name, a, b)], partial(_copy_chunk, name=s.name, a=a))
            else:
                yield from _shared_steps(m, src, s.name, new_rows)

    def tensors(writer: ShardedWriter) -> None:
        run_steps(steps(), writer, planned, buffer_bytes=buffer_bytes, progress=progress, desc="graft")

    def finish(described: list[dict[str, Any]]) -> Finished:
        inputs = {"moe": described[0], **deltas.record(described[1:])}
        if (deltas.base is not None and check_base and upcycled_from
                and upcycled_from["sha256"] != described[1]["sha256"]):
            raise CheckpointError(
                f"{deltas.base.path}: sha256 {described[1]['sha256'][:16]}... differs from the dense model "
                f"{upcycled_from['path']} (sha256 {upcycled_from['sha256'][:16]}...) that {m.path} was upcycled "
                "from; graft needs that exact base. If it is the same model re-saved, pass --no-check-base"
            )
        params: dict[str, Any] = {"experts": chosen, "scale": float(scale)}
        if not deltas.single:
            params["weights"] = deltas.weights()
        params.update({
            "replicated_layers_get": "full delta in every expert",
            "new_rows": new_rows, "dtype": dtype, "check_base": check_base,
            "added_rows": {n: [r, src.shapes[n][0]] for n, r in src.rows.items()
                           if src.shapes[n] and r < src.shapes[n][0] and n in plan.consumed},
            "config_from_post": changes, "max_shard_bytes": max_shard_bytes,
        })
        manifest = new_manifest(m_manifest, stage="graft", params=params, inputs=inputs, command=command)
        return Finished(output_config(m.config, changes, dtype), manifest)

    write_output(out_path, plan.specs, inputs=[m, *deltas.checkpoints()], aux=src.aux, tensors=tensors,
                 finish=finish, force=force, max_shard_bytes=max_shard_bytes)
    return out_path


@dataclass
class _GraftPlan:
    specs: list[TensorSpec]
    kinds: dict[str, str]  # output name -> "expert", "copy" or "shared"
    expert_of: dict[str, tuple[str, int, int]]  # expert tensor -> (dense FFN name, layer, expert)
    groups: dict[str, list[_ExpertTarget]]  # dense FFN name -> the experts it feeds
    consumed: set[str]  # tensors of the delta that reach the output


def _plan_graft(m: Checkpoint, src: DeltaSource, moe_info: dict[str, Any], chosen: list[int], scale: float,
                dtype: str) -> _GraftPlan:
    """Which stored tensor of M is which (experts -> dense FFN name, routers, inert, shared), checked."""
    names = moe_info["names"]
    n_exp = int(moe_info["num_experts"])
    moe_layers, replicated = set(moe_info["moe_layers"]), set(moe_info["replicated_layers"])
    plan = _GraftPlan([], {}, {}, {}, set())
    untouched: set[str] = set()
    for layer in sorted(moe_layers | replicated):
        for role, tmpl in names["expert_ffn"].items():
            dense = names["dense_ffn"][role].format(layer=layer)
            for e in range(n_exp):
                plan.expert_of[tmpl.format(layer=layer, expert=e)] = (dense, layer, e)
        untouched.add(names["router"].format(layer=layer))
        untouched.update(t.format(layer=layer) for t in names["inert"])
    absent = sorted(n for n in [*plan.expert_of, *untouched] if n not in m.tensors)
    if absent:
        raise CheckpointError(f"{m.path}: missing tensor(s) {absent[:5]} that its deltamoe.json 'moe' block implies")

    for name in sorted(m.keys(), key=natural_key):
        ms = m.spec(name)
        if name in plan.expert_of:
            dense, layer, e = plan.expert_of[name]
            if dense not in src.shapes:
                raise CheckpointError(f"{src.label}: has no tensor {dense!r}, the dense FFN of expert {name!r} of {m.path}")
            want = src.base_shape(dense)
            if ms.shape != want or src.shapes[dense] != want:
                raise CheckpointError(
                    f"tensor {name!r} of {m.tensors[name].file} has shape {list(ms.shape)}, but the dense FFN "
                    f"{dense!r} of the base/post models has {list(src.shapes[dense])}; M was not upcycled from this base"
                )
            s = 1.0 if layer in replicated else (scale if e in chosen else 0.0)
            plan.groups.setdefault(dense, []).append(_ExpertTarget(name, e, s))
            plan.consumed.add(dense)
            plan.kinds[name] = "expert"
            plan.specs.append(TensorSpec(name, out_dtype_code(ms.dtype, dtype), ms.shape))
        elif name in untouched:
            plan.kinds[name] = "copy"
            plan.specs.append(TensorSpec(name, out_dtype_code(ms.dtype, dtype), ms.shape))
        elif name in src.shapes:
            want = src.base_shape(name)
            if ms.shape != want:
                raise CheckpointError(
                    f"tensor {name!r} has shape {list(ms.shape)} in {m.tensors[name].file} but {list(want)} in "
                    f"the base ({src.label}); M was not upcycled from this base"
                )
            if not is_float(ms.dtype):
                raise CheckpointError(f"{m.tensors[name].file}: tensor {name!r} is {ms.dtype}, not floating point")
            plan.consumed.add(name)
            plan.kinds[name] = "shared"
            plan.specs.append(TensorSpec(name, out_dtype_code(ms.dtype, dtype), src.shapes[name]))
        else:
            raise CheckpointError(
                f"{m.tensors[name].file}: tensor {name!r} is neither an expert, a router nor a tensor of the "
                f"base/post models ({src.label}); M does not match them"
            )
    left = sorted(set(src.shapes) - plan.consumed)
    if left:
        _, optional = arch.expected_dense_tensors(src.base_config, source=f"{src.label} (base config)")
        if set(left) - optional:
            bad = sorted(set(left) - optional)
            raise CheckpointError(
                f"{m.path}: has no counterpart for tensor(s) {bad[:5]} of the base/post models ({src.label}); "
                "M was not upcycled from this base"
            )
    return plan


def _expert_steps(m: Checkpoint, src: DeltaSource, dense: str, targets: list[_ExpertTarget]) -> Iterator[Step]:
    """Per row chunk: Δ is computed once (with the first expert that needs it) and shared.

    Steps are planned ahead of their execution (read-ahead), so everything a step's compute
    uses is bound to it explicitly (``partial``), never looked up in this loop's variables.
    """
    shape = src.shapes[dense]
    users = [i for i, t in enumerate(targets) if t.scale != 0]
    for a, b in row_chunks(shape):
        held: dict[str, torch.Tensor] = {}  # this chunk's Δ, from its first user to its last
        for i, t in enumerate(targets):
            mine = Read(m, t.name, a, b)
            if t.scale == 0:
                yield Step([mine], partial(_copy_chunk, name=t.name, a=a))
                continue
            first = i == users[0]
            reads, fn = src.delta(dense, a, b) if first else ([], None)
            yield Step([*reads, mine], partial(_expert_chunk, name=t.name, a=a, scale=t.scale, fn=fn, held=held,
                                               first=first, last=i == users[-1]))


def _copy_chunk(ts: list[torch.Tensor], *, name: str, a: int | None) -> list[Out]:
    return [(name, a, ts[0])]


def _expert_chunk(ts: list[torch.Tensor], *, name: str, a: int | None, scale: float, fn: Any,
                  held: dict[str, torch.Tensor], first: bool, last: bool) -> list[Out]:
    if first:
        held["d"] = fn(ts[:-1])
    d = held["d"]
    if last:
        held.clear()
    return [(name, a, _add(ts[-1], d, scale))]


def _shared_steps(m: Checkpoint, src: DeltaSource, name: str, new_rows: str) -> Iterator[Step]:
    shape = src.shapes[name]
    mean = RowMean() if new_rows == "mean" and shape and src.rows[name] < shape[0] else None
    for a, b in row_chunks(shape, 0, src.rows[name]):
        reads, fn = src.delta(name, a, b)

        def compute(ts: list[torch.Tensor], a=a, fn=fn) -> list[Out]:
            o = _add(ts[-1], fn(ts[:-1]), 1.0)
            if mean is not None:
                mean.add(o)
            return [(name, a, o)]

        yield Step([*reads, Read(m, name, a, b)], compute)
    if shape and src.rows[name] < shape[0]:
        yield from added_rows_steps(src, name, new_rows, mean)
