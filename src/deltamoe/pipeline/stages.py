"""The plan: stages, their cache keys, and the runner that executes them in order.

A plan is a list of :class:`StageRun` nodes, each a typed function from input paths to one output
directory. Every node's output lives under ``<workdir>/stages/<name>-<key>``, where ``key`` hashes
the stage's parameters and the keys of its inputs (external models are fingerprinted by content).
Outputs are written atomically, so a directory that exists is complete: a re-run skips it, and an
interrupted run resumes at the first stage whose output is missing (training stages also resume
from their own step checkpoints).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

RECIPE_VERSION = 1  # part of every cache key: bump when a stage's meaning changes

T = TypeVar("T")


@dataclass
class StageRun:
    """One node of the plan: ``fn(inputs, out)`` writes the directory ``out`` (atomically)."""

    name: str
    kind: str
    params: dict[str, Any]
    inputs: dict[str, str]  # role -> name of another stage, or "ext:<path>"
    fn: Callable[[dict[str, Path], Path], None]
    est_bytes: int = 0
    key: str = ""
    out: Path = field(default_factory=Path)


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def fingerprint(path: Path, cache_file: Path) -> str:
    """Content hash of an external checkpoint directory, memoised by (path, size, mtime) of its files."""
    from deltamoe.io.provenance import sha256_file

    files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
    stat_key = _digest([(str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files])
    memo = json.loads(cache_file.read_text()) if cache_file.is_file() else {}
    if memo.get(str(path), {}).get("stat") != stat_key:
        memo[str(path)] = {"stat": stat_key, "sha256": _digest([(p.name, sha256_file(p)) for p in files])}
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        cache_file.write_text(json.dumps(memo, indent=1))
    return memo[str(path)]["sha256"]


def _resolve(ref: str, ext: Callable[[str], T], stage: Callable[[str, str], T]) -> T:
    """A stage reference: 'ext:PATH' through ``ext(PATH)``, 'stage' or 'stage/sub' through
    ``stage(name, sub)``."""
    if ref.startswith("ext:"):
        return ext(ref[4:])
    name, _, sub = ref.partition("/")
    return stage(name, sub)


def ref_path(ref: str, stages: dict[str, StageRun], ext_path: Callable[[str], Path]) -> Path:
    """Directory of a stage reference ('stage', 'stage/sub' or 'ext:path')."""
    return _resolve(ref, ext_path, lambda name, sub: stages[name].out / sub if sub else stages[name].out)


def resolve_keys(stages: list[StageRun], workdir: Path, ext_key: Callable[[str], str]) -> None:
    """Give every stage its cache key and output directory (stages are in dependency order)."""
    by_name: dict[str, StageRun] = {}
    for s in stages:
        inputs = {role: _resolve(src, ext_key, lambda name, sub: by_name[name].key + (f"/{sub}" if sub else ""))
                  for role, src in s.inputs.items()}
        s.key = _digest({"v": RECIPE_VERSION, "kind": s.kind, "params": s.params, "inputs": inputs})[:16]
        s.out = workdir / "stages" / f"{s.name}-{s.key}"
        by_name[s.name] = s


def input_paths(stage: StageRun, stages: dict[str, StageRun], ext_path: Callable[[str], Path]) -> dict[str, Path]:
    """Directories of a stage's inputs: 'ext:PATH', 'stage' or 'stage/subdir'."""
    return {role: ref_path(src, stages, ext_path) for role, src in stage.inputs.items()}


def run_plan(
    stages: list[StageRun],
    ext_path: Callable[[str], Path],
    *,
    log: Callable[[str], None] = print,
) -> list[str]:
    """Run every stage whose output is missing, in order; return the names of the stages executed."""
    done: list[str] = []
    by_name = {s.name: s for s in stages}
    dist = _Distributed()
    for i, s in enumerate(stages, 1):
        if s.out.is_dir():
            dist.log(log, f"[{i}/{len(stages)}] {s.name}: cached ({s.out.name})")
            continue
        dist.log(log, f"[{i}/{len(stages)}] {s.name}: running ...")
        t0 = time.perf_counter()
        s.out.parent.mkdir(parents=True, exist_ok=True)
        if s.kind == "train" or dist.is_main:  # training runs on every process; the rest on one
            s.fn(input_paths(s, by_name, ext_path), s.out)
        dist.barrier()
        if not s.out.is_dir():  # every stage function must produce its directory
            raise RuntimeError(f"stage {s.name} finished without writing {s.out}")
        dist.log(log, f"[{i}/{len(stages)}] {s.name}: done in {time.perf_counter() - t0:.0f} s")
        done.append(s.name)
    return done


class _Distributed:
    """Under ``accelerate launch``/``torchrun`` (several processes sharing one file system), training
    stages run on every process and every other stage on the main process while the rest wait."""

    def __init__(self) -> None:
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.state: Any = None
        if self.world > 1:
            import torch
            from accelerate import PartialState

            # accelerate sets up a CPU process group (gloo) only when told to use the CPU
            self.state = PartialState(cpu=not torch.cuda.is_available())

    @property
    def is_main(self) -> bool:
        return self.state is None or self.state.is_main_process

    def barrier(self) -> None:
        if self.state is not None:
            self.state.wait_for_everyone()

    def log(self, log: Callable[[str], None], msg: str) -> None:
        if self.is_main:
            log(msg)
