"""``deltamoe run``: turn a recipe into the stages of DeltaMoE and its baselines, run them, report.

Systems compared (all on the same inputs and evaluation):

    base            B
    post            P
    dense_cpt       B'  = B continued-pretrained on the new-language corpora (every weight trains)
    paramdelta      B' + (P - B)
    task_arithmetic, ties, dare_linear, dare_ties   data-free merges of B' and P relative to B
    moe_lpr         the MoE after stage 1 (post-pretraining) and stage 2 (router review), no delta
    deltamoe        moe_lpr + expand(P - B)
    moe_unallocated the same upcycling, training and graft with learned routing only: no router
                    mask, no LPR loss (what the language allocation contributes)
    budget_matched  B'' + (P - B), where B'' is dense CPT with the same training FLOPs as the MoE run
    block_expansion B with new identity decoder blocks (LLaMA-Pro), as many new parameters as the
                    MoE's new experts, only they trained on stage 1's data, then P - B grafted onto
                    the original blocks: the parameter-matched dense baseline
    ceiling         B' post-trained on chat data in every language (toy only): the path the method
                    avoids, an upper bound rather than a baseline

FLOPs are counted as 6 x N_active x tokens (forward 2N, backward 4N; attention-score FLOPs and
the weight gradients that frozen weights skip are ignored, for both models alike). N_active of the
MoE is the dense parameter count plus (K - 1) FFNs per MoE layer plus the routers, so the dense
model gets N_active_moe / N_dense times the MoE's training tokens (stage 1 + stage 2), in steps of
the same batch.
"""

from __future__ import annotations

import functools
import json
import math
import os
from pathlib import Path
from typing import Any

from deltamoe.errors import UsageError
from deltamoe.preflight import human
from deltamoe.recipe import MERGE_BASELINES, Recipe, StageRun, fingerprint, resolve_keys
from deltamoe.train.config import run_dir_of

SYSTEM_ORDER = ("base", "post", "dense_cpt", "paramdelta", *MERGE_BASELINES, "budget_matched", "block_expansion",
                "moe_lpr",
                "moe_unallocated", "deltamoe", "ceiling")
UPPER_BOUNDS = ("ceiling",)


def _sub(obj: Any, toy: Path | None) -> Any:
    """Replace '{toy}' in every string of a nested structure by the toy build path."""
    if isinstance(obj, str):
        if "{toy}" in obj:
            if toy is None:
                raise ValueError(f"'{{toy}}' used in {obj!r} but the recipe builds no toy world")
            return obj.replace("{toy}", str(toy))
        return obj
    if isinstance(obj, dict):
        return {k: _sub(v, toy) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_sub(v, toy) for v in obj]
    return obj


def _train_config(stage: str, spec: dict[str, Any], model: Path, out: Path, seed: int, toy: Path | None) -> dict[str, Any]:
    cfg = {"stage": stage, "model": str(model), "output": str(out), "run_dir": str(run_dir_of(out)), "seed": seed}
    cfg.update({k: v for k, v in spec.items() if v})
    return _sub(cfg, toy)


def _param_counts(path: Path) -> dict[str, int]:
    """Total parameters and FFN parameters of a dense checkpoint, from its headers."""
    import math as m

    from deltamoe import arch
    from deltamoe.checkpoint import Checkpoint

    ck = Checkpoint(path)
    spec = arch.arch_for(ck.config)
    total = sum(m.prod(t.spec.shape) for t in ck.tensors.values())
    n_layers = arch.num_layers(ck.config)
    ffn = sum(m.prod(ck.spec(spec.dense_name(r, 0)).shape) for r in ("gate", "up", "down"))
    return {"total": total, "ffn_per_layer": ffn, "layers": n_layers, "hidden": int(ck.config["hidden_size"])}


def _tokens_per_step(train: dict[str, Any], data: dict[str, Any]) -> int:
    # sequences per optimizer step; grad_accum x micro_batch_size counts one process's share only
    per_step = train.get("global_batch") or int(train.get("micro_batch_size", 8)) * int(train.get("grad_accum", 1))
    return int(per_step) * int(data["seq_len"])


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
        stages.append(("dense_cpt", "dense_cpt", _dense_spec(recipe)))
    if "block_expansion" in recipe.wanted:
        stages.append(("dense_cpt", "block_expansion", _expansion_spec(recipe)))
    placeholder = Path("/nonexistent-until-run")
    for stage, where, spec in stages:
        cfg = _train_config(stage, spec, placeholder / "model", placeholder / "out", recipe.seed, placeholder / "toy")
        try:
            load_config(cfg)
        except UsageError as e:
            raise UsageError(f"{source}: {where}: {str(e).removeprefix('config: ')}") from None
        for lang in (spec.get("routing") or {}).get("top_k") or {}:
            if lang not in recipe.languages.all:
                raise UsageError(f"{source}: {where}.routing.top_k.{lang}: {lang!r} is not one of the recipe's "
                                 f"languages ({', '.join(recipe.languages.all)})")


def _ceiling_params(recipe: Recipe) -> dict[str, Any]:
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


def _ceiling_lm_files(recipe: Recipe, toy: Path) -> list[Path]:
    """The text the ceiling replays: the new languages' CPT corpora (B''s training text) and the
    replay set (half of it original-language text)."""
    return [*(toy / "cpt" / f"{lang}.jsonl" for lang in recipe.languages.new), toy / "replay.jsonl"]


def _spec(stage: Any) -> dict[str, Any]:
    """A training stage's sections; an empty ``distributed`` or ``routing`` is left out (cache keys
    stay as they were)."""
    return {k: v for k, v in stage.model_dump().items() if k not in ("distributed", "routing") or v}


def _unallocated(spec: dict[str, Any]) -> dict[str, Any]:
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


def _dense_spec(recipe: Recipe) -> dict[str, Any]:
    spec = {
        "data": _dense_data(recipe, recipe.dense_cpt.data or recipe.train.post_pretrain.data),
        "train": {**recipe.train.post_pretrain.train, **recipe.dense_cpt.train},
        "logging": recipe.dense_cpt.logging,
    }
    engine = recipe.dense_cpt.distributed or recipe.train.post_pretrain.distributed
    if engine:  # only when given: cache keys of recipes without it stay as they were
        spec["distributed"] = engine
    return spec


def _expansion_spec(recipe: Recipe) -> dict[str, Any]:
    """The block-expansion baseline's training: stage 1's data and train section (overridden by
    ``block_expansion.train``), dense CPT of the new blocks only."""
    pp = recipe.train.post_pretrain
    spec: dict[str, Any] = {"data": _dense_data(recipe, pp.data), "train": {**pp.train, **recipe.block_expansion.train},
                            "trainable": {"layers": "new"}, "logging": recipe.block_expansion.logging}
    engine = recipe.dense_cpt.distributed or pp.distributed
    if engine:
        spec["distributed"] = engine
    return spec


def parameter_match(expanded: Path, moe: Path, base: Path) -> dict[str, Any]:
    """What the block-expansion baseline adds to B against what the upcycle adds (its new experts
    and routers), counted from the checkpoints' headers."""
    from deltamoe.checkpoint import Checkpoint

    def total(p: Path) -> int:
        return sum(math.prod(t.spec.shape) for t in Checkpoint(p).tensors.values())

    n_base = total(base)
    info = json.loads((expanded / "deltamoe.json").read_text())["expand"]
    added, moe_added = total(expanded) - n_base, total(moe) - n_base
    return {"blocks": info["new_blocks"], "new_layers": info["new_layers"], "base_params": n_base,
            "added_params": added, "moe_added_params": moe_added, "ratio": added / moe_added}


def base_ref_of(recipe: Recipe) -> str:
    """The stage reference of B."""
    if recipe.toy is not None:
        return f"toy/{recipe.toy.base_model}"
    assert recipe.models is not None
    return f"ext:{recipe.models.base}"


def budget_matched_steps(recipe: Recipe, base: Path) -> dict[str, Any]:
    """Steps of dense CPT with the same training FLOPs as the MoE's stage 1 + stage 2 (see module doc)."""
    c = _param_counts(base)
    e, k = recipe.upcycle.experts, recipe.upcycle.top_k
    n_moe_layers = c["layers"]  # all layers by default; replicated layers also run K experts
    n_active = c["total"] + (k - 1) * c["ffn_per_layer"] * n_moe_layers + e * c["hidden"] * n_moe_layers
    moe_tokens = 0
    for spec in (recipe.train.post_pretrain, recipe.train.router_review):
        if spec is not None:
            steps = spec.train.get("steps")
            if steps is None:
                raise UsageError("budget_matched needs explicit train.steps in every training stage")
            moe_tokens += int(steps) * _tokens_per_step(spec.train, spec.data)
    dense_train = {**recipe.train.post_pretrain.train, **recipe.dense_cpt.train}
    dense_data = recipe.dense_cpt.data or recipe.train.post_pretrain.data
    flops_moe = 6 * n_active * moe_tokens
    steps = math.ceil(flops_moe / (6 * c["total"] * _tokens_per_step(dense_train, dense_data)))
    return {"n_dense": c["total"], "n_active_moe": n_active, "moe_tokens": moe_tokens, "moe_flops": flops_moe,
            "dense_steps": steps, "dense_flops": 6 * c["total"] * steps * _tokens_per_step(dense_train, dense_data)}


def build_plan(
    recipe: Recipe, recipe_dir: Path, *, progress: bool = True, local_only: bool = False
) -> tuple[list[StageRun], Path, dict[str, Any]]:
    """The stages of a recipe, with cache keys and output directories resolved.

    With ``local_only`` (dry runs) external models that are not on disk are keyed by their name
    instead of being fetched.
    """
    workdir = Path(recipe.workdir) if recipe.workdir else Path("runs") / recipe.name
    if not workdir.is_absolute():
        workdir = (recipe_dir / workdir if recipe.workdir else Path.cwd() / workdir).resolve()
    stages: list[StageRun] = []
    ctx: dict[str, Any] = {"workdir": workdir}

    def add(name: str, kind: str, params: dict[str, Any], inputs: dict[str, str], fn: Any) -> None:
        stages.append(StageRun(name=name, kind=kind, params=params, inputs=inputs, fn=fn))

    toy_role: dict[str, str] = {}
    if recipe.toy is not None:
        size, seed = recipe.toy.size, recipe.toy.seed

        def build_toy(inp: dict[str, Path], out: Path) -> None:
            from deltamoe.toy import build

            build(out, size, seed, progress=progress)

        add("toy", "toy_build", {"size": size, "seed": seed}, {}, build_toy)
        toy_role = {"toy": "toy"}
        post_ref = f"toy/{recipe.toy.post_model}"
    else:
        assert recipe.models is not None
        post_ref = f"ext:{recipe.models.post}"
    base_ref = base_ref_of(recipe)

    def toy_of(inp: dict[str, Path]) -> Path | None:
        return inp.get("toy")

    # -- DeltaMoE ---------------------------------------------------------------------------
    up = recipe.upcycle
    up_params = {**up.model_dump(), "allocation": recipe.allocation, "seed": recipe.seed}

    def do_upcycle(inp: dict[str, Path], out: Path) -> None:
        from deltamoe.upcycle import upcycle

        upcycle(inp["dense"], out, num_experts=up.experts, top_k=up.top_k, layers=up.layers,
                allocation=recipe.allocation, router_init=up.router_init, noise=up.noise,
                reinit_ratio=up.reinit_ratio, seed=recipe.seed, dtype=up.dtype, progress=progress)

    add("upcycle", "upcycle", up_params, {"dense": base_ref}, do_upcycle)

    def trainer(stage: str, spec: dict[str, Any]) -> Any:
        def run(inp: dict[str, Path], out: Path) -> None:
            from deltamoe.train import train

            train(_train_config(stage, spec, inp["model"], out, recipe.seed, toy_of(inp)), progress=progress)

        return run

    g = recipe.graft

    def do_graft(inp: dict[str, Path], out: Path) -> None:
        from deltamoe.delta import graft

        graft(inp["moe"], out, base=inp["base"], post=inp["post"], experts=g.experts, scale=g.scale,
              dtype=g.dtype, progress=progress)

    def moe_chain(prefix: str, system: str, pp: dict[str, Any], rr: dict[str, Any] | None) -> str:
        """Stage 1, the router review and the graft, in the recipe's order; returns the stage of
        the MoE without Δ (after every training stage before the graft)."""
        add(f"{prefix}post_pretrain", "train", {"stage": "post_pretrain", **pp, "seed": recipe.seed},
            {"model": "upcycle", **toy_role}, trainer("post_pretrain", pp))
        moe = f"{prefix}post_pretrain"
        review = {"stage": "router_review", **(rr or {}), "seed": recipe.seed}
        if rr is not None and recipe.train.review == "before_graft":
            add(f"{prefix}router_review", "train", review, {"model": moe, **toy_role}, trainer("router_review", rr))
            moe = f"{prefix}router_review"
        if rr is not None and recipe.train.review == "after_graft":
            add(f"{prefix}grafted", "graft", g.model_dump(), {"moe": moe, "base": base_ref, "post": post_ref}, do_graft)
            add(system, "train", review, {"model": f"{prefix}grafted", **toy_role}, trainer("router_review", rr))
        else:
            add(system, "graft", g.model_dump(), {"moe": moe, "base": base_ref, "post": post_ref}, do_graft)
        return moe

    pp = _spec(recipe.train.post_pretrain)
    rr = _spec(recipe.train.router_review) if recipe.train.router_review is not None else None
    moe_final = moe_chain("", "deltamoe", pp, rr)
    systems: dict[str, str] = {"deltamoe": "deltamoe"}
    if "moe_unallocated" in recipe.wanted:
        moe_chain("unallocated_", "moe_unallocated", _unallocated(pp), _unallocated(rr) if rr is not None else None)
        systems["moe_unallocated"] = "moe_unallocated"

    # -- baselines --------------------------------------------------------------------------
    wanted = recipe.wanted
    if "base" in wanted:
        systems["base"] = base_ref
    if "post" in wanted:
        systems["post"] = post_ref
    if "moe_lpr" in wanted:
        systems["moe_lpr"] = moe_final
    dense_spec = _dense_spec(recipe)
    dense_train = dense_spec["train"]
    needs_cpt = wanted & {"dense_cpt", "paramdelta", "ceiling", *MERGE_BASELINES}
    if needs_cpt:
        add("dense_cpt", "train", {"stage": "dense_cpt", **dense_spec, "seed": recipe.seed},
            {"model": base_ref, **toy_role}, trainer("dense_cpt", dense_spec))
        if "dense_cpt" in wanted:
            systems["dense_cpt"] = "dense_cpt"

    m = recipe.merge

    def merger(method: str, cpt: str) -> Any:
        def run(inp: dict[str, Path], out: Path) -> None:
            from deltamoe.merge import merge

            if method == "paramdelta":
                merge([inp["cpt"], inp["post"]], out, method="paramdelta", base=inp["base"], progress=progress)
            else:
                merge([(inp["cpt"], m.weights[0]), (inp["post"], m.weights[1])], out, method=method,  # type: ignore[arg-type]
                      base=inp["base"], density=m.density if method != "task_arithmetic" else None,
                      lambda_=m.lambda_, seed=m.seed, progress=progress)

        return run

    for method in ("paramdelta", *MERGE_BASELINES):
        if method in wanted:
            params = {"method": method} if method == "paramdelta" else {"method": method, **m.model_dump()}
            add(method, "merge", params, {"cpt": "dense_cpt", "base": base_ref, "post": post_ref},
                merger(method, "dense_cpt"))
            systems[method] = method

    if "budget_matched" in wanted:
        def budget_cpt(inp: dict[str, Path], out: Path) -> None:
            from deltamoe.train import train

            budget = budget_matched_steps(recipe, inp["model"])
            spec = {**dense_spec, "train": {**dense_train, "steps": budget["dense_steps"]}}
            train(_train_config("dense_cpt", spec, inp["model"], out, recipe.seed, toy_of(inp)), progress=progress)
            run_dir_of(out).mkdir(parents=True, exist_ok=True)
            (run_dir_of(out) / "budget.json").write_text(json.dumps(budget, indent=2))

        add("dense_cpt_budget", "train", {"stage": "dense_cpt", "budget": "moe_flops", **dense_spec,
                                          "moe": [_spec(recipe.train.post_pretrain),
                                                  _spec(recipe.train.router_review) if recipe.train.router_review else None],
                                          "upcycle": up_params, "seed": recipe.seed},
            {"model": base_ref, **toy_role}, budget_cpt)
        add("budget_matched", "merge", {"method": "paramdelta"},
            {"cpt": "dense_cpt_budget", "base": base_ref, "post": post_ref}, merger("paramdelta", "dense_cpt_budget"))
        systems["budget_matched"] = "budget_matched"

    if "block_expansion" in wanted:
        be, expansion_spec = recipe.block_expansion, _expansion_spec(recipe)

        def do_expand(inp: dict[str, Path], out: Path) -> None:
            from deltamoe.expand import blocks_matching, expand_blocks

            blocks = be.blocks or blocks_matching(inp["dense"], up.experts)
            expand_blocks(inp["dense"], out, blocks=blocks, progress=progress)

        def do_graft_expanded(inp: dict[str, Path], out: Path) -> None:
            from deltamoe.expand_graft import graft_expanded

            graft_expanded(inp["model"], out, base=inp["base"], post=inp["post"], dtype=g.dtype, progress=progress)

        add("expand", "expand", {"blocks": be.blocks or f"match:{up.experts}"}, {"dense": base_ref}, do_expand)
        add("expand_cpt", "train", {"stage": "dense_cpt", **expansion_spec, "seed": recipe.seed},
            {"model": "expand", **toy_role}, trainer("dense_cpt", expansion_spec))
        add("block_expansion", "graft", {"target": "expanded", "dtype": g.dtype},
            {"model": "expand_cpt", "base": base_ref, "post": post_ref}, do_graft_expanded)
        systems["block_expansion"] = "block_expansion"

    if "ceiling" in wanted:
        assert recipe.toy is not None
        ceiling = _ceiling_params(recipe)

        def do_ceiling(inp: dict[str, Path], out: Path) -> None:
            from deltamoe.toy.sft import post_train_chat

            post_train_chat(inp["model"], inp["toy"] / "chat_all.jsonl", out, seed=recipe.seed, progress=progress,
                            lm_files=_ceiling_lm_files(recipe, inp["toy"]) if ceiling["lm_rows"] else None, **ceiling)

        add("ceiling", "toy_sft", {**ceiling, "seed": recipe.seed}, {"model": "dense_cpt", **toy_role}, do_ceiling)
        systems["ceiling"] = "ceiling"

    # -- evaluation -------------------------------------------------------------------------
    from deltamoe.evaluate.run import EVAL_VERSION

    ev = recipe.eval
    toy_data = ev.toy_data

    def evaluator(inp: dict[str, Path], out: Path) -> None:
        from deltamoe.checkpoint import atomic_output_dir

        with atomic_output_dir(out) as tmp:
            if "toy" in ev.suites:
                from deltamoe.evaluate import evaluate

                data = Path(toy_data) if toy_data else inp["toy"]
                evaluate(inp["model"], "toy", data=data, out=tmp / "toy", batch_size=ev.batch_size,
                         max_items=ev.max_items, progress=progress)
            if "lm_eval" in ev.suites:
                run_lm_eval(inp["model"], ev.lm_eval_tasks, tmp / "lm_eval", limit=ev.lm_eval_limit,
                            batch_size=ev.batch_size)

    for system in [s for s in SYSTEM_ORDER if s in systems]:
        add(f"eval-{system}", "eval", {"evaluator": EVAL_VERSION, **ev.model_dump()}, {"model": systems[system], **toy_role},
            evaluator)

    ctx["systems"] = systems
    memo = workdir / "fingerprints.json"

    def ext_key(p: str) -> str:
        local = Path(p).expanduser()
        local = recipe_dir / local if not local.is_absolute() and (recipe_dir / local).exists() else local
        if local_only and not local.exists():
            return "name:" + p  # not downloaded yet: a real run fingerprints its content
        return fingerprint(_ext(p, recipe_dir), memo)

    resolve_keys(stages, workdir, ext_key)
    return stages, workdir, ctx


def _ext(p: str, recipe_dir: Path) -> Path:
    """A model given in the recipe: a path relative to the recipe, an absolute path, or a Hub id."""
    from deltamoe.checkpoint import resolve_model

    return resolve_model(p, recipe_dir)


def ref_path(ref: str, stages: dict[str, StageRun], recipe_dir: Path) -> Path:
    """Directory of a stage reference ('stage', 'stage/sub' or 'ext:path')."""
    if ref.startswith("ext:"):
        return _ext(ref[4:], recipe_dir)
    name, _, sub = ref.partition("/")
    return stages[name].out / sub if sub else stages[name].out


def clean_stale_temporaries(workdir: Path) -> int:
    """Remove temporary directories left by killed runs (their owning process is gone), saying so."""
    from deltamoe.preflight import remove_stale_temporaries

    root = workdir / "stages"
    return remove_stale_temporaries(root) if root.is_dir() else 0


def _base_config(recipe: Recipe, recipe_dir: Path) -> dict[str, Any] | None:
    """B's config without downloading B: the toy size, a local directory, or the local Hub cache."""
    if recipe.toy is not None:
        from deltamoe.toy import SIZES

        cfg = SIZES[recipe.toy.size]
        shape = cfg.model if recipe.toy.arch == "llama" or cfg.model2 is None else cfg.model2
        return {**shape.model_dump(), "vocab_size": cfg.vocab_size, "torch_dtype": "float32"}
    assert recipe.models is not None
    p = Path(recipe.models.base).expanduser()
    p = recipe_dir / p if not p.is_absolute() and (recipe_dir / p).exists() else p
    if (p / "config.json").is_file():
        return json.loads((p / "config.json").read_text())
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(recipe.models.base, "config.json")
    except Exception:  # not a valid repo id
        return None
    return json.loads(Path(cached).read_text()) if isinstance(cached, str) else None


def estimate_disk(stages: list[StageRun], recipe: Recipe, recipe_dir: Path) -> dict[str, int | None]:
    """Bytes each stage writes (see :mod:`deltamoe.estimate`), or None where B's config is not known."""
    from deltamoe.estimate import MOE_STAGES, Shape, stage_bytes

    c = _base_config(recipe, recipe_dir)
    if c is None:
        return {s.name: None for s in stages}
    shape = Shape.from_config(c)
    toy = recipe.toy.size if recipe.toy else None
    return {s.name: stage_bytes(s, shape, recipe.upcycle.experts, toy, set(MOE_STAGES), recipe.block_expansion.blocks)
            for s in stages}


def _report_estimate(recipe: Recipe, ctx: dict[str, Any]) -> int:
    from deltamoe.estimate import report_bytes

    systems = ctx["systems"]
    langs = len(recipe.languages.all)
    return report_bytes(len(systems), langs, sum(1 for s in ("moe_lpr", "moe_unallocated", "deltamoe") if s in systems))


def _human(n: int | None) -> str:
    return "unknown" if n is None else human(n)


def check_recipe_inputs(recipe: Recipe, rdir: Path, source: str, stages: list[StageRun], workdir: Path) -> list[str]:
    """Everything a run needs that can be checked before its first stage: models, data, options, workdir.

    Raises for what is wrong; returns the data paths that do not exist (yet): a dry run lists them
    (real-scale recipes are checked before their corpora are downloaded), a run refuses to start.
    """
    from deltamoe.delta import parse_experts
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


def _train_sections(recipe: Recipe) -> list[tuple[str, dict[str, Any]]]:
    out = [("train.post_pretrain", recipe.train.post_pretrain.model_dump())]
    if recipe.train.router_review is not None:
        out.append(("train.router_review", recipe.train.router_review.model_dump()))
    out.append(("dense_cpt", _dense_spec(recipe)))
    if "block_expansion" in recipe.wanted:
        out.append(("block_expansion", _expansion_spec(recipe)))
    return out


def _check_model(ref: str, rdir: Path, where: str) -> None:
    """A local model must be a supported safetensors checkpoint; a Hub id is fetched when the run needs it."""
    from deltamoe import arch
    from deltamoe.checkpoint import Checkpoint, model_ref
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
                missing += _missing_data(_sub(path, toy), f"{source}: {where}.data.sources.{i}.path")
    return missing


def _missing_data(path: str, where: str) -> list[str]:
    import glob

    p = Path(path).expanduser()
    return [] if p.exists() or glob.glob(str(p)) else [f"{where}: {path}: no such file, directory or glob match"]


def _check_disk(workdir: Path, need: int | None, source: str) -> None:
    from deltamoe.preflight import check_disk

    if need:
        check_disk(workdir, need, f"{source}: the stages still to run")


def run_recipe(
    path: str | Path, *, dry_run: bool = False, progress: bool = True, log: Any = print
) -> dict[str, Any]:
    """Validate and run a recipe (or, with ``dry_run``, print its plan); return what happened.

    Returns ``{"workdir", "plan": [...], "executed": [...], "report", "results"}``.
    """
    from deltamoe.recipe import load_recipe, run_plan

    recipe, rdir = load_recipe(path)
    if "lm_eval" in recipe.eval.suites:
        try:
            check_lm_eval_tasks(recipe.eval.lm_eval_tasks)
        except ValueError as e:
            raise UsageError(f"{path}: {e}") from None
    check_train_sections(recipe, str(path))
    check_recipe_models(recipe, rdir, str(path))  # before build_plan fingerprints them
    stages, workdir, ctx = build_plan(recipe, rdir, progress=progress, local_only=True)
    missing = check_recipe_inputs(recipe, rdir, str(path), stages, workdir)
    if missing and not dry_run:
        raise UsageError(f"{missing[0]} (the run needs every data path before it starts"
                         + (f"; {len(missing) - 1} more missing" if len(missing) > 1 else "") + ")")
    est = estimate_disk(stages, recipe, rdir)
    plan = [{"stage": s.name, "kind": s.kind, "key": s.key, "cached": s.out.is_dir(), "est_bytes": est[s.name],
             "out": str(s.out)} for s in stages]
    todo = [p["est_bytes"] for p in plan if not p["cached"]]
    total = None if any(b is None for b in todo) else sum(todo) + _report_estimate(recipe, ctx)
    _check_disk(workdir, total, str(path))
    if dry_run:
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
        return {"workdir": str(workdir), "plan": plan, "executed": [], "est_total_bytes": total, "missing": missing}

    stages, workdir, ctx = build_plan(recipe, rdir, progress=progress)  # keys external models by content
    workdir.mkdir(parents=True, exist_ok=True)
    clean_stale_temporaries(workdir)
    by_name = {s.name: s for s in stages}
    executed = run_plan(stages, lambda p: _ext(p, rdir), log=log)
    if int(os.environ.get("RANK", "0")) != 0:
        return {"workdir": str(workdir), "plan": plan, "executed": executed}

    from deltamoe.report import collect, format_table, write_report

    systems = {name: (ref_path(ctx["systems"][name], by_name, rdir), by_name[f"eval-{name}"].out)
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
                                                   ref_path(base_ref_of(recipe), by_name, rdir))
    languages = {"original": recipe.languages.original, "new": recipe.languages.new}
    results = collect(systems, languages, extra)
    logs = {name: run_dir_of(by_name[name].out) / "logs" / "train.jsonl"
            for name in ("post_pretrain", "router_review", "dense_cpt") if name in by_name}
    report = write_report(workdir, results, logs, Path(path).read_text())
    log("\n" + format_table(results))
    log(f"\nreport: {report}")
    return {"workdir": str(workdir), "plan": plan, "executed": executed, "report": str(report), "results": results}


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
