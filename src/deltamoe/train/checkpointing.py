"""Resumable step checkpoints of a training run: save, find, check, restore.

A checkpoint ``<run_dir>/checkpoints/step-NNNNNNN`` holds the trainable parameters, the optimizer
state, the random state and the data stream's position, and ``state.json`` with the counters,
the digest of the config fields that decide the trained weights and the global batch; resuming
continues bit-for-bit where the interrupted run would have been. Its format follows the engine
(``distributed.CHECKPOINT_FORMAT``):

- ``deltamoe`` (ddp): safetensors only, nothing pickled, written by the main process;
- ``dcp`` (fsdp2): sharded with ``torch.distributed.checkpoint``, every process writing its part;
- ``accelerate`` (zero3): accelerate's ``save_state``/``load_state``.

A checkpoint that cannot be resumed (another engine, another config, another global batch) is
refused before the model is loaded, naming what differs.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from deltamoe.errors import CheckpointError, UsageError
from deltamoe.train import distributed as dist_engine
from deltamoe.train.config import AnyStageConfig
from deltamoe.train.data import TrainStream

_CKPT = re.compile(r"^step-(\d+)$")
_STATE = "state.json"


def config_digest(cfg: AnyStageConfig) -> tuple[str, dict[str, Any]]:
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


@dataclass
class Progress:
    """What a checkpoint must restore besides parameters and optimizer."""

    step: int = 0
    tokens: int = 0
    heldout_before: dict[str, float] | None = None  # held-out loss at step 0, for the manifest


def _rng_state() -> dict[str, torch.Tensor]:
    state = {"rng.cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["rng.cuda"] = torch.stack(torch.cuda.get_rng_state_all())
    return state


def _set_rng_state(tensors: Mapping[str, torch.Tensor]) -> None:
    torch.set_rng_state(tensors["rng.cpu"])
    if "rng.cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(list(tensors["rng.cuda"]))


@dataclass(frozen=True)
class Resume:
    """A checkpoint this run resumes, and its state."""

    path: Path
    meta: dict[str, Any]


@dataclass(frozen=True)
class RunCheckpoints:
    """The step checkpoints of one run: where they go, how many stay, and what identifies the run
    (``digest`` of the fields ``config`` that decide the trained weights, and the global batch)."""

    run_dir: Path
    engine: str
    keep_last: int
    digest: str
    config: dict[str, Any]
    global_batch: int

    @property
    def root(self) -> Path:
        return self.run_dir / "checkpoints"

    def saved(self) -> list[tuple[int, Path]]:
        """The complete checkpoints of the run, by step."""
        if not self.root.is_dir():
            return []
        found = []
        for p in self.root.iterdir():
            m = _CKPT.match(p.name)
            if m and (p / _STATE).is_file():
                found.append((int(m[1]), p))
        return sorted(found)

    def resumable(self, resume: str, processes: int) -> Resume | None:
        """The checkpoint ``checkpoint.resume`` names (``never``, ``auto``: the latest, or a path),
        checked to resume this run on ``processes``; None to start from step 0."""
        path = self._find(resume)
        return Resume(path, self._read(path, processes)) if path is not None else None

    def _find(self, resume: str) -> Path | None:
        if resume == "never":
            return None
        if resume == "auto":
            found = self.saved()
            return found[-1][1] if found else None
        path = Path(resume)
        if not (path / _STATE).is_file():
            raise CheckpointError(f"checkpoint.resume: {path} is not a training checkpoint (no {_STATE})")
        return path

    def clear(self) -> None:
        """Starting over: old checkpoints of this run_dir must not be resumed or outlive new ones."""
        shutil.rmtree(self.root, ignore_errors=True)

    def _read(self, path: Path, processes: int) -> dict[str, Any]:
        try:
            meta = json.loads((path / _STATE).read_text())
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{path / _STATE}: unreadable ({type(e).__name__}: {e})") from None
        engine = meta.get("engine", "zero3" if meta["format"] == "accelerate" else "ddp")
        if engine != self.engine:
            raise UsageError(
                f"{path}: written by distributed.engine {engine}, this run uses {self.engine}; its "
                f"optimizer state is in that engine's format: resume with distributed.engine: {engine}, or set "
                "checkpoint.resume: never to start over"
            )
        saved_procs = meta.get("processes", processes)
        if engine == "zero3" and saved_procs != processes:
            raise UsageError(
                f"{path}: a DeepSpeed ZeRO-3 checkpoint of {saved_procs} processes, now {processes}; DeepSpeed's "
                "partitioned optimizer state loads only on the same process count (ddp and fsdp2 checkpoints load on any)"
            )
        if meta["config_digest"] != self.digest:
            changed = _diff(meta["config"], self.config)
            raise UsageError(
                f"{path}: the config changed since this checkpoint ({', '.join(changed) or 'unknown fields'}); "
                "resume with the same settings, or set checkpoint.resume: never (or another run_dir) to start over"
            )
        if meta["global_batch"] != self.global_batch:
            raise UsageError(
                f"{path}: saved with a global batch of {meta['global_batch']} sequences, now {self.global_batch} "
                "(micro_batch_size x grad_accum x processes); keep it equal to resume"
            )
        return meta

    def save(self, acc: Any, model: Any, optimizer: Any, names: list[str], progress: Progress,
             stream: TrainStream) -> Path:
        """Checkpoint the run after ``progress.step`` (collective), keeping the last ``keep_last``."""
        final = self.root / f"step-{progress.step:07d}"
        fmt = dist_engine.CHECKPOINT_FORMAT[self.engine]
        meta = {
            "format": fmt,
            "engine": self.engine,
            "processes": acc.num_processes,
            "step": progress.step,
            "tokens": progress.tokens,
            "heldout_before": progress.heldout_before,
            "config_digest": self.digest,
            "config": self.config,
            "global_batch": self.global_batch,
            "param_names": names,
            "data": stream.state_dict(),
        }
        if fmt != "deltamoe":
            self._save_sharded(acc, model, optimizer, meta, final)
        elif acc.is_main_process:
            self._save_own(acc, model, optimizer, names, meta, final)
        acc.wait_for_everyone()
        if acc.is_main_process:
            for _, old in self.saved()[: -self.keep_last]:
                shutil.rmtree(old, ignore_errors=True)
        acc.wait_for_everyone()
        return final

    def _save_sharded(self, acc: Any, model: Any, optimizer: Any, meta: dict[str, Any], final: Path) -> None:
        """dcp or accelerate: every process writes its part into one shared directory."""
        from safetensors.torch import save_file

        tmp = self.root / f".tmp-{final.name}"
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        acc.wait_for_everyone()
        if meta["format"] == "dcp":
            dist_engine.save_sharded(tmp, model, optimizer)
        else:
            acc.save_state(str(tmp), safe_serialization=True)
        if acc.is_main_process:
            save_file(_rng_state(), str(tmp / "rng.safetensors"))
            (tmp / _STATE).write_text(json.dumps(meta))
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)

    def _save_own(self, acc: Any, model: Any, optimizer: Any, names: list[str], meta: dict[str, Any],
                  final: Path) -> None:
        """deltamoe's own format, by the main process: safetensors of the trainable parameters, and of
        the optimizer state with the random state."""
        from safetensors.torch import save_file

        from deltamoe.io import atomic_output_dir

        self.root.mkdir(parents=True, exist_ok=True)
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


def _check_names(path: Path, meta: Mapping[str, Any], names: list[str]) -> None:
    if meta["param_names"] != names:
        raise CheckpointError(
            f"{path}: trains other parameters than this run; start over with checkpoint.resume: never"
        )


def restore_unwrapped(resume: Resume, model: Any, optimizer: Any, names: list[str]) -> None:
    """The part of a resume before accelerate wraps the model: a checkpoint in deltamoe's own format."""
    from safetensors.torch import load_file

    path, meta = resume.path, resume.meta
    if meta["format"] != "deltamoe":
        return
    _check_names(path, meta, names)
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


def restore_prepared(acc: Any, resume: Resume, model: Any, optimizer: Any, names: list[str], stream: TrainStream,
                     scheduler: Any) -> Progress:
    """The rest of a resume, once the model and optimizer are prepared: their state in the other
    formats, the data stream's position, the schedule and the counters."""
    path, meta = resume.path, resume.meta
    if meta["format"] == "accelerate":
        acc.load_state(str(path))
    elif meta["format"] == "dcp":
        from safetensors.torch import load_file

        _check_names(path, meta, names)
        dist_engine.load_sharded(path, model, optimizer)
        _set_rng_state(load_file(str(path / "rng.safetensors")))
    stream.load_state_dict(meta["data"])
    progress = Progress(step=meta["step"], tokens=meta["tokens"], heldout_before=meta.get("heldout_before"))
    with warnings.catch_warnings():  # "scheduler.step() before optimizer.step()": intended here
        warnings.simplefilter("ignore", UserWarning)
        for _ in range(progress.step):  # the schedule is a pure function of the step
            scheduler.step()
    return progress
