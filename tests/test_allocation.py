"""Language allocation realised by the demo recipe's routing defaults on the shipped toy (issue 13).

The demo trains stage 1 with the router mask, the LPR loss and original-language replay, then a
300-step router review with LPR (docs/results/routing-screens.md). The session's run of the demo
recipe on the shipped small toy (conftest.py ``demo_small_run``) runs exactly those stages, grafts
Δ and evaluates the grafted model, counting which experts its routers pick (top-1) for each
language's held-out text, without language tags, as it is served.

Targets (issue 13): >= 0.8 of each new language's tokens on its own expert, >= 0.9 of en's on
expert 0, mean over layers. Measured with seed 0 on the generator-3 toy (the main study,
2026-12-07, and this test, the same bytes): en 0.925, vel 0.807, kyr 0.716, tol 0.854; kyr misses.
(On the generator-2 toy: en 0.82, vel 0.77, kyr 0.83, tol 0.87; en and vel missed.) The known
misses are listed so that the test fails once they are met; each language also has a floor 0.05
under its measured share, so that a change that loses the allocation fails too.
"""

from __future__ import annotations

import pytest
import yaml

from deltamoe.demo import demo_recipe_text

TARGET = {"en": 0.9, "vel": 0.8, "kyr": 0.8, "tol": 0.8}
MEASURED = {"en": 0.925, "vel": 0.807, "kyr": 0.716, "tol": 0.854}
KNOWN_MISSES = {"kyr"}


@pytest.mark.slow
def test_demo_routing_defaults_allocate_languages_on_the_grafted_model(demo_small_run: dict) -> None:
    r = yaml.safe_load(demo_recipe_text())
    assert r["train"]["post_pretrain"]["routing"] == {"allocated": True}  # the defaults under test
    entry = demo_small_run["systems"]["deltamoe"]
    routing = entry["routing"]
    assert routing["allocation"] == {"en": [0], "vel": [1], "kyr": [2], "tol": [3]}
    for lang in TARGET:  # the mean over layers of the top-1 share on the language's own experts
        per_layer = [sum(row[e] for e in routing["allocation"][lang]) for row in routing["languages"][lang]["top1"]]
        assert entry["allocation_realised"][lang] == pytest.approx(sum(per_layer) / len(per_layer), abs=1e-6)
    for lang, share in entry["allocation_realised"].items():
        assert (share >= TARGET[lang]) != (lang in KNOWN_MISSES), (lang, share)
        assert share >= MEASURED[lang] - 0.05, (lang, share)
