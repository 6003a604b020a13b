"""deltamoe: language expansion by upcycling to MoE and grafting the post-training delta.

The public API is imported lazily so that ``import deltamoe`` (and ``deltamoe --help``)
does not pay for importing torch and transformers.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_LAZY = {
    "upcycle": "deltamoe.ops.upcycle",
    "open_checkpoint": "deltamoe.io",
    "DeltaMoEError": "deltamoe.errors",
    "train": "deltamoe.train",
    "graft": "deltamoe.ops.graft",
    "extract_delta": "deltamoe.ops.extract",
    "merge": "deltamoe.ops.merge",
    "inspect_conflict": "deltamoe.inspect",
    "expand_blocks": "deltamoe.ops.expand",
}

__all__ = ["__version__", *_LAZY]

if TYPE_CHECKING:  # pragma: no cover
    from deltamoe.io import open_checkpoint
    from deltamoe.errors import DeltaMoEError
    from deltamoe.inspect import inspect_conflict
    from deltamoe.ops.expand import expand_blocks
    from deltamoe.ops.extract import extract_delta
    from deltamoe.ops.graft import graft
    from deltamoe.ops.merge import merge
    from deltamoe.ops.upcycle import upcycle


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'deltamoe' has no attribute {name!r}")
