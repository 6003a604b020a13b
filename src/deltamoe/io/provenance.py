"""``deltamoe.json``: where an output came from (tool version, command, inputs and their sha256,
language -> expert allocation, the stages that produced it) and a short model card."""

from __future__ import annotations

import hashlib
import json
import os
import threading
import weakref
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from deltamoe import __version__
from deltamoe.filehash import _HASH_THREADS, _yield_the_cpu, sha256_file, take_started
from deltamoe.io import CONFIG_NAME, INDEX_NAME, Checkpoint
from deltamoe.errors import CheckpointError

MANIFEST_NAME = "deltamoe.json"
FORMAT_VERSION = 1


def _weight_files(ckpt: Checkpoint) -> list[str]:
    """The files that define a checkpoint's weights and config, sorted."""
    names = [CONFIG_NAME, *(p.name for p in ckpt.shard_files)]
    if (ckpt.path / INDEX_NAME).is_file():
        names.append(INDEX_NAME)
    return sorted(names)


def _describe(ckpt: Checkpoint, files: dict[str, str]) -> dict[str, Any]:
    digest = hashlib.sha256("".join(f"{n}:{h}\n" for n, h in files.items()).encode()).hexdigest()
    return {"path": str(ckpt.path.absolute()), "sha256": digest, "files": files}


def describe_checkpoint(ckpt: Checkpoint) -> dict[str, Any]:
    """Path and sha256 of every file that defines a checkpoint's weights and config.

    ``sha256`` is a digest of the sorted ``name:sha256`` lines, one identifier for the model.
    """
    return _describe(ckpt, {n: sha256_file(ckpt.path / n) for n in _weight_files(ckpt)})


def hash_in_background(*ckpts: Checkpoint) -> Future[list[dict[str, Any]]]:
    """Start hashing the inputs' files on low-priority worker threads (one file per task, in input
    order); the caller collects the descriptions, as :func:`describe_checkpoint` gives them, at the end."""
    workers = max(1, min(_HASH_THREADS, os.cpu_count() or 1))
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="deltamoe-sha256", initializer=_yield_the_cpu)
    names = [_weight_files(c) for c in ckpts]
    # files whose hashing the command line started before importing torch (filehash.prehash) are taken over
    digests = [[take_started(c.path / n) or pool.submit(sha256_file, c.path / n) for n in ns]
               for c, ns in zip(ckpts, names)]
    pool.shutdown(wait=False)
    waiter = ThreadPoolExecutor(max_workers=1, thread_name_prefix="deltamoe-sha256-collect")
    result = waiter.submit(lambda: [_describe(c, {n: f.result() for n, f in zip(ns, fs)})
                                    for c, ns, fs in zip(ckpts, names, digests)])
    waiter.shutdown(wait=False)
    _FILE_TASKS[result] = [f for fs in digests for f in fs]
    return result


# The per-file tasks behind each hash_in_background result, for cancel_hashing.
_FILE_TASKS: weakref.WeakKeyDictionary[Future[Any], list[Future[str]]] = weakref.WeakKeyDictionary()


def cancel_hashing(hashes: Future[Any]) -> None:
    """Drop the files not yet hashed for ``hashes`` (an operation that failed will not need them):
    the process then exits once the files being hashed are done, not after every input."""
    for f in _FILE_TASKS.pop(hashes, []):
        f.cancel()


def read_manifest(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The ``deltamoe.json`` of a checkpoint directory, or None for a plain HF checkpoint."""
    p = Path(path) / MANIFEST_NAME
    if not p.is_file():
        return None
    try:
        data = json.loads(p.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{p}: not valid JSON: {e}") from None
    if not isinstance(data, dict) or "stages" not in data:
        raise CheckpointError(f"{p}: not a deltamoe provenance file (no 'stages')")
    return data


def new_manifest(
    previous: dict[str, Any] | None,
    *,
    stage: str,
    params: dict[str, Any],
    inputs: dict[str, dict[str, Any]],
    command: list[str] | None,
    moe: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Manifest for a new output: the previous stages (if any) plus this one.

    No timestamps: the same command with the same inputs gives byte-identical outputs.
    """
    stages = list(previous["stages"]) if previous else []
    stages.append(
        {
            "stage": stage,
            "deltamoe_version": __version__,
            "command": command,
            "params": params,
            "inputs": inputs,
        }
    )
    out: dict[str, Any] = {
        "format": FORMAT_VERSION,
        "deltamoe_version": __version__,
        "stage": stage,
        "stages": stages,
    }
    moe = moe if moe is not None else (previous or {}).get("moe")
    if moe is not None:
        out["moe"] = moe
    if previous and "expand" in previous:  # a block-expanded model stays one through training and graft
        out["expand"] = previous["expand"]
    return out


def write_manifest(directory: str | os.PathLike[str], manifest: dict[str, Any]) -> None:
    Path(directory, MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")


def write_model_card(directory: str | os.PathLike[str], manifest: dict[str, Any]) -> None:
    """A short README.md so a checkpoint shared on its own still says what it is."""
    lines = [
        "---",
        "library_name: transformers",
        "tags: [deltamoe, mixture-of-experts]",
        "---",
        f"# deltamoe output ({manifest['stage']})",
        "",
        f"Produced by deltamoe {manifest['deltamoe_version']}. The full provenance (commands, "
        "parameters, sha256 of every input) is in `deltamoe.json`.",
        "",
        "Stages:",
    ]
    for s in manifest["stages"]:
        ins = ", ".join(f"{k}: `{v['path']}` (sha256 {v['sha256'][:12]}…)" for k, v in s["inputs"].items())
        lines.append(f"- **{s['stage']}** from {ins}")
    moe = manifest.get("moe")
    if moe:
        lines += [
            "",
            f"MoE: {moe['num_experts']} experts, top-{moe['top_k']}, family `{moe['family']}` → "
            f"`{moe['architecture']}`; MoE layers: {moe['moe_layers']}.",
            f"Expert allocation: {json.dumps(moe['allocation']) if moe['allocation'] else 'none given'}.",
            "Load with `transformers.AutoModelForCausalLM.from_pretrained(path)`; no remote code needed.",
        ]
    exp = manifest.get("expand")
    if exp:
        lines += [
            "",
            f"Block expansion (LLaMA-Pro): {exp['original_layers']} original decoder layers of family "
            f"`{exp['family']}` and {exp['new_blocks']} new ones (layers {exp['new_layers']}), "
            f"{exp['num_layers']} in all.",
        ]
    Path(directory, "README.md").write_text("\n".join(lines) + "\n")
