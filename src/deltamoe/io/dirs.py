"""Output directories written whole or not at all, and the small files that travel with a model."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from deltamoe.errors import OutputError
from deltamoe.io.format import TOKENIZER_FILES
from deltamoe.io.reader import Checkpoint
from deltamoe.preflight import (
    apply_umask,
    broken_link_message,
    is_broken_link,
    os_error_message,
    remove_stale_temporaries,
    temp_prefix,
    writable_dir,
)


def check_output(out: str | os.PathLike[str], *, force: bool) -> Path:
    """Fail early (before any heavy work) if ``out`` exists without ``force`` or is unwritable."""
    out = Path(out).absolute()
    if is_broken_link(out):
        raise OutputError(broken_link_message(out))
    if out.exists() and not force:
        raise OutputError(f"{out}: already exists; pass --force (force=True) to replace it")
    if out.exists() and not out.is_dir():
        raise OutputError(f"{out}: exists and is not a directory; refusing to replace it")
    writable_dir(out.parent, str(out))
    return out


@contextmanager
def atomic_output_dir(out: str | os.PathLike[str], *, force: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling directory that replaces ``out`` only if the block succeeds.

    On any exception (including KeyboardInterrupt) the temporary directory is removed and
    ``out`` is left exactly as it was; an OSError (a full disk...) becomes an :class:`OutputError`.
    The temporary directory's name records this process's host and pid, so that the next run
    writing ``out`` removes those of killed runs (and only those). The output honours the umask.
    """
    out = check_output(out, force=force)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(out.parent, out.name)
        tmp = Path(tempfile.mkdtemp(prefix=temp_prefix(out), dir=out.parent))
    except OSError as e:
        raise OutputError(f"{out}: cannot create the output directory: {e.strerror or e}") from None
    try:
        yield tmp
        apply_umask(tmp)
        if out.exists():
            if not force:  # appeared while we were working
                raise OutputError(f"{out}: was created by someone else during this run; not replacing it")
            old = Path(tempfile.mkdtemp(prefix=temp_prefix(out, "old"), dir=out.parent))
            os.replace(out, old / "x")
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise OutputError(os_error_message(e, out)) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def copy_aux_files(src: Checkpoint | str | os.PathLike[str], dst: str | os.PathLike[str]) -> list[str]:
    """Copy tokenizer files, chat template and generation config from ``src`` into ``dst``."""
    src_path = src.path if isinstance(src, Checkpoint) else Path(src)
    copied = []
    for name in TOKENIZER_FILES:
        p = src_path / name
        if p.is_file():
            shutil.copyfile(p, Path(dst) / name)
            copied.append(name)
    return copied


def write_json(path: str | os.PathLike[str], obj: Any) -> None:
    Path(path).write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write a text file whole or not at all: a temporary file beside it, then a rename (a reader
    never sees half a file; the file gets the umask's permissions, as a plain write would)."""
    p = Path(path)
    tmp = p.with_name(f".{p.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, p)
    finally:
        tmp.unlink(missing_ok=True)
