"""`deltamoe upcycle` from the command line: bad input gives a clear error, exit 1 and no output."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from deltamoe.cli import app

runner = CliRunner()


def _run(*args: str) -> tuple[int, str]:
    res = runner.invoke(app, list(args))
    return res.exit_code, res.output


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _no_leftovers(parent: Path, name: str) -> None:
    assert not (parent / name).exists()
    assert not [p for p in parent.iterdir() if p.name.startswith(f".{name}.")], "temporary directory left behind"


def test_help_on_every_command() -> None:
    code, out = _run("--help")
    assert code == 0 and "upcycle" in out
    for cmd in [c.name or c.callback.__name__ for c in app.registered_commands]:
        code, out = _run(cmd, "--help")
        assert code == 0 and "Usage" in out, cmd


def test_upcycle_success(dense_model, tmp_path: Path) -> None:
    dense = dense_model("llama-tied")
    code, out = _run("upcycle", str(dense), str(tmp_path / "m"), "--experts", "4", "--top-k", "2",
                     "--allocate", "en=0", "--allocate", "el=1,2", "--layers", "all", "-q")
    assert code == 0, out
    man = json.loads((tmp_path / "m" / "deltamoe.json").read_text())
    assert man["moe"]["allocation"] == {"en": [0], "el": [1, 2]}
    assert man["stages"][0]["command"][:2] == ["deltamoe", "upcycle"] or man["stages"][0]["command"][0] == "deltamoe"


@pytest.mark.parametrize(
    "case",
    ["missing-config", "bin-only", "unknown-arch", "topk-gt-experts", "shape-mismatch", "exists", "unwritable",
     "mixtral-attention-bias", "sliding-qwen3", "bad-allocation"],
)
def test_bad_input(case: str, dense_model, tmp_path: Path) -> None:
    dense = _copy(dense_model("llama-untied-gqa"), tmp_path / "dense")
    out_parent = tmp_path / "outs"
    out_parent.mkdir()
    out = out_parent / "moe"
    extra: list[str] = []
    expect = ""
    if case == "missing-config":
        (dense / "config.json").unlink()
        expect = "missing config.json"
    elif case == "bin-only":
        for p in dense.glob("*.safetensors"):
            p.unlink()
        (dense / "pytorch_model.bin").write_bytes(b"\x80\x04")
        expect = "never unpickles"
    elif case == "unknown-arch":
        cfg = json.loads((dense / "config.json").read_text())
        cfg["model_type"] = "gpt2"
        (dense / "config.json").write_text(json.dumps(cfg))
        expect = "'gpt2' is not supported. Supported dense families: llama -> mixtral"
    elif case == "topk-gt-experts":
        extra = ["--top-k", "5"]
        expect = "--top-k must be between 1 and --experts (4)"
    elif case == "shape-mismatch":
        cfg = json.loads((dense / "config.json").read_text())
        cfg["intermediate_size"] = 64
        (dense / "config.json").write_text(json.dumps(cfg))
        expect = "model.layers.0.mlp.down_proj.weight' has shape [32, 48], but config.json implies [32, 64]"
    elif case == "exists":
        out.mkdir()
        (out / "keep").write_text("x")
        expect = "already exists; pass --force"
    elif case == "unwritable":
        (out_parent / "blocker").write_text("")
        out = out_parent / "blocker" / "moe"
        expect = "is not a directory"
    elif case == "mixtral-attention-bias":
        dense = _copy(dense_model("llama-tied", attention_bias=True), tmp_path / "biased")
        expect = "attention_bias = True cannot be carried over to MixtralForCausalLM"
    elif case == "sliding-qwen3":
        dense = _copy(dense_model("qwen3-untied", use_sliding_window=True, sliding_window=4, max_window_layers=1),
                      tmp_path / "sw")
        expect = "use_sliding_window = True cannot be carried over to Qwen3MoeForCausalLM"
    elif case == "bad-allocation":
        extra = ["--allocate", "el=1,9"]
        expect = "uses expert(s) [9]; valid ids are 0..3"
    args = ["upcycle", str(dense), str(out), "--experts", "4", "--top-k", "2", "-q", *extra]
    code, output = _run(*args)
    assert code == 1, output
    assert output.startswith("error: ") and expect in " ".join(output.split()), output
    assert "Traceback" not in output
    if case == "exists":
        assert (out / "keep").read_text() == "x"  # untouched
    elif case != "unwritable":
        _no_leftovers(out_parent, "moe")


def test_force_replaces_and_failure_midway_leaves_nothing(dense_model, tmp_path: Path, monkeypatch) -> None:
    dense = dense_model("qwen2-tied")
    out = tmp_path / "moe"
    out.mkdir()
    (out / "old").write_text("x")
    import deltamoe.io as ck

    calls = {"n": 0}
    real = ck.ShardedWriter.write

    def failing(self, name, tensor):
        calls["n"] += 1
        if calls["n"] == 7:
            raise OSError(28, "No space left on device")
        return real(self, name, tensor)

    monkeypatch.setattr(ck.ShardedWriter, "write", failing)
    code, output = _run("upcycle", str(dense), str(out), "-e", "2", "-k", "1", "--force", "-q")
    assert code != 0
    assert [p.name for p in out.iterdir()] == ["old"], "a failed --force run must keep the old output"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["moe"]
    monkeypatch.setattr(ck.ShardedWriter, "write", real)
    code, output = _run("upcycle", str(dense), str(out), "-e", "2", "-k", "1", "--force", "-q")
    assert code == 0, output
    assert not (out / "old").exists() and (out / "deltamoe.json").is_file()


def test_console_script_and_sigterm(dense_model, tmp_path: Path) -> None:
    """The installed entry point runs; SIGTERM mid-run leaves no output or temporary directory."""
    exe = Path(sys.executable).parent / "deltamoe"
    res = subprocess.run([str(exe), "--version"], capture_output=True, text=True)
    assert res.returncode == 0 and res.stdout.startswith("deltamoe ")
    res = subprocess.run([str(exe), "upcycle", str(tmp_path / "nope"), str(tmp_path / "o"), "-e", "2", "-k", "1"],
                         capture_output=True, text=True)
    assert res.returncode == 1 and "no such directory" in res.stderr
