"""Checks that run before any heavy work: paths, writability, free disk, option values, stale temporaries.

Every command calls these before it reads a tensor, so that a bad input ends in one clear error
(naming the file, field or option and what to do) within seconds, with nothing written. They are
collected here so that each check exists once; the README's "Input checks" section lists them.
"""

from __future__ import annotations

import difflib
import errno
import os
import re
import shutil
import socket
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from deltamoe.errors import OutputError, UsageError

# Hidden siblings of an output while it is being written: .NAME.tmp-HOST-PID-XXXX and .NAME.old-HOST-PID-XXXX.
_TEMP = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old)-(?P<host>[^/]+)-(?P<pid>\d+)-(?P<rand>[A-Za-z0-9_]+)$")
_FULL = (errno.ENOSPC, errno.EDQUOT)


def human(n: float) -> str:
    """1234567 -> '1.2 MB' (decimal units, as ``df -H``)."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return str(n)


# -- paths ---------------------------------------------------------------------------------
def is_broken_link(path: Path) -> bool:
    """A symbolic link that loops or points to nothing (``exists()`` is False, ``lexists`` True)."""
    return os.path.lexists(path) and not os.path.exists(path)


def broken_link_message(path: Path) -> str:
    try:
        os.stat(path)
    except OSError as e:
        if e.errno == errno.ELOOP:
            return f"{path}: is a symbolic link that loops (too many levels of symbolic links); fix or remove the link"
    return f"{path}: is a symbolic link to {os.readlink(path)}, which does not exist; fix or remove the link"


def nearest_existing(path: Path) -> Path:
    """The closest ancestor of ``path`` (or ``path`` itself) that exists; a broken link is an error."""
    p = Path(path).absolute()
    while True:
        if is_broken_link(p):
            raise OutputError(broken_link_message(p))
        if p.exists() or p == p.parent:
            return p
        p = p.parent


def _probe(directory: Path) -> None:
    """Create and remove an empty directory in ``directory`` (os.access is wrong for root and ACLs)."""
    probe = tempfile.mkdtemp(prefix=".deltamoe-probe-", dir=directory)
    os.rmdir(probe)


def writable_dir(path: str | os.PathLike[str], what: str) -> Path:
    """``path`` is a directory we can write in, or can be created: else an error naming ``what``."""
    p = Path(path).absolute()
    if is_broken_link(p):
        raise OutputError(f"{what}: {broken_link_message(p)}")
    if p.exists() and not p.is_dir():
        raise OutputError(f"{what}: {p} exists and is not a directory; choose a directory")
    anchor = nearest_existing(p)
    if not anchor.is_dir():
        raise OutputError(f"{what}: cannot write {p} ({anchor} is not a directory)")
    try:
        _probe(anchor)
    except OSError as e:
        raise OutputError(f"{what}: cannot write {p} ({anchor}: {e.strerror or e}); choose a writable location") from None
    return p


# -- free disk -----------------------------------------------------------------------------
def disk_free(path: Path) -> int:
    """Free bytes on the file system holding ``path`` (tests replace this to fake a full disk)."""
    return shutil.disk_usage(path).free


def check_disk(path: str | os.PathLike[str], need: int, what: str) -> None:
    """Refuse to start when the planned ``need`` bytes do not fit on the file system of ``path``."""
    anchor = nearest_existing(Path(path))
    free = disk_free(anchor)
    if need > free:
        raise OutputError(
            f"{path}: not enough free disk: {what} needs about {human(need)} ({need} bytes), but {anchor} has "
            f"{human(free)} ({free} bytes) free; free {human(need - free)} or choose another location"
        )


def checkpoint_bytes(specs: Any, aux: Any = ()) -> int:
    """Bytes a checkpoint directory takes: tensor data, headers and index (~256 bytes per tensor),
    the tokenizer and config files in ``aux`` (paths) and ~16 KB of config, manifest and card."""
    specs = list(specs)
    return sum(s.nbytes for s in specs) + 256 * len(specs) + sum(Path(a).stat().st_size for a in aux) + 2**14


def check_output_disk(out: Path, specs: Any, aux: Any = ()) -> None:
    """Enough free disk for a checkpoint of ``specs`` (plus ``aux`` files) at ``out``."""
    check_disk(out, checkpoint_bytes(specs, aux), "the output")


def os_error_message(e: OSError, out: Path) -> str:
    """One line for an OSError raised while writing ``out`` (full disk, quota, I/O error...)."""
    where = f" ({e.filename})" if e.filename else ""
    if e.errno in _FULL:
        return (f"{out}: the disk filled up while writing{where}: {e.strerror}; nothing was written and any "
                "previous output is unchanged. Free some space or choose another location, then run again")
    return (f"{out}: the system reported an error{where}: {e.strerror or e}; nothing was written and any previous "
            "output is unchanged")


# -- option values -------------------------------------------------------------------------
def check_shard_size(max_shard_bytes: int, option: str = "--shard-size") -> None:
    if not isinstance(max_shard_bytes, int) or max_shard_bytes <= 0:
        raise UsageError(f"{option} must be a positive size such as 5GB or 500MB, got {max_shard_bytes!r}")


def unknown_field_hint(model: Any, loc: tuple[Any, ...]) -> str:
    """' (did you mean 'x'?)' or '; valid fields: ...' for the unknown field at ``loc`` of a pydantic model."""
    known = fields_at(model, loc[:-1])
    near = difflib.get_close_matches(str(loc[-1]), known, n=1)
    if near:
        return f" (did you mean '{near[0]}'?)"
    return f"; valid fields: {', '.join(known)}" if known else ""


def fields_at(model: Any, loc: tuple[Any, ...]) -> list[str]:
    """Field names of the (nested) pydantic model reached by ``loc`` from ``model``; [] if unknown."""
    from pydantic import BaseModel

    cls = model
    for part in loc:
        if isinstance(part, int):
            continue
        field = getattr(cls, "model_fields", {}).get(part)
        if field is None:
            return []
        ann = field.annotation
        cands = [ann, *getattr(ann, "__args__", ())]
        nxt = next((c for c in cands if isinstance(c, type) and issubclass(c, BaseModel)), None)
        if nxt is None:
            return []
        cls = nxt
    return list(getattr(cls, "model_fields", {}))


# -- temporaries of killed runs ------------------------------------------------------------
def temp_prefix(out: Path, kind: str = "tmp") -> str:
    """Prefix of a temporary sibling of ``out`` that names its owner (host and pid)."""
    return f".{out.name}.{kind}-{socket.gethostname()}-{os.getpid()}-"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def stale_temporaries(directory: Path, name: str | None = None) -> list[tuple[Path, int]]:
    """Temporary siblings in ``directory`` (of output ``name``, or of any output) whose owner is dead.

    Only temporaries made on this host are judged: on a shared file system another node's pid
    says nothing here.
    """
    host = socket.gethostname()
    found = []
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return []
    for entry in entries:
        m = _TEMP.match(entry.name)
        if not m or (name is not None and m["name"] != name) or m["host"] != host:
            continue
        pid = int(m["pid"])
        if pid != os.getpid() and not _alive(pid):
            found.append((Path(entry.path), pid))
    return found


def remove_stale_temporaries(directory: Path, name: str | None = None,
                             log: Callable[[str], None] | None = None) -> int:
    """Remove what :func:`stale_temporaries` finds, saying so; return how many were removed."""
    say = log or (lambda m: print(m, file=sys.stderr))
    n = 0
    for path, pid in stale_temporaries(directory, name):
        shutil.rmtree(path, ignore_errors=True)
        if not path.exists():
            say(f"note: removed {path}, left behind by an earlier run (pid {pid}) that was killed")
            n += 1
    return n


def current_umask() -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # no /proc: read it the racy way
    os.umask(mask)
    return mask


def apply_umask(root: Path) -> None:
    """Give ``root`` and everything in it the permissions the umask asks for (mkdtemp makes 0700,
    safetensors 0600), so that teammates can read a model the way they read any other file."""
    mask = current_umask()
    os.chmod(root, 0o777 & ~mask)
    for dirpath, dirnames, filenames in os.walk(root):
        for d in dirnames:
            os.chmod(os.path.join(dirpath, d), 0o777 & ~mask, follow_symlinks=False)
        for f in filenames:
            p = os.path.join(dirpath, f)
            if not os.path.islink(p):
                os.chmod(p, 0o666 & ~mask)
