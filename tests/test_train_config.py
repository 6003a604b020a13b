"""The training config schema: stage defaults, strictness, errors that name the field."""

from __future__ import annotations

import pytest

from deltamoe.errors import UsageError
from deltamoe.train.config import PostPretrainConfig, RouterReviewConfig, config_schema, load_config

BASE = {
    "stage": "post_pretrain",
    "model": "/m",
    "output": "/o",
    "data": {"seq_len": 64, "sources": [{"path": "/d/xx.txt", "lang": "xx"}]},
    "train": {"steps": 10},
}


def with_(**kw) -> dict:
    return {**BASE, **kw}


def test_stage_defaults() -> None:
    s1 = load_config(BASE)
    assert isinstance(s1, PostPretrainConfig)
    assert (s1.losses.balance, s1.losses.lpr, s1.losses.lm) == (0.01, 0.0, 1.0)
    assert (s1.trainable.new_experts, s1.trainable.routers, s1.trainable.attention) == (True, True, False)
    s2 = load_config(with_(stage="router_review"))
    assert isinstance(s2, RouterReviewConfig)
    assert (s2.losses.balance, s2.losses.lpr) == (0.0, 0.1)
    assert (s2.trainable.new_experts, s2.trainable.routers) == (False, True)
    assert str(s1.resolved_run_dir) == "/o.run"
    # coefficients are per stage and configurable
    s3 = load_config(with_(stage="router_review", losses={"balance": 0.02, "lpr": 0.5}))
    assert (s3.losses.balance, s3.losses.lpr) == (0.02, 0.5)


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (with_(train={"steps": 10, "lrr": 1e-3}), r"train\.lrr: unknown field \(did you mean 'lr'\?\)"),
        (with_(trian={"steps": 3}), r"trian: unknown field \(did you mean 'train'\?\)"),
        (with_(losses={"lrp": 0.1}), r"losses\.lrp: unknown field \(did you mean 'lpr'\?\)"),
        (
            with_(data={"seq_len": 8, "sources": [{"path": "x", "lnag": "xx"}]}),
            r"data\.sources\.0\.lnag: unknown field \(did you mean 'lang'\?\)",
        ),
        (with_(trainable={"atention": True}), r"trainable\.atention: unknown field \(did you mean 'attention'\?\)"),
        (
            with_(stage="pretrain"),
            r"stage: .pretrain. is not a stage; use one of post_pretrain, router_review, dense_cpt",
        ),
        ({k: v for k, v in BASE.items() if k != "stage"}, r"stage: required"),
        ({k: v for k, v in BASE.items() if k != "model"}, r"model: required field is missing"),
        (with_(train={"steps": 0}), r"train\.steps: Input should be greater than 0"),
        (with_(train={"steps": 10, "precision": "fp8"}), r"train\.precision: Input should be 'float32' or 'bf16'"),
        (with_(train={}), r"train\.steps is required"),
        (with_(train={"steps": 5, "warmup_steps": 6}), r"warmup_steps \(6\) exceeds train\.steps \(5\)"),
        (
            with_(data={"seq_len": 8, "sources": [{"path": "a", "weight": 1}, {"path": "b", "tokens": 100}]}),
            r"mix by 'weight' or by 'tokens'",
        ),
        (with_(data={"seq_len": 8, "sources": [{"path": "a", "weight": 1, "tokens": 5}]}), r"not both"),
        (with_(data={"seq_len": 8, "sources": [{"path": "a", "eval_only": True}]}), r"every source is eval_only"),
        (with_(data={"seq_len": 8, "sources": []}), r"data\.sources: List should have at least 1 item"),
    ],
)
def test_bad_configs_name_the_field(bad: dict, message: str) -> None:
    with pytest.raises(UsageError, match=message):
        load_config(bad)


def test_yaml_paths_are_relative_to_the_file_and_overrides_apply(tmp_path) -> None:
    sub = tmp_path / "cfg"
    sub.mkdir()
    (sub / "stage1.yaml").write_text(
        "stage: post_pretrain\nmodel: ../moe\noutput: out/cpt\n"
        "data:\n  seq_len: 32\n  sources:\n    - {path: data/xx.txt, lang: xx, weight: 2}\n"
        "    - {path: /abs/en.txt, lang: en, eval_only: true}\n"
        "train: {steps: 4}\n"
    )
    cfg = load_config(sub / "stage1.yaml", ["train.steps=7", "losses.balance=0.5", "data.sources.0.weight=3"])
    assert cfg.model == str(sub / "../moe") and cfg.output == str(sub / "out/cpt")
    assert cfg.data.sources[0].path == str(sub / "data/xx.txt") and cfg.data.sources[1].path == "/abs/en.txt"
    assert (cfg.train.steps, cfg.losses.balance, cfg.data.sources[0].weight) == (7, 0.5, 3.0)
    with pytest.raises(UsageError, match=r"--set 'train\.steps': expected KEY=VALUE"):
        load_config(sub / "stage1.yaml", ["train.steps"])
    with pytest.raises(UsageError, match=r"data\.sources\.5 is not a valid list index"):
        load_config(sub / "stage1.yaml", ["data.sources.5.weight=1"])
    (sub / "bad.yaml").write_text("- just\n- a list\n")
    with pytest.raises(UsageError, match=r"bad\.yaml: expected a mapping"):
        load_config(sub / "bad.yaml")
    with pytest.raises(UsageError, match=r"nope\.yaml: no such config file"):
        load_config(sub / "nope.yaml")


def test_config_objects_are_frozen_and_schema_covers_both_stages() -> None:
    cfg = load_config(BASE)
    with pytest.raises(Exception):  # noqa: B017 - pydantic raises ValidationError on assignment
        cfg.train.steps = 3  # type: ignore[misc]
    schema = config_schema()
    assert {"PostPretrainConfig", "RouterReviewConfig"} <= set(schema["$defs"])


def test_shipped_recipes_validate() -> None:
    from pathlib import Path

    import yaml

    root = Path(__file__).parent.parent / "recipes"
    stages = sorted((root / "train").glob("*.yaml"))
    assert [p.name for p in stages] == ["post_pretrain.yaml", "router_review.yaml"]
    for p in stages:
        cfg = load_config(p)
        assert cfg.stage == p.stem
    for name in ("zero3.yaml",):  # FSDP2 is distributed.engine: fsdp2 under torchrun (no accelerate config)
        acc = yaml.safe_load((root / "accelerate" / name).read_text())
        assert acc["distributed_type"] in ("FSDP", "DEEPSPEED")
        # precision and accumulation must come from the training config
        assert "mixed_precision" not in acc and "gradient_accumulation_steps" not in acc.get("deepspeed_config", {})


def test_dense_cpt_stage() -> None:
    from deltamoe.train.config import DenseCptConfig

    cfg = load_config(with_(stage="dense_cpt"))
    assert isinstance(cfg, DenseCptConfig)
    assert cfg.losses.lm == 1.0 and (cfg.trainable.ffn, cfg.trainable.attention, cfg.trainable.embeddings) == (
        True,
        True,
        True,
    )
    with pytest.raises(UsageError, match=r"losses\.lpr: unknown field"):  # a dense model has no routing losses
        load_config(with_(stage="dense_cpt", losses={"lpr": 0.1}))
    with pytest.raises(UsageError, match=r"trainable\.new_experts: unknown field"):
        load_config(with_(stage="dense_cpt", trainable={"new_experts": True}))
