"""Recipes: strict schema, every shipped recipe validates, the dry-run plan, FLOP matching."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from deltamoe.cli import app
from deltamoe.demo import demo_recipe_text
from deltamoe.errors import UsageError
from deltamoe.pipeline.run import run_recipe
from deltamoe.recipe import load_recipe

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = sorted((ROOT / "recipes").glob("*.yaml"))


def _write(tmp: Path, data: dict) -> Path:
    p = tmp / "r.yaml"
    p.write_text(yaml.safe_dump(data))
    return p


def _demo() -> dict:
    return yaml.safe_load(demo_recipe_text())


def test_shipped_recipes_exist() -> None:
    names = {p.name for p in SHIPPED}
    assert {"llama31-8b-el-hu-tr.yaml", "qwen3-8b-el-hu-tr.yaml"} <= names


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_recipe_dry_run(path: Path) -> None:
    res = run_recipe(path, dry_run=True, log=lambda m: None)
    stages = [p["stage"] for p in res["plan"]]
    assert stages[:4] == ["upcycle", "post_pretrain", "router_review", "deltamoe"]
    assert {"dense_cpt", "paramdelta", "ties", "dare_ties", "budget_matched", "eval-deltamoe", "eval-moe_lpr"} <= set(stages)
    assert not any(p["cached"] for p in res["plan"])


def test_demo_recipe_dry_run(tmp_path: Path) -> None:
    p = tmp_path / "recipe.yaml"
    p.write_text(demo_recipe_text())
    res = run_recipe(p, dry_run=True, log=lambda m: None)
    assert res["plan"][0]["stage"] == "toy"
    assert res["est_total_bytes"] and res["est_total_bytes"] > 0
    assert not (tmp_path / "stages").exists(), "a dry run writes no stage output"


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda r: r.update(upcylce={"experts": 4}), "upcylce: unknown field"),
        (lambda r: r["train"]["post_pretrain"].update(trian={}), "train.post_pretrain.trian: unknown field"),
        (lambda r: r.update(models={"base": "a", "post": "b"}), "exactly one of 'toy'"),
        (lambda r: r["upcycle"].update(top_k=5), "top_k (5) exceeds experts (4)"),
        (lambda r: r["upcycle"].update(allocation={"xx": [1]}), "languages ['xx'] that are not in 'languages'"),
        (lambda r: r["upcycle"].update(allocation={"vel": [7]}), "uses experts [7]"),
        (lambda r: r["languages"].update(new=["en"]), "both original and new"),
        (lambda r: r.update(baselines=["ties", "nope"]), "baselines.1"),
        (lambda r: r.update(eval={"suites": ["lm_eval"]}), "needs lm_eval_tasks"),
    ],
)
def test_bad_recipes_name_the_field(tmp_path: Path, mutate, message: str) -> None:
    r = _demo()
    mutate(r)
    with pytest.raises(UsageError) as e:
        load_recipe(_write(tmp_path, r))
    assert message in str(e.value)


def test_top_k_per_language_must_name_a_recipe_language(tmp_path: Path) -> None:
    r = _demo()
    r["train"]["router_review"]["routing"] = {"top_k": {"en": 1, "xx": 1}}
    with pytest.raises(UsageError, match=r"train\.router_review\.routing\.top_k\.xx: 'xx' is not one of the recipe's languages"):
        run_recipe(_write(tmp_path, r), dry_run=True, log=lambda m: None)
    r["train"]["router_review"]["routing"] = {"top_k": {"en": 1}}
    assert run_recipe(_write(tmp_path, r), dry_run=True, log=lambda m: None)["plan"]


def test_training_sections_are_validated_before_anything_runs(tmp_path: Path) -> None:
    r = _demo()
    r["train"]["router_review"]["train"]["stpes"] = 3
    with pytest.raises(UsageError, match=r"(?s)train\.router_review: .*train\.stpes: unknown field \(did you mean 'steps'\?\)"):
        run_recipe(_write(tmp_path, r), dry_run=True, log=lambda m: None)
    r = _demo()
    r["dense_cpt"] = {"train": {"lr": -1}}
    with pytest.raises(UsageError, match=r"(?s)dense_cpt: .*train\.lr"):
        run_recipe(_write(tmp_path, r), dry_run=True, log=lambda m: None)


def test_unknown_lm_eval_task_is_an_error(tmp_path: Path) -> None:
    r = _demo()
    r["eval"] = {"suites": ["toy", "lm_eval"], "lm_eval_tasks": ["belebele_ell_Grek", "belebele_xx_Nope"]}
    with pytest.raises(UsageError, match=r"unknown lm-eval task\(s\) \['belebele_xx_Nope'\]"):
        run_recipe(_write(tmp_path, r), dry_run=True, log=lambda m: None)


def _keys(tmp: Path, r: dict) -> dict[str, str]:
    return {s["stage"]: s["key"] for s in run_recipe(_write(tmp, r), dry_run=True, log=lambda m: None)["plan"]}


def test_cache_keys_follow_parameters(tmp_path: Path) -> None:
    r = _demo()
    r["train"]["review"] = "before_graft"
    a = _keys(tmp_path, r)
    r["train"]["router_review"]["train"]["steps"] = 41
    b = _keys(tmp_path, r)
    same = {k for k in a if a[k] == b[k]}
    # changing stage 2 changes it and everything downstream of it, nothing upstream
    assert {"toy", "upcycle", "post_pretrain", "dense_cpt", "paramdelta", "ties", "eval-base", "eval-post"} <= same
    assert {"router_review", "deltamoe", "eval-deltamoe", "eval-moe_lpr", "dense_cpt_budget"}.isdisjoint(same)


def test_cache_keys_follow_parameters_with_the_review_after_the_graft(tmp_path: Path) -> None:
    """The demo's order: stage 1, graft, review. A review setting changes the review (the DeltaMoE
    system), MoE-LPR's own review and what reads them, not the graft before it."""
    r = _demo()
    assert r["train"]["review"] == "after_graft"
    a = _keys(tmp_path, r)
    r["train"]["router_review"]["train"]["steps"] = 41
    b = _keys(tmp_path, r)
    same = {k for k in a if a[k] == b[k]}
    assert {"toy", "upcycle", "post_pretrain", "grafted", "unallocated_grafted", "dense_cpt", "paramdelta",
            "eval-post"} <= same
    assert {"deltamoe", "eval-deltamoe", "router_review", "eval-moe_lpr", "moe_unallocated", "eval-moe_unallocated",
            "dense_cpt_budget"}.isdisjoint(same)


def test_flop_matched_cpt_is_keyed_on_the_moe_tokens_only(tmp_path: Path) -> None:
    """The FLOP-matched dense CPT reads of the MoE's stages only their steps and tokens per step: a
    review lr or LPR weight leaves it (and its merge and evaluation) cached, a review batch does not."""
    r = _demo()
    a = _keys(tmp_path, r)
    r["train"]["router_review"]["train"]["lr"] = 1.0e-2
    r["train"]["router_review"]["losses"] = {"lpr": 2.0}
    r["train"]["post_pretrain"]["train"]["lr"] = 1.0e-3
    b = _keys(tmp_path, r)
    budget = {"dense_cpt_budget", "budget_matched", "eval-budget_matched"}
    assert {k for k in budget if a[k] == b[k]} == budget
    assert a["deltamoe"] != b["deltamoe"] and a["post_pretrain"] != b["post_pretrain"]
    r["train"]["router_review"]["train"]["micro_batch_size"] = 8
    c = _keys(tmp_path, r)
    assert {k for k in budget if b[k] == c[k]} == set()
    r["train"]["router_review"]["train"]["micro_batch_size"] = 16
    r["train"]["router_review"]["data"]["seq_len"] = 32
    assert _keys(tmp_path, r)["dense_cpt_budget"] not in {a["dense_cpt_budget"], c["dense_cpt_budget"]}
    r["train"]["router_review"]["data"]["seq_len"] = 64  # 16 x 64 tokens per step, as 8 x 128: the same budget
    assert _keys(tmp_path, r)["dense_cpt_budget"] == c["dense_cpt_budget"]


def test_cli_dry_run_and_missing_recipe(tmp_path: Path) -> None:
    runner = CliRunner()
    res = runner.invoke(app, ["run", str(SHIPPED[0]), "--dry-run"])
    assert res.exit_code == 0 and "estimated new disk use" in res.output
    res = runner.invoke(app, ["run", str(tmp_path / "none.yaml")])
    assert res.exit_code == 1 and "no such recipe file" in res.output


def test_toy_architecture_and_delta_choose_the_models(tmp_path: Path) -> None:
    from deltamoe.pipeline.graph import build_plan

    for toy, base, post in (({"arch": "llama", "post": "instruct"}, "toy/base", "toy/instruct"),
                            ({"arch": "llama", "post": "instruct2"}, "toy/base", "toy/instruct2"),
                            ({"arch": "qwen3"}, "toy/qwen3-base", "toy/qwen3-instruct")):
        r = _demo()
        r["toy"].update(toy)
        stages = {s.name: s for s in build_plan(*load_recipe(_write(tmp_path, r)), local_only=True)[0]}
        assert stages["upcycle"].inputs == {"dense": base}
        # the demo grafts stage 1's MoE, then reviews the routers of the grafted model
        assert stages["deltamoe"].inputs["model"] == "grafted"
        assert stages["grafted"].inputs["post"] == post and stages["grafted"].inputs["base"] == base
        assert stages["paramdelta"].inputs["post"] == post
    r = _demo()
    r["toy"].update(arch="qwen3", post="instruct2")
    with pytest.raises(UsageError, match="qwen3 architecture has one post-trained model"):
        load_recipe(_write(tmp_path, r))


def test_ceiling_is_dense_cpt_plus_chat_in_every_language(tmp_path: Path) -> None:
    from deltamoe.pipeline.graph import SYSTEM_ORDER, build_plan
    from deltamoe.toy import SIZES

    size = SIZES["small"]
    phase = size.posts[0].phase

    def ceiling(recipe: dict):
        return {s.name: s for s in build_plan(*load_recipe(_write(tmp_path, recipe)), local_only=True)[0]}

    # without a ``ceiling`` section: the toy's own post-training recipe, P's lr and batch, its
    # language-model replay rows per step, and P's steps once per language (en, vel, kyr, tol):
    # P spends all of its steps on one language
    r = _demo()
    del r["ceiling"]
    stages = ceiling(r)
    assert stages["ceiling"].kind == "toy_sft" and stages["ceiling"].inputs == {"model": "dense_cpt", "toy": "toy"}
    expected = {"steps": 4 * phase.steps, "lr": phase.lr, "batch_size": phase.batch_size,
                "lm_rows": size.sft_lm_rows, "lm_weight": size.sft_lm_weight, "seq_len": size.seq_len, "seed": 0}
    assert stages["ceiling"].params == expected
    # the demo overrides only the lr: the ceiling screen's 1e-3 (2.5 times P's 4e-4 since generator 3),
    # everything else as above
    stages = ceiling(_demo())
    assert stages["ceiling"].params == {**expected, "lr": 1.0e-3} and phase.lr == 4.0e-4
    assert size.sft_lm_rows == 32
    assert "eval-ceiling" in stages and SYSTEM_ORDER[-1] == "ceiling"
    # the ceiling needs the toy world's chat data: refused by name for real models, left out by default
    r = _demo()
    del r["toy"], r["baselines"]
    r["models"] = {"base": "b", "post": "p"}
    r["eval"]["suites"] = ["lm_eval"]
    r["eval"]["lm_eval_tasks"] = ["belebele_ell_Grek"]
    recipe, rdir = load_recipe(_write(tmp_path, r))
    assert "ceiling" not in recipe.wanted
    r["baselines"] = ["post", "ceiling"]
    with pytest.raises(UsageError, match="'ceiling' needs the toy world"):
        load_recipe(_write(tmp_path, r))


def test_router_review_after_the_graft_and_the_unallocated_moe(tmp_path: Path) -> None:
    """``train.review: after_graft`` grafts the stage-1 MoE and reviews the routers of the grafted
    model (the DeltaMoE system is that review's output); the unallocated MoE baseline runs the same
    chain with the router mask and the LPR loss switched off, and nothing else changed."""
    from deltamoe.pipeline.graph import build_plan

    r = _demo()
    r["train"]["post_pretrain"]["routing"] = {"allocated": True}
    r["train"]["post_pretrain"]["losses"] = {"lpr": 0.5, "lpr_tokens": "original"}
    r["baselines"] = ["post", "moe_lpr", "moe_unallocated"]
    r["train"]["review"] = "before_graft"
    before = {s.name: s for s in build_plan(*load_recipe(_write(tmp_path, r)), local_only=True)[0]}
    assert before["deltamoe"].kind == "graft" and before["deltamoe"].inputs["moe"] == "router_review"
    assert before["router_review"].inputs["model"] == "post_pretrain"
    assert before["post_pretrain"].params["routing"] == {"allocated": True}
    free = before["unallocated_post_pretrain"].params
    assert "routing" not in free and free["losses"] == {"lpr": 0.0}
    assert before["unallocated_router_review"].params["losses"]["lpr"] == 0.0
    assert before["moe_unallocated"].inputs["moe"] == "unallocated_router_review"
    same = {k: v for k, v in before["post_pretrain"].params.items() if k not in ("routing", "losses")}
    assert same == {k: v for k, v in free.items() if k != "losses"}
    assert "eval-moe_unallocated" in before
    r["train"]["review"] = "after_graft"
    after = {s.name: s for s in build_plan(*load_recipe(_write(tmp_path, r)), local_only=True)[0]}
    # MoE-LPR (no Δ) is stage 1 and the review on the MoE itself, in either order
    assert after["router_review"].inputs["model"] == "post_pretrain"
    assert after["grafted"].kind == "graft" and after["grafted"].inputs["moe"] == "post_pretrain"
    assert after["deltamoe"].kind == "train" and after["deltamoe"].inputs["model"] == "grafted"
    assert after["deltamoe"].params["stage"] == "router_review"
    assert after["moe_unallocated"].inputs["model"] == "unallocated_grafted"
    assert after["eval-moe_lpr"].inputs["model"] == "router_review"
    assert after["router_review"].params == before["router_review"].params
    assert after["router_review"].key == before["router_review"].key  # one stage, cached for both orders
    r["train"]["review"] = "later"
    with pytest.raises(UsageError, match="train.review"):
        load_recipe(_write(tmp_path, r))


def test_routing_options_do_not_change_keys_of_recipes_without_them(tmp_path: Path) -> None:
    from deltamoe.pipeline.specs import _spec
    from deltamoe.recipe import TrainSpec

    spec = TrainSpec(data={"seq_len": 8, "sources": []})
    assert "routing" not in _spec(spec)
    assert _spec(TrainSpec(data={"seq_len": 8, "sources": []}, routing={"allocated": True}))["routing"] == {
        "allocated": True}


def test_block_expansion_is_expand_then_new_block_cpt_then_graft(tmp_path: Path) -> None:
    """The parameter-matched baseline: expand B (blocks matched to the experts unless given), train
    only the new blocks on stage 1's data and steps, graft Δ onto the expanded CPT model."""
    from deltamoe.pipeline.graph import build_plan

    r = _demo()
    r["baselines"] = ["post", "block_expansion"]
    plan = {s.name: s for s in build_plan(*load_recipe(_write(tmp_path, r)), local_only=True)[0]}
    # matched to the new experts of the demo's MoE layers (1-3); the key names them
    assert plan["expand"].kind == "expand" and plan["expand"].params == {"blocks": "match:4:layers=1-3"}
    assert plan["expand"].inputs == {"dense": "toy/base"}
    cpt = plan["expand_cpt"]
    assert cpt.inputs["model"] == "expand" and cpt.params["stage"] == "dense_cpt"
    assert cpt.params["trainable"] == {"layers": "new"}
    stage1 = r["train"]["post_pretrain"]
    # stage 1's data; the mixed replay source's record tags listed for the dense model
    assert {**cpt.params["data"], "languages": None} == {**stage1["data"], "languages": None}
    assert cpt.params["data"]["languages"] == ["en", "vel", "kyr", "tol"] and cpt.params["train"] == stage1["train"]
    assert plan["block_expansion"].inputs == {"model": "expand_cpt", "base": "toy/base", "post": "toy/instruct"}
    assert plan["eval-block_expansion"].inputs["model"] == "block_expansion"
    r["upcycle"]["layers"] = "all"  # every layer upcycled: the key of recipes from before the layers counted
    every = {s.name: s for s in build_plan(*load_recipe(_write(tmp_path, r)), local_only=True)[0]}
    assert every["expand"].params == {"blocks": "match:4"}
    r["block_expansion"] = {"blocks": 3, "train": {"lr": 1.0e-3}}
    again = {s.name: s for s in build_plan(*load_recipe(_write(tmp_path, r)), local_only=True)[0]}
    assert again["expand"].params == {"blocks": 3} and again["expand"].key != plan["expand"].key
    assert again["expand_cpt"].params["train"] == {**stage1["train"], "lr": 1.0e-3}
    r["block_expansion"] = {"blocks": 0}
    with pytest.raises(UsageError, match="block_expansion.blocks"):
        load_recipe(_write(tmp_path, r))
