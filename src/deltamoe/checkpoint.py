"""Streaming safetensors checkpoints: lazy reading, planned sharded writing, atomic output.

Reading: the shard headers are parsed once; each tensor is then read on demand with
``pread`` into a fresh buffer that is freed when the caller drops it. We deliberately do not
keep the shards memory-mapped: pages of a mapping count towards the process's resident set
until it is unmapped, so a mapped 16 GB model looks (and, under cgroup limits, is charged)
like 16 GB of memory by the end of a pass. ``pread`` keeps peak memory at the size of the
tensors in flight.

Writing: the output layout (names, dtypes, shapes) is known before any data is computed, so
:class:`ShardedWriter` plans the shards up front, writes each header once and ``pwrite``s
every tensor at its final offset. Nothing is buffered beyond the tensor being written, and
tensors may arrive in any order. The files are ordinary safetensors files (verified in the
tests by reading them back with the ``safetensors`` library and with transformers).

Model files are never unpickled: a checkpoint with only ``.bin``/``.pt`` weights is refused
with instructions for converting it.
"""

from __future__ import annotations

import errno
import json
import math
import os
import re
import shutil
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from deltamoe.errors import CheckpointError, OutputError
from deltamoe.preflight import (
    apply_umask,
    broken_link_message,
    check_shard_size,
    is_broken_link,
    os_error_message,
    remove_stale_temporaries,
    temp_prefix,
    writable_dir,
)

CONFIG_NAME = "config.json"
INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
DEFAULT_SHARD_BYTES = 5 * 10**9

# safetensors dtype code -> (torch dtype, bytes per element)
_DTYPES: dict[str, tuple[torch.dtype, int]] = {
    "F64": (torch.float64, 8),
    "F32": (torch.float32, 4),
    "F16": (torch.float16, 2),
    "BF16": (torch.bfloat16, 2),
    "I64": (torch.int64, 8),
    "I32": (torch.int32, 4),
    "I16": (torch.int16, 2),
    "I8": (torch.int8, 1),
    "U8": (torch.uint8, 1),
    "BOOL": (torch.bool, 1),
}
_TORCH_TO_CODE = {v[0]: k for k, v in _DTYPES.items()}
# Names accepted by --dtype; "auto" keeps each tensor's stored dtype.
DTYPE_NAMES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}

# Files that travel with a model: tokenizer, chat template, generation settings.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_MAX_HEADER = 100 * 2**20


def dtype_code(dtype: torch.dtype) -> str:
    """safetensors dtype code (``"BF16"``...) of a torch dtype."""
    try:
        return _TORCH_TO_CODE[dtype]
    except KeyError:
        raise CheckpointError(f"dtype {dtype} cannot be stored in safetensors by deltamoe") from None


def torch_dtype(code: str) -> torch.dtype:
    return _DTYPES[code][0]


def itemsize(code: str) -> int:
    return _DTYPES[code][1]


@dataclass(frozen=True)
class TensorSpec:
    """Name, safetensors dtype code and shape of one tensor; enough to plan a file layout."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * itemsize(self.dtype)


@dataclass(frozen=True)
class TensorInfo:
    """Where one stored tensor lives: file and absolute byte offset of its data."""

    spec: TensorSpec
    file: Path
    offset: int


def _read_header(path: Path) -> tuple[dict[str, Any], int]:
    """Parse a safetensors header; return it and the offset where the data section starts."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(8)
            n = int.from_bytes(raw, "little")
            text = f.read(n) if len(raw) == 8 and 0 < n <= _MAX_HEADER else b""
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read this shard ({e.strerror or e})") from None
    if len(raw) < 8:
        raise CheckpointError(f"{path}: not a safetensors file (shorter than 8 bytes)")
    if n <= 0 or n > _MAX_HEADER or 8 + n > size:
        raise CheckpointError(f"{path}: not a safetensors file (header length {n} is invalid)")
    try:
        header = json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: corrupt safetensors header: {e}") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object)")
    return header, 8 + n


def _parse_entry(path: Path, name: str, entry: Any, data_len: int) -> tuple[TensorSpec, int, int]:
    try:
        code, shape, (begin, end) = entry["dtype"], tuple(entry["shape"]), entry["data_offsets"]
    except (KeyError, TypeError, ValueError):
        raise CheckpointError(f"{path}: corrupt header entry for tensor {name!r}") from None
    if code not in _DTYPES:
        raise CheckpointError(
            f"{path}: tensor {name!r} has dtype {code}, which deltamoe does not handle "
            f"(supported: {', '.join(_DTYPES)})"
        )
    ints = all(isinstance(x, int) and not isinstance(x, bool) for x in (*shape, begin, end))
    if not ints or any(d < 0 for d in shape):
        raise CheckpointError(f"{path}: corrupt header entry for tensor {name!r} (shape and offsets must be "
                              "non-negative integers)")
    spec = TensorSpec(name, code, shape)
    if not (0 <= begin <= end <= data_len) or end - begin != spec.nbytes:
        raise CheckpointError(
            f"{path}: tensor {name!r} ({code}, shape {list(shape)}) has data offsets "
            f"[{begin}, {end}) that do not fit its size or the file; the file is truncated or corrupt"
        )
    return spec, begin, end


def _check_layout(path: Path, spans: list[tuple[int, int, str]], data_len: int) -> None:
    """Tensors must tile the data section exactly, as the safetensors library requires: sorted by
    offset, each starts where the previous one ends (no overlap, no gap) and the last ends the file."""
    pos, prev = 0, None
    for begin, end, name in sorted(spans):
        if begin < pos:
            raise CheckpointError(
                f"{path}: tensors {prev!r} and {name!r} overlap (bytes [{begin}, {pos}) belong to both); "
                "the header is corrupt and reading it would give wrong values"
            )
        if begin > pos:
            raise CheckpointError(f"{path}: {begin - pos} bytes before tensor {name!r} belong to no tensor "
                                  "(offsets are not contiguous); the header is corrupt")
        pos, prev = end, name
    if pos != data_len:
        raise CheckpointError(f"{path}: the data section holds {data_len} bytes but the tensors cover {pos}; "
                              "the file is truncated or corrupt")


def _parse_shard(path: Path) -> dict[str, TensorInfo]:
    header, data_start = _read_header(path)
    data_len = path.stat().st_size - data_start
    out: dict[str, TensorInfo] = {}
    spans: list[tuple[int, int, str]] = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        spec, begin, end = _parse_entry(path, name, entry, data_len)
        spans.append((begin, end, name))
        out[name] = TensorInfo(spec, path, data_start + begin)
    _check_layout(path, spans, data_len)
    return out


def model_ref(spec: str | os.PathLike[str], base_dir: Path | None = None) -> tuple[str, Path | str]:
    """Classify a model argument without fetching anything: ``("local", path)`` or ``("hub", repo_id)``.

    The rule: a path that exists (relative to ``base_dir`` first, then to the working directory)
    is local. ``hf://owner/name`` is always a Hub id. Otherwise the text is a Hub id only if it is
    exactly ``owner/name``, does not start with ``.``, ``/`` or ``~``, and ``owner`` is not a local
    directory (then it is a mistyped local path). A symbolic link that loops or dangles is an error.
    """
    text = str(spec)
    if text.startswith("hf://"):
        return "hub", text[5:]
    cands = [Path(text).expanduser()]
    if base_dir is not None and not cands[0].is_absolute():
        cands.insert(0, base_dir / cands[0])
    for c in cands:
        if is_broken_link(c):
            raise CheckpointError(broken_link_message(c))
        if c.exists():
            return "local", c
    if not _HUB_ID.match(text) or text.startswith((".", "/", "~")):
        raise CheckpointError(f"{text}: no such directory (and it is not a Hugging Face Hub id)")
    owner = next((c.parent for c in cands if c.parent.is_dir()), None)
    if owner is not None:
        raise CheckpointError(
            f"{text}: no such directory. {owner} exists locally, so this is taken as a mistyped local path, "
            f"not as a Hugging Face Hub id; check the path, or write hf://{text} to fetch it from the Hub"
        )
    return "hub", text


def resolve_model(spec: str | os.PathLike[str], base_dir: Path | None = None) -> Path:
    """Turn a local path or a Hugging Face Hub id (see :func:`model_ref`) into a local directory.

    Hub ids are fetched with ``huggingface_hub`` (config, safetensors and tokenizer files only).
    """
    kind, ref = model_ref(spec, base_dir)
    if kind == "local":
        return Path(ref)
    text = str(ref)
    from huggingface_hub import snapshot_download

    patterns = ["config.json", "*.safetensors", INDEX_NAME, *TOKENIZER_FILES]
    try:
        return Path(snapshot_download(repo_id=text, allow_patterns=patterns))
    except Exception as e:  # hub errors have many types: offline, DNS, auth, 404
        raise CheckpointError(
            f"{text}: there is no local directory of that name, and fetching it from the Hugging Face Hub failed "
            f"({type(e).__name__}: {e}). Check the path; without network access, download the model elsewhere "
            f"(safetensors, config and tokenizer files) and pass its local path."
        ) from None


class Checkpoint:
    """A Hugging Face checkpoint directory opened for lazy, tensor-at-a-time reading.

    Only the headers are read on opening; :meth:`read` loads one tensor.
    """

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)
        if not self.path.is_dir():
            raise CheckpointError(f"{self.path}: not a directory")
        cfg_path = self.path / CONFIG_NAME
        if not cfg_path.is_file():
            raise CheckpointError(
                f"{self.path}: missing {CONFIG_NAME}; a Hugging Face checkpoint directory needs one"
            )
        try:
            self.config: dict[str, Any] = json.loads(cfg_path.read_text())
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{cfg_path}: not valid JSON: {e}") from None
        if not isinstance(self.config, dict):
            raise CheckpointError(f"{cfg_path}: expected a JSON object")
        self.shard_files = self._find_shards()
        self.tensors: dict[str, TensorInfo] = {}
        for shard in self.shard_files:
            for name, info in _parse_shard(shard).items():
                if name in self.tensors:
                    raise CheckpointError(
                        f"{self.path}: tensor {name!r} is stored twice "
                        f"({self.tensors[name].file.name} and {shard.name})"
                    )
                self.tensors[name] = info
        self._check_index()

    def _find_shards(self) -> list[Path]:
        index = self.path / INDEX_NAME
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (KeyError, TypeError, UnicodeDecodeError, json.JSONDecodeError) as e:
                raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from None
            files = sorted(set(weight_map.values()))
            for name in files:
                if not (self.path / name).is_file():
                    raise CheckpointError(f"{index}: lists shard {name}, which does not exist")
            return [self.path / f for f in files]
        files = sorted(self.path.glob("*.safetensors"))
        if files:
            return files
        pickled = sorted(p.name for p in self.path.iterdir() if p.suffix in _PICKLE_SUFFIXES)
        if pickled:
            raise CheckpointError(
                f"{self.path}: only pickle weights found ({', '.join(pickled)}). deltamoe never "
                "unpickles model files, because unpickling can run arbitrary code. If you trust the "
                "file, convert it once with: python -c \"from transformers import "
                "AutoModelForCausalLM as M; M.from_pretrained('IN').save_pretrained('OUT')\" "
                "(save_pretrained writes safetensors), then pass OUT."
            )
        raise CheckpointError(f"{self.path}: no *.safetensors weights found")

    def _check_index(self) -> None:
        index = self.path / INDEX_NAME
        if not index.is_file():
            return
        weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        for name, file in weight_map.items():
            info = self.tensors.get(name)
            if info is None or info.file.name != file:
                raise CheckpointError(f"{index}: says tensor {name!r} is in {file}, but it is not there")
        extra = sorted(set(self.tensors) - set(weight_map))
        if extra:
            raise CheckpointError(f"{index}: shards hold tensors missing from the index: {extra[:5]}")

    # -- reading -----------------------------------------------------------------------
    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def keys(self) -> list[str]:
        return list(self.tensors)

    def spec(self, name: str) -> TensorSpec:
        try:
            return self.tensors[name].spec
        except KeyError:
            raise CheckpointError(f"{self.path}: has no tensor {name!r}") from None

    def read(self, name: str) -> torch.Tensor:
        """Load one tensor into a new CPU buffer (owned by the caller)."""
        info = self.tensors.get(name)
        if info is None:
            raise CheckpointError(f"{self.path}: has no tensor {name!r}")
        spec = info.spec
        buf = torch.empty(spec.nbytes, dtype=torch.uint8)
        if spec.nbytes:
            view = memoryview(buf.numpy())
            done = 0
            with open(info.file, "rb", buffering=0) as f:
                fd = f.fileno()
                while done < spec.nbytes:
                    n = os.preadv(fd, [view[done:]], info.offset + done)
                    if n <= 0:
                        raise CheckpointError(f"{info.file}: unexpected end of file reading {name!r}")
                    done += n
        return buf.view(torch_dtype(spec.dtype)).reshape(spec.shape)

    @property
    def largest_tensor_bytes(self) -> int:
        return max((t.spec.nbytes for t in self.tensors.values()), default=0)

    @property
    def total_bytes(self) -> int:
        return sum(t.spec.nbytes for t in self.tensors.values())

    def aux_files(self) -> list[Path]:
        """Tokenizer, chat-template and generation-config files present in the directory."""
        return [self.path / n for n in TOKENIZER_FILES if (self.path / n).is_file()]


def open_checkpoint(spec: str | os.PathLike[str]) -> Checkpoint:
    """Open a local checkpoint directory or a Hub id (see :func:`resolve_model`)."""
    return Checkpoint(resolve_model(spec))


# -- writing ---------------------------------------------------------------------------
_COPY_FALLBACK = {errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL, errno.EPERM}


def _copy_range(src_fd: int, src_off: int, dst_fd: int, dst_off: int, n: int) -> None:
    """Copy ``n`` bytes between files, in the kernel where the platform allows it."""
    done = 0
    if hasattr(os, "copy_file_range"):
        try:
            while done < n:
                k = os.copy_file_range(src_fd, dst_fd, n - done, src_off + done, dst_off + done)
                if k == 0:
                    raise CheckpointError(f"unexpected end of file after {done} of {n} bytes")
                done += k
            return
        except OSError as e:
            if e.errno not in _COPY_FALLBACK:
                raise
    buf = bytearray(min(n - done, 16 * 2**20) or 1)
    view = memoryview(buf)
    while done < n:
        k = os.preadv(src_fd, [view[: n - done]], src_off + done)
        if k <= 0:
            raise CheckpointError(f"unexpected end of file after {done} of {n} bytes")
        w = 0
        while w < k:
            w += os.pwrite(dst_fd, view[w:k], dst_off + done + w)
        done += k


def _tensor_bytes(t: torch.Tensor) -> memoryview:
    return memoryview(t.detach().contiguous().reshape(-1).view(torch.uint8).numpy())


class ShardedWriter:
    """Write a planned set of tensors as sharded safetensors plus ``model.safetensors.index.json``.

    ``specs`` fixes names, dtypes, shapes and order; shards are filled greedily in that order up
    to ``max_shard_bytes`` (a larger tensor gets a shard of its own). Each :meth:`write` goes
    straight to its final offset, so memory use is one tensor regardless of shard size.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        specs: Sequence[TensorSpec],
        *,
        max_shard_bytes: int = DEFAULT_SHARD_BYTES,
        metadata: Mapping[str, str] | None = None,
    ):
        check_shard_size(max_shard_bytes, "max_shard_bytes")
        self.directory = Path(directory)
        groups: list[list[TensorSpec]] = []
        size = 0
        seen: set[str] = set()
        for spec in specs:
            if spec.name in seen:
                raise ValueError(f"tensor {spec.name!r} planned twice")
            seen.add(spec.name)
            if not groups or (size + spec.nbytes > max_shard_bytes and groups[-1]):
                groups.append([])
                size = 0
            groups[-1].append(spec)
            size += spec.nbytes
        if not groups:
            groups.append([])
        n = len(groups)
        self._slots: dict[str, tuple[int, int, TensorSpec]] = {}  # name -> (fd, offset, spec)
        self._fds: list[int] = []
        self.weight_map: dict[str, str] = {}
        self.total_size = 0
        meta = {"format": "pt", **(metadata or {})}
        for i, group in enumerate(groups):
            fname = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            header: dict[str, Any] = {"__metadata__": meta}
            offset = 0
            for spec in group:
                header[spec.name] = {
                    "dtype": spec.dtype,
                    "shape": list(spec.shape),
                    "data_offsets": [offset, offset + spec.nbytes],
                }
                offset += spec.nbytes
            raw = json.dumps(header, separators=(",", ":")).encode()
            raw += b" " * (-len(raw) % 8)  # data section starts 8-byte aligned
            fd = os.open(self.directory / fname, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            self._fds.append(fd)
            os.pwrite(fd, len(raw).to_bytes(8, "little") + raw, 0)
            os.ftruncate(fd, 8 + len(raw) + offset)
            base = 8 + len(raw)
            for spec in group:
                self._slots[spec.name] = (fd, base + int(header[spec.name]["data_offsets"][0]), spec)
                self.weight_map[spec.name] = fname
                self.total_size += spec.nbytes
        self._pending = set(self._slots)
        self._rows_done: dict[str, int] = {}  # rows received by write_rows, per tensor

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Store ``tensor`` (dtype and shape must match the plan) at its planned place."""
        fd, offset, spec = self._take(name)
        if dtype_code(tensor.dtype) != spec.dtype or tuple(tensor.shape) != spec.shape:
            raise ValueError(
                f"tensor {name!r}: got {dtype_code(tensor.dtype)} {list(tensor.shape)}, "
                f"planned {spec.dtype} {list(spec.shape)}"
            )
        data = _tensor_bytes(tensor.cpu())
        done = 0
        while done < len(data):
            done += os.pwrite(fd, data[done:], offset + done)
        self._pending.discard(name)

    def write_rows(self, name: str, start: int, rows: torch.Tensor) -> None:
        """Store rows ``start:start + len(rows)`` (along dim 0) of a planned tensor.

        Lets a streaming caller write a large tensor in pieces; the tensor counts as written
        once all of its rows have arrived (each row exactly once).
        """
        try:
            fd, offset, spec = self._slots[name]
        except KeyError:
            raise ValueError(f"tensor {name!r} is not in the write plan") from None
        if name not in self._pending:
            raise ValueError(f"tensor {name!r} written twice")
        n = rows.shape[0] if rows.dim() else 0
        if (
            not spec.shape
            or dtype_code(rows.dtype) != spec.dtype
            or tuple(rows.shape[1:]) != spec.shape[1:]
            or not 0 <= start <= start + n <= spec.shape[0]
        ):
            raise ValueError(
                f"tensor {name!r}: rows {start}:{start + n} of {dtype_code(rows.dtype)} {list(rows.shape)} "
                f"do not fit the planned {spec.dtype} {list(spec.shape)}"
            )
        row_bytes = spec.nbytes // spec.shape[0] if spec.shape[0] else 0
        data = _tensor_bytes(rows.cpu())
        done = 0
        while done < len(data):
            done += os.pwrite(fd, data[done:], offset + start * row_bytes + done)
        got = self._rows_done.get(name, 0) + n
        if got > spec.shape[0]:
            raise ValueError(f"tensor {name!r}: more rows written than planned ({got} > {spec.shape[0]})")
        self._rows_done[name] = got
        if got == spec.shape[0]:
            self._pending.discard(name)

    def copy_from(self, name: str, src: TensorInfo) -> None:
        """Store the stored bytes of ``src`` unchanged (same dtype and shape) without passing
        through user memory: ``copy_file_range`` copies inside the kernel."""
        fd, offset, spec = self._take(name)
        if src.spec.dtype != spec.dtype or src.spec.shape != spec.shape:
            raise ValueError(
                f"tensor {name!r}: source {src.spec.dtype} {list(src.spec.shape)}, planned {spec.dtype} {list(spec.shape)}"
            )
        with open(src.file, "rb", buffering=0) as f:
            _copy_range(f.fileno(), src.offset, fd, offset, spec.nbytes)
        self._pending.discard(name)

    def spec(self, name: str) -> TensorSpec:
        """The planned spec of ``name``."""
        return self._slots[name][2]

    def _take(self, name: str) -> tuple[int, int, TensorSpec]:
        try:
            slot = self._slots[name]
        except KeyError:
            raise ValueError(f"tensor {name!r} is not in the write plan") from None
        if name not in self._pending:
            raise ValueError(f"tensor {name!r} written twice")
        return slot

    def close(self) -> None:
        """Check that every planned tensor was written, flush, and write the index."""
        try:
            if self._pending:
                missing = sorted(self._pending)
                raise RuntimeError(f"{len(missing)} planned tensors were never written, e.g. {missing[:3]}")
            for fd in self._fds:
                os.fsync(fd)
        finally:
            for fd in self._fds:
                os.close(fd)
            self._fds = []
        index = {
            "metadata": {"total_size": self.total_size},
            "weight_map": dict(sorted(self.weight_map.items())),
        }
        (self.directory / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")

    def abort(self) -> None:
        for fd in self._fds:
            os.close(fd)
        self._fds = []


# -- output directories ----------------------------------------------------------------
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
