"""Graft the post-training delta onto an MoE (docs/design.md#step-3-graft): M' = M + expand(Δ).

``graft`` streams M' = M + expand(Δ): the dense FFN delta of each layer goes to the chosen
experts of that layer (scaled by α), every other tensor (attention, norms, embeddings, LM
head) gets its delta once, and routers and inert tensors are copied untouched. Layers that a
Mixtral upcycle kept dense (``replicated_layers``: E identical experts and a zero router) get
the full delta in every expert, because their experts must stay identical.

Δ comes either from a pair of checkpoints (B, P) or from a delta artifact written once by
:func:`deltamoe.ops.extract.extract_delta` (:mod:`deltamoe.ops.sources`); several deltas are
summed (:mod:`deltamoe.ops.deltas`).

Vocabulary: when P has embedding/LM-head rows that B lacks (added special tokens), the first
rows of the result are M + Δ and the extra rows take P's values (``new_rows="post"``), the
mean of the grafted rows (``"mean"``), or the run is refused (``"error"``). Any other shape
difference between B, P and M is an error that names the tensors and their shapes.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch

from deltamoe import arch
from deltamoe.io import DEFAULT_SHARD_BYTES, Checkpoint, TensorSpec, open_checkpoint
from deltamoe.choices import NewRows
from deltamoe.engine import Out, Read, Step, row_chunks
from deltamoe.errors import ArchitectureError, CheckpointError, UsageError
from deltamoe.ops.common import (
    DTYPE_KEYS,
    check_dtype_arg,
    check_float,
    check_new_rows,
    config_changes,
    dense_input,
    natural_key,
    out_dtype_code,
    output_config,
    prepare_output,
)
from deltamoe.ops.deltas import DeltaSet, WeightedInput, check_artifact_bases, open_deltas
from deltamoe.ops.expand_graft import expand_block, graft_expanded
from deltamoe.ops.sources import DeltaSource, added_rows, check_counterparts, refuse_new_rows
from deltamoe.ops.steps import add_scaled, copy_chunk, copy_steps, graft_steps, stream_output
from deltamoe.ops.upcycle import UPCYCLE_STAGE
from deltamoe.io.output import Finished
from deltamoe.io.provenance import new_manifest, read_manifest

_MOE_KEYS = ("family", "num_experts", "top_k", "moe_layers", "replicated_layers", "names")


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
    :func:`deltamoe.ops.expand_graft.graft_expanded`.

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
    _check_options(dtype, new_rows, scale)
    out_path = prepare_output(out, force=force, max_shard_bytes=max_shard_bytes)
    m = open_checkpoint(moe)
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
    spec = _check_family(m, moe_info, src)
    upcycled_from = dense_input(m_manifest, UPCYCLE_STAGE)
    if check_base:
        check_artifact_bases(deltas.artifacts(), upcycled_from, m.path)
    refuse_new_rows(src, new_rows)
    plan = _plan_graft(m, src, moe_info, chosen, float(scale), dtype)
    changes = _post_config_changes(spec, src, moe_info)

    def finish(described: list[dict[str, Any]]) -> Finished:
        inputs = {"moe": described[0], **deltas.record(described[1:])}
        if deltas.base is not None and check_base and upcycled_from:
            _check_upcycled_from(deltas.base.path, described[1], upcycled_from, m.path)
        params = _params(deltas, chosen, float(scale), new_rows, dtype, check_base, src, plan.consumed, changes,
                         max_shard_bytes)
        manifest = new_manifest(m_manifest, stage="graft", params=params, inputs=inputs, command=command)
        return Finished(output_config(m.config, changes, dtype), manifest)

    stream_output(out_path, plan.specs, _steps(m, src, plan, new_rows), inputs=[m, *deltas.checkpoints()],
                  aux=src.aux, finish=finish, desc="graft", force=force, max_shard_bytes=max_shard_bytes,
                  buffer_bytes=buffer_bytes, progress=progress)
    return out_path


# -- validate -------------------------------------------------------------------------------
def _check_options(dtype: str, new_rows: str, scale: Any) -> None:
    check_dtype_arg(dtype)
    check_new_rows(new_rows)
    if not isinstance(scale, (int, float)) or scale != scale or abs(scale) == float("inf"):
        raise UsageError(f"--scale must be a finite number, got {scale!r}")


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
    for key in _MOE_KEYS:
        if key not in moe:
            raise CheckpointError(f"{m.path}/deltamoe.json: the 'moe' block lacks {key!r}")
    return manifest, moe


def _check_family(m: Checkpoint, moe_info: dict[str, Any], src: DeltaSource) -> arch.ArchSpec:
    """M is an MoE of the family that Δ's base is; that family's spec."""
    spec = arch.arch_for(src.base_config, source=f"{src.label} (base config)")
    family_ok = moe_info["family"] in (src.base_config.get("model_type"), spec.family)  # older: the table name
    if not family_ok or m.config.get("model_type") != spec.moe_model_type:
        raise ArchitectureError(
            f"{m.path}: is a {m.config.get('model_type')} MoE upcycled from the {moe_info['family']!r} family, "
            f"but the base is a {src.base_config.get('model_type')} model ({spec.family!r} family -> "
            f"{spec.moe_model_type}); graft onto an MoE upcycled from this base"
        )
    return spec


def _check_upcycled_from(base: Path, described: dict[str, Any], upcycled_from: dict[str, Any], moe: Path) -> None:
    """The B of a (B, P) pair, hashed, is the dense model M was upcycled from."""
    if upcycled_from["sha256"] != described["sha256"]:
        raise CheckpointError(
            f"{base}: sha256 {described['sha256'][:16]}... differs from the dense model "
            f"{upcycled_from['path']} (sha256 {upcycled_from['sha256'][:16]}...) that {moe} was upcycled "
            "from; graft needs that exact base. If it is the same model re-saved, pass --no-check-base"
        )


# -- plan -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class _ExpertTarget:
    name: str
    expert: int
    scale: float


@dataclass
class _GraftPlan:
    specs: list[TensorSpec]
    kinds: dict[str, str]  # output name -> "expert", "copy" or "shared"
    expert_of: dict[str, tuple[str, int, str, int]]  # expert tensor -> (dense FFN name, layer, role, expert)
    groups: dict[str, list[_ExpertTarget]]  # dense FFN name -> the experts it feeds
    consumed: set[str]  # tensors of the delta that reach the output


def moe_tensors(m: Checkpoint, moe_info: dict[str, Any]) -> tuple[dict[str, tuple[str, int, str, int]], set[str]]:
    """What the 'moe' block of M's deltamoe.json says M's tensors are: expert tensor -> (dense FFN
    name, layer, role, expert), and the routers and inert tensors; each of them must be in M."""
    names, n_exp = moe_info["names"], int(moe_info["num_experts"])
    expert_of: dict[str, tuple[str, int, str, int]] = {}
    untouched: set[str] = set()
    for layer in sorted(set(moe_info["moe_layers"]) | set(moe_info["replicated_layers"])):
        for role, tmpl in names["expert_ffn"].items():
            dense = names["dense_ffn"][role].format(layer=layer)
            for e in range(n_exp):
                expert_of[tmpl.format(layer=layer, expert=e)] = (dense, layer, role, e)
        untouched.add(names["router"].format(layer=layer))
        untouched.update(t.format(layer=layer) for t in names["inert"])
    absent = sorted(n for n in [*expert_of, *untouched] if n not in m.tensors)
    if absent:
        raise CheckpointError(f"{m.path}: missing tensor(s) {absent[:5]} that its deltamoe.json 'moe' block implies")
    return expert_of, untouched


def _plan_graft(m: Checkpoint, src: DeltaSource, moe_info: dict[str, Any], chosen: list[int], scale: float,
                dtype: str) -> _GraftPlan:
    """Which stored tensor of M is which (experts -> dense FFN name, routers, inert, shared), checked."""
    expert_of, untouched = moe_tensors(m, moe_info)
    replicated = set(moe_info["replicated_layers"])
    plan = _GraftPlan([], {}, expert_of, {}, set())
    for name in sorted(m.keys(), key=natural_key):
        ms = m.spec(name)
        shape = ms.shape
        if name in expert_of:
            dense, layer, _, e = expert_of[name]
            _check_expert(m, name, src, dense)
            s = 1.0 if layer in replicated else (scale if e in chosen else 0.0)
            plan.groups.setdefault(dense, []).append(_ExpertTarget(name, e, s))
            plan.consumed.add(dense)
            plan.kinds[name] = "expert"
        elif name in untouched:
            plan.kinds[name] = "copy"
        elif name in src.shapes:
            _check_shared(m, name, src)
            plan.consumed.add(name)
            plan.kinds[name] = "shared"
            shape = src.shapes[name]
        else:
            raise CheckpointError(
                f"{m.tensors[name].file}: tensor {name!r} is neither an expert, a router nor a tensor of the "
                f"base/post models ({src.label}); M does not match them"
            )
        plan.specs.append(TensorSpec(name, out_dtype_code(ms.dtype, dtype), shape))
    check_counterparts(src, plan.consumed, m.path, "M was not upcycled from this base")
    return plan


def _check_expert(m: Checkpoint, name: str, src: DeltaSource, dense: str) -> None:
    if dense not in src.shapes:
        raise CheckpointError(f"{src.label}: has no tensor {dense!r}, the dense FFN of expert {name!r} of {m.path}")
    want = src.base_shape(dense)
    if m.spec(name).shape != want or src.shapes[dense] != want:
        raise CheckpointError(
            f"tensor {name!r} of {m.tensors[name].file} has shape {list(m.spec(name).shape)}, but the dense FFN "
            f"{dense!r} of the base/post models has {list(src.shapes[dense])}; M was not upcycled from this base"
        )


def _check_shared(m: Checkpoint, name: str, src: DeltaSource) -> None:
    ms, want = m.spec(name), src.base_shape(name)
    if ms.shape != want:
        raise CheckpointError(
            f"tensor {name!r} has shape {list(ms.shape)} in {m.tensors[name].file} but {list(want)} in "
            f"the base ({src.label}); M was not upcycled from this base"
        )
    check_float(m, name)


def _post_config_changes(spec: arch.ArchSpec, src: DeltaSource, moe: dict[str, Any]) -> dict[str, Any]:
    """MoE config fields whose value P's config implies differently from B's (e.g. token ids)."""
    def semantic(cfg: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in cfg.items() if k not in DTYPE_KEYS}

    if semantic(src.base_config) == semantic(src.post_config):
        # The same dense config maps to the same MoE config: skip importing transformers'
        # config machinery (~80 MB of memory and 1.5-3 s on a small machine).
        return {}
    kw = dict(num_experts=int(moe["num_experts"]), top_k=int(moe["top_k"]), moe_layers=list(moe["moe_layers"]),
              dtype_name=None)
    cb = arch.moe_config(spec, src.base_config, source=f"{src.label} (base config)", **kw)
    cp = arch.moe_config(spec, src.post_config, source=f"{src.label} (post config)", **kw)
    return config_changes(cb, cp)


def _params(deltas: DeltaSet, chosen: list[int], scale: float, new_rows: str, dtype: str, check_base: bool,
            src: DeltaSource, consumed: set[str], changes: dict[str, Any], max_shard_bytes: int) -> dict[str, Any]:
    """The graft stage's parameters, as recorded in deltamoe.json (``added_rows``: those that reach the output)."""
    added = {n: [r, src.shapes[n][0]] for n, r in added_rows(src).items() if n in consumed}
    params: dict[str, Any] = {"experts": chosen, "scale": scale}
    if not deltas.single:
        params["weights"] = deltas.weights()
    params.update({
        "replicated_layers_get": "full delta in every expert",
        "new_rows": new_rows, "dtype": dtype, "check_base": check_base,
        "added_rows": added, "config_from_post": changes, "max_shard_bytes": max_shard_bytes,
    })
    return params


# -- write ----------------------------------------------------------------------------------
def _steps(m: Checkpoint, src: DeltaSource, plan: _GraftPlan, new_rows: str) -> Iterator[Step]:
    done_groups: set[str] = set()
    for s in plan.specs:
        kind = plan.kinds[s.name]
        if kind == "expert":
            dense = plan.expert_of[s.name][0]
            if dense not in done_groups:
                done_groups.add(dense)
                yield from _expert_steps(m, src, dense, plan.groups[dense])
        elif kind == "copy":
            yield from copy_steps(m, s.name)
        else:
            yield from graft_steps(m, src, s.name, new_rows)


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
                yield Step([mine], partial(copy_chunk, name=t.name, a=a))
                continue
            first = i == users[0]
            reads, fn = src.delta(dense, a, b) if first else ([], None)
            yield Step([*reads, mine], partial(_expert_chunk, name=t.name, a=a, scale=t.scale, fn=fn, held=held,
                                               first=first, last=i == users[-1]))


def _expert_chunk(ts: list[torch.Tensor], *, name: str, a: int | None, scale: float, fn: Any,
                  held: dict[str, torch.Tensor], first: bool, last: bool) -> list[Out]:
    if first:
        held["d"] = fn(ts[:-1])
    d = held["d"]
    if last:
        held.clear()
    return [(name, a, add_scaled(ts[-1], d, scale))]
