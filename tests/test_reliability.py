"""Issue 14: every bad input ends in one `error:` line (exit 1), before the work starts, with nothing lost.

Each test asserts the exit code, that no traceback is printed (and no exception escaped the CLI),
the key words of the message, and that nothing is left behind (an old output survives).
"""

from __future__ import annotations

import errno
import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from delta_fixtures import load_all, perturbed, save
from micro_demo import micro_demo
from typer.testing import CliRunner

from deltamoe.cli import app

runner = CliRunner()
NAN_TENSOR = "model.layers.1.self_attn.q_proj.weight"


def _cli(*args: object) -> tuple[int, str]:
    res = runner.invoke(app, [str(a) for a in args])
    assert res.exception is None or isinstance(res.exception, SystemExit), f"escaped: {res.exception!r}"
    return res.exit_code, res.output


def _error(code: int, out: str, *words: str) -> None:
    assert code == 1, out
    assert "Traceback" not in out, out
    assert out.startswith("error: ") or "\nerror: " in out, out
    flat = " ".join(out.split())
    for w in words:
        assert w in flat, f"{w!r} not in {out!r}"


def _old(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "old").write_text("x")
    return path


def _survives(path: Path) -> None:
    assert [p.name for p in path.iterdir()] == ["old"], "the old output must survive"
    left = [p.name for p in path.parent.iterdir() if p.name.startswith(f".{path.name}.")]
    assert left == [], f"temporary directories left behind: {left}"


def _nothing(path: Path) -> None:
    assert not os.path.lexists(path)
    assert not [p for p in path.parent.iterdir() if p.name.startswith(f".{path.name}.")]


@pytest.fixture(scope="module")
def bcp(dense_model, tmp_path_factory) -> dict[str, Path]:
    """B, C (continued-pretrained), P (post-trained), P with one NaN, an MoE M upcycled from B."""
    from deltamoe.ops.upcycle import upcycle

    root = tmp_path_factory.mktemp("bcp")
    b = dense_model("llama-untied-gqa")
    c = perturbed(b, root / "C", seed=1)
    p = perturbed(b, root / "P", seed=2, tokenizer=True)
    tensors = load_all(p)
    tensors[NAN_TENSOR][0, 0] = math.nan
    nan = save(root / "P-nan", tensors, json.loads((p / "config.json").read_text()), copy_from=p)
    m = upcycle(b, root / "M", num_experts=2, top_k=1, progress=False)
    return {"B": b, "C": c, "P": p, "P_nan": nan, "M": m}


# -- 1. NaN/Inf ------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["ties", "dare_ties"])
def test_nan_input_refused_by_consensus_merges(method: str, bcp, tmp_path: Path) -> None:
    out = _old(tmp_path / "merged")
    code, text = _cli("merge", out, "--method", method, "--base", bcp["B"], "--model", bcp["C"],
                      "--model", bcp["P_nan"], "--density", "0.5", "--force", "-q")
    _error(code, text, "non-finite", NAN_TENSOR, str(bcp["P_nan"]))
    _survives(out)


def test_nan_input_refused_by_upcycle(bcp, tmp_path: Path) -> None:
    out = _old(tmp_path / "moe")
    code, text = _cli("upcycle", bcp["P_nan"], out, "-e", "2", "-k", "1", "--force", "-q")
    _error(code, text, "non-finite", NAN_TENSOR, str(bcp["P_nan"]))
    _survives(out)


# -- 2. full disk ----------------------------------------------------------------------------
def _commands(bcp, out: Path) -> dict[str, list[object]]:
    return {
        "upcycle": ["upcycle", bcp["B"], out, "-e", "2", "-k", "1"],
        "graft": ["graft", out, "--moe", bcp["M"], "--base", bcp["B"], "--post", bcp["P"]],
        "extract": ["delta", "extract", out, "--base", bcp["B"], "--post", bcp["P"]],
        "merge": ["merge", out, "--method", "ties", "--base", bcp["B"], "--model", bcp["C"], "--model", bcp["P"],
                  "--density", "0.5"],
    }


@pytest.mark.parametrize("command", ["upcycle", "graft", "extract", "merge"])
def test_disk_full_mid_write_is_one_error_and_keeps_the_old_output(command: str, bcp, tmp_path: Path,
                                                                   monkeypatch) -> None:
    import deltamoe.io as ck

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    for name in ("write", "write_rows", "copy_from"):
        monkeypatch.setattr(ck.ShardedWriter, name, full)
    out = _old(tmp_path / "out")
    code, text = _cli(*_commands(bcp, out)[command], "--force", "-q")
    _error(code, text, "disk filled up", "No space left on device", str(out))
    _survives(out)


@pytest.mark.parametrize("command", ["upcycle", "graft", "extract", "merge"])
def test_free_disk_is_checked_before_writing(command: str, bcp, tmp_path: Path, monkeypatch) -> None:
    import deltamoe.preflight as pf

    monkeypatch.setattr(pf, "disk_free", lambda path: 1000)
    out = _old(tmp_path / "out")
    code, text = _cli(*_commands(bcp, out)[command], "--force", "-q")
    _error(code, text, "not enough free disk", "1000 bytes) free")
    _survives(out)


# -- 3. unwritable destinations --------------------------------------------------------------
def test_eval_out_unwritable(toy_micro: Path, tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    for out in (tmp_path / "file" / "res", Path("/proc/deltamoe-test-out"), tmp_path / "file"):
        code, text = _cli("eval", toy_micro / "base", "--out", out, "--max-items", "1", "-q")
        _error(code, text, "--out", "cannot write" if out != tmp_path / "file" else "not a directory")
    assert [p.name for p in tmp_path.iterdir()] == ["file"]


def test_train_output_unwritable_fails_before_training(tmp_path_factory, tmp_path: Path) -> None:
    from train_world import base_config, get_world

    world = get_world(tmp_path_factory)
    cfg = base_config(world.moe, Path("/proc/deltamoe-test/out"), [{"path": str(world.xx), "lang": "xx"}])
    cfg["run_dir"] = str(tmp_path / "run")
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    code, text = _cli("train", tmp_path / "cfg.yaml", "-q")
    _error(code, text, "/proc/deltamoe-test/out", "cannot write")
    assert not (tmp_path / "run").exists(), "refused before the first step: no run directory"


# -- 4. run --dry-run preflight --------------------------------------------------------------
def _recipe(tmp: Path, mutate=None) -> Path:
    r = micro_demo()
    r["workdir"] = str(tmp / "work")
    if mutate:
        mutate(r)
    p = tmp / "recipe.yaml"
    p.write_text(yaml.safe_dump(r))
    return p


def _models(tmp: Path, base: str, post: str):
    def mutate(r: dict) -> None:
        r.pop("toy")
        r["baselines"] = [b for b in r["baselines"] if b != "ceiling"]  # the ceiling needs the toy world
        r["models"] = {"base": base, "post": post}
        r["eval"]["toy_data"] = str(tmp)
        for stage in ("post_pretrain", "router_review"):
            r["train"][stage]["data"]["sources"] = [{"path": str(tmp / "data.jsonl"), "lang": "vel"}]
    return mutate


@pytest.mark.parametrize("case", ["workdir-file", "base-missing", "post-missing", "experts-nwe", "experts-09",
                                  "budget-no-steps", "unsupported-model", "layers-out-of-range"])
def test_dry_run_refuses_what_the_run_would_fail_on(case: str, dense_model, tmp_path: Path) -> None:
    (tmp_path / "data.jsonl").write_text('{"text": "x"}\n')
    good = str(dense_model("llama-tied"))
    mutate, words = None, []
    if case == "workdir-file":
        (tmp_path / "blocker").write_text("")
        mutate, words = (lambda r: r.update(workdir=str(tmp_path / "blocker" / "w"))), ["workdir", "not a directory"]
    elif case == "base-missing":
        mutate, words = _models(tmp_path, str(tmp_path / "nope"), good), ["models.base", "no such directory"]
    elif case == "post-missing":
        mutate, words = _models(tmp_path, good, "./nope/post"), ["models.post", "no such directory"]
    elif case == "experts-nwe":
        mutate, words = (lambda r: r["graft"].update(experts="nwe")), ["graft.experts", "cannot parse 'nwe'"]
    elif case == "experts-09":
        mutate, words = (lambda r: r["graft"].update(experts="0,9")), ["graft.experts", "[9] out of range"]
    elif case == "budget-no-steps":
        def mutate(r: dict) -> None:  # token budgets: the stage's steps follow from them, unknown to the plan
            rr = r["train"]["router_review"]
            rr["train"].pop("steps")
            rr["data"]["sources"] = [{k: v for k, v in src.items() if k != "weight"} | {"tokens": 4096}
                                     for src in rr["data"]["sources"]]
        words = ["train.router_review.train.steps", "budget_matched needs explicit steps"]
    elif case == "layers-out-of-range":  # the micro toy's base has two layers
        mutate, words = (lambda r: r["upcycle"].update(layers="1-3")), ["upcycle.layers", "[2, 3] out of range"]
    elif case == "unsupported-model":
        bert = tmp_path / "bert"
        bert.mkdir()
        cfg = json.loads((Path(good) / "config.json").read_text()) | {"model_type": "bert"}
        (bert / "config.json").write_text(json.dumps(cfg))
        save(bert, {"x": torch.zeros(2)}, cfg)
        mutate, words = _models(tmp_path, str(bert), good), ["models.base", "'bert' is not supported"]
    recipe = _recipe(tmp_path, mutate)
    for args in (["--dry-run"], []):
        code, text = _cli("run", recipe, *args, "-q")
        _error(code, text, *words)
        assert "valid" not in text
    assert not (tmp_path / "work").exists()


def test_missing_data_path_listed_by_dry_run_and_refused_by_run(tmp_path: Path) -> None:
    def mutate(r: dict) -> None:
        r["train"]["router_review"]["data"]["sources"][0]["path"] = str(tmp_path / "no-such.jsonl")

    recipe = _recipe(tmp_path, mutate)
    code, text = _cli("run", recipe, "--dry-run")
    assert code == 0 and "do not exist yet" in text and "train.router_review.data.sources.0.path" in text
    code, text = _cli("run", recipe, "-q")
    _error(code, text, "train.router_review.data.sources.0.path", "no-such.jsonl", "before it starts")
    assert not (tmp_path / "work" / "stages").exists(), "refused before the toy build"


def test_run_checks_free_disk_with_numbers(tmp_path: Path, monkeypatch) -> None:
    import deltamoe.preflight as pf

    monkeypatch.setattr(pf, "disk_free", lambda path: 10**6)
    recipe = _recipe(tmp_path)
    for args in (["--dry-run"], ["-q"]):
        code, text = _cli("run", recipe, *args)
        _error(code, text, "not enough free disk", "the stages still to run", "1000000 bytes) free")
    assert not (tmp_path / "work" / "stages").exists()


# -- 5. misspelt fields ----------------------------------------------------------------------
def test_misspelt_recipe_field_gets_did_you_mean(tmp_path: Path) -> None:
    recipe = _recipe(tmp_path, lambda r: r.update(upcylce={"experts": 4}))
    code, text = _cli("run", recipe, "--dry-run")
    _error(code, text, "upcylce: unknown field (did you mean 'upcycle'?)")
    assert not (tmp_path / "work").exists()


def test_set_typo_is_blamed_on_the_command_line(tmp_path_factory, tmp_path: Path) -> None:
    from train_world import base_config, get_world

    world = get_world(tmp_path_factory)
    cfg = base_config(world.moe, tmp_path / "out", [{"path": str(world.xx), "lang": "xx"}])
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    code, text = _cli("train", tmp_path / "cfg.yaml", "--set", "train.stpes=3", "-q")
    _error(code, text, "command line", "--set train.stpes=3", "did you mean 'steps'?")
    assert str(tmp_path / "cfg.yaml") not in text
    _nothing(tmp_path / "out")


# -- 6. symbolic links and Hub-shaped paths ----------------------------------------------------
@pytest.fixture
def no_hub(monkeypatch):
    import huggingface_hub

    calls = []
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda **k: calls.append(k) or "/nonexistent")
    return calls


def test_looping_input_is_not_sent_to_the_hub(tmp_path: Path, monkeypatch, no_hub) -> None:
    monkeypatch.chdir(tmp_path)
    os.mkdir("models")
    os.symlink("loop", "models/loop")
    for ref, words in (("models/loop", ["models/loop", "loops"]),
                       ("models/typo", ["models/typo", "mistyped local path", "hf://models/typo"])):
        code, text = _cli("upcycle", ref, "out", "-e", "2", "-k", "1", "-q")
        _error(code, text, *words)
    assert no_hub == [] and not os.path.lexists("out")


def test_hub_failure_says_the_local_path_does_not_exist_either(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, text = _cli("upcycle", "deltamoe-test-org/no-such-model", "out", "-e", "2", "-k", "1", "-q")
    _error(code, text, "no local directory of that name", "Hugging Face Hub failed")
    _nothing(tmp_path / "out")


def test_looping_shard_and_output(dense_model, tmp_path: Path, no_hub) -> None:
    import shutil

    dense = tmp_path / "dense"
    shutil.copytree(dense_model("llama-tied"), dense)
    os.symlink("extra.safetensors", dense / "extra.safetensors")
    code, text = _cli("upcycle", dense, tmp_path / "out", "-e", "2", "-k", "1", "-q")
    _error(code, text, "extra.safetensors", "symbolic links")
    (dense / "extra.safetensors").unlink()
    os.symlink("out", tmp_path / "out")
    code, text = _cli("upcycle", dense, tmp_path / "out", "-e", "2", "-k", "1", "-q")
    _error(code, text, "out", "symbolic link that loops")
    assert os.path.islink(tmp_path / "out") and not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]


# -- 7. overlapping offsets ----------------------------------------------------------------------
def test_overlapping_offsets_are_refused(dense_model, tmp_path: Path) -> None:
    import shutil

    dense = tmp_path / "dense"
    shutil.copytree(dense_model("llama-tied"), dense)
    f = dense / "model.safetensors"
    raw = f.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    a, b = "model.layers.0.input_layernorm.weight", "model.layers.0.post_attention_layernorm.weight"
    header[b]["data_offsets"] = header[a]["data_offsets"]  # b now reads a's bytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (n - len(text))
    assert len(text) == n
    f.write_bytes(raw[:8] + text + raw[8 + n:])
    out = _old(tmp_path / "moe")
    code, out_text = _cli("upcycle", dense, out, "-e", "2", "-k", "1", "--force", "-q")
    _error(code, out_text, "model.safetensors", "overlap", a, b)
    _survives(out)


# -- 8. eval of a non-causal model -----------------------------------------------------------------
def test_eval_refuses_a_bert_checkpoint(toy_micro: Path, tmp_path: Path) -> None:
    from transformers import BertConfig, BertForMaskedLM

    cfg = BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    BertForMaskedLM(cfg).save_pretrained(tmp_path / "bert")
    code, text = _cli("eval", tmp_path / "bert", "--data", toy_micro, "--no-qa", "-q")
    _error(code, text, "BertForMaskedLM", "not a causal language model")
    assert not (tmp_path / "bert" / "eval").exists()


# -- 9. --shard-size 0 -------------------------------------------------------------------------
def test_shard_size_zero(bcp, tmp_path: Path) -> None:
    for cmd, words in (("upcycle", ["--shard-size must be positive"]), ("graft", ["--shard-size must be positive"])):
        out = _old(tmp_path / cmd)
        code, text = _cli(*_commands(bcp, out)[cmd], "--shard-size", "0", "--force", "-q")
        _error(code, text, *words)
        _survives(out)


# -- 10. temporaries of killed runs; umask; family; SIGTERM ------------------------------------
def test_stale_temporaries_of_dead_runs_are_removed_and_reported(bcp, tmp_path: Path) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = socket.gethostname()
    stale = tmp_path / f".moe.tmp-{host}-{dead.pid}-abc123"
    stale.mkdir()
    (stale / "model-00001-of-00002.safetensors").write_bytes(b"x" * 1000)
    live = tmp_path / f".moe.tmp-{host}-{os.getppid()}-def456"  # our parent: alive
    live.mkdir()
    other = tmp_path / f".other.tmp-{host}-{dead.pid}-ghi789"  # another output's: not ours to judge
    other.mkdir()
    code, text = _cli("upcycle", bcp["B"], tmp_path / "moe", "-e", "2", "-k", "1", "-q")
    assert code == 0, text
    assert "removed" in text and str(stale) in text and f"pid {dead.pid}" in text
    assert not stale.exists() and live.is_dir() and other.is_dir()


def test_outputs_honour_the_umask(bcp, tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        code, text = _cli("upcycle", bcp["B"], tmp_path / "moe", "-e", "2", "-k", "1", "-q")
    finally:
        os.umask(old)
    assert code == 0, text
    assert (tmp_path / "moe").stat().st_mode & 0o777 == 0o755
    assert {p.stat().st_mode & 0o777 for p in (tmp_path / "moe").iterdir()} == {0o644}


def test_mistral_upcycle_records_mistral(dense_model, tmp_path: Path) -> None:
    code, text = _cli("upcycle", dense_model("mistral-sliding"), tmp_path / "moe", "-e", "2", "-k", "1", "-q")
    assert code == 0, text
    assert json.loads((tmp_path / "moe" / "deltamoe.json").read_text())["moe"]["family"] == "mistral"


def test_sigterm_exits_143(bcp, tmp_path: Path, monkeypatch) -> None:
    import deltamoe.ops.upcycle as up
    from deltamoe.cli import _terminate

    monkeypatch.setattr(up, "upcycle", lambda *a, **k: _terminate(15, None))
    res = runner.invoke(app, ["upcycle", str(bcp["B"]), str(tmp_path / "moe"), "-e", "2", "-k", "1"])
    assert res.exit_code == 143 and "interrupted; no output was written" in res.output
    assert "Traceback" not in res.output
