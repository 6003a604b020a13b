"""Setting up a training run: everything before the first step, as one :class:`RunState`.

In order: what can be refused before anything loads (the output, the run directory, the model
and its tokenizer, the data against the model's languages, the engine, the step plan, a
checkpoint that cannot be resumed), then accelerate, the model with one parameter per expert and
what trains in it, the optimizer and schedule, the data stream and held-out set, the resume, and
the routing rules. This is the one place that reads the stage's config: each helper gets the
sections or values it uses. accelerate supplies the process group and the model wrapper (DDP, or
DeepSpeed chosen by ``accelerate launch --config_file``; FSDP2 is applied by
deltamoe.train.distributed when the config says ``distributed.engine: fsdp2``) and mixed precision.
"""

from __future__ import annotations

import os
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from deltamoe.io import Checkpoint
from deltamoe.errors import CheckpointError, UsageError
from deltamoe.train import data as D
from deltamoe.train import distributed as dist_engine
from deltamoe.train import losses as L
from deltamoe.train import pack as P
from deltamoe.train.checkpointing import (
    Progress,
    Resume,
    RunCheckpoints,
    config_digest,
    restore_prepared,
    restore_unwrapped,
)
from deltamoe.train.config import AnyStageConfig
from deltamoe.train.model import Layout, RouterCapture, load_for_training
from deltamoe.train.policy import PolicySummary, apply_policy, resolve_layers
from deltamoe.train.routing import RouterMask, routing_rules
from deltamoe.train.sections import CheckpointConfig, DataConfig, TrainingConfig
from deltamoe.train.sources import Languages


@dataclass
class RunState:
    """A training run ready for its first (or next) step."""

    out: Path  # the output directory (checked)
    acc: Any  # the accelerate Accelerator
    ckpt: Checkpoint  # the input model
    layout: Layout
    model: Any  # prepared (wrapped, or sharded by FSDP2)
    optimizer: Any
    scheduler: Any
    policy: PolicySummary
    names: list[str]  # the trainable parameters, in optimizer order
    train_layers: list[int] | None  # dense_cpt's trainable.layers, resolved
    lang_names: list[str]
    stream: D.TrainStream
    heldout: D.HeldOut
    checkpoints: RunCheckpoints
    resume: Resume | None  # the checkpoint resumed from
    progress: Progress
    capture: RouterCapture
    mask: RouterMask | None
    allowed: torch.Tensor  # [languages, experts] of the LPR loss
    lpr_keep: torch.Tensor | None
    accum: int
    total_steps: int
    hashes: Future[list[dict[str, Any]]] | None  # of the input, on the main process
    show: bool  # progress bars

    @property
    def global_batch(self) -> int:
        return self.checkpoints.global_batch


@dataclass
class _Input:
    """The input model, checked before it loads."""

    ckpt: Checkpoint
    moe: dict[str, Any] | None
    train_layers: list[int] | None
    tokenizer: Any


def accelerator(precision: str, grad_accum: int) -> Any:
    """accelerate's Accelerator for this process, with the config's precision and accumulation."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    # A second train() in one process (notebooks, tests) may use other settings; accelerate
    # keeps them in process-wide singletons. The process group itself (PartialState) is kept.
    AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    # accelerate sets up a CPU process group (gloo) only when told to use the CPU
    cpu = world > 1 and not torch.cuda.is_available()
    acc = Accelerator(
        mixed_precision="bf16" if precision == "bf16" else "no", gradient_accumulation_steps=grad_accum, cpu=cpu
    )
    if acc.num_processes != world:
        raise UsageError(
            f"launched as {world} processes (WORLD_SIZE), but accelerate set up {acc.num_processes}; "
            "launch with torchrun or accelerate launch"
        )
    asked = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    if asked and acc.distributed_type.name != "DEEPSPEED":
        raise UsageError(
            f"the accelerate config asks for DEEPSPEED, but accelerate set up {acc.distributed_type.name} "
            "(DEEPSPEED needs GPUs); launch with torchrun for data parallel (ddp) or sharded (fsdp2) training on CPUs"
        )
    # an accelerate config file can override both through the environment; the config must win
    want = "bf16" if precision == "bf16" else "no"
    deepspeed = acc.distributed_type.name == "DEEPSPEED"  # precision lives in the DeepSpeed config there
    if acc.gradient_accumulation_steps != grad_accum or (not deepspeed and str(acc.mixed_precision) != want):
        raise UsageError(
            f"the accelerate launch config sets gradient_accumulation_steps={acc.gradient_accumulation_steps}, "
            f"mixed_precision={acc.mixed_precision}, but the training config says train.grad_accum={grad_accum}, "
            f"train.precision={precision}; remove them from the accelerate config (deltamoe sets them)"
        )
    return acc


def _require_moe(ckpt_path: Path, manifest: dict[str, Any] | None, stage: str) -> dict[str, Any] | None:
    """The MoE layout of the model; None for dense_cpt, which needs a dense model instead."""
    moe = (manifest or {}).get("moe")
    if stage == "dense_cpt":
        if moe:
            raise UsageError(f"{ckpt_path}: an upcycled MoE; stage dense_cpt trains a dense model (the base)")
        return None
    if not moe:
        raise UsageError(
            f"{ckpt_path}: not an upcycled MoE (no deltamoe.json with a 'moe' block). Stage {stage} trains "
            "the output of `deltamoe upcycle` (or of a previous training stage)"
        )
    return dict(moe)


def _open_input(cfg: AnyStageConfig) -> _Input:
    """The input model of the stage, its MoE block, the trained layers and the tokenizer, checked."""
    from transformers import AutoTokenizer

    from deltamoe.io import open_checkpoint
    from deltamoe.engine import check_finite_tensors
    from deltamoe.io.provenance import read_manifest

    ckpt = open_checkpoint(cfg.model)
    in_manifest = read_manifest(ckpt.path)
    moe = _require_moe(ckpt.path, in_manifest, cfg.stage)
    train_layers = resolve_layers(cfg.trainable, in_manifest, int(ckpt.config.get("num_hidden_layers") or 0), ckpt.path)
    check_finite_tensors(ckpt)  # NaN/Inf weights would train into a NaN model
    max_pos = ckpt.config.get("max_position_embeddings")
    if isinstance(max_pos, int) and cfg.data.seq_len > max_pos:
        raise UsageError(
            f"data.seq_len = {cfg.data.seq_len} exceeds the model's maximum sequence length "
            f"(max_position_embeddings = {max_pos} in {ckpt.path / 'config.json'})"
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(ckpt.path)
    except Exception as e:
        raise CheckpointError(f"{ckpt.path}: no usable tokenizer files ({type(e).__name__}: {e})") from None
    vocab = int(ckpt.config.get("vocab_size", 0))
    if len(tokenizer) > vocab:
        raise CheckpointError(f"{ckpt.path}: the tokenizer has {len(tokenizer)} tokens, the model only {vocab}")
    return _Input(ckpt, moe, train_layers, tokenizer)


def _check_data(cfg: AnyStageConfig, inp: _Input) -> tuple[Languages, P.Pack | None]:
    """The stage's languages and its pack (or None), checked against the model and the sources."""
    coef_lpr = getattr(cfg.losses, "lpr", 0.0)
    langs = P.languages(cfg, inp.moe)  # dense: the sources' languages (for per-language evaluation)
    if inp.moe is not None and coef_lpr > 0 and not langs.allocation:
        raise UsageError(
            f"losses.lpr = {coef_lpr} needs a language -> expert allocation, and {inp.ckpt.path} has none; "
            "upcycle with --allocate (e.g. --allocate en=0 --allocate el=1,2) or set losses.lpr: 0"
        )
    packed = P.Pack(cfg.data.pack) if cfg.data.pack else None
    if packed is not None:  # the raw sources need not be here
        packed.check(cfg.data, cfg.seed, inp.tokenizer, langs)
    else:
        D.check_sources(cfg.data, langs)
    return langs, packed


def _total_steps(steps: int | None, data: DataConfig, global_batch: int) -> int:
    """Optimizer steps of the run: as configured, or as many as the token budgets fill."""
    seq = data.seq_len
    available = D.budget_sequences(data)
    total_steps = steps or (available // global_batch if available is not None else 0)
    if available is not None and total_steps * global_batch > available:
        raise UsageError(
            f"the token budgets fill {available} sequences of {seq} tokens, but {total_steps} steps of "
            f"{global_batch} sequences need {total_steps * global_batch}; lower train.steps or raise the budgets"
        )
    if total_steps <= 0:
        raise UsageError(f"the token budgets fill {available} sequences, less than one global batch ({global_batch})")
    return total_steps


def _check_disk(output: str, run_dir: Path, checkpoint: CheckpointConfig, ckpt: Checkpoint, trainable: int,
                stop_after: int | None) -> None:
    """Room for the output (the input's size) and for the step checkpoints (trainable weights and
    two AdamW moments in float32, ``keep_last`` of them), before the first step."""
    from deltamoe.preflight import check_disk, checkpoint_bytes

    specs = [t.spec for t in ckpt.tensors.values()]
    check_disk(output, checkpoint_bytes(specs, ckpt.aux_files()), "the trained model")
    if checkpoint.every or stop_after:
        check_disk(run_dir, checkpoint.keep_last * 12 * trainable, "the step checkpoints")


def _gradient_checkpointing(model: Any) -> None:
    # non-reentrant: frozen embeddings would cut the gradient with the reentrant variant
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.24 name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def _optimizer(model: Any, train: TrainingConfig, total_steps: int) -> tuple[Any, Any, list[str]]:
    """AdamW over the trainable parameters (no decay of vectors), its schedule, and their names."""
    from transformers import get_scheduler

    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]  # tied aliases appear once
    names = [n for n, _ in named]
    decay = [p for n, p in named if p.dim() >= 2]
    no_decay = [p for n, p in named if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": train.weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    optimizer = torch.optim.AdamW(groups, lr=train.lr, betas=train.betas, eps=train.eps)
    sched_name = {"constant": "constant_with_warmup", "linear": "linear", "cosine": "cosine_with_min_lr"}[
        train.lr_schedule
    ]
    extra = {"min_lr_rate": train.min_lr_ratio} if train.lr_schedule == "cosine" else None
    scheduler = get_scheduler(
        sched_name,
        optimizer,
        num_warmup_steps=train.warmup_steps,
        num_training_steps=total_steps,
        scheduler_specific_kwargs=extra,
    )
    return optimizer, scheduler, names


def _data(data: DataConfig, packed: P.Pack | None, tokenizer: Any, langs: Languages, seed: int
          ) -> tuple[D.HeldOut, D.TrainStream]:
    """The held-out sequences and the training stream, from the pack or the raw sources."""
    if packed is not None:
        return packed.heldout(data), P.PackedStream(data, packed, tokenizer, langs, seed)
    return D.build_heldout(data, tokenizer, langs, seed), D.TrainStream(data, tokenizer, langs, seed)


def setup(cfg: AnyStageConfig, *, force: bool, progress: bool | None, stop_after: int | None) -> RunState:
    """Check, load and prepare everything a run needs before its first step (or its next one,
    resuming a checkpoint); see the module's docstring for the order."""
    from accelerate.utils import set_seed

    from deltamoe.io import check_output
    from deltamoe.preflight import writable_dir
    from deltamoe.io.provenance import hash_in_background

    out = check_output(cfg.output, force=force)
    writable_dir(cfg.resolved_run_dir, "run_dir (logs and step checkpoints)")
    inp = _open_input(cfg)
    langs, packed = _check_data(cfg, inp)
    engine = cfg.distributed.engine
    dist_engine.check_engine(engine)
    accum = cfg.train.accumulation(int(os.environ.get("WORLD_SIZE", "1")))
    acc = accelerator(cfg.train.precision, accum)
    global_batch = cfg.train.micro_batch_size * accum * acc.num_processes
    total_steps = _total_steps(cfg.train.steps, cfg.data, global_batch)
    # a checkpoint that cannot be resumed is refused before the model is loaded
    digest, fields = config_digest(cfg)
    checkpoints = RunCheckpoints(cfg.resolved_run_dir, engine, cfg.checkpoint.keep_last, digest, fields, global_batch)
    resume = checkpoints.resumable(cfg.checkpoint.resume, acc.num_processes)
    set_seed(cfg.seed)
    hashes = hash_in_background(inp.ckpt) if acc.is_main_process else None
    show = cfg.logging.progress if progress is None else progress
    model, layout = load_for_training(inp.ckpt, inp.moe, progress=show and acc.is_main_process,
                                      experts_implementation=cfg.train.experts_implementation)
    policy = apply_policy(model, layout, cfg.trainable, layers=inp.train_layers)
    if policy.trainable_params == 0:
        raise UsageError("trainable: nothing trains in this model with these settings")
    _check_disk(cfg.output, cfg.resolved_run_dir, cfg.checkpoint, inp.ckpt, policy.trainable_params, stop_after)
    if cfg.train.gradient_checkpointing:
        _gradient_checkpointing(model)
    if engine == "fsdp2":  # before the optimizer: fully_shard replaces the parameters by sharded ones
        model = dist_engine.shard(model, acc.device, acc.num_processes)
    optimizer, scheduler, names = _optimizer(model, cfg.train, total_steps)
    heldout, stream = _data(cfg.data, packed, inp.tokenizer, langs, cfg.seed)
    if resume is not None:
        restore_unwrapped(resume, model, optimizer, names)
    elif cfg.checkpoint.resume == "never" and acc.is_main_process:
        checkpoints.clear()
    if engine == "fsdp2":  # sharded already; accelerate handles the optimizer's accumulation steps
        optimizer = acc.prepare(optimizer)
    else:
        model, optimizer = acc.prepare(model, optimizer)
    run_progress = Progress() if resume is None else restore_prepared(acc, resume, model, optimizer, names, stream,
                                                                       scheduler)
    allocation = {k: list(v) for k, v in langs.allocation.items()}
    capture = RouterCapture(layout.routed_layers)
    allowed = L.allowed_matrix(allocation, langs.names, layout.num_experts).to(acc.device)
    mask, lpr_keep = routing_rules(getattr(cfg, "routing", None), getattr(cfg.losses, "lpr_tokens", "tagged"),
                                   cfg.model, inp.moe, layout, allocation, langs.names, acc.device)
    return RunState(out, acc, inp.ckpt, layout, model, optimizer, scheduler, policy, names, inp.train_layers,
                    langs.names, stream, heldout, checkpoints, resume, run_progress, capture, mask, allowed,
                    lpr_keep, accum, total_steps, hashes, show)
