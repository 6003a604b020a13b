"""``run_recipe``: check a recipe, plan its stages, run them (or print the plan), and report."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from deltamoe.errors import UsageError
from deltamoe.pipeline.accounting import estimate_disk, parameter_match, report_estimate
from deltamoe.pipeline.checks import (check_disk, check_recipe_inputs, check_recipe_models, check_train_sections,
                                      check_upcycle_layers)
from deltamoe.pipeline.graph import SYSTEM_ORDER, build_plan, ext_path
from deltamoe.pipeline.specs import ref_of
from deltamoe.pipeline.stages import StageRun, ref_path, run_plan
from deltamoe.preflight import human
from deltamoe.recipe import Recipe
from deltamoe.train.config import run_dir_of


def clean_stale_temporaries(workdir: Path) -> int:
    """Remove temporary directories left by killed runs (their owning process is gone), saying so."""
    from deltamoe.preflight import remove_stale_temporaries

    root = workdir / "stages"
    return remove_stale_temporaries(root) if root.is_dir() else 0


def _human(n: int | None) -> str:
    return "unknown" if n is None else human(n)


def _check_recipe(recipe: Recipe, rdir: Path, path: str | Path) -> None:
    """The checks that need no plan: lm-eval task names, training sections, models."""
    if "lm_eval" in recipe.eval.suites:
        from deltamoe.evaluate.lm_eval_run import check_lm_eval_tasks

        try:
            check_lm_eval_tasks(recipe.eval.lm_eval_tasks)
        except ValueError as e:
            raise UsageError(f"{path}: {e}") from None
    check_train_sections(recipe, str(path))
    check_recipe_models(recipe, rdir, str(path))  # before build_plan fingerprints them
    check_upcycle_layers(recipe, rdir, str(path))  # before the disk estimate counts the MoE layers


def _plan_rows(stages: list[StageRun], recipe: Recipe, rdir: Path) -> list[dict[str, Any]]:
    est = estimate_disk(stages, recipe, rdir)
    return [{"stage": s.name, "kind": s.kind, "key": s.key, "cached": s.out.is_dir(), "est_bytes": est[s.name],
             "out": str(s.out)} for s in stages]


def _log_plan(path: str | Path, workdir: Path, plan: list[dict[str, Any]], missing: list[str], total: int | None,
              log: Any) -> None:
    if missing:
        log(f"recipe {path}: valid, but {len(missing)} data path(s) do not exist yet; the run refuses to start "
            "until they do:")
        for m in missing:
            log(f"  missing: {m}")
    else:
        log(f"recipe {path}: valid. Work directory {workdir}")
    for i, p in enumerate(plan, 1):
        log(f"  {i:2d}. {p['stage']:18} {'cached' if p['cached'] else 'to run':7} ~{_human(p['est_bytes']):>9}  {p['key']}")
    log(f"  estimated new disk use: {_human(total)} (stage outputs, training logs and step checkpoints, report)")


def _results(recipe: Recipe, rdir: Path, stages: list[StageRun], ctx: dict[str, Any],
             executed: list[str]) -> dict[str, Any]:
    """results.json of a finished run: every system's checkpoint and scores, and how it was made."""
    from deltamoe.report import collect

    by_name = {s.name: s for s in stages}

    def where(ref: str) -> Path:
        return ref_path(ref, by_name, lambda p: ext_path(p, rdir))

    systems = {name: (where(ctx["systems"][name]), by_name[f"eval-{name}"].out)
               for name in SYSTEM_ORDER if name in ctx["systems"]}
    extra: dict[str, Any] = {"recipe_name": recipe.name, "recipe": recipe.model_dump(mode="json", by_alias=True),
                             "stages": {s.name: {"key": s.key, "out": str(s.out)} for s in stages},
                             "executed": executed}
    if "dense_cpt_budget" in by_name:
        budget_file = run_dir_of(by_name["dense_cpt_budget"].out) / "budget.json"
        if budget_file.is_file():
            extra["budget_matched"] = json.loads(budget_file.read_text())
    if "expand" in by_name and by_name["expand"].out.is_dir():
        extra["block_expansion"] = parameter_match(by_name["expand"].out, by_name["upcycle"].out,
                                                   where(ref_of(recipe, "base")))
    languages = {"original": recipe.languages.original, "new": recipe.languages.new}
    return collect(systems, languages, extra)


def run_recipe(
    path: str | Path, *, dry_run: bool = False, progress: bool = True, log: Any = print
) -> dict[str, Any]:
    """Validate and run a recipe (or, with ``dry_run``, print its plan); return what happened.

    Returns ``{"workdir", "plan": [...], "executed": [...], "report", "results"}``.
    """
    from deltamoe.recipe import load_recipe

    recipe, rdir = load_recipe(path)
    _check_recipe(recipe, rdir, path)
    stages, workdir, ctx = build_plan(recipe, rdir, progress=progress, local_only=True)
    missing = check_recipe_inputs(recipe, rdir, str(path), stages, workdir)
    if missing and not dry_run:
        raise UsageError(f"{missing[0]} (the run needs every data path before it starts"
                         + (f"; {len(missing) - 1} more missing" if len(missing) > 1 else "") + ")")
    plan = _plan_rows(stages, recipe, rdir)
    todo = [p["est_bytes"] for p in plan if not p["cached"]]
    total = None if any(b is None for b in todo) else sum(todo) + report_estimate(recipe, ctx["systems"])
    check_disk(workdir, total, str(path))
    if dry_run:
        _log_plan(path, workdir, plan, missing, total, log)
        return {"workdir": str(workdir), "plan": plan, "executed": [], "est_total_bytes": total, "missing": missing}

    stages, workdir, ctx = build_plan(recipe, rdir, progress=progress)  # keys external models by content
    workdir.mkdir(parents=True, exist_ok=True)
    clean_stale_temporaries(workdir)
    executed = run_plan(stages, lambda p: ext_path(p, rdir), log=log)
    if int(os.environ.get("RANK", "0")) != 0:
        return {"workdir": str(workdir), "plan": plan, "executed": executed}

    from deltamoe.report import format_table, write_report

    results = _results(recipe, rdir, stages, ctx, executed)
    by_name = {s.name: s for s in stages}
    logs = {name: run_dir_of(by_name[name].out) / "logs" / "train.jsonl"
            for name in ("post_pretrain", "router_review", "dense_cpt") if name in by_name}
    report = write_report(workdir, results, logs, Path(path).read_text())
    log("\n" + format_table(results))
    log(f"\nreport: {report}")
    return {"workdir": str(workdir), "plan": plan, "executed": executed, "report": str(report), "results": results}
