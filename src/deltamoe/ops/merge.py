"""Dense data-free merges, the baselines the method is compared against (docs/design.md#baselines).

All methods combine task vectors δ_i = X_i − B (or the Δ of a delta artifact) and add them to
an anchor:

- ``paramdelta``: C + (P − B), the ParamΔ / Chat Vector recipe (anchor C, one task vector).
- ``task_arithmetic``: B + λ Σ w_i δ_i.
- ``ties``: keep the ``density`` fraction of largest-magnitude entries of each δ_i, weight,
  elect a sign per entry (sign of the weighted sum), sum the agreeing entries and divide by
  the sum of their weights (``normalize``), scale by λ.
- ``dare_linear``: drop entries of each δ_i at random (keep probability ``density``), rescale
  the survivors, weight, sum, scale by λ.
- ``dare_ties``: DARE's random drop with TIES's sign election.

The parameter conventions follow mergekit (the reference implementation in the field), so a
mergekit config gives the same model: weights are not normalised except in TIES, DARE rescales
so that each tensor keeps its L1 norm (``rescale="l1"``; ``"inverse"`` divides by the density
as in the DARE paper). DARE's random masks come from a generator seeded by (seed, tensor,
input), so a run is reproducible and independent of processing order.

paramdelta and task arithmetic are elementwise and stream in row chunks; TIES and DARE need
whole tensors (a global top-k, a per-tensor norm), so their peak memory is a few times the
largest tensor.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch

from deltamoe.io import DEFAULT_SHARD_BYTES, DTYPE_NAMES, Checkpoint, TensorSpec, dtype_code, open_checkpoint
from deltamoe.choices import METHODS, Method, Rescale
from deltamoe.arith import add32
from deltamoe.engine import Out, Read, Step, row_chunks
from deltamoe.errors import CheckpointError, UsageError
from deltamoe.ops.common import (
    check_dtype_arg,
    check_new_rows,
    natural_key,
    out_dtype_code,
    prepare_output,
    set_config_dtype,
)
from deltamoe.ops.deltas import (
    DeltaTerm,
    WeightedInput,
    check_artifact_bases,
    check_same_delta,
    pair_terms,
    weight_of,
    weighted_inputs,
)
from deltamoe.ops.merge_methods import SPARSE, mix
from deltamoe.ops.sources import ArtifactDelta, PairDelta, added_rows, check_configs, pair_rows, refuse_new_rows
from deltamoe.ops.steps import RowMean, added_rows_steps, stream_output
from deltamoe.io.output import Finished
from deltamoe.io.provenance import new_manifest


def parse_weighted(text: str) -> tuple[str, float | None]:
    """``PATH[:WEIGHT]`` -> (path, weight or None). A suffix that is not a number is part of the path."""
    path, sep, tail = text.rpartition(":")
    if sep and path:
        try:
            return path, float(tail)
        except ValueError:
            pass
    return text, None


def merge(
    models: Sequence[str | os.PathLike[str] | tuple[str | os.PathLike[str], float | None]],
    out: str | os.PathLike[str],
    *,
    method: Method,
    base: str | os.PathLike[str] | None = None,
    delta: WeightedInput | list[WeightedInput] | None = None,
    post: WeightedInput | list[WeightedInput] | None = None,
    density: float | None = None,
    lambda_: float = 1.0,
    seed: int = 0,
    normalize: bool | None = None,
    rescale: Rescale = "l1",
    new_rows: str = "post",
    tokenizer_from: str | os.PathLike[str] | None = None,
    dtype: str = "auto",
    force: bool = False,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    buffer_bytes: int | None = None,
    progress: bool = True,
    command: list[str] | None = None,
) -> Path:
    """Merge dense models relative to ``base`` with ``method``; write the result to ``out``.

    Args:
        models: the models to merge, each a path or (path, weight); a string ``PATH:WEIGHT``
            is parsed. Weights default to 1. For ``paramdelta`` give the continued-pretrained
            model C and the post-trained model P (in that order), or only C with ``delta``
            and/or ``post``.
        base: the common base B (required except for ``paramdelta`` with ``delta`` only).
        delta: a delta artifact (``deltamoe delta extract``), or a list of them, each a path,
            ``"PATH:WEIGHT"`` or ``(path, weight)`` (weight 1 by default): more task vectors.
            For ``paramdelta`` they replace B and P: C + Σ wᵢ Dᵢ.
        post: ``paramdelta`` only: post-trained models Pᵢ (same forms as ``delta``), giving
            C + Σ wᵢ (Pᵢ − B); may be combined with ``delta``.
        density: fraction of each task vector kept by ties/dare (required there, in (0, 1]).
        lambda_: factor on the combined task vector (mergekit's ``lambda``).
        seed: seeds DARE's random masks.
        normalize: divide by the sum of weights; default True for ties, False otherwise.
        rescale: DARE's rescaling of the kept entries: "l1" (keep each tensor's L1 norm, as
            mergekit), "inverse" (divide by density, as the DARE paper) or "none".
        new_rows: vocabulary rows the tokenizer source has beyond the base: "post" (its
            values), "mean" (mean of the merged rows) or "error".
        tokenizer_from: the input whose tokenizer files, chat template, generation config and
            config are copied; default the first ``post``, else the first ``delta``, else the
            last model.
        dtype: "auto" (the first model's stored dtypes) or float32/bfloat16/float16.
    """
    _check_options(method, density, lambda_, rescale, dtype, new_rows)
    parsed = [_as_weighted(x) for x in models]
    d_parsed, p_parsed = weighted_inputs(delta, "--delta"), weighted_inputs(post, "--post")
    _check_inputs(method, parsed, p_parsed, d_parsed, base, lambda_)
    if normalize is None:
        normalize = method == "ties"
    out_path = prepare_output(out, force=force, max_shard_bytes=max_shard_bytes)

    b = open_checkpoint(base) if base is not None else None
    ckpts = [open_checkpoint(p) for p, _ in parsed]
    anchor, vectors, extra = _open_vectors(method, b, ckpts, parsed, p_parsed, d_parsed)
    tok_ckpt, tok_vec = _tokenizer_source(tokenizer_from, ckpts, b, vectors, extra[0] if extra else vectors[-1])
    _check_added_rows(vectors, tok_vec, tok_ckpt.path, new_rows)

    names = sorted(anchor.keys(), key=natural_key)
    out_shapes = {n: (tok_vec.src.shapes[n] if tok_vec else anchor.spec(n).shape) for n in names}
    specs = [TensorSpec(n, out_dtype_code(ckpts[0].spec(n).dtype, dtype), out_shapes[n]) for n in names]
    sparse = SPARSE.get(method)
    job = _Job(method, anchor, vectors, tok_vec, out_shapes, {n: vectors[0].src.rows[n] for n in names}, sparse,
               density, rescale, seed, bool(normalize), lambda_, new_rows)

    def finish(hashes: list[dict[str, Any]]) -> Finished:
        inputs = _recorded_inputs(hashes, b, len(ckpts), extra)
        cfg = dict(tok_ckpt.config)
        set_config_dtype(cfg, dtype_code(DTYPE_NAMES[dtype]) if dtype != "auto" else _float_code(ckpts[0]))
        params = {
            "method": method, "weights": {v.role: v.weight for v in vectors}, "density": density, "lambda": lambda_,
            "seed": seed, "normalize": normalize, "rescale": rescale if sparse == "random" else None,
            "new_rows": new_rows, "tokenizer_from": str(tok_ckpt.path), "dtype": dtype,
            "max_shard_bytes": max_shard_bytes,
        }
        return Finished(cfg, new_manifest(None, stage=f"merge:{method}", params=params, inputs=inputs, command=command))

    stream_output(out_path, specs, _steps(job, names), inputs=[*([b] if b is not None else []), *ckpts,
                  *(v.src.aux for v in extra)], aux=tok_ckpt, finish=finish, desc=f"merge {method}", force=force,
                  max_shard_bytes=max_shard_bytes, buffer_bytes=buffer_bytes, progress=progress)
    return out_path


# -- validate -------------------------------------------------------------------------------
def _check_options(method: str, density: float | None, lambda_: float, rescale: str, dtype: str,
                   new_rows: str) -> None:
    if method not in METHODS:
        raise UsageError(f"--method must be one of {list(METHODS)}, got {method!r}")
    check_dtype_arg(dtype)
    check_new_rows(new_rows)
    if rescale not in ("l1", "inverse", "none"):
        raise UsageError(f"--rescale must be l1, inverse or none, got {rescale!r}")
    if method in SPARSE:
        if density is None:
            raise UsageError(f"--method {method} needs --density (the fraction of each task vector kept, e.g. 0.5)")
        if not 0 < density <= 1:
            raise UsageError(f"--density must be in (0, 1], got {density}")
    elif density is not None:
        raise UsageError(f"--density applies to ties, dare_linear and dare_ties, not {method}")
    if lambda_ != lambda_ or abs(lambda_) == float("inf"):
        raise UsageError(f"--lambda must be a finite number, got {lambda_}")


Weighted = list[tuple[str, "float | None"]]


def _check_inputs(method: str, parsed: Weighted, p_parsed: Weighted, d_parsed: Weighted, base: Any,
                  lambda_: float) -> None:
    if not parsed:
        raise UsageError("give at least one --model")
    if method != "paramdelta":
        if p_parsed:
            raise UsageError(f"--post is for paramdelta; for {method} give each post-trained model as "
                             "--model P[:WEIGHT]")
        if base is None:
            raise UsageError(f"--method {method} needs --base B")
        return
    want = 1 if d_parsed or p_parsed else 2
    if len(parsed) != want:
        raise UsageError(
            "paramdelta is C + (P - B): give --model C --model P with --base B, or --model C with --delta D "
            f"and/or --post P (repeatable, with weights D:W, P:W) (got {len(parsed)} --model)"
        )
    if any(w not in (None, 1.0) for _, w in parsed) or lambda_ != 1:
        raise UsageError("paramdelta takes no weights on --model and no --lambda; weigh the deltas with "
                         "--post P:W or --delta D:W (or use task_arithmetic for weighted sums)")
    if base is None and (p_parsed or not d_parsed):
        raise UsageError("paramdelta needs --base B (or delta artifacts only: --model C --delta D)")


def _open_artifacts(b: Checkpoint | None, d_parsed: Weighted) -> list[ArtifactDelta]:
    """The --delta artifacts, checked against B (or, without B, against the first artifact)."""
    arts = [ArtifactDelta(open_checkpoint(p)) for p, _ in d_parsed]
    for art in arts:
        if b is not None:
            check_configs(b.config, art.base_config, str(b.path / "config.json"), f"{art.label} (base config)")
            pair_rows(b.path, {n: b.spec(n) for n in b.keys()}, b.config, art.ckpt)  # its config is P's
        elif art is not arts[0]:
            check_same_delta(arts[0], art)
    check_artifact_bases(arts)
    return arts


def _open_vectors(
    method: str, b: Checkpoint | None, ckpts: list[Checkpoint], parsed: Weighted, p_parsed: Weighted,
    d_parsed: Weighted,
) -> tuple[Checkpoint, list[DeltaTerm], list[DeltaTerm]]:
    """The anchor, every task vector, and those of them given as --post/--delta (posts first), checked."""
    arts = _open_artifacts(b, d_parsed)
    extra: list[DeltaTerm] = []
    if p_parsed:
        assert b is not None
        extra += pair_terms(b, p_parsed)
    for i, (art, (_, w)) in enumerate(zip(arts, d_parsed)):
        extra.append(DeltaTerm(art, weight_of(w), "delta" if len(arts) == 1 else f"delta_{i}"))

    vectors: list[DeltaTerm] = []
    if method == "paramdelta":
        anchor = ckpts[0]
        if len(ckpts) == 2:
            assert b is not None
            vectors.append(DeltaTerm(PairDelta(b, ckpts[1]), 1.0, "model_1"))
        _check_anchor_rows(anchor, b, arts)
    else:
        assert b is not None
        anchor = b
        for i, (c, (_, w)) in enumerate(zip(ckpts, parsed)):
            vectors.append(DeltaTerm(PairDelta(b, c), weight_of(w), f"model_{i}"))
    return anchor, [*vectors, *extra], extra


def _check_anchor_rows(anchor: Checkpoint, b: Checkpoint | None, arts: list[ArtifactDelta]) -> None:
    """paramdelta's C has the base's tensors and shapes, and no vocabulary rows of its own."""
    if arts:
        anchor_rows = pair_rows(
            anchor.path, {n: TensorSpec(n, "F32", arts[0].base_shape(n)) for n in arts[0].shapes},
            arts[0].base_config, anchor,
        )
    else:
        assert b is not None
        anchor_rows = PairDelta(b, anchor).rows
    if any(anchor_rows[n] != (anchor.spec(n).shape[0] if anchor.spec(n).shape else 0) for n in anchor_rows):
        grown = next(n for n in anchor_rows if anchor.spec(n).shape and anchor_rows[n] != anchor.spec(n).shape[0])
        raise CheckpointError(
            f"{anchor.tensors[grown].file}: tensor {grown!r} of the continued-pretrained model has more rows than "
            "the base; paramdelta cannot merge two different vocabulary extensions"
        )


def _check_added_rows(vectors: list[DeltaTerm], tok_vec: DeltaTerm | None, tokenizer: Path, new_rows: str) -> None:
    """Only the tokenizer source may bring vocabulary rows the base lacks (and none with --new-rows error)."""
    for v in vectors:
        refuse_new_rows(v.src, new_rows)
        if v is tok_vec:
            continue
        for n, r in added_rows(v.src).items():
            raise CheckpointError(
                f"{v.src.label}: tensor {n!r} has {v.src.shapes[n][0]} rows, more than the base's {r}, but the "
                f"tokenizer comes from {tokenizer}; only the tokenizer source may add vocabulary rows"
            )


def _recorded_inputs(hashes: list[dict[str, Any]], b: Checkpoint | None, n_models: int,
                     extra: list[DeltaTerm]) -> dict[str, dict[str, Any]]:
    """The merge's provenance inputs, from the digests (base, models, then --post/--delta); an
    artifact must have been extracted against this base."""
    described = iter(hashes)
    inputs: dict[str, dict[str, Any]] = {}
    if b is not None:
        inputs["base"] = next(described)
    for i in range(n_models):
        inputs[f"model_{i}"] = next(described)
    for v in extra:
        inputs[v.role] = next(described)
    for art in [v.src for v in extra if isinstance(v.src, ArtifactDelta)]:
        if b is not None and art.base_sha256 != inputs["base"]["sha256"]:
            raise CheckpointError(
                f"{art.label}: this delta was extracted against the base {art.recorded_inputs['base']['path']} "
                f"(sha256 {art.base_sha256[:16]}...), not against {b.path} (sha256 "
                f"{inputs['base']['sha256'][:16]}...); extract it against this base"
            )
    return inputs


# -- plan and write -------------------------------------------------------------------------
@dataclass(frozen=True)
class _Job:
    method: str
    anchor: Checkpoint
    vectors: list[DeltaTerm]
    tok_vec: DeltaTerm | None
    out_shapes: dict[str, tuple[int, ...]]
    known_rows: dict[str, int]
    sparse: str | None
    density: float | None
    rescale: Rescale
    seed: int
    normalize: bool
    lambda_: float
    new_rows: str


def _steps(job: _Job, names: list[str]) -> Iterator[Step]:
    for n in names:
        shape = job.out_shapes[n]
        grown = bool(shape) and job.known_rows[n] < shape[0]
        mean = RowMean() if grown and job.new_rows == "mean" else None
        ranges: list[tuple[int | None, int | None]]
        if job.sparse is None:  # elementwise: stream in row chunks
            ranges = row_chunks(shape, 0, job.known_rows[n])
        elif grown:  # ties/dare see the rows shared with the base as one tensor
            ranges = [(0, job.known_rows[n])]
        else:
            ranges = [(None, None)]
        for a, bb in ranges:
            reads: list[Read] = [Read(job.anchor, n, a, bb)]
            fns: list[tuple[int, int, Callable[[list[torch.Tensor]], torch.Tensor]]] = []
            for v in job.vectors:
                r, fn = v.src.delta(n, a, bb)
                fns.append((len(reads), len(reads) + len(r), fn))
                reads.extend(r)
            yield Step(reads, partial(_compute, job=job, n=n, a=a, fns=fns, mean=mean),
                       check_inputs=job.sparse is not None)  # TIES/DARE drop NaNs
        if grown:
            assert job.tok_vec is not None
            yield from added_rows_steps(job.tok_vec.src, n, job.new_rows, mean)


def _compute(ts: list[torch.Tensor], *, job: _Job, n: str, a: int | None, fns: list[tuple[int, int, Any]],
             mean: RowMean | None) -> list[Out]:
    mixed = mix([fn(ts[i:j]) for i, j, fn in fns], [v.weight for v in job.vectors], [v.role for v in job.vectors],
                method=job.method, tensor=n, density=job.density, rescale=job.rescale, seed=job.seed,
                normalize=job.normalize, lambda_=job.lambda_)
    o = add32(ts[0], mixed, scratch=True)  # the output piece: consumed at once
    if mean is not None:
        mean.add(o)
    return [(n, a, o)]


def _as_weighted(x: Any) -> tuple[str, float | None]:
    if isinstance(x, tuple):
        path, w = x
        return str(path), (None if w is None else float(w))
    return parse_weighted(str(x))


def _float_code(ckpt: Checkpoint) -> str | None:
    for n in ckpt.keys():
        code = ckpt.spec(n).dtype
        if code in ("F32", "BF16", "F16"):
            return code
    return None


def _tokenizer_source(
    tokenizer_from: str | os.PathLike[str] | None,
    ckpts: list[Checkpoint],
    base: Checkpoint | None,
    vectors: list[DeltaTerm],
    default: DeltaTerm,
) -> tuple[Checkpoint, DeltaTerm | None]:
    """The input whose tokenizer, chat template and config the output gets, and its task vector.

    Only that input may bring vocabulary rows the base lacks; an input without a task vector
    (the base, or paramdelta's C) brings none. ``default``: the first --post or --delta, else
    the last model.
    """
    if tokenizer_from is None:
        return default.src.aux, default
    want = Path(tokenizer_from).expanduser().resolve()
    for v in vectors:
        if v.src.aux.path.resolve() == want:
            return v.src.aux, v
    for c in [*ckpts, *([base] if base is not None else [])]:
        if c.path.resolve() == want:
            return c, None
    raise UsageError(f"--tokenizer-from {tokenizer_from}: not one of the inputs (--base, --model, --delta)")
