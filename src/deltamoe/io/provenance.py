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
from deltamoe.io import CONFIG_NAME, INDEX_NAME, Checkpoint
from deltamoe.errors import CheckpointError

MANIFEST_NAME = "deltamoe.json"
FORMAT_VERSION = 1
_CHUNK = 2**20
_HASH_THREADS = 4  # files hashed at once, at most (and at most one per core)


# Files at least this large have their sha256 cached (see _hash_cache_key).
_CACHE_MIN_BYTES = 16 * 2**20


def _hash_cache_dir() -> Path | None:
    if os.environ.get("DELTAMOE_HASH_CACHE", "1") == "0":
        return None
    root = os.environ.get("DELTAMOE_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "deltamoe"
    )
    return Path(root) / "sha256"


def _hash_cache_key(path: str | os.PathLike[str]) -> tuple[str, os.stat_result]:
    # Like git's index: a file whose path, inode, size, mtime and ctime are unchanged has
    # unchanged contents. ctime cannot be set back by user tools, so a rewrite always misses.
    st = os.stat(path)
    ident = f"{os.path.realpath(path)}|{st.st_dev}|{st.st_ino}|{st.st_size}|{st.st_mtime_ns}|{st.st_ctime_ns}"
    return hashlib.sha256(ident.encode()).hexdigest(), st


def sha256_file(path: str | os.PathLike[str]) -> str:
    """sha256 of a file; large files' digests are cached by stat identity (DELTAMOE_HASH_CACHE=0 disables).

    Grafting one delta onto many MoEs, or re-running a recipe, then hashes the unchanged base
    and post-trained models once instead of on every run.
    """
    cache = _hash_cache_dir()
    key, st = _hash_cache_key(path)
    entry = cache / key if cache is not None and st.st_size >= _CACHE_MIN_BYTES else None
    if entry is not None:
        try:
            cached = entry.read_text().strip()
            if len(cached) == 64:
                return cached
        except (OSError, UnicodeDecodeError):
            pass
    digest = _sha256_file(path)
    if entry is not None and _hash_cache_key(path)[0] == key:  # unchanged while we read it
        try:
            entry.parent.mkdir(parents=True, exist_ok=True)
            tmp = entry.with_name(f".{key}.{os.getpid()}.{threading.get_ident()}")
            tmp.write_text(digest + "\n")
            os.replace(tmp, entry)
        except OSError:
            pass  # a read-only cache only costs speed
    return digest


def _sha256_file(path: str | os.PathLike[str]) -> str:
    h = hashlib.sha256()
    buf = bytearray(_CHUNK)  # one reused 1 MiB buffer (larger ones hash no faster here)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])  # hashlib releases the GIL on large buffers: runs beside the main work
    return h.hexdigest()


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


def _yield_the_cpu() -> None:
    # Linux keeps a nice value per thread: at 19 the hashing threads take the cycles that the work
    # they run beside leaves idle and finish on every core once it is done, instead of taking a
    # fair share from its critical thread (measured on 2 cores: docs/design.md#input-hashing).
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
    except (AttributeError, OSError):
        pass  # not Linux, or not permitted: hashing runs at normal priority


def hash_in_background(*ckpts: Checkpoint) -> Future[list[dict[str, Any]]]:
    """Start hashing the inputs' files on low-priority worker threads (one file per task, in input
    order); the caller collects the descriptions, as :func:`describe_checkpoint` gives them, at the end."""
    workers = max(1, min(_HASH_THREADS, os.cpu_count() or 1))
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="deltamoe-sha256", initializer=_yield_the_cpu)
    names = [_weight_files(c) for c in ckpts]
    digests = [[pool.submit(sha256_file, c.path / n) for n in ns] for c, ns in zip(ckpts, names)]
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
