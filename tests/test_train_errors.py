"""Bad input gives one clear line from `deltamoe train` (exit 1) and writes nothing."""

from __future__ import annotations

import pytest
import yaml
from train_world import base_config, get_world, make_moe
from typer.testing import CliRunner

from deltamoe.cli import app


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return get_world(tmp_path_factory)


def run_cli(tmp_path, cfg: dict, *extra: str):
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return CliRunner().invoke(app, ["train", str(path), "--quiet", *extra])


def _expect_error(tmp_path, cfg: dict, pattern: str, *extra: str) -> None:
    import re

    res = run_cli(tmp_path, cfg, *extra)
    assert res.exit_code == 1, res.output
    assert res.output.startswith("error: ") and re.search(pattern, res.output), res.output
    assert "Traceback" not in res.output
    assert not (tmp_path / "out").exists()


def test_empty_corpus(world, tmp_path) -> None:
    (tmp_path / "empty.jsonl").write_text("")
    cfg = base_config(world.moe, tmp_path / "out", [{"path": str(tmp_path / "empty.jsonl"), "lang": "xx"}])
    _expect_error(tmp_path, cfg, r"empty\.jsonl: empty corpus")


def test_language_tag_not_in_allocation(world, tmp_path) -> None:
    cfg = base_config(world.moe, tmp_path / "out", [{"path": str(world.xx), "lang": "el"}])
    _expect_error(tmp_path, cfg, r"language tag 'el' is not in the model's expert allocation \(en=\[0\], xx=\[1, 2\]\)")


def test_sequence_longer_than_the_model(world, tmp_path) -> None:
    cfg = base_config(world.moe, tmp_path / "out", [{"path": str(world.xx), "lang": "xx"}], data={"seq_len": 129})
    _expect_error(
        tmp_path,
        cfg,
        r"data\.seq_len = 129 exceeds the model's maximum sequence length "
        r"\(max_position_embeddings = 128",
    )


def test_misspelt_config_field(world, tmp_path) -> None:
    cfg = base_config(world.moe, tmp_path / "out", [{"path": str(world.xx), "lang": "xx"}])
    cfg["train"]["micro_batch"] = 2
    _expect_error(tmp_path, cfg, r"train\.micro_batch: unknown field \(did you mean 'micro_batch_size'\?\)")
    _expect_error(
        tmp_path,
        base_config(world.moe, tmp_path / "out", [{"path": str(world.xx)}]),
        r"losses\.lprr: unknown field",
        "--set",
        "losses.lprr=1",
    )


def test_model_that_is_not_an_upcycled_moe(world, tmp_path) -> None:
    dense = world.moe.parent / "dense"
    cfg = base_config(dense, tmp_path / "out", [{"path": str(world.xx), "lang": "xx"}])
    _expect_error(tmp_path, cfg, r"dense: not an upcycled MoE \(no deltamoe\.json with a 'moe' block\)")


def test_lpr_without_allocation(tmp_path) -> None:
    moe = make_moe(tmp_path / "noalloc", allocation={})
    (tmp_path / "t.txt").write_text("kumo ke vani ke doru !\n")
    cfg = base_config(moe, tmp_path / "out", [{"path": str(tmp_path / "t.txt")}], stage="router_review")
    _expect_error(tmp_path, cfg, r"losses\.lpr = 0\.1 needs a language -> expert allocation")


def test_existing_output_and_budget_too_small(world, tmp_path) -> None:
    (tmp_path / "out").mkdir()
    cfg = base_config(world.moe, tmp_path / "out", [{"path": str(world.xx), "lang": "xx"}])
    res = run_cli(tmp_path, cfg)
    assert res.exit_code == 1 and "already exists; pass --force" in res.output
    (tmp_path / "out").rmdir()
    cfg = base_config(
        world.moe, tmp_path / "out", [{"path": str(world.xx), "lang": "xx", "tokens": 100}], train={"steps": None}
    )
    _expect_error(tmp_path, cfg, r"the token budgets fill 3 sequences, less than one global batch \(4\)")


def test_cli_stop_and_resume(world, tmp_path) -> None:
    cfg = base_config(world.moe, tmp_path / "out", [{"path": str(world.xx), "lang": "xx"}], train={"steps": 4})
    res = run_cli(tmp_path, cfg, "--stop-after", "2")
    assert res.exit_code == 0 and "stopped after 2 steps" in res.output and not (tmp_path / "out").exists()
    res = run_cli(tmp_path, cfg)
    assert res.exit_code == 0 and f"wrote {tmp_path / 'out'}" in res.output
