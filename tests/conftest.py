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
    """The smaller-than-tiny toy world: corpora and models in seconds (no sanity pattern)."""
    from deltamoe.toy import build

    return build(tmp_path_factory.mktemp("toy") / "micro", "micro", seed=0, progress=False)


@pytest.fixture(scope="session")
def toy_tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny toy world (about 3 minutes on 2 cores), built once per test session."""
    from deltamoe.toy import build

    return build(tmp_path_factory.mktemp("toy") / "tiny", "tiny", seed=0, progress=False)


@pytest.fixture(scope="session")
def toy_tiny_results(toy_tiny: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """deltamoe's toy-suite results for the tiny base and instruct models."""
    from deltamoe.evaluate import evaluate

    out = tmp_path_factory.mktemp("toy-eval")
    return {m: evaluate(toy_tiny / m, "toy", out=out / m, progress=False) for m in ("base", "instruct")}
