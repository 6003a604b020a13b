"""deltamoe: language expansion by upcycling to MoE and grafting the post-training delta.

The public API is imported lazily so that ``import deltamoe`` (and ``deltamoe --help``)
does not pay for importing torch and transformers.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_LAZY = {
    "upcycle": "deltamoe.upcycle",
    "open_checkpoint": "deltamoe.checkpoint",
    "DeltaMoEError": "deltamoe.errors",
    "train": "deltamoe.train",
    "graft": "deltamoe.delta",
    "extract_delta": "deltamoe.delta",
    "merge": "deltamoe.merge",
    "inspect_conflict": "deltamoe.inspect",
    "expand_blocks": "deltamoe.expand",
}

__all__ = ["__version__", *_LAZY]

if TYPE_CHECKING:  # pragma: no cover
    from deltamoe.checkpoint import open_checkpoint
    from deltamoe.delta import extract_delta, graft
    from deltamoe.errors import DeltaMoEError
    from deltamoe.inspect import inspect_conflict
    from deltamoe.expand import expand_blocks
    from deltamoe.merge import merge
    from deltamoe.upcycle import upcycle


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'deltamoe' has no attribute {name!r}")
