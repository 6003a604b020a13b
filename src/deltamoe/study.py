"""``deltamoe study``: one recipe over several training seeds and named variants, with intervals.

A study file names a recipe, the training seeds and the variants (overrides of recipe fields,
by dotted path)::

    name: routing
    recipe: demo                 # the packaged demo recipe, or a path to a recipe YAML
    seeds: [0, 1, 2]
    variants:
      default: {}
      allocated: {train.post_pretrain.routing.allocated: true, train.post_pretrain.losses.lpr: 1.0}

Every (variant, seed) is a recipe of its own, run in ``<workdir>/runs/<variant>/seed<k>/``;
their ``stages/`` directories are one shared cache, so a stage that two runs share (the toy, a
baseline that no variant changes) runs once. Every run is validated before any stage runs. A
stopped study resumes where it stopped: finished stages are cached and training stages resume
from their step checkpoints.

The study report gives, per system, the mean over seeds and a 95 % interval from a two-level
bootstrap (seeds, then items within each seed), and the paired difference between ``compare``
(DeltaMoE) and every other system: the same seeds and the same items, resampled together.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import Field, ValidationError, field_validator

from deltamoe.config_files import read_yaml_mapping, set_dotted
from deltamoe.errors import UsageError
from deltamoe.strict import Strict


class StudySpec(Strict):
    name: str = Field(pattern=r"^[\w.-]+$")
    recipe: str = Field(description="'demo' (the packaged demo recipe) or a recipe YAML, relative to the study file.")
    seeds: list[int] = Field(min_length=1, description="Training seeds (the recipe's seed field).")
    variants: dict[str, dict[str, Any]] = Field(
        default_factory=lambda: {"default": {}}, min_length=1,
        description="name -> {dotted.recipe.field: value}; {} is the recipe as it is.")
    workdir: str | None = Field(None, description="Default: <study file's directory>/<name>.")
    compare: str = Field("deltamoe", description="The system whose paired differences the report gives.")
    bootstrap: int = Field(2000, ge=100, description="Bootstrap resamples for the intervals.")

    @field_validator("seeds")
    @classmethod
    def _distinct(cls, seeds: list[int]) -> list[int]:
        if len(set(seeds)) != len(seeds):
            raise ValueError("a seed is listed twice")
        return seeds

    @field_validator("variants")
    @classmethod
    def _names(cls, variants: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        import re

        for name in variants:
            if not re.fullmatch(r"[\w.-]+", name):
                raise ValueError(f"variant name {name!r}: use letters, digits, '.', '-' or '_'")
        return variants


def _format_errors(e: ValidationError, source: str) -> str:
    msgs = [f"{'.'.join(str(x) for x in err['loc']) or '(top level)'}: "
            + ("unknown field" if err["type"] == "extra_forbidden" else err["msg"].removeprefix("Value error, "))
            for err in e.errors()]
    return f"{source}: " + "; ".join(msgs)


def load_study(path: str | os.PathLike[str]) -> tuple[StudySpec, Path]:
    """Parse and validate a study YAML; return it and its directory."""
    from deltamoe.config_files import load_yaml_model

    return load_yaml_model(path, "study", StudySpec, _format_errors)


def _base_recipe(spec: StudySpec, sdir: Path) -> tuple[dict[str, Any], Path]:
    import yaml

    if spec.recipe == "demo":
        from deltamoe.demo import demo_recipe_text

        return yaml.safe_load(demo_recipe_text()), sdir
    from deltamoe.recipe import load_recipe

    path = Path(spec.recipe) if Path(spec.recipe).is_absolute() else sdir / spec.recipe
    _, rdir = load_recipe(path)  # a clear error for a missing or invalid recipe
    raw = read_yaml_mapping(path, "recipe")
    models = raw.get("models") or {}
    for role in ("base", "post"):  # local model paths are relative to the original recipe
        if isinstance(models.get(role), str) and (rdir / models[role]).exists():
            models[role] = str((rdir / models[role]).resolve())
    return raw, rdir


def plan_runs(spec: StudySpec, sdir: Path) -> tuple[Path, list[dict[str, Any]]]:
    """The study's work directory and its runs: variant, seed, run directory, recipe dict."""
    import copy

    workdir = Path(spec.workdir) if spec.workdir else Path(spec.name)
    workdir = workdir if workdir.is_absolute() else (sdir / workdir).resolve()
    base, _ = _base_recipe(spec, sdir)
    runs = []
    for variant, changes in spec.variants.items():
        for seed in spec.seeds:
            recipe = copy.deepcopy(base)
            for dotted, value in changes.items():
                set_dotted(recipe, dotted, value, f"variant {variant!r}")
            recipe.update(seed=seed, workdir=".", name=f"{spec.name}-{variant}-seed{seed}")
            runs.append({"variant": variant, "seed": seed, "dir": workdir / "runs" / variant / f"seed{seed}",
                         "recipe": recipe})
    return workdir, runs


def _write_run(run: dict[str, Any], workdir: Path) -> Path:
    """The run's recipe file, and its stages/ linked to the study's shared cache."""
    import yaml

    run["dir"].mkdir(parents=True, exist_ok=True)
    (workdir / "stages").mkdir(parents=True, exist_ok=True)
    link = run["dir"] / "stages"
    if not link.is_symlink():
        if link.exists():
            raise UsageError(f"{link}: exists and is not the study's shared cache; remove it")
        link.symlink_to(os.path.relpath(workdir / "stages", run["dir"]))
    from deltamoe.io import atomic_write_text

    path = run["dir"] / "recipe.yaml"
    text = yaml.safe_dump(run["recipe"], sort_keys=False)
    if not path.is_file() or path.read_text() != text:
        atomic_write_text(path, text)
    return path


def run_study(path: str | os.PathLike[str], *, dry_run: bool = False, progress: bool = True,
              log: Callable[[str], Any] = print) -> dict[str, Any]:
    """Validate every run of the study, then run them in order (cached, resumable) and write
    ``study.json``, ``study.md`` and the trade-off plots into the study's work directory."""
    from deltamoe.pipeline.run import run_recipe

    spec, sdir = load_study(path)
    workdir, runs = plan_runs(spec, sdir)
    todo: dict[str, str] = {}  # stage directory name -> kind, over all runs (shared stages count once)
    for run in runs:
        rpath = _write_run(run, workdir)
        try:
            plan = run_recipe(rpath, dry_run=True, log=lambda m: None)["plan"]
        except UsageError as e:
            flat = " ".join(line.strip() for line in str(e).splitlines())
            raise UsageError(f"{path}: variant {run['variant']!r}, seed {run['seed']}: {flat}") from None
        todo.update({Path(p["out"]).name: p["kind"] for p in plan if not p["cached"]})
    log(f"study {spec.name}: {len(runs)} runs ({len(spec.variants)} variants x {len(spec.seeds)} seeds), "
        f"{len(todo)} stages to run, work directory {workdir}")
    if dry_run:
        return {"workdir": str(workdir), "runs": len(runs), "stages_to_run": len(todo)}
    start, done = time.monotonic(), 0
    for i, run in enumerate(runs, 1):
        log(f"study {spec.name}: run {i}/{len(runs)}: variant {run['variant']}, seed {run['seed']}")
        res = run_recipe(run["dir"] / "recipe.yaml", progress=progress, log=log)
        run["results"] = res["results"] if "results" in res else json.loads((run["dir"] / "results.json").read_text())
        done += len(res["executed"])
        left = max(len(todo) - done, 0)
        elapsed = time.monotonic() - start
        eta = f", about {elapsed / done * left / 60:.0f} min left" if done and left else ""
        log(f"study {spec.name}: run {i}/{len(runs)} done ({done} of {len(todo)} stages run{eta})")
    from deltamoe.study_report import write_study_report

    report = write_study_report(workdir, spec, runs)
    log(f"study {spec.name} finished: report at {report}")
    return {"workdir": str(workdir), "runs": len(runs), "report": str(report)}
