"""The experts of one MoE layer with one parameter per expert, and their grouped-GEMM kernel.

transformers 5.x holds all experts of a layer in ONE fused parameter per projection
(``experts.gate_up_proj`` [E, 2I, H], ``experts.down_proj`` [E, H, I]). A fused parameter can
only be trained as a whole: autograd computes the gradient of every slice, AdamW decays every
element, and Adam moves any element whose optimizer state is non-zero. Masking all three paths
is possible but fragile. Instead each MoE layer's experts module is replaced (by
:func:`deltamoe.train.model.split_and_map`) by :class:`SplitExperts`, which owns one parameter per
expert (``gate_up_{e}`` [2I, H] and ``down_{e}`` [H, I]; direct parameters of the module, so
DeepSpeed ZeRO-3 gathers them when the module runs). Frozen experts are then ordinary parameters
with ``requires_grad=False``: no gradient is computed for them, they never enter the optimizer,
and DDP/FSDP ignore them. Two forward implementations (``experts_implementation`` of the
training config):

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
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from deltamoe.errors import ArchitectureError

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
