"""The demo recipe fitted to the micro toy, for the tests that run the pipeline end to end on it."""

from __future__ import annotations

from typing import Any

import yaml

from deltamoe.demo import demo_recipe_text


def micro_demo(*, review: str | None = None, **toy: Any) -> dict[str, Any]:
    """The demo recipe (as a dict) on the micro toy. The demo upcycles layers 1-3 of the small toy's
    four and keeps layer 0 dense; the micro toy has two layers, so here that is layer 1 alone.
    ``review`` overrides ``train.review`` (the demo reviews the routers after the graft); ``toy``
    fields are set on top of ``{size: micro, seed: 0}``."""
    r = yaml.safe_load(demo_recipe_text())
    assert r["upcycle"]["layers"] == "1-3", "the demo's upcycled layers changed: fit them to the micro toy again"
    r["toy"] = {"size": "micro", "seed": 0, **toy}
    r["upcycle"]["layers"] = "1"
    if review is not None:
        r["train"]["review"] = review
    return r
