"""The demo recipe on the shipped small toy with DeltaMoE and the ceiling as its only systems: its
routing defaults (stage 1, graft, router review of the grafted model) and B' with the ceiling's chat post-training.

The tests that read it (tests/test_allocation.py, the ceiling test of tests/test_toy.py) need some
eight minutes of training. conftest.py runs this file in a process of its own, started as soon as
collection selects one of them and given one core, while the rest of the suite runs on the others;
those tests run last and wait for it.

    python tests/demo_run.py WORKDIR     # writes WORKDIR/results.json
"""

from __future__ import annotations

import sys
from pathlib import Path


def run(work: Path) -> Path:
    """Run the demo recipe (systems: DeltaMoE and the ceiling) in ``work``; returns its results.json."""
    import yaml

    from deltamoe.demo import demo_recipe_text
    from deltamoe.pipeline.graph import build_plan
    from deltamoe.pipeline.run import run_recipe
    from deltamoe.recipe import load_recipe
    from deltamoe.toy import build

    r = yaml.safe_load(demo_recipe_text())
    assert r["toy"]["size"] == "small"
    r["baselines"] = ["ceiling"]
    recipe = work / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(r))
    stages, _, _ = build_plan(*load_recipe(recipe))
    build(stages[0].out, "small", seed=0, progress=False)  # the toy stage's output: the shipped set
    run_recipe(recipe, progress=False, log=lambda m: print(m, flush=True))
    return work / "results.json"


if __name__ == "__main__":
    run(Path(sys.argv[1]))
