"""Loading an upcycled MoE for training, and writing the trained one back in the upcycle format.

transformers 5.x holds all experts of a layer in ONE fused parameter per projection
(``experts.gate_up_proj`` [E, 2I, H], ``experts.down_proj`` [E, H, I]). A fused parameter can
only be trained as a whole: autograd computes the gradient of every slice, AdamW decays every
element, and Adam moves any element whose optimizer state is non-zero. Masking all three paths
is possible but fragile. Instead each MoE layer's experts module is replaced by
:class:`SplitExperts`, which owns one parameter per expert (``gate_up_{e}`` [2I, H] and
``down_{e}`` [H, I]; direct parameters of the module, so DeepSpeed ZeRO-3 gathers them when the
module runs). Frozen experts are then ordinary parameters with ``requires_grad=False``:
no gradient is computed for them, they never enter the optimizer, and DDP/FSDP ignore them.
Two forward implementations (``experts_implementation`` of the training config):

- ``eager``: what the stock transformers eager expert loop computes, with the same matrix
  products on the same rows in the same order, so outputs are bit-identical to
  ``experts_implementation="eager"`` (tested); it sorts the tokens by expert once instead of
  searching the routing mask once per expert.
- ``grouped_mm``: one grouped GEMM per projection over all experts (``torch.nn.functional.
  grouped_mm``, the kernel behind transformers' default ``grouped_mm`` experts), through
  :class:`_GroupedLinear`, an autograd function that stacks the per-expert parameters only
  for the duration of each product (nothing stacked is kept for backward) and computes weight
  gradients only for experts that train. Same values as eager up to summation order.
- ``auto`` (default): ``grouped_mm`` on CUDA where the kernel takes the shapes and dtype, else
  ``eager``.

The mapping between on-disk tensor names (per-expert layout, from the ``names`` templates in
``deltamoe.json``) and in-memory parameters is built once (:class:`Layout`) and checked in both
directions; the output is written with :class:`deltamoe.checkpoint.ShardedWriter` in the
input's tensor order and dtypes. Frozen tensors are copied from the input file after checking
that the trained model still holds exactly those values.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from deltamoe.checkpoint import DEFAULT_SHARD_BYTES, Checkpoint, ShardedWriter
from deltamoe.errors import ArchitectureError, CheckpointError

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


EXPERTS_IMPLEMENTATIONS = ("auto", "grouped_mm", "eager")
_grouped_mm = getattr(nn.functional, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


class _GroupedLinear(torch.autograd.Function):
    """``out[rows of expert e] = x[rows of expert e] @ W_e.T`` for all experts in one grouped GEMM.

    ``x`` [S, K] is sorted by expert, ``offs`` [E] int32 holds the cumulative row counts, and
    ``weights`` are the E per-expert parameters [N, K]. The stacked [E, N, K] weight exists
    only inside forward and backward (autograd keeps references to the parameters, not a
    stacked copy), and the weight gradient is computed only when some expert needs one; frozen
    experts get None. Under autocast, computes in the autocast dtype and returns gradients in
    each input's own dtype.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, offs: torch.Tensor, dtype: torch.dtype, *weights: torch.Tensor) -> torch.Tensor:
        w = torch.stack([t.to(dtype) for t in weights])
        ctx.save_for_backward(x, offs, *weights)
        ctx.dtype = dtype
        return _grouped_mm(x.to(dtype), w.transpose(-2, -1), offs=offs)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, offs, *weights = ctx.saved_tensors
        grad = grad.to(ctx.dtype).contiguous()
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            w = torch.stack([t.to(ctx.dtype) for t in weights])
            grad_x = _grouped_mm(grad, w, offs=offs).to(x.dtype)
            del w
        wants = ctx.needs_input_grad[3:]
        if any(wants):
            # [N, S] x [S, K] grouped along S -> [E, N, K]; rows past offs[-1] (none here) are skipped
            grad_w = _grouped_mm(grad.t(), x.to(ctx.dtype), offs=offs)
        grads_w = [
            grad_w[e].to(weights[e].dtype) if want else None for e, want in enumerate(wants)
        ]
        return (grad_x, None, None, *grads_w)


def _grouped_aligned(dims: tuple[int, ...], dtype: torch.dtype) -> bool:
    """The grouped kernel needs 16-byte aligned rows."""
    size = torch.empty((), dtype=dtype).element_size()
    return all(d * size % 16 == 0 for d in dims)


class SplitExperts(nn.Module):
    """The experts of one MoE layer, one parameter per expert and projection.

    Drop-in for transformers' fused experts module: ``forward(hidden [T, H], top_k_index [T, K],
    top_k_weights [T, K]) -> [T, H]``. Every expert runs on every call (an expert that got no
    token runs on an empty batch), so each trainable parameter gets a gradient, possibly zero,
    on every step: DDP needs no ``find_unused_parameters``.
    """

    def __init__(
        self, gate_up: torch.Tensor, down: torch.Tensor, act_fn: nn.Module, implementation: str = "auto"
    ):
        super().__init__()
        if implementation not in EXPERTS_IMPLEMENTATIONS:
            raise ValueError(f"experts_implementation: {implementation!r} is not one of {EXPERTS_IMPLEMENTATIONS}")
        self.implementation = implementation
        self.num_experts = gate_up.shape[0]
        self.intermediate_dim = gate_up.shape[1] // 2
        # clone(): each expert owns its storage, so the fused tensor can be freed
        for e in range(self.num_experts):
            self.register_parameter(f"gate_up_{e}", nn.Parameter(gate_up[e].clone()))
            self.register_parameter(f"down_{e}", nn.Parameter(down[e].clone()))
        self.act_fn = act_fn

    def gate_up(self, e: int) -> nn.Parameter:
        return getattr(self, f"gate_up_{e}")

    def down(self, e: int) -> nn.Parameter:
        return getattr(self, f"down_{e}")

    def _use_grouped(self, x: torch.Tensor) -> bool:
        """auto: the grouped kernel on CUDA with bf16 compute and aligned shapes. grouped_mm: the
        grouped kernel wherever torch has it (on the CPU too, where it is mostly useful for
        tests), or a clear error."""
        if self.implementation == "eager":
            return False
        dtype = _compute_dtype(x)
        dims = (x.shape[-1], self.intermediate_dim)
        if self.implementation == "auto":
            return (
                _grouped_mm is not None
                and x.device.type == "cuda"
                and dtype == torch.bfloat16
                and _grouped_aligned(dims, dtype)
            )
        if _grouped_mm is None:
            raise ArchitectureError(f"experts_implementation grouped_mm: torch {torch.__version__} has no grouped_mm; "
                                    "use auto or eager")
        if not _grouped_aligned(dims, dtype):
            raise ArchitectureError(
                f"experts_implementation grouped_mm: hidden {dims[0]} and intermediate {dims[1]} must be multiples "
                f"of {16 // torch.empty((), dtype=dtype).element_size()} for {dtype}; use auto or eager"
            )
        return True

    def forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        num_tokens = hidden_states.shape[0]
        if self._use_grouped(hidden_states):
            return self._forward_grouped(hidden_states, top_k_index, top_k_weights)
        final = torch.zeros_like(hidden_states)
        with torch.no_grad():
            # Sort the (token, slot) pairs by expert once, instead of one torch.where per expert
            # (each a host-device sync on a GPU). A stable sort of the slot-major flattening
            # keeps the eager loop's order within each expert ([K, T] mask, where() row-major),
            # so every expert multiplies the same rows in the same order: bit-identical outputs.
            flat = top_k_index.t().reshape(-1)
            experts, order = torch.sort(flat, stable=True)
            # expert e's pairs are experts[bounds[e]:bounds[e + 1]] (searchsorted, unlike
            # bincount, is allowed under torch.use_deterministic_algorithms on CUDA)
            edges = torch.arange(self.num_experts + 1, device=flat.device, dtype=flat.dtype)
            counts = torch.searchsorted(experts, edges).diff().tolist()  # the one host sync
            token_idx, top_k_pos = order % num_tokens, order // num_tokens
        x_all = hidden_states[token_idx]
        w_all = top_k_weights[token_idx, top_k_pos, None]
        start = 0
        for e, n in enumerate(counts):
            end = start + n
            gate, up = nn.functional.linear(x_all[start:end], self.gate_up(e)).chunk(2, dim=-1)
            h = nn.functional.linear(self.act_fn(gate) * up, self.down(e))
            h = h * w_all[start:end]
            final.index_add_(0, token_idx[start:end], h.to(final.dtype))
            start = end
        return final

    def _forward_grouped(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        num_tokens, hidden = hidden_states.shape
        top_k = top_k_index.shape[1]
        dtype = _compute_dtype(hidden_states)
        with torch.no_grad():
            flat = top_k_index.t().reshape(-1)  # slot-major: pair p = k * T + t
            experts, order = torch.sort(flat, stable=True)
            edges = torch.arange(1, self.num_experts + 1, device=flat.device, dtype=flat.dtype)
            offs = torch.searchsorted(experts, edges).to(torch.int32)  # no host sync
            token_idx, top_k_pos = order % num_tokens, order // num_tokens
        x = hidden_states[token_idx]
        w = top_k_weights[token_idx, top_k_pos, None]
        gate_up = [self.gate_up(e) for e in range(self.num_experts)]
        down = [self.down(e) for e in range(self.num_experts)]
        gate, up = _GroupedLinear.apply(x, offs, dtype, *gate_up).chunk(2, dim=-1)
        h = _GroupedLinear.apply(self.act_fn(gate) * up, offs, dtype, *down) * w.to(dtype)
        # back to slot-major pair order (a permutation: deterministic), then sum the K slots in
        # the hidden states' dtype (float32 under mixed precision, as the eager loop accumulates)
        h = h.to(hidden_states.dtype)
        h = h.new_empty(h.shape).index_copy(0, order, h)
        return h.view(top_k, num_tokens, hidden).sum(dim=0)


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

    tmpl = names["expert_ffn"]
    special: dict[str, tuple[str, tuple[int, int] | None]] = {}
    for lay in layout.layers:
        i, inter = lay.index, layout.intermediate[lay.index]
        ep = f"{lay.block}.{experts_attr}"
        for e in range(num_experts):
            special[tmpl["gate"].format(layer=i, expert=e)] = (f"{ep}.gate_up_{e}", (0, inter))
            special[tmpl["up"].format(layer=i, expert=e)] = (f"{ep}.gate_up_{e}", (inter, 2 * inter))
            special[tmpl["down"].format(layer=i, expert=e)] = (f"{ep}.down_{e}", None)
        special[names["router"].format(layer=i)] = (lay.router_param, None)
    _classify_and_map(model, ckpt, layout, groups, special)
    return layout


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


def write_trained(
    ckpt: Checkpoint,
    layout: Layout,
    state: Mapping[str, torch.Tensor],
    trainable: set[str],
    directory: str | os.PathLike[str],
    *,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
) -> dict[str, int]:
    """Write the trained weights in the input's names, order and dtypes.

    ``state`` maps in-memory names to tensors (a full state dict). Trainable tensors come from
    ``state`` cast to their stored dtype; frozen ones are copied from the input after checking
    that ``state`` still holds exactly their values (skipped only where the in-memory dtype is
    narrower than the stored one, e.g. ZeRO-3 bf16 weights of a float32 checkpoint).
    Returns counts: {"trained": n, "frozen_verified": n, "frozen_unverified": n}.
    """
    specs = [ckpt.spec(n) for n in ckpt.keys()]
    writer = ShardedWriter(directory, specs, max_shard_bytes=max_shard_bytes)
    counts = {"trained": 0, "frozen_verified": 0, "frozen_unverified": 0}
    try:
        for spec in specs:
            mem, rows = layout.disk_to_mem[spec.name]
            value = state[mem]
            if rows is not None:
                value = value[rows[0] : rows[1]]
            stored_dtype = ckpt.spec(spec.name).dtype
            if mem in trainable:
                from deltamoe.checkpoint import torch_dtype

                writer.write(spec.name, value.detach().to("cpu", torch_dtype(stored_dtype)).contiguous())
                counts["trained"] += 1
                continue
            disk = ckpt.read(spec.name)
            if value.dtype == torch.float32 or value.dtype == disk.dtype or value.dtype == torch.float64:
                if not torch.equal(_bits(value.detach().to("cpu", disk.dtype)), _bits(disk)):
                    raise RuntimeError(
                        f"frozen tensor {spec.name!r} ({mem}) changed during training; this is a deltamoe bug, "
                        "please report it"
                    )
                counts["frozen_verified"] += 1
            else:
                counts["frozen_unverified"] += 1
            writer.write(spec.name, disk)
        writer.close()
    except BaseException:
        writer.abort()
        raise
    return counts
