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
from pathlib import Path
from typing import Any, Literal

import torch

from deltamoe.checkpoint import (
    DEFAULT_SHARD_BYTES,
    DTYPE_NAMES,
    Checkpoint,
    ShardedWriter,
    TensorSpec,
    atomic_output_dir,
    check_output,
    copy_aux_files,
    dtype_code,
    open_checkpoint,
    write_json,
)
from deltamoe.delta import (
    ArtifactDelta,
    DeltaSource,
    PairDelta,
    RowMean,
    added_rows_steps,
    check_dtype_arg,
    check_new_rows,
    natural_key,
    out_dtype_code,
    pair_rows,
    refuse_new_rows,
    set_config_dtype,
)
from deltamoe.engine import Out, Read, Step, add32, row_chunks, run_steps
from deltamoe.errors import CheckpointError, UsageError
from deltamoe.preflight import check_output_disk, check_shard_size
from deltamoe.provenance import hash_in_background, new_manifest, write_manifest, write_model_card

Method = Literal["paramdelta", "task_arithmetic", "ties", "dare_linear", "dare_ties"]
METHODS: tuple[str, ...] = ("paramdelta", "task_arithmetic", "ties", "dare_linear", "dare_ties")
Rescale = Literal["l1", "inverse", "none"]
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
    delta: str | os.PathLike[str] | tuple[str | os.PathLike[str], float | None] | None = None,
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
            model C and the post-trained model P (in that order), or only C with ``delta``.
        base: the common base B (required except for ``paramdelta`` with ``delta``).
        delta: a delta artifact (``deltamoe delta extract``) used as one more task vector
            (weight 1 or the given one); for ``paramdelta`` it replaces B and P.
        density: fraction of each task vector kept by ties/dare (required there, in (0, 1]).
        lambda_: factor on the combined task vector (mergekit's ``lambda``).
        seed: seeds DARE's random masks.
        normalize: divide by the sum of weights; default True for ties, False otherwise.
        rescale: DARE's rescaling of the kept entries: "l1" (keep each tensor's L1 norm, as
            mergekit), "inverse" (divide by density, as the DARE paper) or "none".
        new_rows: vocabulary rows the tokenizer source has beyond the base: "post" (its
            values), "mean" (mean of the merged rows) or "error".
        tokenizer_from: the input whose tokenizer files, chat template, generation config and
            config are copied; default the delta artifact if given, else the last model.
        dtype: "auto" (the first model's stored dtypes) or float32/bfloat16/float16.
    """
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
    parsed = [_as_weighted(x) for x in models]
    d_parsed = _as_weighted(delta) if delta is not None else None
    if not parsed:
        raise UsageError("give at least one --model")
    if method == "paramdelta":
        want = 1 if d_parsed else 2
        if len(parsed) != want:
            raise UsageError(
                "paramdelta is C + (P - B): give --model C --model P with --base B, or --model C with --delta D "
                f"(got {len(parsed)} --model)"
            )
        if any(w not in (None, 1.0) for _, w in [*parsed, *([d_parsed] if d_parsed else [])]) or lambda_ != 1:
            raise UsageError("paramdelta takes no weights and no --lambda (use task_arithmetic for weighted sums)")
        if base is None and not d_parsed:
            raise UsageError("paramdelta needs --base B (or a delta artifact --delta D)")
    elif base is None:
        raise UsageError(f"--method {method} needs --base B")
    if normalize is None:
        normalize = method == "ties"
    check_shard_size(max_shard_bytes)
    out_path = check_output(out, force=force)

    b = open_checkpoint(base) if base is not None else None
    ckpts = [open_checkpoint(p) for p, _ in parsed]
    art = ArtifactDelta(open_checkpoint(d_parsed[0])) if d_parsed else None
    if art is not None and b is not None:
        from deltamoe.delta import check_configs

        check_configs(b.config, art.base_config, str(b.path / "config.json"), f"{art.label} (base config)")
        pair_rows(b.path, {n: b.spec(n) for n in b.keys()}, b.config, art.ckpt)  # its config is P's

    # anchor + task vectors
    vectors: list[_Vector] = []
    if method == "paramdelta":
        anchor = ckpts[0]
        if art is not None:
            vectors.append(_Vector(art, 1.0, "delta"))
            anchor_rows = pair_rows(
                anchor.path, {n: TensorSpec(n, "F32", art.base_shape(n)) for n in art.shapes},
                art.base_config, anchor,
            )
        else:
            assert b is not None
            vectors.append(_Vector(PairDelta(b, ckpts[1]), 1.0, "model_1"))
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
        if art is not None:
            assert d_parsed is not None
            vectors.append(_Vector(art, 1.0 if d_parsed[1] is None else d_parsed[1], "delta"))

    # the tokenizer (and config) source and the vocabulary rows it brings
    tok_ckpt, tok_vec = _tokenizer_source(tokenizer_from, ckpts, b, vectors)
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
    known_rows = {n: (vectors[0].src.rows[n]) for n in names}
    specs = [TensorSpec(n, out_dtype_code(first.spec(n).dtype, dtype), out_shapes[n]) for n in names]
    sparse = _SPARSE.get(method)
    weights = [v.weight for v in vectors]
    consensus = method in _CONSENSUS

    def steps() -> Iterator[Step]:
        for n in names:
            shape = out_shapes[n]
            grown = bool(shape) and known_rows[n] < shape[0]
            mean = RowMean() if grown and new_rows == "mean" else None
            ranges: list[tuple[int | None, int | None]]
            if sparse is None:  # elementwise: stream in row chunks
                ranges = row_chunks(shape, 0, known_rows[n])
            elif grown:  # ties/dare see the rows shared with the base as one tensor
                ranges = [(0, known_rows[n])]
            else:
                ranges = [(None, None)]
            for a, bb in ranges:
                reads: list[Read] = [Read(anchor, n, a, bb)]
                fns: list[tuple[int, int, Callable[[list[torch.Tensor]], torch.Tensor]]] = []
                for v in vectors:
                    r, fn = v.src.delta(n, a, bb)
                    fns.append((len(reads), len(reads) + len(r), fn))
                    reads.extend(r)

                def compute(ts: list[torch.Tensor], n=n, a=a, fns=fns, mean=mean) -> list[Out]:
                    deltas = [fn(ts[i:j]) for i, j, fn in fns]
                    if sparse == "magnitude":
                        deltas = [magnitude_prune(d, density) for d in deltas]  # type: ignore[arg-type]
                    elif sparse == "random":
                        deltas = [
                            random_drop(d, density, rescale, _generator(seed, n, v.label))  # type: ignore[arg-type]
                            for d, v in zip(deltas, vectors)
                        ]
                    if method == "paramdelta":
                        mixed = deltas[0]
                    else:
                        mixed = combine(deltas, weights, consensus=consensus, normalize=bool(normalize), lambda_=lambda_)
                    del deltas
                    o = add32(ts[0], mixed, scratch=True)  # the output piece: consumed at once
                    if mean is not None:
                        mean.add(o)
                    return [(n, a, o)]

                yield Step(reads, compute, check_inputs=sparse is not None)  # TIES/DARE drop NaNs
            if grown:
                assert tok_vec is not None
                yield from added_rows_steps(tok_vec.src, n, new_rows, mean)

    check_output_disk(out_path, specs, tok_ckpt.aux_files())
    to_hash = [*([b] if b is not None else []), *ckpts, *([art.ckpt] if art is not None else [])]
    hashes = hash_in_background(*to_hash)
    planned = {s.name: s for s in specs}
    with atomic_output_dir(out_path, force=force) as tmp:
        writer = ShardedWriter(tmp, specs, max_shard_bytes=max_shard_bytes)
        try:
            run_steps(steps(), writer, planned, buffer_bytes=buffer_bytes, progress=progress, desc=f"merge {method}")
            writer.close()
        except BaseException:
            writer.abort()
            raise
        described = hashes.result()
        inputs: dict[str, dict[str, Any]] = {}
        k = 0
        if b is not None:
            inputs["base"] = described[0]
            k = 1
        for i in range(len(ckpts)):
            inputs[f"model_{i}"] = described[k + i]
        if art is not None:
            inputs["delta"] = described[-1]
            if b is not None and art.base_sha256 != inputs["base"]["sha256"]:
                raise CheckpointError(
                    f"{art.label}: this delta was extracted against the base {art.recorded_inputs['base']['path']} "
                    f"(sha256 {art.base_sha256[:16]}...), not against {b.path} (sha256 "
                    f"{inputs['base']['sha256'][:16]}...); extract it against this base"
                )
        cfg = dict(tok_ckpt.config)
        set_config_dtype(cfg, dtype_code(DTYPE_NAMES[dtype]) if dtype != "auto" else _float_code(first))
        write_json(tmp / "config.json", cfg)
        copy_aux_files(tok_ckpt, tmp)
        params = {
            "method": method,
            "weights": {v.label: v.weight for v in vectors},
            "density": density, "lambda": lambda_, "seed": seed, "normalize": normalize,
            "rescale": rescale if sparse == "random" else None,
            "new_rows": new_rows, "tokenizer_from": str(tok_ckpt.path), "dtype": dtype,
            "max_shard_bytes": max_shard_bytes,
        }
        manifest = new_manifest(None, stage=f"merge:{method}", params=params, inputs=inputs, command=command)
        write_manifest(tmp, manifest)
        write_model_card(tmp, manifest)
    return out_path


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
) -> tuple[Checkpoint, _Vector | None]:
    """The input whose tokenizer, chat template and config the output gets, and its task vector.

    Only that input may bring vocabulary rows the base lacks; an input without a task vector
    (the base, or paramdelta's C) brings none.
    """
    if tokenizer_from is None:
        v = vectors[-1]  # the delta artifact if given (it is last), else the last model
        return v.src.aux, v
    want = Path(tokenizer_from).expanduser().resolve()
    for v in vectors:
        if v.src.aux.path.resolve() == want:
            return v.src.aux, v
    for c in [*ckpts, *([base] if base is not None else [])]:
        if c.path.resolve() == want:
            return c, None
    raise UsageError(f"--tokenizer-from {tokenizer_from}: not one of the inputs (--base, --model, --delta)")
