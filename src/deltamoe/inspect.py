"""``deltamoe inspect``: where the continued-pretraining update U and the post-training delta Δ collide.

The paper's argument (docs/design.md#the-problem) is that dense continued pre-training moves the
weights that Δ = P − B moves. This measures it, per layer and tensor group: ‖U‖, ‖Δ‖, their ratio
and cos(U, Δ). U is B' − B for a dense CPT model B' (``cpt``), or, for an MoE M after stage 1
(``moe``), M_e − M_0 for each new expert e (expert 0 is B's FFN, frozen) and M − B for expert 0
and the tensors M shares with B (zero where stage 1 kept them frozen, and reported as such).

Everything streams: tensors are read in row chunks by the engine's reader thread, each chunk's
three dot products go into float64 sums, and nothing but those sums is kept. Δ comes from the
same sources as graft's (:func:`deltamoe.ops.deltas.open_deltas`).
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Callable
from functools import partial
from typing import Any, cast

import torch
from tqdm.auto import tqdm

from deltamoe import __version__, arch
from deltamoe.io import Checkpoint, ShardedWriter, atomic_output_dir, check_output, open_checkpoint, write_json
from deltamoe.arith import diff32
from deltamoe.engine import DEFAULT_BUFFER_BYTES, Read, Step, row_chunks, run_steps
from deltamoe.errors import ArchitectureError, CheckpointError, UsageError
from deltamoe.inspect_output import Acc, Target, format_table, plot, summary_rows, table_rows, totals
from deltamoe.ops.common import check_float, natural_key
from deltamoe.ops.deltas import open_deltas
from deltamoe.ops.graft import moe_tensors
from deltamoe.ops.sources import STRUCTURAL, ArtifactDelta, DeltaSource, PairDelta, pair_rows
from deltamoe.io.provenance import read_manifest

JSON_NAME = "inspect.json"
PLOT_NAME = "inspect.png"
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.(.+)$")

__all__ = ["inspect_conflict", "format_table", "group_of"]


def group_of(name: str, ffn: dict[str, tuple[int, str]] | None = None) -> tuple[int | None, str]:
    """(layer, tensor group) of a tensor name: the family table's FFN roles (``ffn``: dense FFN
    name -> (layer, group)) first; otherwise read from the name (``...layers.3.self_attn.q_proj.weight``
    -> (3, "attn.q"); any ``*norm*`` -> "norm"; ``embed_tokens`` -> "embed"; ``lm_head``)."""
    if ffn and name in ffn:
        return ffn[name]
    m = _LAYER.search(name)
    layer, rest = (int(m[1]), m[2]) if m else (None, name)
    parts = rest.split(".")
    if len(parts) > 1 and parts[-1] in ("weight", "bias"):
        parts = parts[:-1]
    leaf = parts[-1]
    if "norm" in leaf:
        return layer, "norm"
    if "embed" in leaf:
        return layer, "embed"
    if any("attn" in p or "attention" in p for p in parts[:-1]):
        return layer, "attn." + leaf.removesuffix("_proj")
    if any("mlp" in p for p in parts[:-1]):
        return layer, "mlp." + leaf.removesuffix("_proj")
    return layer, leaf


def _ffn_groups(dense_ffn: dict[str, str], n_layers: int) -> dict[str, tuple[int, str]]:
    return {t.format(layer=i): (i, f"mlp.{role}") for role, t in dense_ffn.items() for i in range(n_layers)}


# -- inputs -----------------------------------------------------------------------------------
def _same_structure(b: Checkpoint, x: Checkpoint) -> None:
    for key in STRUCTURAL:
        if b.config.get(key) != x.config.get(key):
            hint = " (an MoE made by 'deltamoe upcycle' goes to --moe)" if read_manifest(x.path) and key == "model_type" else ""
            raise ArchitectureError(
                f"{x.path / 'config.json'}: {key} = {x.config.get(key)!r}, but the base {b.path} has "
                f"{key} = {b.config.get(key)!r}; the continued-pretrained model must have the base model's "
                f"architecture and shapes{hint}"
            )


def _check_base_of_artifact(b: Checkpoint, src: ArtifactDelta) -> None:
    """``--base B`` beside ``--delta D``: B must have the tensors and shapes D was extracted against."""
    for key in STRUCTURAL:
        if b.config.get(key) != src.base_config.get(key):
            raise ArchitectureError(
                f"{b.path / 'config.json'}: {key} = {b.config.get(key)!r}, but the delta {src.label} was extracted "
                f"against a base with {key} = {src.base_config.get(key)!r}; give the base the delta was made from"
            )
    for name in sorted(set(src.shapes) | set(b.tensors), key=natural_key):
        if name not in b.tensors:
            raise CheckpointError(f"{b.path}: has no tensor {name!r}, which the delta {src.label} holds; "
                                  "give the base the delta was made from")
        if name not in src.shapes:
            raise CheckpointError(f"{b.tensors[name].file}: tensor {name!r} is not in the delta {src.label}; "
                                  "give the base the delta was made from")
        if b.spec(name).shape != src.base_shape(name):
            raise CheckpointError(
                f"tensor {name!r} has shape {list(b.spec(name).shape)} in {b.tensors[name].file} but "
                f"{list(src.base_shape(name))} in the base of the delta {src.label}; give the base the delta was made from"
            )


def _open_delta(base: Any, post: Any, delta: Any) -> tuple[DeltaSource, Checkpoint | None]:
    """Δ (from B and P, or from an artifact) and B where one is given."""
    if delta is None:
        src = open_deltas(base, post, None).terms[0].src
        return src, cast(PairDelta, src).base
    src = open_deltas(None, post, delta).terms[0].src
    b = open_checkpoint(base) if base is not None else None
    if b is not None:
        _check_base_of_artifact(b, cast(ArtifactDelta, src))
    return src, b


def _moe_block(m: Checkpoint) -> dict[str, Any]:
    moe = (read_manifest(m.path) or {}).get("moe")
    if not isinstance(moe, dict):
        raise CheckpointError(
            f"{m.path}: no deltamoe.json with an 'moe' block; --moe needs an MoE made by 'deltamoe upcycle' "
            "(and trained from it). For a dense continued-pretrained model use --cpt instead"
        )
    for key in ("family", "num_experts", "moe_layers", "replicated_layers", "names"):
        if key not in moe:
            raise CheckpointError(f"{m.path}/deltamoe.json: the 'moe' block lacks {key!r}")
    return moe


def _check_family(m: Checkpoint, moe: dict[str, Any], src: DeltaSource) -> None:
    spec = arch.arch_for(src.base_config, source=f"{src.label} (base config)")
    if moe["family"] not in (src.base_config.get("model_type"), spec.family) or m.config.get("model_type") != spec.moe_model_type:
        raise ArchitectureError(
            f"{m.path}: is a {m.config.get('model_type')} MoE upcycled from the {moe['family']!r} family, but the base "
            f"is a {src.base_config.get('model_type')} model ({spec.family!r} family -> {spec.moe_model_type}); "
            "inspect an MoE upcycled from this base"
        )


# -- steps --------------------------------------------------------------------------------------
def _delta64(src_fn: Callable[[list[torch.Tensor]], torch.Tensor], ts: list[torch.Tensor]) -> tuple[torch.Tensor, float]:
    d = src_fn(ts).reshape(-1).double()
    return d, float(torch.dot(d, d))


def _pair_chunk(ts: list[torch.Tensor], *, nd: int, fn: Any, acc: Acc, bar: Any) -> list[Any]:
    d, dd = _delta64(fn, ts[:nd])
    acc.add(diff32(ts[nd], ts[nd + 1]), d, dd)
    bar.update(1)
    return []


def _pair_steps(src: DeltaSource, name: str, x: Checkpoint, b: Checkpoint, acc: Acc, bar: Any) -> list[Step]:
    """U = X − B against Δ, over the rows B has (rows P or X added to the vocabulary are not compared)."""
    steps = []
    for a, z in row_chunks(src.base_shape(name)):
        reads, fn = src.delta(name, a, z)
        steps.append(Step([*reads, Read(x, name, a, z), Read(b, name, a, z)],
                          partial(_pair_chunk, nd=len(reads), fn=fn, acc=acc, bar=bar), check_inputs=True))
    return steps


def _expert_chunk(ts: list[torch.Tensor], *, nd: int, fn: Any, accs: list[Acc | None], bar: Any) -> list[Any]:
    d, dd = _delta64(fn, ts[:nd])
    experts = ts[nd:nd + len(accs)]
    for e, acc in enumerate(accs):
        if acc is None:
            continue
        u = diff32(experts[0], ts[-1]) if e == 0 else diff32(experts[e], experts[0])
        acc.add(u, d, dd)
    bar.update(1)
    return []


def _expert_steps(src: DeltaSource, dense: str, m: Checkpoint, names: list[str], targets: list[Target],
                  b: Checkpoint | None, bar: Any) -> list[Step]:
    """Per row chunk of one dense FFN tensor: Δ once, U of every expert of that layer (``names``, by id).
    Expert 0 is measured (against B) only where it is among ``targets``."""
    accs: list[Acc | None] = [None] * len(names)
    for t in targets:
        accs[t.expert or 0] = t.acc
    steps = []
    for a, z in row_chunks(src.base_shape(dense)):
        reads, fn = src.delta(dense, a, z)
        extra = [Read(b, dense, a, z)] if b is not None else []
        steps.append(Step([*reads, *(Read(m, n, a, z) for n in names), *extra],
                          partial(_expert_chunk, nd=len(reads), fn=fn, accs=accs, bar=bar),
                          check_inputs=True))
    return steps


# -- plans ----------------------------------------------------------------------------------------
def _plan_dense(src: DeltaSource, b: Checkpoint | None, x: Checkpoint, bar: Any) -> tuple[list[Target], list[Step], list[str]]:
    if b is None:
        raise UsageError("--cpt B' needs --base B as well (U = B' - B); with --delta D, add --base B")
    _same_structure(b, x)
    rows = pair_rows(b.path, {n: b.spec(n) for n in b.keys()}, b.config, x)
    spec = arch.arch_for(b.config, source=str(b.path / "config.json"))
    ffn = _ffn_groups(spec.dense_ffn, arch.num_layers(b.config, source=str(b.path / "config.json")))
    targets, steps = [], []
    for name in sorted(b.keys(), key=natural_key):
        layer, group = group_of(name, ffn)
        t = Target(name, layer, group, "dense", delta_name=name)
        targets.append(t)
        steps.extend(_pair_steps(src, name, x, b, t.acc, bar))
    notes = []
    if any(s.shape and rows[n] < s.shape[0] for n, s in ((n, x.spec(n)) for n in x.keys())):
        notes.append("B' has vocabulary rows beyond B's: only the rows B has are compared")
    return targets, steps, notes


def _check_shape(m: Checkpoint, name: str, src: DeltaSource, dense: str) -> None:
    want, got = src.base_shape(dense), m.spec(name)
    if got.shape != want or (name != dense and src.shapes[dense] != want):
        raise CheckpointError(
            f"tensor {name!r} has shape {list(got.shape)} in {m.tensors[name].file}, but {dense!r} has "
            f"{list(src.shapes[dense])} in the base/post models ({src.label}); M was not upcycled from this base"
        )
    check_float(m, name)


def _plan_moe(src: DeltaSource, b: Checkpoint | None, m: Checkpoint, bar: Any) -> tuple[list[Target], list[Step], list[str]]:
    moe = _moe_block(m)
    _check_family(m, moe, src)
    expert_of, untouched = moe_tensors(m, moe)
    ffn = _ffn_groups(moe["names"]["dense_ffn"], arch.num_layers(m.config, source=str(m.path / "config.json")))
    experts: dict[str, list[Target]] = {}
    expert_names: dict[str, dict[int, str]] = {}
    shared: list[Target] = []
    consumed: set[str] = set()
    for name in sorted(m.keys(), key=natural_key):
        if name in untouched:
            continue
        if name in expert_of:
            dense, layer, role, e = expert_of[name]
            group = f"mlp.{role}"
            if dense not in src.shapes:
                raise CheckpointError(f"{src.label}: has no tensor {dense!r}, the dense FFN of expert {name!r} of {m.path}")
            _check_shape(m, name, src, dense)
            consumed.add(dense)
            expert_names.setdefault(dense, {})[e] = name
            if e > 0 or b is not None:
                experts.setdefault(dense, []).append(Target(name, layer, group, "expert", e, delta_name=dense))
        elif name in src.shapes:
            _check_shape(m, name, src, name)
            consumed.add(name)
            if b is not None:
                shared.append(Target(name, *group_of(name, ffn), "shared", delta_name=name))
        else:
            raise CheckpointError(f"{m.tensors[name].file}: tensor {name!r} is neither an expert, a router nor a tensor "
                                  f"of the base/post models ({src.label}); M does not match them")
    left = set(src.shapes) - consumed
    if left and left - arch.expected_dense_tensors(src.base_config, source=f"{src.label} (base config)")[1]:
        bad = sorted(left, key=natural_key)
        raise CheckpointError(f"{m.path}: has no counterpart for tensor(s) {bad[:5]} of the base/post models "
                              f"({src.label}); M was not upcycled from this base")
    steps: list[Step] = []
    for t in shared:
        steps.extend(_pair_steps(src, t.name, m, cast(Checkpoint, b), t.acc, bar))
    for dense, ts in experts.items():
        names = [expert_names[dense][e] for e in sorted(expert_names[dense])]
        steps.extend(_expert_steps(src, dense, m, names, ts, b, bar))
    targets = [*shared, *(t for ts in experts.values() for t in ts)]
    notes = [f"{len(untouched)} router and inert tensors have no counterpart in Δ and are not measured"]
    if b is None:
        notes.append("no --base: expert 0 and the shared tensors (U = M - B) are not measured, only the new experts")
    return targets, steps, notes


# -- the command ----------------------------------------------------------------------------------
class _Ticks:
    """Progress in row chunks; the bar is made once the plan (and so the number of chunks) is known."""

    def __init__(self) -> None:
        self.bar: Any = None

    def update(self, n: int) -> None:
        if self.bar is not None:
            self.bar.update(n)


def _measure(steps: list[Step]) -> None:
    """Run the steps on the engine (reads ahead on its thread); they write nothing, only accumulate."""
    run_steps(steps, cast(ShardedWriter, None), {}, buffer_bytes=DEFAULT_BUFFER_BYTES, progress=False)


def _frozen_notes(targets: list[Target]) -> list[str]:
    """Say where U is exactly 0: frozen tensors (expected for expert 0 and the shared tensors of an MoE)."""
    notes = []
    kinds = (("dense", "tensors of B'", "bit-identical to B"), ("shared", "shared tensors of M", "bit-identical to B"),
             ("expert0", "expert-0 tensors", "bit-identical to B"),
             ("new", "new-expert tensors", "identical to expert 0, untrained"))
    for kind, label, what in kinds:
        mine = [t for t in targets if (t.kind if t.kind != "expert" else "expert0" if t.expert == 0 else "new") == kind]
        zero = sum(t.acc.uu == 0 for t in mine)
        if zero == len(mine) and mine:
            notes.append(f"U = 0 in all {len(mine)} {label}: {what}")
        elif zero:
            notes.append(f"U = 0 in {zero} of {len(mine)} {label} ({what} there)")
    return notes


def inspect_conflict(
    out: str | os.PathLike[str],
    *,
    base: str | os.PathLike[str] | None = None,
    post: str | os.PathLike[str] | None = None,
    delta: str | os.PathLike[str] | None = None,
    cpt: str | os.PathLike[str] | None = None,
    moe: str | os.PathLike[str] | None = None,
    force: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Measure ‖U‖, ‖Δ‖, ‖U‖/‖Δ‖ and cos(U, Δ) per layer and tensor group; write ``out``.

    Args:
        base, post: B and P, giving Δ = P − B; or ``delta``, an artifact of ``deltamoe delta
            extract`` (then ``base`` is needed only for U = X − B).
        cpt: a dense continued-pretrained B' (U = B' − B; needs ``base``).
        moe: an MoE made by ``deltamoe upcycle`` and trained (U = M_e − M_0 for the new experts,
            M − B for expert 0 and the shared tensors where ``base`` is given).
    Returns:
        The report (also ``out/inspect.json``; ``out/inspect.png`` is the plot): ``rows`` per layer,
        group and expert, ``summary`` with the new experts taken together, ``tensors`` one by one,
        ``totals``, and ``notes``; ratio and cosine are None where a norm is 0.
    """
    if (cpt is None) == (moe is None):
        raise UsageError("give exactly one updated model: --cpt B' (dense continued pre-training) or --moe M")
    out_path = check_output(out, force=force)
    src, b = _open_delta(base, post, delta)
    x = open_checkpoint(cast(str, cpt if cpt is not None else moe))
    ticks = _Ticks()
    targets, steps, notes = (_plan_dense if cpt is not None else _plan_moe)(src, b, x, ticks)
    with tqdm(total=len(steps), unit="chunk", desc="inspect", disable=not progress, file=sys.stderr) as ticks.bar:
        _measure(steps)
    result = {
        "format": 1,
        "deltamoe_version": __version__,
        "mode": "dense_cpt" if cpt is not None else "moe",
        "inputs": {"base": str(b.path) if b is not None else None, "post": str(src.aux.path) if delta is None else None,
                   "delta": str(src.aux.path) if delta is not None else None,
                   "cpt" if cpt is not None else "moe": str(x.path)},
        "update": "B' - B" if cpt is not None else "M_e - M_0 (new experts); M - B (expert 0, shared tensors)",
        "delta": "P - B",
        "notes": [*notes, *_frozen_notes(targets)],
        "totals": totals(targets),
        "summary": summary_rows(targets),
        "rows": table_rows(targets),
        "tensors": [{"name": t.name, "delta_name": t.delta_name, "layer": t.layer, "group": t.group, "kind": t.kind,
                     "expert": t.expert, **t.acc.stats()} for t in targets],
        "files": {"json": JSON_NAME, "plot": PLOT_NAME},
    }
    with atomic_output_dir(out_path, force=force) as tmp:
        write_json(tmp / JSON_NAME, result)
        plot(result, tmp / PLOT_NAME)
    return {**result, "out": str(out_path)}

