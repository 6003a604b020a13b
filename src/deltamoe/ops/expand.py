"""Block expansion (LLaMA-Pro), the parameter-matched dense baseline (docs/expand.md).

``expand_blocks`` writes a stock dense checkpoint of the same family with N new decoder blocks
interleaved among the L original ones. A new block is a copy of the original block it follows,
with its two output projections (attention ``o_proj`` and MLP ``down_proj``, weights and biases)
set to zero: the block then adds exactly 0 to the residual stream, so the expanded model
computes what the original computes. Dense CPT can then train only the new blocks
(``trainable.layers: new``) and the post-training delta can be grafted onto the original ones
(:func:`deltamoe.ops.expand_graft.graft_expanded`).

Placement: the k-th new block (k = 0..N−1) follows original layer ⌈(k+1)·L/N⌉ − 1. For N ≤ L
the originals fall into N consecutive groups whose sizes differ by at most one, with one new
block after each group (LLaMA-Pro's rule when N divides L); for N > L every original layer is
followed by ⌊N/L⌋ or ⌈N/L⌉ new blocks. The last original layer is always followed by one.

The copy streams like upcycle: every input tensor is read once, unchanged bytes go from file to
file in the kernel, and only the zeroed projections are generated.
"""

from __future__ import annotations

import math
import os
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from deltamoe import arch
from deltamoe._memory import return_large_frees_to_os
from deltamoe.io import DEFAULT_SHARD_BYTES, Checkpoint, ShardedWriter, TensorSpec, open_checkpoint, torch_dtype
from deltamoe.engine import byte_bar, check_finite_tensors
from deltamoe.errors import ArchitectureError, CheckpointError, UsageError
from deltamoe.ops.common import natural_key, prepare_output
from deltamoe.ops.upcycle import parse_layers, validate_dense
from deltamoe.io.output import Finished, write_output
from deltamoe.io.provenance import new_manifest, read_manifest

EXPAND_STAGE = "expand"
ATTENTION_OUT = "self_attn.o_proj"  # in every supported family (checked against transformers' model)
PER_LAYER_LISTS = ("layer_types",)  # config lists with one entry per decoder layer
PLACEMENT_RULE = "new block k (0-based) follows original layer ceil((k+1)*L/N) - 1"


# -- placement and layer names ----------------------------------------------------------
def placement(num_layers: int, blocks: int) -> list[int]:
    """For each new block k, the original layer it follows: ⌈(k+1)·L/N⌉ − 1."""
    if num_layers < 1 or blocks < 1:
        raise UsageError(f"placement needs L >= 1 and N >= 1, got L={num_layers}, N={blocks}")
    return [-(-(k + 1) * num_layers // blocks) - 1 for k in range(blocks)]


def layer_sources(num_layers: int, blocks: int) -> tuple[list[int], list[int]]:
    """(source original layer of every output layer, output indices of the new blocks)."""
    after = Counter(placement(num_layers, blocks))
    sources: list[int] = []
    new: list[int] = []
    for i in range(num_layers):
        sources.append(i)
        for _ in range(after[i]):
            new.append(len(sources))
            sources.append(i)
    return sources, new


def layer_prefix(spec: arch.ArchSpec) -> str:
    """The part of a decoder-layer tensor name before its index, e.g. ``model.layers.``."""
    tmpl = spec.dense_ffn["gate"]
    return tmpl[: tmpl.index("{layer}")]


def split_layer_name(name: str, prefix: str) -> tuple[int, str] | None:
    """``model.layers.3.mlp.up_proj.weight`` -> (3, ``mlp.up_proj.weight``); None outside the layers."""
    m = re.fullmatch(re.escape(prefix) + r"(\d+)\.(.+)", name)
    return (int(m[1]), m[2]) if m else None


def zeroed_modules(spec: arch.ArchSpec) -> tuple[str, str]:
    """The two output projections of a block, as module paths inside the block."""
    down = spec.dense_ffn["down"].split("{layer}.", 1)[1].removesuffix(".weight")
    return ATTENTION_OUT, down


def _is_zeroed(rest: str, zeroed: Sequence[str]) -> bool:
    return any(rest.startswith(z + ".") for z in zeroed)


# -- config ------------------------------------------------------------------------------
def expanded_config(config: Mapping[str, Any], sources: Sequence[int], *, source: str = "config.json") -> dict[str, Any]:
    """``config`` with ``len(sources)`` layers: per-layer lists follow each output layer's source,
    and ``max_window_layers`` (the first layers use full attention) keeps covering the same blocks."""
    n_orig = arch.num_layers(dict(config), source=source)
    out = dict(config)
    out["num_hidden_layers"] = len(sources)
    for key in PER_LAYER_LISTS:
        value = config.get(key)
        if value is None:
            continue
        if not isinstance(value, list) or len(value) != n_orig:
            raise ArchitectureError(f"{source}: {key} must list one entry per layer ({n_orig}), got {value!r}")
        out[key] = [value[i] for i in sources]
    mwl = config.get("max_window_layers")
    if isinstance(mwl, int):
        out["max_window_layers"] = sum(1 for i in sources if i < mwl) + max(0, mwl - n_orig)
    out.pop("_name_or_path", None)
    return out


def _layer_params(config: Mapping[str, Any], source: str) -> tuple[int, int, int]:
    """(layers, parameters of one decoder block, parameters of its FFN), from transformers' model."""
    spec = arch.arch_for(dict(config), source=source)
    prefix = layer_prefix(spec) + "0."
    ffn_module = spec.dense_ffn["gate"].format(layer=0).rsplit(".", 2)[0] + "."  # model.layers.0.mlp.
    shapes, _ = arch.expected_dense_tensors(dict(config), source=source)
    block = sum(math.prod(s) for n, s in shapes.items() if n.startswith(prefix))
    ffn = sum(math.prod(s) for n, s in shapes.items() if n.startswith(ffn_module))
    return arch.num_layers(dict(config), source=source), block, ffn


def blocks_matching(dense_config: Mapping[str, Any] | str | os.PathLike[str], num_experts: int,
                    layers: str | Sequence[int] | None = None) -> int:
    """New blocks N whose parameters match the new experts of an E-expert upcycle of ``layers``
    (as ``upcycle --layers``; default every layer).

    N = round((E − 1) · L · F / P), with L the upcycled layers, F the FFN parameters of one layer
    and P the parameters of one decoder block (attention, FFN, norms); halves round up, and N is at
    least 1. Routers (E · hidden per layer) are not counted, nor the identical frozen experts of a
    layer that a Mixtral upcycle keeps dense. ``dense_config`` is a config dict or a checkpoint.
    """
    if num_experts < 2:
        raise UsageError(f"--match-experts must be at least 2 (an MoE with one new expert or more), got {num_experts}")
    if isinstance(dense_config, Mapping):
        config, source = dict(dense_config), "config"
    else:
        ckpt = open_checkpoint(dense_config)
        config, source = ckpt.config, str(ckpt.path / "config.json")
    n_layers, block, ffn = _layer_params(config, source)
    moe_layers = n_layers if layers is None else len(parse_layers(layers, n_layers))
    num, den = (num_experts - 1) * moe_layers * ffn, block
    return max(1, (2 * num + den) // (2 * den))


# -- input checks ------------------------------------------------------------------------
def _moe_model_types() -> set[str]:
    return {s.moe_model_type for s in arch.families()}


def check_dense_input(ckpt: Checkpoint) -> arch.ArchSpec:
    """A dense checkpoint of a supported family, not an MoE and not expanded already."""
    source = str(ckpt.path / "config.json")
    manifest = read_manifest(ckpt.path) or {}
    mt = ckpt.config.get("model_type")
    if manifest.get("moe") or mt in _moe_model_types():
        raise ArchitectureError(
            f"{source}: model_type {mt!r} is a Mixture-of-Experts; expand takes a dense model (the base B)"
        )
    if manifest.get("expand"):
        raise CheckpointError(
            f"{ckpt.path / 'deltamoe.json'}: this model is block-expanded already (an 'expand' block); "
            "expand the original dense model instead"
        )
    if mt not in arch.supported_model_types():
        raise ArchitectureError(
            f"{source}: model_type {mt!r} is not supported; expand supports the dense families "
            + ", ".join(arch.supported_model_types())
        )
    for key, why in arch._FORBIDDEN_KEYS.items():
        if ckpt.config.get(key):
            raise ArchitectureError(f"{source}: field {key!r} is set; deltamoe cannot expand it ({why})")
    spec = arch.arch_for(ckpt.config, source=source)
    validate_dense(ckpt)
    return spec


def _plan(ckpt: Checkpoint, prefix: str, sources: list[int]) -> list[TensorSpec]:
    by_source: dict[int, list[int]] = {}
    for j, i in enumerate(sources):
        by_source.setdefault(i, []).append(j)
    specs: list[TensorSpec] = []
    for name in ckpt.keys():
        s = ckpt.spec(name)
        parsed = split_layer_name(name, prefix)
        if parsed is None:
            specs.append(s)
            continue
        i, rest = parsed
        specs += [TensorSpec(f"{prefix}{j}.{rest}", s.dtype, s.shape) for j in by_source[i]]
    return sorted(specs, key=lambda s: natural_key(s.name))


def _check_plan(specs: list[TensorSpec], cfg: dict[str, Any], zeroed: Sequence[str], prefix: str, source: str) -> None:
    """The expanded config implies exactly the planned tensors, and every block has both outputs."""
    shapes, optional = arch.expected_dense_tensors(cfg, source=f"{source} (expanded)")
    planned = {s.name: s.shape for s in specs}
    for z in zeroed:
        if f"{prefix}0.{z}.weight" not in shapes:
            raise ArchitectureError(f"{source}: the model has no {prefix}0.{z}.weight; cannot make identity blocks")
    bad = sorted(n for n in set(shapes) | set(planned) if planned.get(n) != shapes.get(n) and n not in optional)
    if bad:
        raise ArchitectureError(
            f"{source}: the expanded config does not match the expanded tensors (first: {bad[0]!r}: "
            f"planned {planned.get(bad[0])}, config implies {shapes.get(bad[0])})"
        )


# -- the operation -----------------------------------------------------------------------
def _write_tensors(ckpt: Checkpoint, writer: ShardedWriter, prefix: str, sources: list[int], new: set[int],
                   zeroed: Sequence[str], bar: Any) -> None:
    """Every input tensor once: to its own output and to each new block that copies its layer."""
    outputs: dict[int, list[int]] = {}
    for j, i in enumerate(sources):
        outputs.setdefault(i, []).append(j)
    for name in ckpt.keys():
        parsed = split_layer_name(name, prefix)
        if parsed is None:
            writer.copy_from(name, ckpt.tensors[name])
            bar.update(writer.spec(name).nbytes)
            continue
        i, rest = parsed
        for j in outputs[i]:
            target = f"{prefix}{j}.{rest}"
            s = writer.spec(target)
            if j in new and _is_zeroed(rest, zeroed):  # the identity block's output projections
                writer.write(target, torch.zeros(s.shape, dtype=torch_dtype(s.dtype)))
            else:  # unchanged bytes, copied in the kernel
                writer.copy_from(target, ckpt.tensors[name])
            bar.update(s.nbytes)


def expand_blocks(
    dense: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    blocks: int,
    force: bool = False,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    progress: bool = True,
    command: list[str] | None = None,
) -> Path:
    """Write ``dense`` with ``blocks`` new identity decoder blocks interleaved; return ``out``.

    The output is a stock dense checkpoint of the same family (config ``num_hidden_layers`` =
    L + N, per-layer config lists extended), tokenizer files copied, and a ``deltamoe.json``
    whose ``expand`` block lists each output layer's source and which layers are new.
    """
    if isinstance(blocks, bool) or not isinstance(blocks, int) or blocks < 1:
        raise UsageError(f"--blocks must be a positive integer, got {blocks!r}")
    out_path = prepare_output(out, force=force, max_shard_bytes=max_shard_bytes)
    return_large_frees_to_os()
    ckpt = open_checkpoint(dense)
    source = str(ckpt.path / "config.json")
    spec = check_dense_input(ckpt)
    n_orig = arch.num_layers(ckpt.config, source=source)
    sources, new_layers = layer_sources(n_orig, blocks)
    prefix, zeroed = layer_prefix(spec), zeroed_modules(spec)
    cfg = expanded_config(ckpt.config, sources, source=source)
    specs = _plan(ckpt, prefix, sources)
    _check_plan(specs, cfg, zeroed, prefix, source)
    info = {
        "family": ckpt.config.get("model_type"),
        "original_layers": n_orig,
        "new_blocks": blocks,
        "num_layers": len(sources),
        "placement": PLACEMENT_RULE,
        "sources": sources,
        "original_layer_outputs": [j for j, i in enumerate(sources) if j not in set(new_layers)],
        "new_layers": new_layers,
        "zeroed": list(zeroed),
        "layer_prefix": prefix,
    }
    params = {"blocks": blocks, "max_shard_bytes": max_shard_bytes}
    check_finite_tensors(ckpt)

    def tensors(writer: ShardedWriter) -> None:
        with byte_bar(sum(s.nbytes for s in specs), "expand", progress) as bar:
            _write_tensors(ckpt, writer, prefix, sources, set(new_layers), zeroed, bar)

    def finish(hashes: list[dict[str, Any]]) -> Finished:
        manifest = new_manifest(None, stage=EXPAND_STAGE, params=params, inputs={"dense": hashes[0]}, command=command)
        manifest["expand"] = info
        return Finished(cfg, manifest)

    write_output(out_path, specs, inputs=[ckpt], aux=ckpt, tensors=tensors, finish=finish, force=force,
                 max_shard_bytes=max_shard_bytes)
    return out_path
