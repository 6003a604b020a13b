"""What each training stage of a recipe is given: the recipe's sections turned into the
``deltamoe train`` configs of stage 1, the router review, dense CPT, block expansion and the
ceiling. Every dict here is part of a stage's cache key, so a section left out at its default
stays out."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from deltamoe.recipe import Recipe
from deltamoe.train.config import run_dir_of


def sub_toy(obj: Any, toy: Path | None) -> Any:
    """Replace '{toy}' in every string of a nested structure by the toy build path."""
    if isinstance(obj, str):
        if "{toy}" in obj:
            if toy is None:
                raise ValueError(f"'{{toy}}' used in {obj!r} but the recipe builds no toy world")
            return obj.replace("{toy}", str(toy))
        return obj
    if isinstance(obj, dict):
        return {k: sub_toy(v, toy) for k, v in obj.items()}
    if isinstance(obj, list):
        return [sub_toy(v, toy) for v in obj]
    return obj


def train_config(stage: str, spec: dict[str, Any], model: Path, out: Path, seed: int, toy: Path | None) -> dict[str, Any]:
    """The ``deltamoe train`` config of a stage that trains ``model`` into ``out``."""
    cfg = {"stage": stage, "model": str(model), "output": str(out), "run_dir": str(run_dir_of(out)), "seed": seed}
    cfg.update({k: v for k, v in spec.items() if v})
    return sub_toy(cfg, toy)


def _spec(stage: Any) -> dict[str, Any]:
    """A training stage's sections; an empty ``distributed`` or ``routing`` is left out (cache keys
    stay as they were)."""
    return {k: v for k, v in stage.model_dump().items() if k not in ("distributed", "routing") or v}


def moe_specs(recipe: Recipe) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Stage 1's and the router review's sections (None: no review)."""
    rr = recipe.train.router_review
    return _spec(recipe.train.post_pretrain), _spec(rr) if rr is not None else None


def unallocated(spec: dict[str, Any]) -> dict[str, Any]:
    """A training stage with learned routing only: no router mask, no LPR loss."""
    out = {k: v for k, v in spec.items() if k != "routing"}
    losses = {k: v for k, v in spec.get("losses", {}).items() if k != "lpr_tokens"}
    out["losses"] = {**losses, "lpr": 0.0}
    return out


def _dense_data(recipe: Recipe, data: dict[str, Any]) -> dict[str, Any]:
    """A dense stage's data section. A dense model has no allocation: its languages are its sources'
    ``lang`` tags, so where a source carries none (a mixed replay set whose records are tagged),
    the recipe's languages are listed for its records' tags (only then: other cache keys stay)."""
    if data.get("languages") or all(src.get("lang") for src in data.get("sources", [])):
        return data
    return {**data, "languages": recipe.languages.all}


def dense_spec(recipe: Recipe) -> dict[str, Any]:
    """Dense CPT (B'): the ``dense_cpt`` section over stage 1's data and train section."""
    spec = {
        "data": _dense_data(recipe, recipe.dense_cpt.data or recipe.train.post_pretrain.data),
        "train": {**recipe.train.post_pretrain.train, **recipe.dense_cpt.train},
        "logging": recipe.dense_cpt.logging,
    }
    engine = recipe.dense_cpt.distributed or recipe.train.post_pretrain.distributed
    if engine:  # only when given: cache keys of recipes without it stay as they were
        spec["distributed"] = engine
    return spec


def expansion_spec(recipe: Recipe) -> dict[str, Any]:
    """The block-expansion baseline's training: stage 1's data and train section (overridden by
    ``block_expansion.train``), dense CPT of the new blocks only."""
    pp = recipe.train.post_pretrain
    spec: dict[str, Any] = {"data": _dense_data(recipe, pp.data), "train": {**pp.train, **recipe.block_expansion.train},
                            "trainable": {"layers": "new"}, "logging": recipe.block_expansion.logging}
    engine = recipe.dense_cpt.distributed or pp.distributed
    if engine:
        spec["distributed"] = engine
    return spec


def ceiling_params(recipe: Recipe) -> dict[str, Any]:
    """The ceiling's post-training: the recipe's ceiling section over the toy's instruct recipe."""
    from deltamoe.toy import SIZES

    assert recipe.toy is not None
    size = SIZES[recipe.toy.size]
    phase = size.posts[0].phase
    c = recipe.ceiling
    n_langs = len(recipe.languages.all)
    return {"steps": c.steps or n_langs * phase.steps, "lr": c.lr or phase.lr,
            "batch_size": c.batch_size or phase.batch_size,
            "lm_rows": size.sft_lm_rows if c.lm_rows is None else c.lm_rows, "lm_weight": size.sft_lm_weight,
            "seq_len": size.seq_len}


def ceiling_lm_files(recipe: Recipe, toy: Path) -> list[Path]:
    """The text the ceiling replays: the new languages' CPT corpora (B''s training text) and the
    replay set (half of it original-language text)."""
    return [*(toy / "cpt" / f"{lang}.jsonl" for lang in recipe.languages.new), toy / "replay.jsonl"]


def ref_of(recipe: Recipe, role: Literal["base", "post"]) -> str:
    """The stage reference of B (``base``) or P (``post``): a model of the toy build, or the recipe's."""
    if recipe.toy is not None:
        return f"toy/{recipe.toy.base_model if role == 'base' else recipe.toy.post_model}"
    assert recipe.models is not None
    return f"ext:{getattr(recipe.models, role)}"
