"""Scoring a checkpoint with lm-eval (the ``lm_eval`` suite of a recipe's evaluations)."""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any


@functools.cache
def _lm_eval_task_names() -> frozenset[str]:
    try:
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise ValueError("eval suite lm_eval needs the lm-eval package (pip install lm-eval)") from None
    return frozenset(TaskManager().all_tasks)  # indexes the installed task YAMLs (seconds)


def check_lm_eval_tasks(tasks: list[str]) -> None:
    """Every task name must exist in the installed lm-eval (its task index is local: no network)."""
    if not tasks:
        return
    known = _lm_eval_task_names()
    unknown = [t for t in tasks if t not in known]
    if unknown:
        raise ValueError(f"eval.lm_eval_tasks: unknown lm-eval task(s) {unknown}")


def run_lm_eval(model: Path, tasks: list[str], out: Path, *, limit: int | None, batch_size: int) -> dict[str, Any]:
    """Score a checkpoint on lm-eval tasks (the hf backend); write ``out/results.json``."""
    import lm_eval
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    res = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={model},dtype=auto", tasks=tasks,
                                  limit=limit, batch_size=batch_size, device=device)
    out.mkdir(parents=True, exist_ok=True)
    results = {"tasks": res["results"], "versions": res.get("versions", {}), "limit": limit}
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    return results
