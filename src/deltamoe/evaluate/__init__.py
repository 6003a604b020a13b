"""Per-language evaluation: chat QA, perplexity, MoE routing statistics, and an lm-eval bridge.

Imported lazily: ``deltamoe.evaluate.evaluate`` loads torch and transformers only when called.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

_LAZY = {
    "evaluate": "deltamoe.evaluate.run",
    "format_table": "deltamoe.evaluate.run",
    "export_lm_eval": "deltamoe.evaluate.lm_eval_bridge",
}
__all__ = list(_LAZY)

if TYPE_CHECKING:  # pragma: no cover
    from deltamoe.evaluate.lm_eval_bridge import export_lm_eval
    from deltamoe.evaluate.run import evaluate, format_table


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'deltamoe.evaluate' has no attribute {name!r}")
