"""sha256 of input files, with a cache keyed by stat identity, on low-priority threads; importable
without torch, so that the command line can start hashing a command's inputs before it pays for
importing torch (about 1.3 s on 2 cores, while the other core would idle).

:func:`prehash` starts hashing the weight files of the model directories a command names;
:func:`deltamoe.io.provenance.hash_in_background` later takes those digests over
(:func:`take_started`) instead of hashing the files again. :func:`abandon` drops what was started
and not taken (a command that fails before it needs them): files not yet begun are cancelled and
files being hashed stop at their next MiB, so a failing command exits at once.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

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


def sha256_file(path: str | os.PathLike[str], stop: threading.Event | None = None) -> str:
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
    digest = _sha256_file(path, stop)
    if entry is not None and _hash_cache_key(path)[0] == key:  # unchanged while we read it
        try:
            entry.parent.mkdir(parents=True, exist_ok=True)
            tmp = entry.with_name(f".{key}.{os.getpid()}.{threading.get_ident()}")
            tmp.write_text(digest + "\n")
            os.replace(tmp, entry)
        except OSError:
            pass  # a read-only cache only costs speed
    return digest


def _sha256_file(path: str | os.PathLike[str], stop: threading.Event | None = None) -> str:
    h = hashlib.sha256()
    buf = bytearray(_CHUNK)  # one reused 1 MiB buffer (larger ones hash no faster here)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])  # hashlib releases the GIL on large buffers: runs beside the main work
            if stop is not None and stop.is_set():
                raise _Abandoned(str(path))
    return h.hexdigest()


def _yield_the_cpu() -> None:
    # Linux keeps a nice value per thread: at 19 the hashing threads take the cycles that the work
    # they run beside leaves idle and finish on every core once it is done, instead of taking a
    # fair share from its critical thread (measured on 2 cores: docs/design.md#input-hashing).
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
    except (AttributeError, OSError):
        pass  # not Linux, or not permitted: hashing runs at normal priority



class _Abandoned(Exception):
    """A prehash that no command took over was stopped (never seen outside this module)."""


# Prehashed files not yet taken over: (path, stat identity) -> its digest, and the event that stops it.
_started: dict[tuple[str, str], tuple[Future[str], threading.Event]] = {}
_lock = threading.Lock()


def _model_files(directory: Path) -> list[Path]:
    """The weight files of a local model directory as provenance hashes them (config, shards, index),
    or none where it is not one; any problem is left for the checkpoint reader to report."""
    try:
        if not (directory / "config.json").is_file():
            return []
        index = directory / "model.safetensors.index.json"
        if index.is_file():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            files = [directory / "config.json", index, *(directory / s for s in shards)]
        else:
            files = [directory / "config.json", *directory.glob("*.safetensors")]
        return sorted((f for f in files if f.is_file()), key=lambda p: p.name)
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return []


def _local_dir(arg: str) -> Path | None:
    """The model directory an argument names (``PATH`` or ``PATH:WEIGHT``), if it is a local one."""
    for text in (arg, arg.rsplit(":", 1)[0] if ":" in arg else None):
        if text and Path(text).expanduser().is_dir():
            return Path(text).expanduser()
    return None


def prehash(args: Iterable[str | os.PathLike[str] | None]) -> None:
    """Start hashing the weight files of the local model directories among ``args``, in order, on
    low-priority threads (nothing for Hub ids, missing paths or anything else)."""
    files = [f for a in args if a is not None and (d := _local_dir(str(a))) for f in _model_files(d)]
    if not files:
        return
    workers = max(1, min(_HASH_THREADS, os.cpu_count() or 1))
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="deltamoe-prehash", initializer=_yield_the_cpu)
    stop = threading.Event()
    with _lock:
        for f in files:
            try:
                key = (os.path.realpath(f), _hash_cache_key(f)[0])
            except OSError:
                continue
            if key not in _started:
                _started[key] = (pool.submit(sha256_file, f, stop), stop)
    pool.shutdown(wait=False)


def take_started(path: str | os.PathLike[str]) -> Future[str] | None:
    """The digest that :func:`prehash` started for ``path`` if the file is unchanged since; None otherwise."""
    with _lock:
        if not _started:
            return None
        try:
            key = (os.path.realpath(path), _hash_cache_key(path)[0])
        except OSError:
            return None
        started = _started.pop(key, None)
    return started[0] if started else None


def abandon() -> None:
    """Stop every prehash not taken over (the command failed before it needed them)."""
    with _lock:
        pending = list(_started.values())
        _started.clear()
    for f, stop in pending:
        f.cancel()
        stop.set()
