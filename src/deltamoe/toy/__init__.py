"""The toy multilingual world (docs/design.md#the-toy-world-as-a-measuring-stick): a seeded
generator of people, facts and text in an original language and three new ones, a tokenizer, and
small base and post-trained models of two architectures. ``deltamoe.toy.build(out, size="small",
seed=0)`` writes everything into ``out`` (from the shipped set, or trained with ``train=True``).

Imported lazily: nothing heavy happens on ``import deltamoe.toy``.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

_LAZY = {
    "build": "deltamoe.toy.builder",
    "read_toy_manifest": "deltamoe.toy.builder",
    "SIZES": "deltamoe.toy.config",
    "ToyConfig": "deltamoe.toy.config",
    "LANGUAGES": "deltamoe.toy.languages",
    "ORIGINAL": "deltamoe.toy.languages",
    "NEW_LANGUAGES": "deltamoe.toy.languages",
}
__all__ = list(_LAZY)

if TYPE_CHECKING:  # pragma: no cover
    from deltamoe.toy.builder import build, read_toy_manifest
    from deltamoe.toy.config import SIZES, ToyConfig
    from deltamoe.toy.languages import LANGUAGES, NEW_LANGUAGES, ORIGINAL


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'deltamoe.toy' has no attribute {name!r}")
