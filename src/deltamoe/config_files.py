"""Reading YAML config files and setting fields by dotted path: one rule for recipes, training
configs and studies."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from deltamoe.errors import UsageError

if TYPE_CHECKING:  # pragma: no cover
    from pydantic import BaseModel, ValidationError

M = TypeVar("M", bound="BaseModel")


def read_yaml_mapping(path: str | os.PathLike[str], kind: str, mapping: str = "a mapping") -> dict[str, Any]:
    """The top-level mapping of a YAML file; a missing file, bad YAML or another top level is a
    one-line error that names the file (``kind``: "recipe", "config", "study")."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise UsageError(f"{p}: no such {kind} file")
    try:
        raw = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise UsageError(f"{p}: not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise UsageError(f"{p}: expected {mapping} at the top level")
    return raw


def load_yaml_model(path: str | os.PathLike[str], kind: str, model: type[M],
                    format_errors: Callable[[ValidationError, str], str]) -> tuple[M, Path]:
    """A YAML file validated as ``model``, and the file's directory (where its relative paths
    resolve). A validation error is one :class:`UsageError`, worded by ``format_errors(error,
    path)``."""
    from pydantic import ValidationError

    p = Path(path)
    raw = read_yaml_mapping(p, kind)
    try:
        spec = model.model_validate(raw)
    except ValidationError as e:
        raise UsageError(format_errors(e, str(p))) from None
    return spec, p.parent.absolute()


def set_dotted(raw: dict[str, Any], dotted: str, value: Any, where: str) -> None:
    """Set ``raw[a][b][c] = value`` for ``a.b.c``, making missing sections; a numeric part indexes
    a list. ``where`` starts the error messages (the flag or the variant being applied)."""
    parts = dotted.split(".")
    if not all(p.strip() for p in parts):
        raise UsageError(f"{where}: {dotted!r} is not a dotted field path (e.g. train.steps)")
    node: Any = raw
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if isinstance(node, list):
            try:
                idx = int(part)
                if last:
                    node[idx] = value
                else:
                    node = node[idx]
            except (ValueError, IndexError):
                raise UsageError(f"{where}: {'.'.join(parts[: i + 1])} is not a valid list index") from None
            continue
        if not isinstance(node, dict):
            raise UsageError(f"{where}: {'.'.join(parts[:i])} is a value, not a section; cannot set {dotted}")
        if last:
            node[part] = value
        else:
            node = node.setdefault(part, {})
