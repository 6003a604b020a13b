"""The distributed engines of a training stage: DDP, FSDP2 and DeepSpeed ZeRO-3.

``distributed.engine`` of the training config chooses one:

- ``ddp``: accelerate's DDP (or one plain process); every process holds the whole model.
- ``fsdp2``: PyTorch's own FSDP2, applied here as torchtitan does: ``fully_shard`` on every decoder
  layer, then on the root (embeddings, final norm, LM head). It runs under ``torchrun`` on GPUs
  (NCCL) and on CPU processes (gloo), so it is tested like DDP. FSDP2 shards each parameter on
  its own (dim 0 across processes), so the per-expert parameters and the frozen ones (expert 0,
  attention, ...) share a layer's unit without any flattening: frozen parameters get no gradient
  and stay bit-identical. Resumable checkpoints are sharded (``torch.distributed.checkpoint``:
  trainable parameters and AdamW state, each process writing its shards), and load on any
  process count. The output is gathered to the main process (``get_model_state_dict``, full
  state dict, CPU offload) and written as the same stock HF checkpoint as from DDP.
- ``zero3``: accelerate's DeepSpeed integration, launched with
  ``accelerate launch --config_file recipes/accelerate/zero3.yaml``.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from deltamoe.errors import CheckpointError, UsageError

ENGINES = ("ddp", "fsdp2", "zero3")
# format of the resumable checkpoints each engine writes
CHECKPOINT_FORMAT = {"ddp": "deltamoe", "fsdp2": "dcp", "zero3": "accelerate"}


def _asked(kind: str) -> bool:
    return os.environ.get(f"ACCELERATE_USE_{kind}", "false").lower() == "true"


def check_engine(engine: str) -> None:
    """Before any work: is the engine available, and does the launcher agree with the config?"""
    if _asked("FSDP"):
        raise UsageError(
            "the accelerate config asks for FSDP; deltamoe applies FSDP2 itself: set distributed.engine: fsdp2 "
            "in the training config and launch with torchrun (or accelerate launch without an FSDP config)"
        )
    if engine == "zero3":
        if importlib.util.find_spec("deepspeed") is None:
            raise UsageError("distributed.engine zero3: DeepSpeed is not installed (pip install deepspeed)")
        if not _asked("DEEPSPEED"):
            raise UsageError(
                "distributed.engine zero3 needs DeepSpeed through accelerate: "
                "accelerate launch --config_file recipes/accelerate/zero3.yaml -m deltamoe train CONFIG"
            )
    elif _asked("DEEPSPEED"):
        raise UsageError(
            f"the accelerate config asks for DeepSpeed, but the training config says distributed.engine: {engine}; "
            "set distributed.engine: zero3"
        )
    if engine == "fsdp2":
        try:
            from torch.distributed.fsdp import fully_shard
        except ImportError:
            fully_shard = None
        if fully_shard is None:
            raise UsageError(
                f"distributed.engine fsdp2: torch {torch.__version__} has no torch.distributed.fsdp.fully_shard "
                "(torch >= 2.6 needed); use distributed.engine: ddp"
            )
        if not torch.distributed.is_available():
            raise UsageError(f"distributed.engine fsdp2: this torch build ({torch.__version__}) has no torch.distributed")


def _process_group(device: torch.device) -> None:
    """FSDP2 needs a process group even for one process (accelerate makes one only for several)."""
    import torch.distributed as dist

    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    layers = getattr(model.base_model, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise UsageError(f"distributed.engine fsdp2: cannot find the decoder layers of {type(model).__name__}")
    return layers


def shard(model: nn.Module, device: torch.device, world: int) -> nn.Module:
    """FSDP2: ``fully_shard`` on every decoder layer, then on the root (in place)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    _process_group(device)
    model.to(device)
    mesh = init_device_mesh(device.type, (world,))
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=mesh, reshard_after_forward=True)
    fully_shard(model, mesh=mesh, reshard_after_forward=True)
    return model


def _local(t: Any) -> Any:
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def clip_grad_norm(params: list[torch.Tensor], max_norm: float) -> float:
    """Clip the global gradient norm of sharded (DTensor) gradients; return the norm."""
    return float(_local(torch.nn.utils.clip_grad_norm_(params, max_norm)))


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's state, gathered on the main process (an empty dict elsewhere)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def _options() -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    # frozen parameters are not checkpointed: they are the input checkpoint's, bit for bit
    return StateDictOptions(ignore_frozen_params=True, strict=False)


def _inner(optimizer: Any) -> torch.optim.Optimizer:
    while hasattr(optimizer, "optimizer"):  # accelerate's wrapper
        optimizer = optimizer.optimizer
    return optimizer


def save_sharded(directory: Path, model: nn.Module, optimizer: Any) -> None:
    """Every process writes its shards of the trainable parameters and AdamW state (collective)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    msd, osd = get_state_dict(model, _inner(optimizer), options=_options())
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(directory))


def load_sharded(directory: Path, model: nn.Module, optimizer: Any) -> None:
    """Load a :func:`save_sharded` checkpoint, resharded to this run's process count (collective)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    inner = _inner(optimizer)
    msd, osd = get_state_dict(model, inner, options=_options())
    state = {"model": msd, "optim": osd}
    try:
        dcp.load(state, checkpoint_id=str(directory))
    except Exception as e:  # DCP raises several types for missing or damaged files
        raise CheckpointError(f"{directory}: cannot load the sharded checkpoint ({type(e).__name__}: {e})") from None
    set_state_dict(model, inner, model_state_dict=state["model"], optim_state_dict=state["optim"], options=_options())
