from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from tiny_models import make_dense  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the network
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def dense_model(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """Factory for tiny dense checkpoints, built once per variant (and options) per test session."""
    cache: dict[tuple, Path] = {}
    root = tmp_path_factory.mktemp("dense")

    def get(variant: str, **kwargs) -> Path:
        key = (variant, tuple(sorted((k, str(v)) for k, v in kwargs.items())))
        if key not in cache:
            cache[key] = make_dense(variant, root / f"{variant}-{len(cache)}", **kwargs)
        return cache[key]

    return get


# -- toy world (tests/test_toy.py, tests/test_evaluate.py) ------------------------------------
@pytest.fixture(scope="session")
def toy_micro(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The micro toy world: corpora and models in seconds (it meets none of the regime targets)."""
    from deltamoe.toy import build

    return build(tmp_path_factory.mktemp("toy") / "micro", "micro", seed=0, progress=False, threads=1)


@pytest.fixture(scope="session")
def toy_small(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo's toy world from the shipped set (models copied and checked, corpora regenerated)."""
    from deltamoe.toy import build

    return build(tmp_path_factory.mktemp("toy") / "small", "small", seed=0, progress=False)


@pytest.fixture(scope="session")
def toy_small_regime(toy_small: Path) -> dict:
    """The regime of the shipped set, measured afresh: every model evaluated, every target checked."""
    from deltamoe.toy.regime import measure

    return measure(toy_small, progress=False, write=False)


@pytest.fixture(scope="session")
def demo_small_run(tmp_path_factory: pytest.TempPathFactory, toy_small: Path) -> dict:
    """The demo recipe on the shipped toy with DeltaMoE and the ceiling as its only systems: its
    routing defaults (stage 1, router review, graft) and B' with the ceiling's chat post-training,
    run once by the pipeline for the tests that read them (tests/test_allocation.py, the ceiling
    test of tests/test_toy.py). Returns the run's results.json."""
    import json
    import shutil

    import yaml

    from deltamoe.demo import demo_recipe_text
    from deltamoe.pipeline.graph import build_plan
    from deltamoe.pipeline.run import run_recipe
    from deltamoe.recipe import load_recipe

    work = tmp_path_factory.mktemp("demo-small")
    r = yaml.safe_load(demo_recipe_text())
    assert r["toy"]["size"] == "small"
    r["baselines"] = ["ceiling"]
    recipe = work / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(r))
    stages, _, _ = build_plan(*load_recipe(recipe))
    shutil.copytree(toy_small, stages[0].out)  # the toy stage's output: the session's shipped build
    run_recipe(recipe, progress=False, log=lambda m: None)
    return json.loads((work / "results.json").read_text())
