"""Graft Δ = P − B onto a block-expanded model (docs/expand.md#graft).

Every output layer that came from original layer i gets Δ's layer-i tensors; the new blocks are
copied as they are; every tensor outside the decoder layers (embeddings, final norm, LM head)
gets its Δ once, with the same vocabulary rules as :func:`deltamoe.ops.graft.graft`. Δ comes from
the same sources (:mod:`deltamoe.ops.sources`: a B, P pair or a delta artifact) and runs through
the same streaming steps (:mod:`deltamoe.ops.steps`).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from deltamoe.io import DEFAULT_SHARD_BYTES, Checkpoint, TensorSpec, open_checkpoint
from deltamoe.engine import Step
from deltamoe.errors import ArchitectureError, CheckpointError
from deltamoe.ops.common import (
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
from deltamoe.ops.deltas import open_deltas
from deltamoe.ops.expand import EXPAND_STAGE, expanded_config, split_layer_name
from deltamoe.ops.sources import (
    STRUCTURAL,
    ArtifactDelta,
    DeltaSource,
    PairDelta,
    added_rows,
    check_counterparts,
    refuse_new_rows,
)
from deltamoe.ops.steps import copy_steps, graft_steps, stream_output
from deltamoe.io.output import Finished
from deltamoe.io.provenance import new_manifest, read_manifest

_EXPAND_KEYS = ("family", "original_layers", "num_layers", "sources", "new_layers", "layer_prefix")


def expand_block(m: Checkpoint) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """(manifest, its ``expand`` block) of a block-expanded model, or None for any other model."""
    manifest = read_manifest(m.path)
    block = (manifest or {}).get("expand")
    if not manifest or not isinstance(block, dict) or manifest.get("moe"):
        return None
    where = m.path / "deltamoe.json"
    for key in _EXPAND_KEYS:
        if key not in block:
            raise CheckpointError(f"{where}: the 'expand' block lacks {key!r}")
    if len(block["sources"]) != block["num_layers"] or m.config.get("num_hidden_layers") != block["num_layers"]:
        raise CheckpointError(
            f"{where}: the 'expand' block lists {len(block['sources'])} layers, config.json has "
            f"num_hidden_layers = {m.config.get('num_hidden_layers')}"
        )
    return manifest, block


def _check_family(m: Checkpoint, block: dict[str, Any], src: DeltaSource) -> None:
    base_src = f"{src.label} (base config)"
    bc = src.base_config
    if bc.get("model_type") != m.config.get("model_type") or bc.get("model_type") != block["family"]:
        raise ArchitectureError(
            f"{m.path}: is a {m.config.get('model_type')} model expanded from the {block['family']!r} family, but the "
            f"base is a {bc.get('model_type')} model; graft onto a model expanded from this base"
        )
    if bc.get("num_hidden_layers") != block["original_layers"]:
        raise ArchitectureError(
            f"{base_src}: num_hidden_layers = {bc.get('num_hidden_layers')}, but {m.path} was expanded from a "
            f"model with {block['original_layers']} layers"
        )
    for key in STRUCTURAL:
        if key != "num_hidden_layers" and bc.get(key) != m.config.get(key):
            raise ArchitectureError(
                f"{m.path / 'config.json'}: {key} = {m.config.get(key)!r}, but the base has {bc.get(key)!r}; "
                "graft onto a model expanded from this base"
            )


def _plan(m: Checkpoint, block: dict[str, Any], src: DeltaSource, dtype: str) -> tuple[list[TensorSpec], dict[str, Any]]:
    """Output specs, and per output tensor its kind: ("copy",), ("layer", Δ name) or ("shared",)."""
    prefix, sources, new = block["layer_prefix"], block["sources"], set(block["new_layers"])
    specs: list[TensorSpec] = []
    kinds: dict[str, Any] = {}
    consumed: set[str] = set()
    for name in sorted(m.keys(), key=natural_key):
        ms = m.spec(name)
        parsed = split_layer_name(name, prefix)
        d_name = name
        if parsed is not None:
            j, rest = parsed
            if j in new:
                kinds[name] = ("copy",)
                specs.append(TensorSpec(name, out_dtype_code(ms.dtype, dtype), ms.shape))
                continue
            d_name = f"{prefix}{sources[j]}.{rest}"
        if d_name not in src.shapes:
            raise CheckpointError(
                f"{m.tensors[name].file}: tensor {name!r} has no counterpart {d_name!r} in the base/post models "
                f"({src.label}); the model was not expanded from this base"
            )
        want = src.base_shape(d_name)
        if ms.shape != want or (parsed is not None and src.shapes[d_name] != want):
            raise CheckpointError(
                f"tensor {name!r} has shape {list(ms.shape)} in {m.tensors[name].file} but {d_name!r} has "
                f"{list(src.shapes[d_name])} in the base/post models ({src.label}); the model was not expanded from this base"
            )
        check_float(m, name)
        consumed.add(d_name)
        kinds[name] = ("layer", d_name) if parsed is not None else ("shared",)
        specs.append(TensorSpec(name, out_dtype_code(ms.dtype, dtype), src.shapes[d_name]))
    check_counterparts(src, consumed, m.path, "the model was not expanded from this base")
    return specs, kinds


def _steps(m: Checkpoint, src: DeltaSource, specs: list[TensorSpec], kinds: dict[str, Any], new_rows: str) -> Iterator[Step]:
    for s in specs:
        kind = kinds[s.name]
        if kind[0] == "copy":
            yield from copy_steps(m, s.name)
        elif kind[0] == "layer":  # Δ's tensor of the source layer, onto this output layer's
            yield from graft_steps(m, src, kind[1], new_rows, s.name)
        else:
            yield from graft_steps(m, src, s.name, new_rows)


def _config_changes(src: DeltaSource, sources: list[int]) -> dict[str, Any]:
    """Config fields P sets differently from B (token ids, ...), as they read in the expanded config."""
    cb = expanded_config(src.base_config, sources, source=f"{src.label} (base config)")
    cp = expanded_config(src.post_config, sources, source=f"{src.label} (post config)")
    return config_changes(cb, cp)


def _inputs(src: DeltaSource, described: list[dict[str, Any]], m: Checkpoint, expanded_from: dict[str, Any] | None,
            check_base: bool) -> dict[str, dict[str, Any]]:
    """The graft's recorded inputs; a (B, P) pair's B must be the model ``m`` was expanded from."""
    inputs = {"model": described[0]}
    if isinstance(src, PairDelta):
        inputs["base"], inputs["post"] = described[1], described[2]
        if check_base and expanded_from and expanded_from["sha256"] != described[1]["sha256"]:
            raise CheckpointError(
                f"{src.base.path}: sha256 {described[1]['sha256'][:16]}... differs from the dense model "
                f"{expanded_from['path']} that {m.path} was expanded from; graft needs that exact base. "
                "If it is the same model re-saved, pass --no-check-base"
            )
    else:
        inputs["delta"] = described[1]
        inputs.update(src.recorded_inputs)
    return inputs


def graft_expanded(
    model: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    base: str | os.PathLike[str] | None = None,
    post: str | os.PathLike[str] | None = None,
    delta: str | os.PathLike[str] | None = None,
    new_rows: str = "post",
    dtype: str = "auto",
    check_base: bool = True,
    force: bool = False,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    buffer_bytes: int | None = None,
    progress: bool = True,
    command: list[str] | None = None,
) -> Path:
    """Graft Δ = P − B (or the delta artifact ``delta``) onto the block-expanded ``model``; write ``out``.

    Output layers that came from original layer i get Δ's layer-i tensors, the new blocks are
    copied unchanged, and embeddings, final norm and LM head get their Δ once. ``new_rows``,
    ``dtype`` and ``check_base`` mean what they mean for :func:`deltamoe.ops.graft.graft`; the base
    is checked against the dense model ``model`` was expanded from.
    """
    check_dtype_arg(dtype)
    check_new_rows(new_rows)
    out_path = prepare_output(out, force=force, max_shard_bytes=max_shard_bytes)
    m = open_checkpoint(model)
    found = expand_block(m)
    if found is None:
        raise CheckpointError(f"{m.path}: no deltamoe.json with an 'expand' block; make the model with 'deltamoe expand'")
    m_manifest, block = found
    deltas = open_deltas(base, post, delta)
    src, to_hash = deltas.source(), deltas.checkpoints()
    _check_family(m, block, src)
    expanded_from = dense_input(m_manifest, EXPAND_STAGE)
    if check_base and expanded_from and isinstance(src, ArtifactDelta) and expanded_from["sha256"] != src.base_sha256:
        raise CheckpointError(
            f"{src.label}: this delta was extracted against the base {src.recorded_inputs['base']['path']}, but "
            f"{m.path} was expanded from {expanded_from['path']} (sha256 differs); extract the delta against that base"
        )
    refuse_new_rows(src, new_rows)
    specs, kinds = _plan(m, block, src, dtype)
    changes = _config_changes(src, block["sources"])

    def finish(hashes: list[dict[str, Any]]) -> Finished:
        inputs = _inputs(src, hashes, m, expanded_from, check_base)
        params = {
            "target": "expanded", "new_layers_get": "nothing (copied)", "new_rows": new_rows, "dtype": dtype,
            "check_base": check_base, "config_from_post": changes, "max_shard_bytes": max_shard_bytes,
            "added_rows": {n: [r, src.shapes[n][0]] for n, r in added_rows(src).items()},
        }
        manifest = new_manifest(m_manifest, stage="graft", params=params, inputs=inputs, command=command)
        return Finished(output_config(m.config, changes, dtype), manifest)

    stream_output(out_path, specs, _steps(m, src, specs, kinds, new_rows), inputs=[m, *to_hash], aux=src.aux,
                  finish=finish, desc="graft", force=force, max_shard_bytes=max_shard_bytes, buffer_bytes=buffer_bytes,
                  progress=progress)
    return out_path
