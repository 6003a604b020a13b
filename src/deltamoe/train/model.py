"""The model of a training stage: loaded with one parameter per expert, mapped, watched, written back.

Loading (:func:`load_for_training`) replaces each MoE layer's fused experts module by
:class:`deltamoe.train.experts.SplitExperts` (one parameter per expert, so frozen experts are
ordinary frozen parameters; the kernel and why are in that module). The mapping between on-disk
tensor names (per-expert layout, from the ``names`` templates in ``deltamoe.json``) and in-memory
parameters is built once (:class:`Layout`), checked in both directions, and puts every parameter
in a group (:data:`GROUPS`; which groups train is decided by deltamoe.train.policy).
:class:`RouterCapture` records the routers' logits during a forward pass, for the routing losses
and statistics. :func:`write_trained_tensors` writes the trained weights back through the layout,
in the input's tensor order and dtypes; frozen tensors are copied from the input file after
checking that the trained model still holds exactly those values (the output directory around
them is written by deltamoe.train.output).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from deltamoe.io import DEFAULT_SHARD_BYTES, Checkpoint, ShardedWriter, torch_dtype
from deltamoe.errors import ArchitectureError, CheckpointError
from deltamoe.io.output import write_shards
from deltamoe.train.experts import SplitExperts

# Parameter groups. Which ones train is decided by deltamoe.train.policy.
ORIGINAL_EXPERT = "original_expert"  # expert 0 of an MoE layer: B's FFN, always frozen
NEW_EXPERT = "new_expert"
ROUTER = "router"
REPLICATED_FFN = "replicated_ffn"  # experts and zero router of a layer the user kept dense: always frozen
DENSE_FFN = "dense_ffn"  # the FFN of a layer that the architecture keeps dense (Qwen mlp_only_layers)
INERT = "inert"  # tensors that must stay zero (Qwen2-MoE shared expert)
ATTENTION = "attention"
NORM = "norm"
EMBEDDING = "embedding"  # input embeddings and LM head
GROUPS = (ORIGINAL_EXPERT, NEW_EXPERT, ROUTER, REPLICATED_FFN, DENSE_FFN, INERT, ATTENTION, NORM, EMBEDDING)


@dataclass
class MoELayer:
    index: int
    block: str  # in-memory path of the sparse MoE block, e.g. "model.layers.3.mlp"
    router: nn.Module
    router_param: str
    experts: SplitExperts
    replicated: bool  # a layer the user kept dense (E identical experts, zero router)


@dataclass
class Layout:
    """Where every tensor of the checkpoint lives in memory, and which group it belongs to."""

    num_experts: int
    top_k: int
    intermediate: dict[int, int]
    layers: list[MoELayer]
    moe_layers: list[int]
    original_experts: list[int]
    # on-disk name -> (in-memory parameter/buffer name, row slice of it or None)
    disk_to_mem: dict[str, tuple[str, tuple[int, int] | None]] = field(default_factory=dict)
    # in-memory parameter name -> group
    groups: dict[str, str] = field(default_factory=dict)

    @property
    def routed_layers(self) -> list[MoELayer]:
        """The MoE layers proper (not replicated): the ones losses and routing statistics cover."""
        return [lay for lay in self.layers if not lay.replicated]


def _template_attr(template: str, before: str) -> str:
    """The attribute name just before ``before`` in a dotted name template."""
    parts = template.split(".")
    try:
        return parts[parts.index(before) - 1]
    except (ValueError, IndexError):
        raise ArchitectureError(f"deltamoe.json: name template {template!r} has no {before!r} part") from None


def _find_block(layer: nn.Module, experts_attr: str) -> tuple[str, nn.Module] | None:
    for name, mod in layer.named_modules():
        sub = getattr(mod, experts_attr, None)
        if isinstance(sub, nn.Module) and hasattr(sub, "gate_up_proj") and hasattr(sub, "down_proj"):
            return name, mod
    return None


def _is_norm(module: nn.Module) -> bool:
    return "norm" in type(module).__name__.lower()


def split_and_map(
    model: nn.Module, moe: Mapping[str, Any] | None, ckpt: Checkpoint, *, experts_implementation: str = "auto"
) -> Layout:
    """Replace every fused experts module by :class:`SplitExperts`; map and classify every tensor.

    ``moe`` is the ``moe`` block of ``deltamoe.json``, or None for a dense model (which must then
    have no experts). Raises if any on-disk tensor has no in-memory counterpart of the same shape
    or vice versa.
    """
    if moe is None:
        for name, mod in model.named_modules():
            if hasattr(mod, "gate_up_proj"):
                raise CheckpointError(f"{ckpt.path}: an MoE model ({name} holds experts), where a dense one is needed")
        layout = Layout(0, 0, {}, [], [], [])
        _classify_and_map(model, ckpt, layout, {}, {})
        return layout
    names = moe["names"]
    experts_attr = _template_attr(names["expert_ffn"]["gate"], "{expert}")
    router_attr = _template_attr(names["router"], "weight")
    num_experts, top_k = int(moe["num_experts"]), int(moe["top_k"])
    moe_layers = [int(x) for x in moe["moe_layers"]]
    replicated = [int(x) for x in moe.get("replicated_layers", [])]
    original = [int(x) for x in moe.get("original_experts", [0])]
    base = model.base_model
    prefix = model.base_model_prefix
    decoder_layers = getattr(base, "layers", None)
    if not isinstance(decoder_layers, nn.ModuleList):
        raise ArchitectureError(f"{type(model).__name__}: cannot find the decoder layers (no {prefix}.layers)")

    layout = Layout(num_experts, top_k, {}, [], moe_layers, original)
    groups: dict[str, str] = {}
    expected = sorted(set(moe_layers) | set(replicated))
    for i, dec in enumerate(decoder_layers):
        found = _find_block(dec, experts_attr)
        lp = f"{prefix}.layers.{i}"
        if found is None:
            if i in expected:
                raise CheckpointError(
                    f"{ckpt.path}: deltamoe.json lists layer {i} as MoE, but the model has no experts there"
                )
            continue
        if i not in expected:
            raise CheckpointError(f"{ckpt.path}: layer {i} is an MoE layer, but deltamoe.json does not list it")
        bname, block = found
        fused = getattr(block, experts_attr)
        router = getattr(block, router_attr, None)
        if router is None or tuple(router.weight.shape) != (num_experts, fused.gate_up_proj.shape[-1]):
            raise ArchitectureError(f"{lp}.{bname}: no router '{router_attr}' of shape [{num_experts}, hidden]")
        if fused.gate_up_proj.shape[0] != num_experts:
            raise CheckpointError(
                f"{lp}: {fused.gate_up_proj.shape[0]} experts in memory, deltamoe.json says {num_experts}"
            )
        split = SplitExperts(fused.gate_up_proj.data, fused.down_proj.data, fused.act_fn, experts_implementation)
        setattr(block, experts_attr, split)  # the fused parameters are freed here
        del fused
        block_path = f"{lp}.{bname}"
        rparam = f"{block_path}.{router_attr}.weight"
        layout.layers.append(MoELayer(i, block_path, router, rparam, split, i in replicated))
        layout.intermediate[i] = split.intermediate_dim
        for e in range(num_experts):
            g = REPLICATED_FFN if i in replicated else (ORIGINAL_EXPERT if e in original else NEW_EXPERT)
            groups[f"{block_path}.{experts_attr}.gate_up_{e}"] = g
            groups[f"{block_path}.{experts_attr}.down_{e}"] = g
        groups[rparam] = REPLICATED_FFN if i in replicated else ROUTER
        for pname, _ in block.named_parameters(remove_duplicate=False):
            full = f"{block_path}.{pname}"
            groups.setdefault(full, INERT)  # anything else in the MoE block: shared expert and its gate

    _classify_and_map(model, ckpt, layout, groups, _expert_names(layout, names, experts_attr))
    return layout


def _expert_names(layout: Layout, names: Mapping[str, Any], experts_attr: str
                  ) -> dict[str, tuple[str, tuple[int, int] | None]]:
    """On-disk name -> (in-memory parameter, row slice or None) of every expert and router tensor:
    an expert's gate and up projections are the two halves of its ``gate_up_{e}``."""
    tmpl = names["expert_ffn"]
    special: dict[str, tuple[str, tuple[int, int] | None]] = {}
    for lay in layout.layers:
        i, inter = lay.index, layout.intermediate[lay.index]
        ep = f"{lay.block}.{experts_attr}"
        for e in range(layout.num_experts):
            special[tmpl["gate"].format(layer=i, expert=e)] = (f"{ep}.gate_up_{e}", (0, inter))
            special[tmpl["up"].format(layer=i, expert=e)] = (f"{ep}.gate_up_{e}", (inter, 2 * inter))
            special[tmpl["down"].format(layer=i, expert=e)] = (f"{ep}.down_{e}", None)
        special[names["router"].format(layer=i)] = (lay.router_param, None)
    return special


def _classify_and_map(
    model: nn.Module,
    ckpt: Checkpoint,
    layout: Layout,
    groups: dict[str, str],
    special: Mapping[str, tuple[str, tuple[int, int] | None]],
) -> None:
    """Group every parameter not grouped yet; map every on-disk tensor to memory (``special``
    names the ones stored under another name or as a slice), checking shapes both ways."""
    # every other parameter, by the kind of module that owns it
    embed_ids = {
        id(p)
        for m in (model.get_input_embeddings(), model.get_output_embeddings())
        if m is not None
        for p in m.parameters()
    }
    for mname, mod in model.named_modules():
        for pname, p in mod.named_parameters(recurse=False, remove_duplicate=False):
            full = f"{mname}.{pname}" if mname else pname
            if full in groups:
                continue
            if id(p) in embed_ids:
                groups[full] = EMBEDDING
            elif _is_norm(mod):
                groups[full] = NORM
            elif ".self_attn." in f".{full}":
                groups[full] = ATTENTION
            elif ".mlp." in f".{full}":
                groups[full] = DENSE_FFN
            else:
                raise ArchitectureError(
                    f"{type(model).__name__}: parameter {full!r} is of no known kind (attention, norm, embedding, "
                    "FFN); deltamoe cannot decide whether it trains"
                )
    layout.groups = groups

    # disk <-> memory
    mem_params = dict(model.named_parameters(remove_duplicate=False))
    mem_buffers = {n: b for n, b in model.named_buffers() if n in model.state_dict()}
    covered: set[str] = set()
    for disk in ckpt.keys():
        mem, rows = special.get(disk, (disk, None))
        t = mem_params.get(mem, mem_buffers.get(mem))
        if t is None:
            raise CheckpointError(f"{ckpt.tensors[disk].file}: tensor {disk!r} has no counterpart in the loaded model")
        shape = tuple(t.shape) if rows is None else (rows[1] - rows[0], *t.shape[1:])
        if shape != ckpt.spec(disk).shape:
            raise CheckpointError(
                f"{ckpt.tensors[disk].file}: tensor {disk!r} has shape {list(ckpt.spec(disk).shape)}, "
                f"the model's {mem!r} has {list(shape)}"
            )
        layout.disk_to_mem[disk] = (mem, rows)
        covered.add(mem)
    owners = {id(p): n for n, p in mem_params.items() if n in covered}
    missing = sorted(n for n, p in mem_params.items() if n not in covered and id(p) not in owners)
    if missing:
        raise CheckpointError(
            f"{ckpt.path}: the model has parameter(s) {missing[:5]} that the checkpoint does not hold"
        )


def load_for_training(
    ckpt: Checkpoint, moe: Mapping[str, Any] | None, *, progress: bool = True, experts_implementation: str = "auto"
) -> tuple[nn.Module, Layout]:
    """Load the model in float32 (exact for bf16/fp16 checkpoints), split its experts and map it.

    ``moe``: the ``moe`` block of ``deltamoe.json``, or None for a dense model.
    """
    import transformers
    from transformers import AutoModelForCausalLM

    if int(transformers.__version__.split(".")[0]) < 5:
        raise ArchitectureError(
            f"training needs transformers >= 5 (fused experts, router modules); found {transformers.__version__}"
        )
    arch = (moe or {}).get("architecture")
    got = (ckpt.config.get("architectures") or [None])[0]
    if arch and got != arch:
        raise CheckpointError(f"{ckpt.path}: config.json says {got}, deltamoe.json says {arch}")
    from transformers.utils import logging as hf_logging

    bar_was_on = hf_logging.is_progress_bar_enabled()
    if not progress:
        hf_logging.disable_progress_bar()
    try:
        model = AutoModelForCausalLM.from_pretrained(ckpt.path, dtype=torch.float32)
    except Exception as e:  # transformers raises many types for a bad directory
        raise CheckpointError(f"{ckpt.path}: transformers cannot load this model: {type(e).__name__}: {e}") from None
    finally:
        if bar_was_on:
            hf_logging.enable_progress_bar()
    model.config.use_cache = False
    layout = split_and_map(model, moe, ckpt, experts_implementation=experts_implementation)
    # a cheap spot check that the mapping reads the right bytes: routers and one expert 0
    state = dict(model.named_parameters(remove_duplicate=False))
    for lay in layout.layers[:1]:
        names = moe["names"]  # type: ignore[index]  # layers exist only for an MoE
        for disk in (
            names["router"].format(layer=lay.index),
            names["expert_ffn"]["up"].format(layer=lay.index, expert=0),
        ):
            mem, rows = layout.disk_to_mem[disk]
            t = state[mem] if rows is None else state[mem][rows[0] : rows[1]]
            if t.is_meta:  # FSDP's low-memory loading: only rank 0 holds the weights
                continue
            if not torch.equal(t, ckpt.read(disk).to(t.dtype)):
                raise CheckpointError(f"{ckpt.path}: loaded {mem!r} differs from the stored {disk!r}; layout mismatch")
    return model, layout


@dataclass
class RouterCapture:
    """Collect router logits [T, E] of the MoE layers during a forward pass (forward hooks).

    Only records while active, so that gradient-checkpointing recomputation during backward
    does not overwrite what the loss was computed from.
    """

    layers: list[MoELayer]
    logits: dict[int, torch.Tensor] = field(default_factory=dict)
    active: bool = False
    _handles: list[Any] = field(default_factory=list)

    def __post_init__(self) -> None:
        for lay in self.layers:
            self._handles.append(lay.router.register_forward_hook(self._hook(lay.index)))

    def _hook(self, index: int) -> Any:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            if self.active:
                self.logits[index] = output[0] if isinstance(output, tuple) else output

        return hook

    @contextmanager
    def capture(self) -> Iterator[dict[int, torch.Tensor]]:
        self.logits = {}
        self.active = True
        try:
            yield self.logits
        finally:
            self.active = False

    def ordered(self) -> list[torch.Tensor]:
        missing = [lay.index for lay in self.layers if lay.index not in self.logits]
        if missing:
            raise RuntimeError(f"router logits of layer(s) {missing} were not captured")
        return [self.logits[lay.index] for lay in self.layers]

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


def _bits(t: torch.Tensor) -> torch.Tensor:
    """Integer view for bitwise comparison (NaN-safe, -0.0 != 0.0)."""
    ints = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
    return t.contiguous().view(ints[t.element_size()])


def write_trained_tensors(
    writer: ShardedWriter,
    ckpt: Checkpoint,
    layout: Layout,
    state: Mapping[str, torch.Tensor],
    trainable: set[str],
) -> dict[str, int]:
    """Write the trained weights in the input's names, order and dtypes (``writer`` plans
    ``ckpt``'s tensors, in its order).

    ``state`` maps in-memory names to tensors (a full state dict). Trainable tensors come from
    ``state`` cast to their stored dtype; frozen ones are copied from the input after checking
    that ``state`` still holds exactly their values (skipped only where the in-memory dtype is
    narrower than the stored one, e.g. ZeRO-3 bf16 weights of a float32 checkpoint).
    Returns counts: {"trained": n, "frozen_verified": n, "frozen_unverified": n}.
    """
    counts = {"trained": 0, "frozen_verified": 0, "frozen_unverified": 0}
    for name in ckpt.keys():
        mem, rows = layout.disk_to_mem[name]
        value = state[mem]
        if rows is not None:
            value = value[rows[0] : rows[1]]
        stored_dtype = ckpt.spec(name).dtype
        if mem in trainable:
            writer.write(name, value.detach().to("cpu", torch_dtype(stored_dtype)).contiguous())
            counts["trained"] += 1
            continue
        disk = ckpt.read(name)
        if value.dtype == torch.float32 or value.dtype == disk.dtype or value.dtype == torch.float64:
            if not torch.equal(_bits(value.detach().to("cpu", disk.dtype)), _bits(disk)):
                raise RuntimeError(
                    f"frozen tensor {name!r} ({mem}) changed during training; this is a deltamoe bug, "
                    "please report it"
                )
            counts["frozen_verified"] += 1
        else:
            counts["frozen_unverified"] += 1
        writer.write(name, disk)
    return counts


def write_trained(
    ckpt: Checkpoint,
    layout: Layout,
    state: Mapping[str, torch.Tensor],
    trainable: set[str],
    directory: str | os.PathLike[str],
    *,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
) -> dict[str, int]:
    """:func:`write_trained_tensors` into ``directory``: the shards and their index alone."""
    specs = [ckpt.spec(n) for n in ckpt.keys()]
    return write_shards(directory, specs, lambda w: write_trained_tensors(w, ckpt, layout, state, trainable),
                        max_shard_bytes=max_shard_bytes)
