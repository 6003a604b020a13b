"""Planned sharded writing of safetensors.

The output layout (names, dtypes, shapes) is known before any data is computed, so
:class:`ShardedWriter` plans the shards up front, writes each header once and ``pwrite``s every
tensor at its final offset. Nothing is buffered beyond the tensor being written, and tensors may
arrive in any order. The files are ordinary safetensors files (verified in the tests by reading
them back with the ``safetensors`` library and with transformers).
"""

from __future__ import annotations

import errno
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from deltamoe.errors import CheckpointError
from deltamoe.io.format import DEFAULT_SHARD_BYTES, INDEX_NAME, TensorInfo, TensorSpec, dtype_code
from deltamoe.preflight import check_shard_size

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


