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

import hashlib
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch

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
from deltamoe.choices import METHODS, Method, Rescale
from deltamoe.delta import (
    ArtifactDelta,
    DeltaSource,
    PairDelta,
    RowMean,
    WeightedInput,
    added_rows_steps,
    check_artifact_bases,
    check_configs,
    check_dtype_arg,
    check_new_rows,
    check_same_delta,
    natural_key,
    out_dtype_code,
    pair_rows,
    refuse_new_rows,
    set_config_dtype,
    weighted_inputs,
)
from deltamoe.engine import Out, Read, Step, add32, f32, row_chunks, run_steps
from deltamoe.errors import CheckpointError, UsageError
from deltamoe.output import Finished, write_output
from deltamoe.preflight import check_shard_size
from deltamoe.provenance import new_manifest

_SPARSE = {"ties": "magnitude", "dare_linear": "random", "dare_ties": "random"}
_CONSENSUS = ("ties", "dare_ties")


def parse_weighted(text: str) -> tuple[str, float | None]:
    """``PATH[:WEIGHT]`` -> (path, weight or None). A suffix that is not a number is part of the path."""
    path, sep, tail = text.rpartition(":")
    if sep and path:
        try:
            return path, float(tail)
        except ValueError:
            pass
    return text, None


@dataclass(frozen=True)
class _Vector:
    src: DeltaSource
    weight: float
    label: str


def _generator(seed: int, *parts: object) -> torch.Generator:
    """A generator whose stream depends only on (seed, parts), not on processing order."""
    digest = hashlib.sha256(repr((seed, *parts)).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


# -- the per-tensor arithmetic (float32 in, float32 out) -----------------------------------
def magnitude_prune(d: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the ``max(1, int(density * numel))`` entries of largest magnitude, zero the rest."""
    if density >= 1 or d.numel() == 0:
        return d
    k = max(1, int(density * d.numel()))
    flat = d.reshape(-1)
    keep = torch.topk(flat.abs(), k, sorted=False).indices
    out = torch.zeros_like(flat)
    out[keep] = flat[keep]
    return out.reshape(d.shape)


def random_drop(d: torch.Tensor, density: float, rescale: Rescale, gen: torch.Generator) -> torch.Tensor:
    """DARE: keep each entry with probability ``density``; rescale the survivors."""
    if density >= 1:
        return d
    mask = torch.empty_like(d).bernoulli_(density, generator=gen)
    kept = d * mask
    if rescale == "inverse":
        return kept.div_(density)
    if rescale == "l1":
        before, after = d.abs().sum(), kept.abs().sum()
        if before >= 1e-7 and after >= 1e-7:  # mergekit's guard against empty masks
            return kept.mul_(before / after)
    return kept


def combine(
    deltas: list[torch.Tensor],
    weights: Sequence[float],
    *,
    consensus: bool,
    normalize: bool,
    lambda_: float,
) -> torch.Tensor:
    """Σ w_i δ_i (with TIES sign election if ``consensus``), optionally / Σ w_i, times λ."""
    if consensus:
        weighted = [d * w for d, w in zip(deltas, weights)]
        total = torch.stack(weighted).sum(0)
        elected = torch.where(total >= 0, 1.0, -1.0)
        del total
        mixed = torch.zeros_like(deltas[0])
        divisor = torch.zeros_like(deltas[0])
        for wd, w in zip(weighted, weights):
            agree = wd.sign() == elected  # a zero entry has sign 0 and never agrees
            mixed.add_(torch.where(agree, wd, 0.0))
            divisor.add_(agree.to(mixed.dtype), alpha=w)
        divisor[divisor == 0] = 1
    else:
        mixed = deltas[0] * weights[0]
        for d, w in zip(deltas[1:], weights[1:]):
            mixed.add_(d, alpha=w)
        s = float(sum(weights))
        divisor = torch.tensor(1.0 if abs(s) < 1e-8 else s)
    if normalize:
        mixed.div_(divisor)
    if lambda_ != 1:
        mixed.mul_(lambda_)
    return mixed


# -- planning -------------------------------------------------------------------------------
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
    check_shard_size(max_shard_bytes)
    out_path = check_output(out, force=force)

    b = open_checkpoint(base) if base is not None else None
    ckpts = [open_checkpoint(p) for p, _ in parsed]
    anchor, vectors, extra = _open_vectors(method, b, ckpts, parsed, p_parsed, d_parsed)
    arts = [v.src for v in extra if isinstance(v.src, ArtifactDelta)]

    # the tokenizer (and config) source and the vocabulary rows it brings
    tok_ckpt, tok_vec = _tokenizer_source(tokenizer_from, ckpts, b, vectors, extra[0] if extra else vectors[-1])
    for v in vectors:
        refuse_new_rows(v.src, new_rows)
        if v is tok_vec:
            continue
        for n, r in v.src.rows.items():
            if v.src.shapes[n] and r < v.src.shapes[n][0]:
                raise CheckpointError(
                    f"{v.src.label}: tensor {n!r} has {v.src.shapes[n][0]} rows, more than the base's {r}, but the "
                    f"tokenizer comes from {tok_ckpt.path}; only the tokenizer source may add vocabulary rows"
                )

    first = ckpts[0]
    names = sorted(anchor.keys(), key=natural_key)
    out_shapes = {n: (tok_vec.src.shapes[n] if tok_vec else anchor.spec(n).shape) for n in names}
    specs = [TensorSpec(n, out_dtype_code(first.spec(n).dtype, dtype), out_shapes[n]) for n in names]
    sparse = _SPARSE.get(method)
    job = _Job(method, anchor, vectors, tok_vec, out_shapes, {n: vectors[0].src.rows[n] for n in names}, sparse,
               density, rescale, seed, bool(normalize), lambda_, new_rows)

    to_hash = [*([b] if b is not None else []), *ckpts, *(v.src.aux for v in extra)]
    planned = {s.name: s for s in specs}

    def tensors(writer: ShardedWriter) -> None:
        run_steps(_steps(job, names), writer, planned, buffer_bytes=buffer_bytes, progress=progress,
                  desc=f"merge {method}")

    def finish(hashes: list[dict[str, Any]]) -> Finished:
        described = iter(hashes)
        inputs: dict[str, dict[str, Any]] = {}
        if b is not None:
            inputs["base"] = next(described)
        for i in range(len(ckpts)):
            inputs[f"model_{i}"] = next(described)
        for v in extra:
            inputs[v.label] = next(described)
        for art in arts:
            if b is not None and art.base_sha256 != inputs["base"]["sha256"]:
                raise CheckpointError(
                    f"{art.label}: this delta was extracted against the base {art.recorded_inputs['base']['path']} "
                    f"(sha256 {art.base_sha256[:16]}...), not against {b.path} (sha256 "
                    f"{inputs['base']['sha256'][:16]}...); extract it against this base"
                )
        cfg = dict(tok_ckpt.config)
        set_config_dtype(cfg, dtype_code(DTYPE_NAMES[dtype]) if dtype != "auto" else _float_code(first))
        params = {
            "method": method,
            "weights": {v.label: v.weight for v in vectors},
            "density": density, "lambda": lambda_, "seed": seed, "normalize": normalize,
            "rescale": rescale if sparse == "random" else None,
            "new_rows": new_rows, "tokenizer_from": str(tok_ckpt.path), "dtype": dtype,
            "max_shard_bytes": max_shard_bytes,
        }
        return Finished(cfg, new_manifest(None, stage=f"merge:{method}", params=params, inputs=inputs, command=command))

    write_output(out_path, specs, inputs=to_hash, aux=tok_ckpt, tensors=tensors, finish=finish, force=force,
                 max_shard_bytes=max_shard_bytes)
    return out_path


def _check_options(method: str, density: float | None, lambda_: float, rescale: str, dtype: str,
                   new_rows: str) -> None:
    if method not in METHODS:
        raise UsageError(f"--method must be one of {list(METHODS)}, got {method!r}")
    check_dtype_arg(dtype)
    check_new_rows(new_rows)
    if rescale not in ("l1", "inverse", "none"):
        raise UsageError(f"--rescale must be l1, inverse or none, got {rescale!r}")
    if method in _SPARSE:
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


def _open_vectors(
    method: str, b: Checkpoint | None, ckpts: list[Checkpoint], parsed: Weighted, p_parsed: Weighted,
    d_parsed: Weighted,
) -> tuple[Checkpoint, list[_Vector], list[_Vector]]:
    """The anchor, every task vector, and those of them given as --post/--delta (posts first), checked."""
    arts = [ArtifactDelta(open_checkpoint(p)) for p, _ in d_parsed]
    for art in arts:
        if b is not None:
            check_configs(b.config, art.base_config, str(b.path / "config.json"), f"{art.label} (base config)")
            pair_rows(b.path, {n: b.spec(n) for n in b.keys()}, b.config, art.ckpt)  # its config is P's
        elif art is not arts[0]:
            check_same_delta(arts[0], art)
    check_artifact_bases(arts)
    extra: list[_Vector] = []
    for i, (p, w) in enumerate(p_parsed):
        assert b is not None
        extra.append(_Vector(PairDelta(b, open_checkpoint(p)), 1.0 if w is None else w, f"post_{i}"))
    for i, (art, (_, w)) in enumerate(zip(arts, d_parsed)):
        extra.append(_Vector(art, 1.0 if w is None else w, "delta" if len(arts) == 1 else f"delta_{i}"))

    vectors: list[_Vector] = []
    if method == "paramdelta":
        anchor = ckpts[0]
        if len(ckpts) == 2:
            assert b is not None
            vectors.append(_Vector(PairDelta(b, ckpts[1]), 1.0, "model_1"))
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
    else:
        assert b is not None
        anchor = b
        for i, (c, (_, w)) in enumerate(zip(ckpts, parsed)):
            vectors.append(_Vector(PairDelta(b, c), 1.0 if w is None else w, f"model_{i}"))
    return anchor, [*vectors, *extra], extra


@dataclass(frozen=True)
class _Job:
    method: str
    anchor: Checkpoint
    vectors: list[_Vector]
    tok_vec: _Vector | None
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
    deltas = [fn(ts[i:j]) for i, j, fn in fns]
    weights = [v.weight for v in job.vectors]
    if job.sparse == "magnitude":
        deltas = [magnitude_prune(d, job.density) for d in deltas]  # type: ignore[arg-type]
    elif job.sparse == "random":
        deltas = [
            random_drop(d, job.density, job.rescale, _generator(job.seed, n, v.label))  # type: ignore[arg-type]
            for d, v in zip(deltas, job.vectors)
        ]
    if job.method == "paramdelta" and len(deltas) == 1 and weights[0] == 1:
        mixed = deltas[0]
    elif job.method == "paramdelta":  # C + Σ wᵢ δᵢ, in float32 in the order given
        mixed = combine([f32(d) for d in deltas], weights, consensus=False, normalize=False, lambda_=1.0)
    else:
        mixed = combine(deltas, weights, consensus=job.method in _CONSENSUS, normalize=job.normalize,
                        lambda_=job.lambda_)
    del deltas
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
    vectors: list[_Vector],
    default: _Vector,
) -> tuple[Checkpoint, _Vector | None]:
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
