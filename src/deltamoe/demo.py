"""``deltamoe demo``: the main job on the built-in toy world, no downloads.

Writes the packaged demo recipe into the work directory and runs it: build the toy world (size
small), upcycle its base model, continue pre-training the new experts on the new languages,
review the routers, graft the post-training delta, run every baseline, evaluate all of them and
write the report. Re-running resumes from the cache; ``deltamoe run WORKDIR/recipe.yaml`` runs an
edited copy.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Any

DEMO_RECIPE = "toy-demo.yaml"


def demo_recipe_text() -> str:
    return resources.files("deltamoe").joinpath("_data/recipes", DEMO_RECIPE).read_text()


def run_demo(workdir: str | os.PathLike[str] = "deltamoe-demo", *, log: Callable[[str], Any] = print,
             progress: bool = True) -> dict[str, Any]:
    """Run the demo recipe in ``workdir``; return what :func:`deltamoe.pipeline.run.run_recipe` returns."""
    from deltamoe.pipeline.run import run_recipe

    work = Path(workdir)
    work.mkdir(parents=True, exist_ok=True)
    recipe = work / "recipe.yaml"
    text = demo_recipe_text()
    if not recipe.is_file() or recipe.read_text() != text:
        recipe.write_text(text)
    result = run_recipe(recipe, progress=progress, log=log)
    log(f"demo finished: report at {result['report']}, numbers in {work.absolute() / 'results.json'}")
    return result
