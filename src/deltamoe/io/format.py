"""The safetensors layout as deltamoe reads and writes it: file names, dtype codes, tensor specs,
and the checked parsing of one shard's header (offsets in bounds, no overlaps, no gaps).

A header is JSON of at most 100 MiB; every entry's dtype, shape and byte span are checked against
the file before a tensor is read, so a truncated or hand-edited shard is an error that names the
file and the tensor, never a silent misread.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from deltamoe.errors import CheckpointError

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


def parse_shard(path: Path) -> dict[str, TensorInfo]:
    """Every tensor of one safetensors file, where it lives, after checking the header against the file."""
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


