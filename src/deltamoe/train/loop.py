"""The training loop of both stages, on accelerate.

accelerate supplies the process group and the model wrapper (DDP, or DeepSpeed chosen by
``accelerate launch --config_file``; FSDP2 is applied by deltamoe.train.distributed when the config
says ``distributed.engine: fsdp2``), mixed precision, gradient
accumulation without needless all-reduces (``accumulate``), gradient clipping and the
collectives for logging. The loop itself is short: every process reads the same global stream
of packed sequences and takes its slice of each global batch, so a run on N processes sees the
same data per optimizer step as a run on one process with N times the accumulation.

Resumable checkpoints hold the trainable parameters, the optimizer state (safetensors; nothing
is pickled), the random state and the data stream's position; resuming continues bit-for-bit
where the interrupted run would have been. Under FSDP2 the checkpoint is sharded with
``torch.distributed.checkpoint``; under DeepSpeed accelerate's ``save_state``/``load_state`` are used.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import sys
import time
import warnings
from collections.abc import Mapping
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from deltamoe.errors import CheckpointError, DataError, UsageError
from deltamoe.train import data as D
from deltamoe.train import distributed as dist_engine
from deltamoe.train import pack as P
from deltamoe.train import losses as L
from deltamoe.train.config import AnyStageConfig, load_config
from deltamoe.train.model import Layout, RouterCapture, load_for_training, write_trained
from deltamoe.train import routing as R
from deltamoe.train.policy import apply_policy, resolve_layers
from deltamoe.train.routing import RouterMask

_CKPT = re.compile(r"^step-(\d+)$")
_STATE = "state.json"


# -- setup helpers ---------------------------------------------------------------------
def _accelerator(precision: str, grad_accum: int) -> Any:
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


def _routing_rules(cfg: AnyStageConfig, moe: Mapping[str, Any] | None, layout: Layout,
                   allocation: Mapping[str, list[int]], lang_names: list[str], device: Any
                   ) -> tuple[RouterMask | None, torch.Tensor | None]:
    """The stage's routing options: the router mask of language-allocated routing and of top-k per
    language (or None) and,
    for ``losses.lpr_tokens: original``, which language ids the LPR loss keeps (None: all tagged)."""
    routing = getattr(cfg, "routing", None)
    losses = cfg.losses
    if moe is None:
        return None, None
    original = [int(e) for e in moe.get("original_experts", [0])]
    need_allocation = (routing is not None and routing.allocated) or getattr(losses, "lpr_tokens", "tagged") == "original"
    if need_allocation and not allocation:
        raise UsageError(
            f"{'routing.allocated' if routing is not None and routing.allocated else 'losses.lpr_tokens: original'} "
            f"needs a language -> expert allocation, and {cfg.model} has none; upcycle with --allocate "
            "(e.g. --allocate en=0 --allocate el=1,2)"
        )
    mask = None
    per_lang = dict(routing.top_k) if routing is not None else {}
    for lang, k in per_lang.items():
        if lang not in lang_names:
            raise UsageError(f"routing.top_k.{lang}: {lang!r} is not one of the model's languages "
                             f"({', '.join(lang_names) or 'none'}); name a language of its allocation")
        if k > layout.top_k:
            raise UsageError(f"routing.top_k.{lang} = {k}: more than the model's top-k ({layout.top_k}); "
                             f"use 1 to {layout.top_k}")
    if routing is not None and (routing.allocated or per_lang):
        if routing.allocated:
            route = R.route_matrix(allocation, lang_names, layout.num_experts, original)
        else:
            route = torch.ones(len(lang_names), layout.num_experts, dtype=torch.bool)
        kept = torch.tensor([per_lang.get(name, layout.top_k) for name in lang_names]) if per_lang else None
        mask = RouterMask([lay.router for lay in layout.routed_layers], route.to(device),
                          kept.to(device) if kept is not None else None)
    keep = None
    if getattr(losses, "lpr_tokens", "tagged") == "original":
        orig_langs = set(R.original_languages(allocation, original))
        keep = torch.tensor([name in orig_langs for name in lang_names], dtype=torch.bool, device=device)
    return mask, keep


def _lpr_tokens(tok_lang: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    """The language ids the LPR loss sees: all, or only those ``keep`` marks (others untagged)."""
    if keep is None:
        return tok_lang
    kept = (tok_lang >= 0) & keep[tok_lang.clamp(min=0)]
    return torch.where(kept, tok_lang, torch.full_like(tok_lang, D.UNTAGGED))


def _require_moe(ckpt_path: Path, manifest: Mapping[str, Any] | None, stage: str) -> dict[str, Any] | None:
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


def _config_digest(cfg: AnyStageConfig) -> tuple[str, dict[str, Any]]:
    """Digest of everything that determines the trained weights (not logging, paths of outputs)."""
    # the engine and the process count do not change the data per step (checked on resume instead)
    keep = cfg.model_dump(mode="json", exclude={"output", "run_dir", "checkpoint", "logging", "distributed"})
    if keep["train"].get("global_batch") is None:
        keep["train"].pop("global_batch", None)  # digests of configs without it stay as they were
    return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest(), keep


def _diff(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out: list[str] = []
        for k in sorted(set(a) | set(b)):
            out += _diff(a.get(k), b.get(k), f"{prefix}{k}.")
        return out
    return [prefix.rstrip(".")] if a != b else []


# -- checkpoints -------------------------------------------------------------------------
def _checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    d = run_dir / "checkpoints"
    if not d.is_dir():
        return []
    found = []
    for p in d.iterdir():
        m = _CKPT.match(p.name)
        if m and (p / _STATE).is_file():
            found.append((int(m[1]), p))
    return sorted(found)


@dataclass
class _Run:
    """What a checkpoint must restore besides parameters and optimizer."""

    step: int = 0
    tokens: int = 0
    heldout_before: dict[str, float] | None = None  # held-out loss at step 0, for the manifest


def _save_checkpoint(
    acc: Any,
    model: Any,
    optimizer: Any,
    names: list[str],
    run: _Run,
    stream: D.TrainStream,
    cfg: AnyStageConfig,
    digest: str,
    global_batch: int,
) -> Path:
    from safetensors.torch import save_file

    from deltamoe.checkpoint import atomic_output_dir

    root = cfg.resolved_run_dir / "checkpoints"
    final = root / f"step-{run.step:07d}"
    fmt = dist_engine.CHECKPOINT_FORMAT[cfg.distributed.engine]
    meta = {
        "format": fmt,
        "engine": cfg.distributed.engine,
        "processes": acc.num_processes,
        "step": run.step,
        "tokens": run.tokens,
        "heldout_before": run.heldout_before,
        "config_digest": digest,
        "config": _config_digest(cfg)[1],
        "global_batch": global_batch,
        "param_names": names,
        "data": stream.state_dict(),
    }
    if fmt != "deltamoe":  # sharded: every process writes its part into one shared directory
        tmp = root / f".tmp-step-{run.step:07d}"
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        acc.wait_for_everyone()
        if fmt == "dcp":
            dist_engine.save_sharded(tmp, model, optimizer)
        else:
            acc.save_state(str(tmp), safe_serialization=True)
        if acc.is_main_process:
            save_file(_rng_state(), str(tmp / "rng.safetensors"))
            (tmp / _STATE).write_text(json.dumps(meta))
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
    elif acc.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        with atomic_output_dir(final, force=True) as tmp:
            unwrapped = acc.unwrap_model(model)
            params = dict(unwrapped.named_parameters())
            save_file({n: params[n].detach().cpu().contiguous() for n in names}, str(tmp / "trainable.safetensors"))
            osd = optimizer.state_dict()
            tensors = {
                f"state.{i}.{k}": v.detach().cpu().contiguous()
                for i, st in osd["state"].items()
                for k, v in st.items()
                if torch.is_tensor(v)
            }
            tensors.update(_rng_state())
            save_file(tensors, str(tmp / "optimizer.safetensors"))
            meta["param_groups"] = osd["param_groups"]
            (tmp / _STATE).write_text(json.dumps(meta))
    acc.wait_for_everyone()
    if acc.is_main_process:
        for _, old in _checkpoints(cfg.resolved_run_dir)[: -cfg.checkpoint.keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    acc.wait_for_everyone()
    return final


def _rng_state() -> dict[str, torch.Tensor]:
    state = {"rng.cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["rng.cuda"] = torch.stack(torch.cuda.get_rng_state_all())
    return state


def _set_rng_state(tensors: Mapping[str, torch.Tensor]) -> None:
    torch.set_rng_state(tensors["rng.cpu"])
    if "rng.cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(list(tensors["rng.cuda"]))


def _find_resume(cfg: AnyStageConfig) -> Path | None:
    mode = cfg.checkpoint.resume
    if mode == "never":
        return None
    if mode == "auto":
        found = _checkpoints(cfg.resolved_run_dir)
        return found[-1][1] if found else None
    path = Path(mode)
    if not (path / _STATE).is_file():
        raise CheckpointError(f"checkpoint.resume: {path} is not a training checkpoint (no {_STATE})")
    return path


def _read_resume_meta(
    path: Path, digest: str, cfg: AnyStageConfig, global_batch: int, processes: int
) -> dict[str, Any]:
    try:
        meta = json.loads((path / _STATE).read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path / _STATE}: unreadable ({type(e).__name__}: {e})") from None
    engine = meta.get("engine", "zero3" if meta["format"] == "accelerate" else "ddp")
    if engine != cfg.distributed.engine:
        raise UsageError(
            f"{path}: written by distributed.engine {engine}, this run uses {cfg.distributed.engine}; its "
            f"optimizer state is in that engine's format: resume with distributed.engine: {engine}, or set "
            "checkpoint.resume: never to start over"
        )
    saved_procs = meta.get("processes", processes)
    if engine == "zero3" and saved_procs != processes:
        raise UsageError(
            f"{path}: a DeepSpeed ZeRO-3 checkpoint of {saved_procs} processes, now {processes}; DeepSpeed's "
            "partitioned optimizer state loads only on the same process count (ddp and fsdp2 checkpoints load on any)"
        )
    if meta["config_digest"] != digest:
        changed = _diff(meta["config"], _config_digest(cfg)[1])
        raise UsageError(
            f"{path}: the config changed since this checkpoint ({', '.join(changed) or 'unknown fields'}); "
            "resume with the same settings, or set checkpoint.resume: never (or another run_dir) to start over"
        )
    if meta["global_batch"] != global_batch:
        raise UsageError(
            f"{path}: saved with a global batch of {meta['global_batch']} sequences, now {global_batch} "
            "(micro_batch_size x grad_accum x processes); keep it equal to resume"
        )
    return meta


def _load_own_checkpoint(path: Path, meta: dict[str, Any], model: Any, optimizer: Any, names: list[str]) -> None:
    from safetensors.torch import load_file

    if meta["param_names"] != names:
        raise CheckpointError(
            f"{path}: trains other parameters than this run; start over with checkpoint.resume: never"
        )
    params = dict(model.named_parameters())
    with torch.no_grad():
        for n, t in load_file(str(path / "trainable.safetensors")).items():
            params[n].copy_(t)
    tensors = load_file(str(path / "optimizer.safetensors"))
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        if key.startswith("state."):
            _, i, k = key.split(".", 2)
            state.setdefault(int(i), {})[k] = t
    groups = meta["param_groups"]
    for g in groups:
        if "betas" in g:
            g["betas"] = tuple(g["betas"])
    optimizer.load_state_dict({"state": state, "param_groups": groups})
    _set_rng_state(tensors)


def _load_dcp_checkpoint(path: Path, meta: dict[str, Any], model: Any, optimizer: Any, names: list[str]) -> None:
    from safetensors.torch import load_file

    if meta["param_names"] != names:
        raise CheckpointError(
            f"{path}: trains other parameters than this run; start over with checkpoint.resume: never"
        )
    dist_engine.load_sharded(path, model, optimizer)
    _set_rng_state(load_file(str(path / "rng.safetensors")))


# -- logging -----------------------------------------------------------------------------
class _Logger:
    def __init__(self, cfg: AnyStageConfig, enabled: bool, fresh: bool):
        self.jsonl = None
        self.tb = None
        if not enabled:
            return
        log_dir = cfg.resolved_run_dir / "logs"
        log_dir.mkdir(parents=True, exist_ok=True)
        if cfg.logging.jsonl:
            self.jsonl = open(log_dir / "train.jsonl", "w" if fresh else "a")
        if cfg.logging.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise UsageError(
                    "logging.tensorboard: the tensorboard package is not installed (pip install tensorboard), "
                    "or set logging.tensorboard: false"
                ) from None
            self.tb = SummaryWriter(str(log_dir / "tensorboard"))

    def log(self, record: dict[str, Any]) -> None:
        if self.jsonl is not None:
            self.jsonl.write(json.dumps(record) + "\n")
            self.jsonl.flush()
        if self.tb is not None:
            step = record["step"]
            kind = record["kind"]
            for k, v in record.items():
                if isinstance(v, (int, float)) and k not in ("step",):
                    self.tb.add_scalar(f"{kind}/{k}", v, step)
            for lang, v in record.get("heldout_loss", {}).items():
                self.tb.add_scalar(f"{kind}/heldout_loss/{lang}", v, step)
            for layer, per_lang in record.get("routing", {}).items():
                for lang, fracs in per_lang.items():
                    for e, f in enumerate(fracs):
                        self.tb.add_scalar(f"{kind}_routing/layer{layer}/{lang}/expert{e}", f, step)
            self.tb.flush()

    def close(self) -> None:
        if self.jsonl is not None:
            self.jsonl.close()
        if self.tb is not None:
            self.tb.close()


def _routing_json(counts: torch.Tensor, layout: Layout, lang_names: list[str]) -> dict[str, dict[str, list[float]]]:
    """[layers, E, langs+1] counts -> {layer: {lang: [share of expert e]}} for languages seen."""
    out: dict[str, dict[str, list[float]]] = {}
    names = [*lang_names, "untagged"]
    for li, lay in enumerate(layout.routed_layers):
        per: dict[str, list[float]] = {}
        for j, lang in enumerate(names):
            col = counts[li, :, j]
            total = float(col.sum())
            if total > 0:
                per[lang] = [round(float(c) / total, 6) for c in col]
        out[str(lay.index)] = per
    return out


# -- evaluation --------------------------------------------------------------------------
@torch.no_grad()
def _evaluate(
    acc: Any,
    model: Any,
    heldout: D.HeldOut,
    capture: RouterCapture,
    layout: Layout,
    lang_names: list[str],
    batch_size: int,
) -> dict[str, Any]:
    """Held-out next-token loss per language and routing shares, over all processes."""
    n_langs = len(lang_names)
    world, rank = acc.num_processes, acc.process_index
    mine = list(range(rank, len(heldout), world))
    n_batches = math.ceil(math.ceil(len(heldout) / world) / batch_size) if len(heldout) else 0
    loss_sum = torch.zeros(n_langs + 1, dtype=torch.float64, device=acc.device)
    count = torch.zeros(n_langs + 1, dtype=torch.float64, device=acc.device)
    routing = torch.zeros(
        len(layout.routed_layers), layout.num_experts, n_langs + 1, dtype=torch.float64, device=acc.device
    )
    was_training = model.training
    model.eval()
    for b in range(n_batches):
        chunk = mine[b * batch_size : (b + 1) * batch_size]
        weight = 1.0 if chunk else 0.0  # every process runs the same number of forwards (FSDP needs it)
        chunk = chunk or [0]
        width = max(len(heldout.ids[i]) for i in chunk)
        ids = torch.zeros(len(chunk), width, dtype=torch.long)
        langs = torch.full((len(chunk), width), D.UNTAGGED, dtype=torch.long)
        valid = torch.zeros(len(chunk), width, dtype=torch.bool)
        for r, i in enumerate(chunk):
            n = len(heldout.ids[i])
            ids[r, :n] = torch.tensor(heldout.ids[i])
            langs[r, :n] = torch.tensor(heldout.langs[i])
            valid[r, :n] = weight > 0
        ids, langs, valid = ids.to(acc.device), langs.to(acc.device), valid.to(acc.device)
        with capture.capture():
            logits = model(input_ids=ids, use_cache=False).logits
        tl = L.token_losses(logits, ids).double()
        tgt_valid = valid[:, 1:]
        slot = torch.where(langs[:, 1:] >= 0, langs[:, 1:], n_langs)
        loss_sum.index_add_(0, slot[tgt_valid], tl[tgt_valid])
        count.index_add_(0, slot[tgt_valid], torch.ones_like(tl[tgt_valid]))
        if layout.routed_layers:
            routing += L.routing_counts(capture.ordered(), langs.reshape(-1), layout.top_k, n_langs, valid.reshape(-1))
    if was_training:
        model.train()
    loss_sum, count, routing = acc.reduce(loss_sum, "sum"), acc.reduce(count, "sum"), acc.reduce(routing, "sum")
    names = [*lang_names, "untagged"]
    per_lang = {names[j]: float(loss_sum[j] / count[j]) for j in range(n_langs + 1) if count[j] > 0}
    if count.sum() > 0:
        per_lang["all"] = float(loss_sum.sum() / count.sum())
    return {
        "heldout_loss": per_lang,
        "heldout_tokens": int(count.sum()),
        "routing": _routing_json(routing.cpu(), layout, lang_names),
    }


# -- the loop ----------------------------------------------------------------------------
def _check_disk(cfg: AnyStageConfig, ckpt: Any, trainable: int, stop_after: int | None) -> None:
    """Room for the output (the input's size) and for the step checkpoints (trainable weights and
    two AdamW moments in float32, ``keep_last`` of them), before the first step."""
    from deltamoe.preflight import check_disk, checkpoint_bytes

    specs = [t.spec for t in ckpt.tensors.values()]
    check_disk(cfg.output, checkpoint_bytes(specs, ckpt.aux_files()), "the trained model")
    if cfg.checkpoint.every or stop_after:
        check_disk(cfg.resolved_run_dir, cfg.checkpoint.keep_last * 12 * trainable, "the step checkpoints")


def train(
    config: str | os.PathLike[str] | dict[str, Any] | AnyStageConfig,
    *,
    overrides: list[str] | None = None,
    force: bool = False,
    progress: bool | None = None,
    stop_after: int | None = None,
    command: list[str] | None = None,
) -> Path | None:
    """Run one training stage (post_pretrain or router_review) as configured; return the output.

    Args:
        config: a YAML path, a dict or a validated config (see deltamoe.train.config).
        overrides: ``dotted.key=value`` settings applied on top of the config.
        force: replace an existing output directory.
        progress: show a progress bar (default: the config's ``logging.progress``).
        stop_after: stop after this many optimizer steps in this invocation, leaving a
            resumable checkpoint and no output (returns None), e.g. to fit a job time limit.
        command: the command line, recorded in ``deltamoe.json``.
    """
    from tqdm.auto import tqdm
    from transformers import AutoTokenizer, get_scheduler

    from deltamoe.checkpoint import atomic_output_dir, check_output, copy_aux_files, open_checkpoint
    from deltamoe.engine import check_finite_tensors
    from deltamoe.preflight import writable_dir
    from deltamoe.provenance import hash_in_background, new_manifest, read_manifest, write_manifest, write_model_card

    cfg = load_config(config, overrides)
    if stop_after is not None and stop_after <= 0:
        raise UsageError(f"stop_after must be positive, got {stop_after}")
    out_path = check_output(cfg.output, force=force)
    writable_dir(cfg.resolved_run_dir, "run_dir (logs and step checkpoints)")
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
    coef_balance, coef_lpr = getattr(cfg.losses, "balance", 0.0), getattr(cfg.losses, "lpr", 0.0)
    langs = P.languages(cfg, moe)  # dense: the sources' languages (for per-language evaluation)
    allocation = {k: list(v) for k, v in langs.allocation.items()}
    if moe is not None and coef_lpr > 0 and not allocation:
        raise UsageError(
            f"losses.lpr = {coef_lpr} needs a language -> expert allocation, and {ckpt.path} has none; "
            "upcycle with --allocate (e.g. --allocate en=0 --allocate el=1,2) or set losses.lpr: 0"
        )
    lang_names = langs.names
    packed = P.Pack(cfg.data.pack) if cfg.data.pack else None
    if packed is not None:  # the raw sources need not be here
        packed.check(cfg.data, cfg.seed, tokenizer, langs)
    else:
        D.check_sources(cfg.data, langs)
    engine = cfg.distributed.engine
    dist_engine.check_engine(engine)
    accum = cfg.train.accumulation(int(os.environ.get("WORLD_SIZE", "1")))

    acc = _accelerator(cfg.train.precision, accum)
    world, rank = acc.num_processes, acc.process_index
    mb, seq = cfg.train.micro_batch_size, cfg.data.seq_len
    global_batch = mb * accum * world
    available = D.budget_sequences(cfg.data)
    total_steps = cfg.train.steps or (available // global_batch if available is not None else 0)
    if available is not None and total_steps * global_batch > available:
        raise UsageError(
            f"the token budgets fill {available} sequences of {seq} tokens, but {total_steps} steps of "
            f"{global_batch} sequences need {total_steps * global_batch}; lower train.steps or raise the budgets"
        )
    if total_steps <= 0:
        raise UsageError(f"the token budgets fill {available} sequences, less than one global batch ({global_batch})")

    from accelerate.utils import set_seed

    # a checkpoint that cannot be resumed is refused before the model is loaded
    digest, _ = _config_digest(cfg)
    resume = _find_resume(cfg)
    meta = _read_resume_meta(resume, digest, cfg, global_batch, world) if resume is not None else None
    set_seed(cfg.seed)
    hashes = hash_in_background(ckpt) if acc.is_main_process else None
    show = cfg.logging.progress if progress is None else progress
    model, layout = load_for_training(
        ckpt, moe, progress=show and acc.is_main_process, experts_implementation=cfg.train.experts_implementation
    )
    policy = apply_policy(model, layout, cfg.trainable, layers=train_layers)
    if policy.trainable_params == 0:
        raise UsageError("trainable: nothing trains in this model with these settings")
    _check_disk(cfg, ckpt, policy.trainable_params, stop_after)
    if cfg.train.gradient_checkpointing:
        # non-reentrant: frozen embeddings would cut the gradient with the reentrant variant
        kwargs = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.24 name
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    if engine == "fsdp2":  # before the optimizer: fully_shard replaces the parameters by sharded ones
        model = dist_engine.shard(model, acc.device, world)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]  # tied aliases appear once
    names = [n for n, _ in named]
    decay = [p for n, p in named if p.dim() >= 2]
    no_decay = [p for n, p in named if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.train.weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    optimizer = torch.optim.AdamW(groups, lr=cfg.train.lr, betas=cfg.train.betas, eps=cfg.train.eps)
    sched_name = {"constant": "constant_with_warmup", "linear": "linear", "cosine": "cosine_with_min_lr"}[
        cfg.train.lr_schedule
    ]
    extra = {"min_lr_rate": cfg.train.min_lr_ratio} if cfg.train.lr_schedule == "cosine" else None
    scheduler = get_scheduler(
        sched_name,
        optimizer,
        num_warmup_steps=cfg.train.warmup_steps,
        num_training_steps=total_steps,
        scheduler_specific_kwargs=extra,
    )

    if packed is not None:
        heldout = packed.heldout(cfg.data)
        stream: D.TrainStream = P.PackedStream(cfg.data, packed, tokenizer, langs, cfg.seed)
    else:
        heldout = D.build_heldout(cfg.data, tokenizer, langs, cfg.seed)
        stream = D.TrainStream(cfg.data, tokenizer, langs, cfg.seed)
    run = _Run()
    if meta is not None:
        if meta["format"] == "deltamoe":
            _load_own_checkpoint(resume, meta, model, optimizer, names)
    elif cfg.checkpoint.resume == "never" and acc.is_main_process:
        # starting over: old checkpoints of this run_dir must not be resumed or outlive new ones
        shutil.rmtree(cfg.resolved_run_dir / "checkpoints", ignore_errors=True)
    if engine == "fsdp2":  # sharded already; accelerate handles the optimizer's accumulation steps
        optimizer = acc.prepare(optimizer)
    else:
        model, optimizer = acc.prepare(model, optimizer)
    if meta is not None:
        if meta["format"] == "accelerate":
            acc.load_state(str(resume))
        elif meta["format"] == "dcp":
            _load_dcp_checkpoint(resume, meta, model, optimizer, names)
        stream.load_state_dict(meta["data"])
        run = _Run(step=meta["step"], tokens=meta["tokens"], heldout_before=meta.get("heldout_before"))
        with warnings.catch_warnings():  # "scheduler.step() before optimizer.step()": intended here
            warnings.simplefilter("ignore", UserWarning)
            for _ in range(run.step):  # the schedule is a pure function of the step
                scheduler.step()

    capture = RouterCapture(layout.routed_layers)
    allowed = L.allowed_matrix(allocation, lang_names, layout.num_experts).to(acc.device)
    mask, lpr_keep = _routing_rules(cfg, moe, layout, allocation, lang_names, acc.device)
    coef = cfg.losses
    logger = _Logger(cfg, acc.is_main_process, fresh=meta is None)
    bar = tqdm(
        total=total_steps,
        initial=run.step,
        desc=cfg.stage,
        unit="step",
        file=sys.stderr,
        disable=not (show and acc.is_main_process),
    )
    params = [p for p in model.parameters() if p.requires_grad]  # after sharding and prepare

    def clip(ps: list[torch.Tensor], max_norm: float) -> float:
        if engine == "fsdp2":
            return dist_engine.clip_grad_norm(ps, max_norm)
        gn = acc.clip_grad_norm_(ps, max_norm)
        return float(gn) if gn is not None else float("nan")  # DeepSpeed clips itself
    if acc.is_main_process:
        logger.log(
            {
                "kind": "setup",
                "step": run.step,
                "stage": cfg.stage,
                "processes": world,
                "distributed": acc.distributed_type.name,
                "engine": engine,
                "precision": cfg.train.precision,
                "global_batch": global_batch,
                "total_steps": total_steps,
                "resumed_from": str(resume) if resume else None,
                "heldout_sequences": len(heldout),
                "heldout_tokens": heldout.tokens,
                "params": {g: {"count": n, "trains": on} for g, (n, on) in policy.params_by_group.items()},
            }
        )

    def evaluate(step: int) -> dict[str, Any]:
        res = _evaluate(acc, model, heldout, capture, layout, lang_names, mb)
        rec = {"kind": "eval", "step": step, **res}
        if acc.is_main_process:
            logger.log(rec)
        return rec

    if run.step == 0 and len(heldout):
        run.heldout_before = evaluate(0)["heldout_loss"]
    n_routed = len(layout.routed_layers)
    sums = torch.zeros(4, dtype=torch.float64, device=acc.device)  # total, lm, balance, lpr
    micro = 0
    counts = torch.zeros(n_routed, layout.num_experts, len(lang_names) + 1, dtype=torch.float64, device=acc.device)
    grad_norm = float("nan")
    t_last, tok_last = time.perf_counter(), run.tokens
    start_step = run.step
    mine = [(j * world + rank) * mb + r for j in range(accum) for r in range(mb)]
    model.train()
    try:
        while run.step < total_steps:
            try:  # this process's rows of the global batch: micro-batch j is rows (j * world + rank) * mb ...
                ids_mine, lang_mine = stream.take(global_batch, keep=mine)
            except StopIteration:
                raise DataError("the data stream ended before the planned number of steps") from None
            for j in range(accum):
                ids = ids_mine[j * mb : (j + 1) * mb].to(acc.device)
                tok_lang = lang_mine[j * mb : (j + 1) * mb].reshape(-1).to(acc.device)
                # the mask stays on through backward: gradient checkpointing recomputes the forward there
                with acc.accumulate(model), mask.tokens(tok_lang) if mask else nullcontext():
                    with capture.capture():
                        logits = model(input_ids=ids, use_cache=False).logits
                    router = capture.ordered()
                    lm = L.token_losses(logits, ids).mean()
                    if router:
                        bal = L.balance_loss(router, layout.top_k)
                        lpr = L.lpr_loss(router, _lpr_tokens(tok_lang, lpr_keep), allowed)
                    else:  # a dense model
                        bal = lpr = torch.zeros((), device=acc.device)
                    total = coef.lm * lm + coef_balance * bal + coef_lpr * lpr
                    acc.backward(total)
                    if acc.sync_gradients and cfg.train.max_grad_norm is not None:
                        grad_norm = clip(params, cfg.train.max_grad_norm)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                sums += torch.stack([total.detach(), lm.detach(), bal.detach(), lpr.detach()]).double()
                micro += 1
                if router:
                    counts += L.routing_counts(router, tok_lang, layout.top_k, len(lang_names))
            scheduler.step()
            run.step += 1
            run.tokens += global_batch * seq
            bar.update(1)
            last = run.step == total_steps
            if run.step % cfg.logging.every == 0 or last:
                s = acc.reduce(sums / max(micro, 1), "mean")
                c = acc.reduce(counts, "sum")
                now = time.perf_counter()
                rec = {
                    "kind": "train",
                    "step": run.step,
                    "lr": scheduler.get_last_lr()[0],
                    "loss": float(s[0]),
                    "loss_lm": float(s[1]),
                    "loss_balance": float(s[2]),
                    "loss_lpr": float(s[3]),
                    "grad_norm": grad_norm,
                    "tokens": run.tokens,
                    "tokens_per_s": (run.tokens - tok_last) / max(now - t_last, 1e-9),
                    "routing": _routing_json(c.cpu(), layout, lang_names),
                }
                if acc.is_main_process:
                    logger.log(rec)
                    bar.set_postfix(loss=f"{rec['loss']:.4f}")
                sums.zero_()
                counts.zero_()
                micro = 0
                t_last, tok_last = now, run.tokens
            if cfg.logging.eval_every and run.step % cfg.logging.eval_every == 0 and not last and len(heldout):
                evaluate(run.step)
            stopping = stop_after is not None and run.step - start_step >= stop_after and not last
            every = cfg.checkpoint.every
            if stopping or (every and run.step % every == 0 and not last):
                _save_checkpoint(acc, model, optimizer, names, run, stream, cfg, digest, global_batch)
            if stopping:
                return None
        final_eval = evaluate(run.step) if len(heldout) else None

        state = dist_engine.full_state_dict(model) if engine == "fsdp2" else acc.get_state_dict(model)
        if acc.is_main_process:
            summary = {
                "steps": run.step,
                "tokens": run.tokens,
                "processes": world,
                "global_batch": global_batch,
                "params": {g: {"count": n, "trains": on} for g, (n, on) in policy.params_by_group.items()},
                "heldout_loss_before": run.heldout_before,
                "heldout_loss_after": final_eval["heldout_loss"] if final_eval else None,
            }
            if train_layers is not None:
                summary["trained_layers"] = train_layers
            with atomic_output_dir(out_path, force=force) as tmp:
                counts_w = write_trained(ckpt, layout, state, set(policy.trainable_names), tmp)
                shutil.copyfile(ckpt.path / "config.json", tmp / "config.json")
                copy_aux_files(ckpt, tmp)
                manifest = new_manifest(
                    read_manifest(ckpt.path),
                    stage=cfg.stage,
                    params={"config": cfg.model_dump(mode="json"), "result": {**summary, "tensors": counts_w}},
                    inputs={"model": hashes.result()[0]},
                    command=command,
                )
                write_manifest(tmp, manifest)
                write_model_card(tmp, manifest)
        acc.wait_for_everyone()
    finally:
        bar.close()
        logger.close()
        capture.remove()
        if mask is not None:
            mask.remove()
    return out_path
