"""The stage graph of a recipe: DeltaMoE and every baseline, as :class:`StageRun` nodes.

:func:`build_plan` composes one builder per family of systems (see :mod:`deltamoe.pipeline` for
the systems): the DeltaMoE chain, the MoE baselines, the dense baselines, the merges, the
FLOP-matched and block-expansion baselines, the ceiling, and one evaluation per system. Each
builder appends its stages (in dependency order) and names the stage that is each of its systems.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from deltamoe.pipeline.accounting import budget_matched_steps, moe_token_counts
from deltamoe.pipeline.specs import (ceiling_lm_files, ceiling_params, dense_spec, expansion_spec, moe_specs, ref_of,
                                     train_config, unallocated)
from deltamoe.pipeline.stages import StageRun, fingerprint, resolve_keys
from deltamoe.recipe import MERGE_BASELINES, Recipe
from deltamoe.train.config import run_dir_of

SYSTEM_ORDER = ("base", "post", "dense_cpt", "paramdelta", *MERGE_BASELINES, "budget_matched", "block_expansion",
                "moe_lpr",
                "moe_unallocated", "deltamoe", "ceiling")

StageFn = Callable[[dict[str, Path], Path], None]


@dataclass
class _Graph:
    """What the builders share: the recipe, B's and P's references, the stages so far and the
    stage that is each system."""

    recipe: Recipe
    progress: bool
    base_ref: str
    post_ref: str
    toy_role: dict[str, str]  # {"toy": "toy"} where the toy world is built: the input of '{toy}' paths
    stages: list[StageRun] = field(default_factory=list)
    systems: dict[str, str] = field(default_factory=dict)

    def add(self, name: str, kind: str, params: dict[str, Any], inputs: dict[str, str], fn: StageFn) -> None:
        self.stages.append(StageRun(name=name, kind=kind, params=params, inputs=inputs, fn=fn))

    def trainer(self, stage: str, spec: dict[str, Any]) -> StageFn:
        """``deltamoe train`` of ``spec`` on the stage's ``model`` input."""
        recipe, progress = self.recipe, self.progress

        def run(inp: dict[str, Path], out: Path) -> None:
            from deltamoe.train import train

            train(train_config(stage, spec, inp["model"], out, recipe.seed, inp.get("toy")), progress=progress)

        return run

    def train(self, name: str, stage: str, spec: dict[str, Any], model: str) -> None:
        """A training stage of ``spec`` on the stage (or model) ``model``."""
        self.add(name, "train", {"stage": stage, **spec, "seed": self.recipe.seed},
                 {"model": model, **self.toy_role}, self.trainer(stage, spec))


def _upcycle_params(recipe: Recipe) -> dict[str, Any]:
    return {**recipe.upcycle.model_dump(), "allocation": recipe.allocation, "seed": recipe.seed}


def _toy_and_upcycle(g: _Graph) -> None:
    """The toy world (where the recipe builds it) and the upcycled MoE of B."""
    recipe, progress = g.recipe, g.progress
    if recipe.toy is not None:
        size, seed = recipe.toy.size, recipe.toy.seed

        def build_toy(inp: dict[str, Path], out: Path) -> None:
            from deltamoe.toy import build

            build(out, size, seed, progress=progress)

        g.add("toy", "toy_build", {"size": size, "seed": seed}, {}, build_toy)
    up = recipe.upcycle

    def do_upcycle(inp: dict[str, Path], out: Path) -> None:
        from deltamoe.ops.upcycle import upcycle

        upcycle(inp["dense"], out, num_experts=up.experts, top_k=up.top_k, layers=up.layers,
                allocation=recipe.allocation, router_init=up.router_init, noise=up.noise,
                reinit_ratio=up.reinit_ratio, seed=recipe.seed, dtype=up.dtype, progress=progress)

    g.add("upcycle", "upcycle", _upcycle_params(recipe), {"dense": g.base_ref}, do_upcycle)


def _moe_chain(g: _Graph, prefix: str, system: str, pp: dict[str, Any], rr: dict[str, Any] | None) -> str:
    """Stage 1, the router review and the graft of Δ onto the upcycled MoE, in the recipe's order;
    returns the stage of the MoE without Δ (after every training stage before the graft)."""
    recipe, gs, progress = g.recipe, g.recipe.graft, g.progress

    def do_graft(inp: dict[str, Path], out: Path) -> None:
        from deltamoe.ops.graft import graft

        graft(inp["moe"], out, base=inp["base"], post=inp["post"], experts=gs.experts, scale=gs.scale,
              dtype=gs.dtype, progress=progress)

    g.train(f"{prefix}post_pretrain", "post_pretrain", pp, "upcycle")
    moe = f"{prefix}post_pretrain"
    if rr is not None and recipe.train.review == "before_graft":
        g.train(f"{prefix}router_review", "router_review", rr, moe)
        moe = f"{prefix}router_review"
    graft_inputs = {"moe": moe, "base": g.base_ref, "post": g.post_ref}
    if rr is not None and recipe.train.review == "after_graft":
        g.add(f"{prefix}grafted", "graft", gs.model_dump(), graft_inputs, do_graft)
        g.train(system, "router_review", rr, f"{prefix}grafted")
    else:
        g.add(system, "graft", gs.model_dump(), graft_inputs, do_graft)
    g.systems[system] = system
    return moe


def _moe_systems(g: _Graph) -> None:
    """DeltaMoE, and the MoE baselines: the same MoE without Δ (MoE-LPR) and the same chain with
    learned routing only (no router mask, no LPR loss)."""
    pp, rr = moe_specs(g.recipe)
    moe_final = _moe_chain(g, "", "deltamoe", pp, rr)
    if "moe_unallocated" in g.recipe.wanted:
        _moe_chain(g, "unallocated_", "moe_unallocated", unallocated(pp), unallocated(rr) if rr is not None else None)
    if "moe_lpr" in g.recipe.wanted:
        if rr is not None and g.recipe.train.review == "after_graft":
            # MoE-LPR reviews its routers on the MoE itself: stage 1's MoE, reviewed, without Δ
            g.train("router_review", "router_review", rr, "post_pretrain")
            moe_final = "router_review"
        g.systems["moe_lpr"] = moe_final


def _dense_baselines(g: _Graph) -> None:
    """B, P, and B' (dense CPT, also the merges' and the ceiling's starting point)."""
    wanted = g.recipe.wanted
    if "base" in wanted:
        g.systems["base"] = g.base_ref
    if "post" in wanted:
        g.systems["post"] = g.post_ref
    if wanted & {"dense_cpt", "paramdelta", "ceiling", *MERGE_BASELINES}:
        g.train("dense_cpt", "dense_cpt", dense_spec(g.recipe), g.base_ref)
        if "dense_cpt" in wanted:
            g.systems["dense_cpt"] = "dense_cpt"


def _merger(g: _Graph, method: str) -> StageFn:
    """Merge the stage's ``cpt`` input and P relative to B."""
    m, progress = g.recipe.merge, g.progress

    def run(inp: dict[str, Path], out: Path) -> None:
        from deltamoe.ops.merge import merge

        if method == "paramdelta":
            merge([inp["cpt"], inp["post"]], out, method="paramdelta", base=inp["base"], progress=progress)
        else:
            merge([(inp["cpt"], m.weights[0]), (inp["post"], m.weights[1])], out, method=method,  # type: ignore[arg-type]
                  base=inp["base"], density=m.density if method != "task_arithmetic" else None,
                  lambda_=m.lambda_, seed=m.seed, progress=progress)

    return run


def _merges(g: _Graph) -> None:
    """ParamΔ and the data-free merges of B' and P relative to B."""
    for method in ("paramdelta", *MERGE_BASELINES):
        if method in g.recipe.wanted:
            params = {"method": method} if method == "paramdelta" else {"method": method, **g.recipe.merge.model_dump()}
            g.add(method, "merge", params, {"cpt": "dense_cpt", "base": g.base_ref, "post": g.post_ref},
                  _merger(g, method))
            g.systems[method] = method


def _budget_matched(g: _Graph) -> None:
    """B'' + Δ: dense CPT with the training FLOPs of the MoE's stages, then ParamΔ."""
    if "budget_matched" not in g.recipe.wanted:
        return
    recipe, progress, spec = g.recipe, g.progress, dense_spec(g.recipe)

    def budget_cpt(inp: dict[str, Path], out: Path) -> None:
        from deltamoe.train import train

        budget = budget_matched_steps(recipe, inp["model"])
        steps = {**spec, "train": {**spec["train"], "steps": budget["dense_steps"]}}
        train(train_config("dense_cpt", steps, inp["model"], out, recipe.seed, inp.get("toy")), progress=progress)
        run_dir_of(out).mkdir(parents=True, exist_ok=True)
        (run_dir_of(out) / "budget.json").write_text(json.dumps(budget, indent=2))

    g.add("dense_cpt_budget", "train", {"stage": "dense_cpt", "budget": "moe_flops", **spec,
                                        "moe_tokens": moe_token_counts(recipe), "upcycle": _upcycle_params(recipe),
                                        "seed": recipe.seed},
          {"model": g.base_ref, **g.toy_role}, budget_cpt)
    g.add("budget_matched", "merge", {"method": "paramdelta"},
          {"cpt": "dense_cpt_budget", "base": g.base_ref, "post": g.post_ref}, _merger(g, "paramdelta"))
    g.systems["budget_matched"] = "budget_matched"


def _block_expansion(g: _Graph) -> None:
    """B with new identity blocks, only they trained on stage 1's data, then Δ grafted onto the
    original blocks (the parameter-matched dense baseline)."""
    if "block_expansion" not in g.recipe.wanted:
        return
    be, up, dtype, progress = g.recipe.block_expansion, g.recipe.upcycle, g.recipe.graft.dtype, g.progress
    experts = up.experts

    def do_expand(inp: dict[str, Path], out: Path) -> None:
        from deltamoe.ops.expand import blocks_matching, expand_blocks

        blocks = be.blocks or blocks_matching(inp["dense"], experts, up.layers)
        expand_blocks(inp["dense"], out, blocks=blocks, progress=progress)

    def do_graft_expanded(inp: dict[str, Path], out: Path) -> None:
        from deltamoe.ops.expand_graft import graft_expanded

        graft_expanded(inp["model"], out, base=inp["base"], post=inp["post"], dtype=dtype, progress=progress)

    # matched to the MoE's new experts: the key names the upcycled layers where they are not all
    match = f"match:{experts}" if up.layers.strip().lower() == "all" else f"match:{experts}:layers={up.layers}"
    g.add("expand", "expand", {"blocks": be.blocks or match}, {"dense": g.base_ref}, do_expand)
    g.train("expand_cpt", "dense_cpt", expansion_spec(g.recipe), "expand")
    g.add("block_expansion", "graft", {"target": "expanded", "dtype": dtype},
          {"model": "expand_cpt", "base": g.base_ref, "post": g.post_ref}, do_graft_expanded)
    g.systems["block_expansion"] = "block_expansion"


def _ceiling(g: _Graph) -> None:
    """B' post-trained on chat data in every language (toy only): an upper bound."""
    if "ceiling" not in g.recipe.wanted:
        return
    recipe, progress = g.recipe, g.progress
    assert recipe.toy is not None
    ceiling = ceiling_params(recipe)

    def do_ceiling(inp: dict[str, Path], out: Path) -> None:
        from deltamoe.toy.sft import post_train_chat

        post_train_chat(inp["model"], inp["toy"] / "chat_all.jsonl", out, seed=recipe.seed, progress=progress,
                        lm_files=ceiling_lm_files(recipe, inp["toy"]) if ceiling["lm_rows"] else None, **ceiling)

    g.add("ceiling", "toy_sft", {**ceiling, "seed": recipe.seed}, {"model": "dense_cpt", **g.toy_role}, do_ceiling)
    g.systems["ceiling"] = "ceiling"


def _evaluations(g: _Graph) -> None:
    """One evaluation per system, in :data:`SYSTEM_ORDER`."""
    from deltamoe.evaluate.run import EVAL_VERSION

    ev, progress = g.recipe.eval, g.progress

    def evaluator(inp: dict[str, Path], out: Path) -> None:
        from deltamoe.io import atomic_output_dir

        with atomic_output_dir(out) as tmp:
            if "toy" in ev.suites:
                from deltamoe.evaluate import evaluate

                data = Path(ev.toy_data) if ev.toy_data else inp["toy"]
                evaluate(inp["model"], "toy", data=data, out=tmp / "toy", batch_size=ev.batch_size,
                         max_items=ev.max_items, progress=progress)
            if "lm_eval" in ev.suites:
                from deltamoe.evaluate.lm_eval_run import run_lm_eval

                run_lm_eval(inp["model"], ev.lm_eval_tasks, tmp / "lm_eval", limit=ev.lm_eval_limit,
                            batch_size=ev.batch_size)

    for system in [s for s in SYSTEM_ORDER if s in g.systems]:
        g.add(f"eval-{system}", "eval", {"evaluator": EVAL_VERSION, **ev.model_dump()},
              {"model": g.systems[system], **g.toy_role}, evaluator)


def workdir_of(recipe: Recipe, recipe_dir: Path) -> Path:
    """The recipe's work directory: ``workdir`` relative to the recipe, or ``runs/<name>`` here."""
    workdir = Path(recipe.workdir) if recipe.workdir else Path("runs") / recipe.name
    if not workdir.is_absolute():
        workdir = (recipe_dir / workdir if recipe.workdir else Path.cwd() / workdir).resolve()
    return workdir


def ext_path(p: str, recipe_dir: Path) -> Path:
    """A model given in the recipe: a path relative to the recipe, an absolute path, or a Hub id."""
    from deltamoe.io import resolve_model

    return resolve_model(p, recipe_dir)


def build_plan(
    recipe: Recipe, recipe_dir: Path, *, progress: bool = True, local_only: bool = False
) -> tuple[list[StageRun], Path, dict[str, Any]]:
    """The stages of a recipe, with cache keys and output directories resolved.

    With ``local_only`` (dry runs) external models that are not on disk are keyed by their name
    instead of being fetched.
    """
    workdir = workdir_of(recipe, recipe_dir)
    g = _Graph(recipe, progress, ref_of(recipe, "base"), ref_of(recipe, "post"),
               {"toy": "toy"} if recipe.toy is not None else {})
    for builder in (_toy_and_upcycle, _moe_systems, _dense_baselines, _merges, _budget_matched, _block_expansion,
                    _ceiling, _evaluations):
        builder(g)
    memo = workdir / "fingerprints.json"

    def ext_key(p: str) -> str:
        local = Path(p).expanduser()
        local = recipe_dir / local if not local.is_absolute() and (recipe_dir / local).exists() else local
        if local_only and not local.exists():
            return "name:" + p  # not downloaded yet: a real run fingerprints its content
        return fingerprint(ext_path(p, recipe_dir), memo)

    resolve_keys(g.stages, workdir, ext_key)
    return g.stages, workdir, {"workdir": workdir, "systems": g.systems}
