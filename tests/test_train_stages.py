"""End to end on a tiny MoE: stage 1 (post_pretrain) then stage 2 (router_review).

Measurements of loss and routing are made with stock transformers on text that neither stage
saw, independently of the training code.
"""

from __future__ import annotations

import json

import pytest
import torch
from train_world import base_config, documents, get_world, make_moe, stock_measure, write_jsonl, write_txt

import deltamoe
from deltamoe.io import TOKENIZER_FILES, open_checkpoint
from deltamoe.io.provenance import read_manifest

STAGE2_XX_TOLERANCE = 0.05  # nats: stage 2 may cost the new language at most this much held-out loss


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return get_world(tmp_path_factory)


@pytest.fixture(scope="module")
def stage1(world, tmp_path_factory):
    out = tmp_path_factory.mktemp("s1") / "cpt"
    cfg = base_config(
        world.moe,
        out,
        [{"path": str(world.xx), "lang": "xx"}, {"path": str(world.en), "lang": "en", "eval_only": True}],
        train={"steps": 40},
        logging={"tensorboard": True},
    )
    assert deltamoe.train(cfg) == out
    return out


@pytest.fixture(scope="module")
def stage2(world, stage1):
    out = stage1.parent / "review"
    cfg = base_config(
        stage1,
        out,
        [{"path": str(world.en), "lang": "en", "weight": 1}, {"path": str(world.xx), "lang": "xx", "weight": 1}],
        stage="router_review",
        train={"steps": 30},
    )
    assert deltamoe.train(cfg) == out
    return out


def _diff(a, b) -> tuple[set[str], set[str]]:
    ca, cb = open_checkpoint(a), open_checkpoint(b)
    assert ca.keys() == cb.keys()
    same, changed = set(), set()
    for k in ca.keys():
        assert ca.spec(k) == cb.spec(k)
        (same if ca.read(k).view(torch.uint8).equal(cb.read(k).view(torch.uint8)) else changed).add(k)
    return same, changed


def test_stage1_freezes_the_original_model_bit_for_bit(world, stage1) -> None:
    same, changed = _diff(world.moe, stage1)
    # new experts (1, 2) and the routers changed, in every layer
    expected = {
        f"model.layers.{i}.block_sparse_moe.experts.{e}.{w}.weight"
        for i in range(2)
        for e in (1, 2)
        for w in ("w1", "w2", "w3")
    } | {f"model.layers.{i}.block_sparse_moe.gate.weight" for i in range(2)}
    assert changed == expected
    # everything else is byte-identical: expert 0, attention, embeddings, norms, LM head
    assert {f"model.layers.{i}.block_sparse_moe.experts.0.w1.weight" for i in range(2)} <= same
    assert {
        "model.embed_tokens.weight",
        "lm_head.weight",
        "model.norm.weight",
        "model.layers.0.self_attn.q_proj.weight",
        "model.layers.1.input_layernorm.weight",
    } <= same


def test_stage1_lowers_new_language_heldout_loss(world, stage1) -> None:
    before, _ = stock_measure(world.moe, world.xx_eval)
    after, _ = stock_measure(stage1, world.xx_eval)
    assert after < before - 0.5, (before, after)


def test_stage1_output_is_a_stock_checkpoint_with_provenance_and_logs(world, stage1) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(stage1)
    assert type(model).__name__ == "MixtralForCausalLM"
    src = {p.name for p in open_checkpoint(world.moe).aux_files()}
    assert src and src == {p.name for p in open_checkpoint(stage1).aux_files()} and src <= set(TOKENIZER_FILES)
    assert (stage1 / "config.json").read_text() == (world.moe / "config.json").read_text()
    m = read_manifest(stage1)
    assert [s["stage"] for s in m["stages"]] == ["upcycle", "post_pretrain"]
    assert m["moe"] == read_manifest(world.moe)["moe"]
    last = m["stages"][-1]
    assert last["inputs"]["model"]["path"] == str(world.moe.absolute())
    assert last["params"]["config"]["losses"] == {"lm": 1.0, "balance": 0.01, "lpr": 0.0}
    assert last["params"]["result"]["tensors"] == {"trained": 14, "frozen_verified": 21, "frozen_unverified": 0}
    records = [json.loads(x) for x in (stage1.parent / "cpt.run" / "logs" / "train.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    evals = [r for r in records if r["kind"] == "eval"]
    assert [r["step"] for r in train] == [5, 10, 15, 20, 25, 30, 35, 40]
    assert {"loss", "loss_lm", "loss_balance", "loss_lpr", "lr", "grad_norm", "tokens_per_s"} <= set(train[0])
    for r in train:
        assert r["loss"] == pytest.approx(r["loss_lm"] + 0.01 * r["loss_balance"], rel=1e-5)
        assert set(r["routing"]) == {"0", "1"} and set(r["routing"]["0"]) == {"xx"}  # trained on xx only
        assert len(r["routing"]["0"]["xx"]) == 3 and sum(r["routing"]["0"]["xx"]) == pytest.approx(1.0, abs=1e-5)
    assert [r["step"] for r in evals] == [0, 40]
    assert set(evals[0]["heldout_loss"]) == {"en", "xx", "all"} and set(evals[0]["routing"]["1"]) == {"en", "xx"}
    assert evals[1]["heldout_loss"]["xx"] < evals[0]["heldout_loss"]["xx"]
    assert list((stage1.parent / "cpt.run" / "logs" / "tensorboard").glob("events.out.tfevents.*"))


def test_stage2_changes_only_the_routers(stage1, stage2) -> None:
    _, changed = _diff(stage1, stage2)
    assert changed == {f"model.layers.{i}.block_sparse_moe.gate.weight" for i in range(2)}
    assert [s["stage"] for s in read_manifest(stage2)["stages"]] == ["upcycle", "post_pretrain", "router_review"]


def test_stage2_routes_original_language_to_expert_0(world, stage1, stage2) -> None:
    _, before = stock_measure(stage1, world.en_eval)
    _, after = stock_measure(stage2, world.en_eval)
    assert all(a > b + 0.1 for a, b in zip(after, before, strict=True)), (before, after)


def test_stage2_keeps_new_language_loss(world, stage1, stage2) -> None:
    before, _ = stock_measure(stage1, world.xx_eval)
    after, _ = stock_measure(stage2, world.xx_eval)
    assert after <= before + STAGE2_XX_TOLERANCE, (before, after)


def test_bf16_and_gradient_checkpointing_keep_frozen_weights(world, tmp_path) -> None:
    src = [{"path": str(world.xx), "lang": "xx"}]
    plain = base_config(world.moe, tmp_path / "plain", src, train={"steps": 6})
    gc = base_config(world.moe, tmp_path / "gc", src, train={"steps": 6, "gradient_checkpointing": True})
    bf16 = base_config(world.moe, tmp_path / "bf16", src, train={"steps": 6, "precision": "bf16"})
    for c in (plain, gc, bf16):
        deltamoe.train(c)
    # checkpointing recomputes the same operations: same weights, bit for bit
    same, changed = _diff(tmp_path / "plain", tmp_path / "gc")
    assert not changed
    same, changed = _diff(world.moe, tmp_path / "bf16")
    assert changed and all(".experts.0." not in k and ("experts" in k or "gate" in k) for k in changed)


@pytest.mark.parametrize(("variant", "layers"), [("qwen3-untied", "0"), ("qwen2-tied", "all")])
def test_other_families_keep_dense_and_inert_tensors(tmp_path, variant, layers) -> None:
    moe = make_moe(tmp_path / variant, variant=variant, experts=3, top_k=2, layers=layers)
    xx = write_txt(tmp_path / "xx.txt", documents("xx", 60, 3))
    out = tmp_path / "out"
    deltamoe.train(
        base_config(moe, out, [{"path": str(xx), "lang": "xx"}], train={"steps": 4}, trainable={"norms": True})
    )
    same, changed = _diff(moe, out)
    assert changed and all(".experts.0." not in k and "shared_expert" not in k for k in changed)
    if variant == "qwen3-untied":  # layer 1 stays a dense MLP: frozen
        dense = {k for k in open_checkpoint(moe).keys() if ".layers.1.mlp." in k}
        assert dense and dense <= same
    assert any("norm" in k for k in changed)
    if variant == "qwen2-tied":
        assert {k for k in same if "shared_expert" in k} == {
            k for k in open_checkpoint(moe).keys() if "shared_expert" in k
        }


def test_dense_cpt_trains_the_whole_dense_model(world, tmp_path) -> None:
    from transformers import AutoModelForCausalLM

    from deltamoe.errors import UsageError

    dense = world.moe.parent / "dense"
    out = tmp_path / "dense-cpt"
    sources = [{"path": str(world.xx), "lang": "xx"}, {"path": str(world.en), "lang": "en", "eval_only": True}]
    deltamoe.train(base_config(dense, out, sources, stage="dense_cpt", train={"steps": 20, "lr": 1e-3}))
    same, changed = _diff(dense, out)
    assert not same  # every tensor trains by default: FFNs, attention, norms, embeddings, LM head
    assert type(AutoModelForCausalLM.from_pretrained(out)).__name__ == "LlamaForCausalLM"
    m = read_manifest(out)
    assert [s["stage"] for s in m["stages"]] == ["dense_cpt"] and "moe" not in m
    result = m["stages"][-1]["params"]["result"]
    assert result["heldout_loss_after"]["xx"] < result["heldout_loss_before"]["xx"]
    # only FFNs: attention, norms and embeddings stay bit-identical
    ffn_only = tmp_path / "ffn-only"
    deltamoe.train(
        base_config(
            dense,
            ffn_only,
            sources[:1],
            stage="dense_cpt",
            train={"steps": 3},
            trainable={"attention": False, "norms": False, "embeddings": False},
        )
    )
    same, changed = _diff(dense, ffn_only)
    assert changed == {k for k in open_checkpoint(dense).keys() if ".mlp." in k}
    with pytest.raises(UsageError, match=r"an upcycled MoE; stage dense_cpt trains a dense model"):
        deltamoe.train(base_config(world.moe, tmp_path / "x", sources, stage="dense_cpt"))


def test_dense_cpt_on_a_mixed_source_needs_its_languages_listed(world, tmp_path) -> None:
    """A mixed source (no source-level lang, records tagged en and xx), as the toy's replay set: a
    dense model has no allocation to name its languages, so a record tag that no source names is a
    clear error before training, and ``data.languages`` lists them for the per-language held-out loss."""
    from deltamoe.errors import DataError

    dense = world.moe.parent / "dense"
    mixed = write_jsonl(tmp_path / "mixed.jsonl", [{"text": t, "lang": lang} for lang, seed in (("en", 1), ("xx", 2))
                                                   for t in documents(lang, 60, seed)])
    sources = [{"path": str(world.xx), "lang": "xx"}, {"path": str(mixed)}]
    with pytest.raises(DataError, match=r"mixed\.jsonl, record \d+: language tag 'en' is not among the sources' "
                                        r"languages \(xx\); give a source lang: en, or list it in data\.languages"):
        deltamoe.train(base_config(dense, tmp_path / "bad", sources, stage="dense_cpt", train={"steps": 2}))
    assert not (tmp_path / "bad").exists()
    cfg = base_config(dense, tmp_path / "ok", sources, stage="dense_cpt", train={"steps": 4})
    cfg["data"]["languages"] = ["en", "xx"]
    deltamoe.train(cfg)
    result = read_manifest(tmp_path / "ok")["stages"][-1]["params"]["result"]
    assert set(result["heldout_loss_after"]) >= {"en", "xx"}
