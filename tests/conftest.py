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
