"""`deltamoe data pack`: the same sequences from the raw sources and from their pack; a pack that
does not fit the run (another tokenizer, truncated or corrupt files) is refused before any step."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from train_world import base_config, get_world, write_jsonl, documents
from typer.testing import CliRunner

import deltamoe
from deltamoe.cli import app
from deltamoe.errors import DataError
from deltamoe.train import data as D
from deltamoe.train import pack as P
from deltamoe.train.config import load_config


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    w = get_world(tmp_path_factory)
    # one jsonl with per-record tags, an eval-only source, and a document with no text
    recs = [{"text": t, "lang": "xx" if i % 3 else "en"} for i, t in enumerate(documents("xx", 40, 7))]
    w.mixed = write_jsonl(w.root / "mixed.jsonl", [*recs[:5], {"text": ""}, *recs[5:]])
    return w


def _cfg(world, out, budgets=False, **data):
    if budgets:
        sources = [{"path": str(world.xx), "lang": "xx", "tokens": 3000},
                   {"path": str(world.mixed), "tokens": 1500}, {"path": str(world.en), "lang": "en", "eval_only": True}]
    else:
        sources = [{"path": str(world.xx), "lang": "xx", "weight": 2}, {"path": str(world.en), "lang": "en"},
                   {"path": str(world.mixed)}]
    cfg = base_config(world.moe, out, sources, train={"steps": 3, "micro_batch_size": 2},
                      data={"shuffle_buffer": 7, **data})
    if budgets:
        del cfg["train"]["steps"]
    return cfg


def _streams(world, tmp_path, budgets):
    from transformers import AutoTokenizer

    raw_cfg = load_config(_cfg(world, tmp_path / "o", budgets))
    packed = P.pack(_cfg(world, tmp_path / "o", budgets), tmp_path / "pack", workers=2, progress=False)
    cfg = load_config(_cfg(world, tmp_path / "o", budgets, pack=str(packed)))
    tok = AutoTokenizer.from_pretrained(world.moe)
    langs = P.languages(cfg, json.loads((world.moe / "deltamoe.json").read_text())["moe"])
    pk = P.Pack(packed)
    pk.check(cfg.data, 0, tok, langs)
    raw = (D.TrainStream(raw_cfg.data, tok, langs, 0), D.build_heldout(raw_cfg.data, tok, langs, 0))
    return raw, (P.PackedStream(cfg.data, pk, tok, langs, 0), pk.heldout(cfg.data)), cfg


@pytest.mark.parametrize("budgets", [False, True])
def test_pack_gives_the_same_sequences_as_raw_sources(world, tmp_path, budgets) -> None:
    (raw, raw_held), (packed, pk_held), cfg = _streams(world, tmp_path, budgets)
    assert (raw_held.ids, raw_held.langs, raw_held.source) == (pk_held.ids, pk_held.langs, pk_held.source)
    assert len(raw_held) > 0
    steps = (D.budget_sequences(cfg.data) // 8) if budgets else 40  # weights: several epochs of the sources
    for step in range(steps):
        if step == steps // 2:  # resume both from their positions (JSON round trip) halfway
            raw.load_state_dict(json.loads(json.dumps(raw.state_dict())))
            state = json.loads(json.dumps(packed.state_dict()))
            assert "buf" in state and all(len(ref) == 4 for ref, _ in state["buf"])  # positions, not tokens
            packed.load_state_dict(state)
        a, b = raw.take(8), packed.take(8, keep=[5, 1])  # a process keeps its own rows only
        assert torch.equal(a[0][[5, 1]], b[0]) and torch.equal(a[1][[5, 1]], b[1]), step
    assert set(a[1].unique().tolist()) <= {0, 1, -1}
    manifest = json.loads((tmp_path / "pack" / "manifest.json").read_text())
    assert manifest["seed"] == 0 and len(manifest["tokenizer"]["sha256"]) == 64
    assert all(len(h) == 64 for e in manifest["sources"] for h in e["sha256"].values())


def test_training_from_a_pack_writes_the_same_bytes(world, tmp_path) -> None:
    P.pack(_cfg(world, tmp_path / "o"), tmp_path / "pack", workers=1, progress=False)
    deltamoe.train(_cfg(world, tmp_path / "raw"))
    deltamoe.train(_cfg(world, tmp_path / "packed", pack=str(tmp_path / "pack")))
    files = sorted(p.name for p in (tmp_path / "raw").glob("*.safetensors"))
    assert files and all((tmp_path / "raw" / f).read_bytes() == (tmp_path / "packed" / f).read_bytes() for f in files)


def _error(*args: str) -> str:
    res = CliRunner().invoke(app, list(args))
    assert res.exit_code == 1, res.output
    lines = [x for x in res.output.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), res.output
    return lines[0]


def test_tokenizer_digest_ignores_call_state_and_sees_the_vocabulary(world) -> None:
    """A padded, truncated call leaves padding and truncation switched on in the fast tokenizer's
    Rust backend; that is call state, so the digest must not change. A new token must change it."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(world.moe)
    before = P.tokenizer_digest(tok)
    tok(["a b", "a b c d e f"], padding="max_length", truncation=True, max_length=4)
    state = json.loads(tok.backend_tokenizer.to_str())
    assert state["padding"] is not None and state["truncation"] is not None  # the state the digest ignores
    assert P.tokenizer_digest(tok) == before
    tok.add_tokens(["zzzq"])
    assert P.tokenizer_digest(tok) != before


def test_bad_packs_are_refused_before_any_step(world, tmp_path) -> None:
    import yaml

    good = tmp_path / "pack"
    P.pack(_cfg(world, tmp_path / "o"), good, workers=1, progress=False)
    # packing with a tokenizer other than the model's
    from transformers import AutoTokenizer

    other = AutoTokenizer.from_pretrained(world.moe)
    other.add_tokens(["zzzq"])
    other.save_pretrained(tmp_path / "other-tok")
    cfg_path = tmp_path / "c.yaml"
    cfg_path.write_text(yaml.safe_dump(_cfg(world, tmp_path / "o")))
    assert "differs from the tokenizer of the model" in _error(
        "data", "pack", str(cfg_path), str(tmp_path / "p2"), "--tokenizer", str(tmp_path / "other-tok"), "-q")
    # a model with another tokenizer than the pack's
    alt = tmp_path / "alt-moe"
    shutil.copytree(world.moe, alt)
    other.save_pretrained(alt)

    def refused(pack_dir, model=world.moe) -> str:
        cfg = _cfg(world, tmp_path / "out", pack=str(pack_dir))
        cfg["model"] = str(model)
        cfg_path.write_text(yaml.safe_dump(cfg))
        msg = _error("train", str(cfg_path), "-q")
        assert not (tmp_path / "out.run").exists()  # nothing ran
        return msg

    assert "tokenised with another tokenizer" in refused(good, alt)
    broken = tmp_path / "broken"
    shutil.copytree(good, broken)
    tokens = broken / "source-000.train.tokens"
    tokens.write_bytes(tokens.read_bytes()[:-4])
    assert "source-000.train.tokens is truncated or corrupt" in refused(broken)
    shutil.rmtree(broken)
    shutil.copytree(good, broken)
    index = broken / "source-001.train.index"
    raw = bytearray(index.read_bytes())
    raw[8:16] = (10**9).to_bytes(8, "little")
    index.write_bytes(bytes(raw))
    assert "source-001.train.index is corrupt" in refused(broken)
    (broken / "manifest.json").write_text('{"format": "deltamoe-pack", ')
    assert "manifest.json is corrupt" in refused(broken)
    with pytest.raises(DataError, match="other sources than data.sources"):
        cfg = _cfg(world, tmp_path / "out", pack=str(good))
        cfg["data"]["sources"] = cfg["data"]["sources"][:2]
        deltamoe.train(cfg)
