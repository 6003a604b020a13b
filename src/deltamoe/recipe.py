"""Recipes: one YAML file that declares a whole DeltaMoE experiment (its schema and loader).

:mod:`deltamoe.pipeline.graph` turns a validated :class:`Recipe` into the stages of DeltaMoE and
its baselines; :mod:`deltamoe.pipeline.stages` keys, caches and runs them.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, model_validator

from deltamoe.strict import Strict


Baseline = Literal[
    "base", "post", "dense_cpt", "paramdelta", "task_arithmetic", "ties", "dare_linear", "dare_ties",
    "moe_lpr", "moe_unallocated", "budget_matched", "block_expansion", "ceiling",
]
ALL_BASELINES: tuple[str, ...] = Baseline.__args__  # type: ignore[attr-defined]
MERGE_BASELINES = ("task_arithmetic", "ties", "dare_linear", "dare_ties")


class ToySpec(Strict):
    """Build the toy world and take B, P, corpora and evaluation sets from it."""

    size: Literal["micro", "small"] = "small"
    seed: int = 0
    arch: Literal["llama", "qwen3"] = Field("llama", description="Which toy architecture is B: llama (-> Mixtral) "
                                            "or qwen3 (-> Qwen3-MoE).")
    post: Literal["instruct", "instruct2"] = Field("instruct", description="Which post-training delta to graft: "
                                                   "instruct, or instruct2 (another recipe; llama only).")

    @model_validator(mode="after")
    def _post(self) -> ToySpec:
        if self.arch == "qwen3" and self.post != "instruct":
            raise ValueError("the toy's qwen3 architecture has one post-trained model: post must be 'instruct'")
        return self

    @property
    def base_model(self) -> str:
        return "base" if self.arch == "llama" else f"{self.arch}-base"

    @property
    def post_model(self) -> str:
        return self.post if self.arch == "llama" else f"{self.arch}-{self.post}"


class CeilingSpec(Strict):
    """The alignment ceiling: B' post-trained on chat data in every language (toy only), with the
    toy's own post-training recipe. Defaults: the toy's instruct recipe's steps once per language
    (P spends them all on the original language), its lr and batch, and its language-model replay rows per step, drawn
    here from the new languages' CPT corpora (B''s training text) and the replay set."""

    steps: int | None = Field(None, gt=0)
    lr: float | None = Field(None, gt=0)
    batch_size: int | None = Field(None, gt=0)
    lm_rows: int | None = Field(None, ge=0, description="Language-model replay rows per step (0: none).")


class ModelsSpec(Strict):
    base: str = Field(description="Dense base model B (local path or Hub id).")
    post: str = Field(description="Post-trained model P of the same family (instruct, SFT, reasoning...).")


class LanguagesSpec(Strict):
    original: list[str] = Field(min_length=1, description="Languages B and P already serve (routed to expert 0).")
    new: list[str] = Field(min_length=1, description="Languages to add.")

    @model_validator(mode="after")
    def _disjoint(self) -> LanguagesSpec:
        both = set(self.original) & set(self.new)
        if both:
            raise ValueError(f"languages {sorted(both)} are listed as both original and new")
        return self

    @property
    def all(self) -> list[str]:
        """Every language of the recipe: the original ones, then the new ones."""
        return [*self.original, *self.new]


class UpcycleSpec(Strict):
    experts: int = Field(4, ge=2)
    top_k: int = Field(2, ge=1)
    layers: str = "all"
    allocation: dict[str, list[int]] | None = Field(
        None, description="language -> experts; default: original languages -> [0], each new language one expert."
    )
    router_init: Literal["random", "zero"] = "random"
    noise: float = Field(0.0, ge=0)
    reinit_ratio: float = Field(0.0, ge=0, le=1)
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"

    @model_validator(mode="after")
    def _k(self) -> UpcycleSpec:
        if self.top_k > self.experts:
            raise ValueError(f"top_k ({self.top_k}) exceeds experts ({self.experts})")
        return self


class TrainSpec(Strict):
    """One training stage; the sections are those of ``deltamoe train`` configs (see docs/training.md)."""

    data: dict[str, Any] = Field(description="Data section of a train config; '{toy}' in paths is the toy build.")
    train: dict[str, Any] = Field(default_factory=dict)
    losses: dict[str, Any] = Field(default_factory=dict)
    trainable: dict[str, Any] = Field(default_factory=dict)
    checkpoint: dict[str, Any] = Field(default_factory=dict)
    logging: dict[str, Any] = Field(default_factory=dict)
    distributed: dict[str, Any] = Field(default_factory=dict)
    routing: dict[str, Any] = Field(default_factory=dict, description="Routing options of MoE stages, e.g. "
                                    "{allocated: true} for language-allocated routing, {top_k: {en: 1}} for top-k per "
                                    "language (docs/training.md).")


class TrainStages(Strict):
    post_pretrain: TrainSpec
    router_review: TrainSpec | None = None
    review: Literal["before_graft", "after_graft"] = Field(
        "before_graft", description="When the router review runs: on the MoE before the graft (MoE-LPR's order), "
        "or on the grafted model, whose hidden states are the ones served.")


class DenseCptSpec(Strict):
    """Dense continued pre-training (the baselines' B'). Default data and steps: stage 1's."""

    data: dict[str, Any] | None = None
    train: dict[str, Any] = Field(default_factory=dict)
    logging: dict[str, Any] = Field(default_factory=dict)
    distributed: dict[str, Any] | None = Field(None, description="Default: stage 1's.")


class BlockExpansionSpec(Strict):
    """The parameter-matched dense baseline (LLaMA-Pro, docs/expand.md): B with new identity decoder
    blocks, only those trained on stage 1's data, then Δ grafted onto the original blocks."""

    blocks: int | None = Field(None, ge=1, description="New decoder blocks. Default: as many parameters as the "
                               "MoE's new experts (deltamoe.ops.expand.blocks_matching).")
    train: dict[str, Any] = Field(default_factory=dict, description="Overrides of stage 1's train section "
                                  "(default: stage 1's steps, batch and lr: the same tokens on as many new parameters).")
    logging: dict[str, Any] = Field(default_factory=dict)


class GraftSpec(Strict):
    experts: str = Field("all", description="all | original | new | comma-separated expert ids")
    scale: float = 1.0
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"


class MergeSpec(Strict):
    weights: tuple[float, float] = Field((1.0, 1.0), description="Weights of (B', P) task vectors.")
    density: float = Field(0.5, gt=0, le=1)
    lambda_: float = Field(1.0, alias="lambda")
    seed: int = 0


class EvalSpec(Strict):
    suites: list[Literal["toy", "lm_eval"]] = Field(default_factory=lambda: ["toy"], min_length=1)
    toy_data: str | None = Field(None, description="Toy build with the eval sets (default: the recipe's toy).")
    lm_eval_tasks: list[str] = Field(default_factory=list)
    lm_eval_limit: int | None = Field(None, gt=0)
    batch_size: int = Field(16, gt=0)
    max_items: int | None = Field(None, gt=0, description="Cap on QA items per language and task (quick runs).")

    @model_validator(mode="after")
    def _tasks(self) -> EvalSpec:
        if "lm_eval" in self.suites and not self.lm_eval_tasks:
            raise ValueError("suite lm_eval needs lm_eval_tasks")
        return self


class Recipe(Strict):
    name: str = Field(pattern=r"^[\w.-]+$")
    workdir: str | None = Field(None, description="Default: runs/<name> next to the recipe.")
    seed: int = 0
    toy: ToySpec | None = None
    models: ModelsSpec | None = None
    languages: LanguagesSpec
    upcycle: UpcycleSpec = UpcycleSpec()
    train: TrainStages
    dense_cpt: DenseCptSpec = DenseCptSpec()
    block_expansion: BlockExpansionSpec = BlockExpansionSpec()
    graft: GraftSpec = GraftSpec()
    baselines: list[Baseline] = Field(default_factory=lambda: list(ALL_BASELINES))
    merge: MergeSpec = MergeSpec()
    ceiling: CeilingSpec = CeilingSpec()
    eval: EvalSpec = EvalSpec()

    @model_validator(mode="after")
    def _cross(self) -> Recipe:
        if (self.toy is None) == (self.models is None):
            raise ValueError("give exactly one of 'toy' (build the toy world) or 'models' (base and post)")
        if "toy" in self.eval.suites and self.toy is None and self.eval.toy_data is None:
            raise ValueError("eval suite 'toy' needs 'toy' or eval.toy_data")
        langs = set(self.languages.all)
        alloc = self.allocation
        unknown = sorted(set(alloc) - langs)
        if unknown:
            raise ValueError(f"upcycle.allocation names languages {unknown} that are not in 'languages'")
        bad = sorted({e for ex in alloc.values() for e in ex if not 0 <= e < self.upcycle.experts})
        if bad:
            raise ValueError(f"upcycle.allocation uses experts {bad}; valid ids are 0..{self.upcycle.experts - 1}")
        if len(set(self.baselines)) != len(self.baselines):
            raise ValueError("baselines lists a system twice")
        if "baselines" in self.model_fields_set and "ceiling" in self.baselines and self.toy is None:
            raise ValueError("baselines: 'ceiling' needs the toy world (chat data in every language); "
                             "remove it from baselines or use 'toy'")
        return self

    @property
    def wanted(self) -> set[str]:
        """The baselines that run: the ceiling only where the toy world provides its chat data."""
        return {b for b in self.baselines if b != "ceiling" or self.toy is not None}

    @property
    def allocation(self) -> dict[str, list[int]]:
        if self.upcycle.allocation is not None:
            return {k: list(v) for k, v in self.upcycle.allocation.items()}
        new = self.languages.new
        if len(new) > self.upcycle.experts - 1:
            raise ValueError(
                f"{len(new)} new languages need at least {len(new) + 1} experts for the default allocation "
                "(or give upcycle.allocation)"
            )
        out = {lang: [0] for lang in self.languages.original}
        out.update({lang: [i + 1] for i, lang in enumerate(new)})
        return out


def _format_errors(e: ValidationError, source: str) -> str:
    lines = []
    for err in e.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            from deltamoe.preflight import unknown_field_hint

            msg = "unknown field" + (unknown_field_hint(Recipe, tuple(err["loc"])) or " (check its spelling)")
        lines.append(f"{source}: {loc}: {msg}")
    return "\n".join(lines)


def load_recipe(path: str | os.PathLike[str]) -> tuple[Recipe, Path]:
    """Parse and validate a recipe YAML; return it and its directory (relative paths resolve there)."""
    from deltamoe.config_files import load_yaml_model

    return load_yaml_model(path, "recipe", Recipe, _format_errors)
