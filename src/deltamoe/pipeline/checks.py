"""What ``deltamoe run`` checks before its first stage: the training sections against the training
schema, the models, the data paths, the options, the work directory and its free disk."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from deltamoe.errors import UsageError
from deltamoe.pipeline.specs import dense_spec, expansion_spec, sub_toy, train_config
from deltamoe.pipeline.stages import StageRun
from deltamoe.recipe import MERGE_BASELINES, Recipe


def check_train_sections(recipe: Recipe, source: str) -> None:
    """Validate every training stage of the recipe against the training schema now, so that a
    misspelt training field fails before hours of earlier stages, not when its stage starts."""
    from deltamoe.train.config import load_config

    stages: list[tuple[str, str, dict[str, Any]]] = [
        ("post_pretrain", "train.post_pretrain", recipe.train.post_pretrain.model_dump())
    ]
    if recipe.train.router_review is not None:
        stages.append(("router_review", "train.router_review", recipe.train.router_review.model_dump()))
    if recipe.wanted & {"dense_cpt", "paramdelta", "budget_matched", "ceiling", *MERGE_BASELINES}:
        stages.append(("dense_cpt", "dense_cpt", dense_spec(recipe)))
    if "block_expansion" in recipe.wanted:
        stages.append(("dense_cpt", "block_expansion", expansion_spec(recipe)))
    placeholder = Path("/nonexistent-until-run")
    for stage, where, spec in stages:
        cfg = train_config(stage, spec, placeholder / "model", placeholder / "out", recipe.seed, placeholder / "toy")
        try:
            load_config(cfg)
        except UsageError as e:
            raise UsageError(f"{source}: {where}: {str(e).removeprefix('config: ')}") from None
        for lang in (spec.get("routing") or {}).get("top_k") or {}:
            if lang not in recipe.languages.all:
                raise UsageError(f"{source}: {where}.routing.top_k.{lang}: {lang!r} is not one of the recipe's "
                                 f"languages ({', '.join(recipe.languages.all)})")


def check_recipe_inputs(recipe: Recipe, rdir: Path, source: str, stages: list[StageRun], workdir: Path) -> list[str]:
    """Everything a run needs that can be checked before its first stage: models, data, options, workdir.

    Raises for what is wrong; returns the data paths that do not exist (yet): a dry run lists them
    (real-scale recipes are checked before their corpora are downloaded), a run refuses to start.
    """
    from deltamoe.ops.graft import parse_experts
    from deltamoe.preflight import writable_dir

    missing = _missing_sources(recipe, stages, source)
    if recipe.eval.toy_data and not Path(recipe.eval.toy_data).expanduser().is_dir():
        raise UsageError(f"{source}: eval.toy_data: {recipe.eval.toy_data}: no such directory")
    e = recipe.upcycle.experts
    try:
        parse_experts(recipe.graft.experts, {"num_experts": e, "original_experts": [0],
                                             "new_experts": list(range(1, e))})
    except UsageError as err:
        raise UsageError(f"{source}: graft.experts: {str(err).removeprefix('--experts: ')}") from None
    if "budget_matched" in recipe.baselines:
        for where, spec in _train_sections(recipe)[:2]:
            if where.startswith("train.") and not spec.get("train", {}).get("steps"):
                raise UsageError(f"{source}: {where}.train.steps: baseline budget_matched needs explicit steps in "
                                 "every training stage (or remove budget_matched from baselines)")
    writable_dir(workdir, f"{source}: workdir")
    return missing


def check_recipe_models(recipe: Recipe, rdir: Path, source: str) -> None:
    """models.base and models.post: local supported checkpoints, or Hub ids (fetched when needed)."""
    if recipe.models is not None:
        for role in ("base", "post"):
            _check_model(getattr(recipe.models, role), rdir, f"{source}: models.{role}")


def check_upcycle_layers(recipe: Recipe, rdir: Path, source: str) -> None:
    """upcycle.layers against B's layer count, where B's config is known without a download."""
    from deltamoe.ops.upcycle import parse_layers
    from deltamoe.pipeline.accounting import base_config

    config = base_config(recipe, rdir)
    if config is None or "num_hidden_layers" not in config:
        return
    parse_layers(recipe.upcycle.layers, int(config["num_hidden_layers"]), f"{source}: upcycle.layers")


def _train_sections(recipe: Recipe) -> list[tuple[str, dict[str, Any]]]:
    out = [("train.post_pretrain", recipe.train.post_pretrain.model_dump())]
    if recipe.train.router_review is not None:
        out.append(("train.router_review", recipe.train.router_review.model_dump()))
    out.append(("dense_cpt", dense_spec(recipe)))
    if "block_expansion" in recipe.wanted:
        out.append(("block_expansion", expansion_spec(recipe)))
    return out


def _check_model(ref: str, rdir: Path, where: str) -> None:
    """A local model must be a supported safetensors checkpoint; a Hub id is fetched when the run needs it."""
    from deltamoe import arch
    from deltamoe.io import Checkpoint, model_ref
    from deltamoe.errors import DeltaMoEError

    try:
        kind, path = model_ref(ref, rdir)
        if kind == "local":
            ck = Checkpoint(path)
            arch.arch_for(ck.config, source=str(Path(path) / "config.json"))
    except DeltaMoEError as e:
        raise UsageError(f"{where}: {e}") from None


def _missing_sources(recipe: Recipe, stages: list[StageRun], source: str) -> list[str]:
    """Data paths of the training stages that do not exist ('{toy}' paths once the toy is built)."""
    toy_out = next((s.out for s in stages if s.kind == "toy_build"), None)
    toy = toy_out if toy_out is not None and toy_out.is_dir() else None
    missing: list[str] = []
    for where, spec in _train_sections(recipe):
        for i, src in enumerate(spec.get("data", {}).get("sources") or []):
            path = src.get("path") if isinstance(src, dict) else None
            if isinstance(path, str) and ("{toy}" not in path or toy is not None):
                missing += _missing_data(sub_toy(path, toy), f"{source}: {where}.data.sources.{i}.path")
    return missing


def _missing_data(path: str, where: str) -> list[str]:
    import glob

    p = Path(path).expanduser()
    return [] if p.exists() or glob.glob(str(p)) else [f"{where}: {path}: no such file, directory or glob match"]


def check_disk(workdir: Path, need: int | None, source: str) -> None:
    """Free disk for ``need`` bytes (None: not known, not checked) under the work directory."""
    from deltamoe.preflight import check_disk as check_free

    if need:
        check_free(workdir, need, f"{source}: the stages still to run")
