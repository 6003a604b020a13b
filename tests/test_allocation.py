"""Language allocation realised by the demo recipe's routing defaults on the shipped toy (issue 13).

The demo trains stage 1 with the router mask, the LPR loss and original-language replay, then a
300-step router review with LPR (docs/results/routing-screens.md). This test runs exactly those
stages on the shipped small toy, grafts Δ, and counts which experts the grafted model's routers pick
(top-1) for each language's held-out text, the way the evaluation does.

Targets (issue 13): >= 0.8 of each new language's tokens on its own expert, >= 0.9 of en's on
expert 0, mean over layers. Measured with seed 0 (routing screen 3, 2026-12-02, and this test):
en 0.82, vel 0.77, kyr 0.83, tol 0.87; en and vel miss. The known misses are listed so that the
test fails once they are met; each language also has a floor 0.05 under its measured share, so
that a change that loses the allocation fails too.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from deltamoe.demo import demo_recipe_text
from deltamoe.evaluate import evaluate
from deltamoe.pipeline import build_plan, run_recipe
from deltamoe.recipe import load_recipe

TARGET = {"en": 0.9, "vel": 0.8, "kyr": 0.8, "tol": 0.8}
MEASURED = {"en": 0.82, "vel": 0.77, "kyr": 0.83, "tol": 0.87}
KNOWN_MISSES = {"en", "vel"}


@pytest.mark.slow
def test_demo_routing_defaults_allocate_languages_on_the_grafted_model(toy_small: Path, tmp_path: Path) -> None:
    r = yaml.safe_load(demo_recipe_text())
    assert r["train"]["post_pretrain"]["routing"] == {"allocated": True}  # the defaults under test
    r["baselines"] = []  # DeltaMoE alone: upcycle, stage 1, router review, graft
    r["eval"]["max_items"] = 1  # the pipeline's own evaluation is not what this test reads
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(r))
    stages, _, _ = build_plan(*load_recipe(recipe))
    shutil.copytree(toy_small, stages[0].out)  # the toy stage's output: the session's shipped build
    run_recipe(recipe, progress=False, log=lambda m: None)
    grafted = Path(json.loads((tmp_path / "results.json").read_text())["systems"]["deltamoe"]["checkpoint"])
    res = evaluate(grafted, "toy", data=toy_small, qa=False, mc=False, out=tmp_path / "ev", progress=False)
    shares = {lang: res["routing"]["languages"][lang]["allocated_mean"] for lang in TARGET}
    assert res["routing"]["allocation"] == {"en": [0], "vel": [1], "kyr": [2], "tol": [3]}
    for lang, share in shares.items():
        assert (share >= TARGET[lang]) != (lang in KNOWN_MISSES), (lang, share)
        assert share >= MEASURED[lang] - 0.05, (lang, share)
