"""What the weight operations share before any tensor is read: argument checks, output dtypes and
configs, the order of tensor names, seeded randomness, checks of their inputs."""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path
from typing import Any

import torch

from deltamoe.io import DTYPE_NAMES, Checkpoint, check_output, dtype_code
from deltamoe.choices import NEW_ROWS
from deltamoe.engine import is_float
from deltamoe.errors import CheckpointError, UsageError
from deltamoe.preflight import check_shard_size

DTYPE_KEYS = ("torch_dtype", "dtype")  # where a config names its dtype
_CONFIG_DTYPE = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}  # safetensors code -> config name


# -- arguments ------------------------------------------------------------------------------
def prepare_output(out: str | os.PathLike[str], *, force: bool, max_shard_bytes: int) -> Path:
    """The checks every operation makes on where it writes: the shard size, then the output path."""
    check_shard_size(max_shard_bytes)
    return check_output(out, force=force)


def check_dtype_arg(dtype: str) -> None:
    if dtype != "auto" and dtype not in DTYPE_NAMES:
        raise UsageError(f"--dtype must be 'auto' or one of {sorted(DTYPE_NAMES)}, got {dtype!r}")


def check_new_rows(new_rows: str) -> None:
    if new_rows not in NEW_ROWS:
        raise UsageError(f"--new-rows must be one of {list(NEW_ROWS)}, got {new_rows!r}")


# -- dtypes and configs ---------------------------------------------------------------------
def out_dtype_code(stored: str, dtype: str) -> str:
    """Output dtype code for a tensor stored as ``stored``: kept for "auto" and non-float tensors."""
    if dtype == "auto" or not is_float(stored):
        return stored
    return dtype_code(DTYPE_NAMES[dtype])


def config_dtype_name(code: str | None) -> str | None:
    """The config's name of a float dtype code ("BF16" -> "bfloat16"); None for other codes."""
    return _CONFIG_DTYPE.get(code or "")


def set_config_dtype(cfg: dict[str, Any], code: str | None) -> None:
    name = config_dtype_name(code)
    if name is None:
        return
    for key in DTYPE_KEYS:
        if key in cfg or (key == "torch_dtype" and "dtype" not in cfg):
            cfg[key] = name


def config_changes(base: dict[str, Any], post: dict[str, Any]) -> dict[str, Any]:
    """The fields (dtype fields aside) that ``post`` sets differently from ``base``; None: removed."""
    keys = sorted(set(base) | set(post))
    return {k: post.get(k) for k in keys if k not in DTYPE_KEYS and base.get(k) != post.get(k)}


def output_config(config: dict[str, Any], changes: dict[str, Any], dtype: str) -> dict[str, Any]:
    """The grafted model's config: M's, with P's config changes (a None value removes the key)
    and the output dtype."""
    cfg = dict(config)
    cfg.update({k: v for k, v in changes.items() if v is not None})
    for k in [k for k, v in changes.items() if v is None]:
        cfg.pop(k, None)
    if dtype != "auto":
        set_config_dtype(cfg, dtype_code(DTYPE_NAMES[dtype]))
    return cfg


# -- names and randomness -------------------------------------------------------------------
def natural_key(name: str) -> list[Any]:
    """Sort key that orders ``layers.2`` before ``layers.10``."""
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


def seeded_generator(seed: int, *parts: object) -> torch.Generator:
    """A generator whose stream depends only on (seed, parts), not on processing order."""
    digest = hashlib.sha256(repr((seed, *parts)).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


# -- inputs ---------------------------------------------------------------------------------
def check_float(m: Checkpoint, name: str) -> None:
    """Tensor ``name`` of ``m``, which gets a delta, is floating point."""
    if not is_float(m.spec(name).dtype):
        raise CheckpointError(f"{m.tensors[name].file}: tensor {name!r} is {m.spec(name).dtype}, not floating point")


def dense_input(manifest: dict[str, Any], stage: str) -> dict[str, Any] | None:
    """The dense model that a ``stage`` stage (upcycle, expand) of a provenance read (the first one
    that records its hash), or None."""
    for s in manifest.get("stages", []):
        if s.get("stage") == stage:
            dense = (s.get("inputs") or {}).get("dense")
            if isinstance(dense, dict) and "sha256" in dense:
                return dense
    return None
