"""Dense CPT of a block-expanded model with only the new blocks trainable (``trainable.layers``)."""

from __future__ import annotations

import math

import pytest
import torch
from train_world import base_config, get_world

import deltamoe
from deltamoe.io import open_checkpoint
from deltamoe.errors import UsageError
from deltamoe.ops.expand import expand_blocks
from deltamoe.io.provenance import read_manifest
from deltamoe.train.config import load_config


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return get_world(tmp_path_factory)


@pytest.fixture(scope="module")
def expanded(world, tmp_path_factory):
    # the world's dense model has 2 layers: 2 new blocks -> layers [0, new, 1, new]
    return expand_blocks(world.moe.parent / "dense", tmp_path_factory.mktemp("exp") / "exp", blocks=2, progress=False)


def _layer(name: str) -> int | None:
    parts = name.split(".")
    return int(parts[2]) if parts[1] == "layers" else None


def _bytes(ck, name: str) -> bytes:
    return ck.read(name).contiguous().view(torch.uint8).numpy().tobytes()


def _sources(world) -> list[dict]:
    return [{"path": str(world.xx), "lang": "xx"}, {"path": str(world.en), "lang": "en", "eval_only": True}]


def test_only_new_blocks_train(world, expanded, tmp_path) -> None:
    assert read_manifest(expanded)["expand"]["new_layers"] == [1, 3]
    out = tmp_path / "cpt"
    cfg = base_config(expanded, out, _sources(world), stage="dense_cpt", train={"steps": 4, "lr": 1e-3},
                      trainable={"layers": "new"})
    assert deltamoe.train(cfg) == out
    a, b = open_checkpoint(expanded), open_checkpoint(out)
    assert a.keys() == b.keys()
    changed = {n for n in a.keys() if _bytes(a, n) != _bytes(b, n)}
    in_new = {n for n in a.keys() if _layer(n) in (1, 3)}
    # every tensor of the new blocks moved (their zero output projections too), nothing else did:
    # original blocks, embeddings, final norm and LM head are byte-identical
    assert changed == in_new
    assert "lm_head.weight" in a.keys() and "model.embed_tokens.weight" in a.keys()
    man = read_manifest(out)
    assert [s["stage"] for s in man["stages"]] == ["expand", "dense_cpt"] and man["expand"]["new_layers"] == [1, 3]
    result = man["stages"][-1]["params"]["result"]
    assert result["trained_layers"] == [1, 3]
    params = result["params"]
    assert all(v["trains"] == k.startswith("layers.") for k, v in params.items())
    block = sum(math.prod(a.spec(n).shape) for n in in_new)
    assert sum(v["count"] for k, v in params.items() if v["trains"]) == block
    assert man["stages"][-1]["params"]["config"]["trainable"] == {
        "ffn": True, "attention": True, "norms": True, "embeddings": False, "layers": "new"}


def test_explicit_layers_and_group_flags(world, expanded, tmp_path) -> None:
    out = tmp_path / "cpt"
    cfg = base_config(expanded, out, _sources(world)[:1], stage="dense_cpt", train={"steps": 2, "lr": 1e-3},
                      trainable={"layers": [3], "attention": False, "norms": False})
    deltamoe.train(cfg)
    a, b = open_checkpoint(expanded), open_checkpoint(out)
    changed = {n for n in a.keys() if _bytes(a, n) != _bytes(b, n)}
    assert changed == {n for n in a.keys() if _layer(n) == 3 and ".mlp." in n}


def test_layers_refused(world, expanded, tmp_path) -> None:
    dense = world.moe.parent / "dense"
    with pytest.raises(UsageError, match=r"trainable.layers: 'new' needs a block-expanded model .*deltamoe.json"):
        deltamoe.train(base_config(dense, tmp_path / "x", _sources(world), stage="dense_cpt", trainable={"layers": "new"}))
    with pytest.raises(UsageError, match=r"trainable.layers: \[4, 9\] out of range; .* has layers 0..3"):
        deltamoe.train(base_config(expanded, tmp_path / "x", _sources(world), stage="dense_cpt",
                                   trainable={"layers": [1, 4, 9]}))
    with pytest.raises(UsageError, match=r"embeddings cannot train with trainable.layers"):
        load_config(base_config(expanded, tmp_path / "x", _sources(world), stage="dense_cpt",
                                trainable={"layers": [1], "embeddings": True}))
    with pytest.raises(UsageError, match=r"trainable.layers: .*selects no layer"):
        load_config(base_config(expanded, tmp_path / "x", _sources(world), stage="dense_cpt", trainable={"layers": []}))
    assert not (tmp_path / "x").exists()


def test_config_without_layers_dumps_and_digests_as_before() -> None:
    """The new field leaves old configs' dumps (manifests) and resume digests as they were."""
    from deltamoe.train.checkpointing import config_digest as _config_digest

    base = {"stage": "dense_cpt", "model": "/m", "output": "/o",
            "data": {"sources": [{"path": "/d.txt", "lang": "xx"}], "seq_len": 32}, "train": {"steps": 5}}
    cfg = load_config(base)
    assert cfg.model_dump(mode="json")["trainable"] == {"ffn": True, "attention": True, "norms": True, "embeddings": True}
    # digests computed by deltamoe before trainable.layers existed
    assert _config_digest(cfg)[0] == "9e4e377bd8869c2281be26c4496f67ba10988d99dd69ba63924a4f0cf94bf59a"
    cfg = load_config({**base, "trainable": {"attention": False}})
    assert _config_digest(cfg)[0] == "7ebdc2a5a162ddae44508d4256df67f1a923682a72c77ec6ff230434077b2d82"
    assert "layers" in load_config({**base, "trainable": {"layers": "new"}}).model_dump()["trainable"]
