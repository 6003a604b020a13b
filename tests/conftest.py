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


class _DemoRun:
    """tests/demo_run.py in a process of its own, on one intra-op thread, with its log in its work
    directory."""

    def __init__(self) -> None:
        import subprocess
        import tempfile

        self.work = Path(tempfile.mkdtemp(prefix="deltamoe-demo-small-"))
        self._log = open(self.work / "run.log", "w")
        self.proc = subprocess.Popen([sys.executable, str(Path(__file__).parent / "demo_run.py"), str(self.work)],
                                     stdout=self._log, stderr=subprocess.STDOUT,
                                     env={**os.environ, "OMP_NUM_THREADS": "1"})

    def result(self) -> dict:
        import json

        rc = self.proc.wait()
        self._log.close()
        if rc != 0:
            tail = (self.work / "run.log").read_text()[-3000:]
            pytest.fail(f"the demo run (tests/demo_run.py) exited {rc}; its log ends:\n{tail}", pytrace=False)
        return json.loads((self.work / "results.json").read_text())

    def close(self) -> None:
        import shutil

        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._log.close()
        shutil.rmtree(self.work, ignore_errors=True)


_DEMO_RUN = pytest.StashKey[_DemoRun]()


def _reads_demo_run(item: pytest.Item) -> bool:
    return "demo_small_run" in getattr(item, "fixturenames", ())


@pytest.hookimpl(trylast=True)  # after -k / -m have deselected
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """When a selected test reads the demo run, start it now beside the suite: it gets one core, the
    suite the others (at least one), and its tests run last."""
    demo = [item for item in items if _reads_demo_run(item)]
    if not demo or config.option.collectonly:
        return
    items[:] = [item for item in items if not _reads_demo_run(item)] + demo
    config.stash[_DEMO_RUN] = _DemoRun()
    import torch

    from deltamoe.toy.train import usable_cores

    torch.set_num_threads(max(1, usable_cores() - 1))


def pytest_unconfigure(config: pytest.Config) -> None:
    run = config.stash.get(_DEMO_RUN, None)
    if run is not None:
        run.close()


@pytest.fixture(scope="session")
def demo_small_run(request: pytest.FixtureRequest) -> dict:
    """The results.json of tests/demo_run.py: the demo recipe on the shipped toy with DeltaMoE and
    the ceiling as its only systems, run once for the tests that read it (tests/test_allocation.py,
    the ceiling test of tests/test_toy.py)."""
    run = request.config.stash.get(_DEMO_RUN, None)
    if run is None:  # not seen at collection (e.g. requested dynamically): run it now
        run = request.config.stash[_DEMO_RUN] = _DemoRun()
    return run.result()
