"""Block expansion (LLaMA-Pro): identity blocks, parameter matching, training only the new blocks,
grafting Δ onto the original blocks, and bad input."""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import pytest
import torch
from delta_fixtures import load_all, perturbed, save
from typer.testing import CliRunner

from deltamoe.io import open_checkpoint
from deltamoe.cli import app
from deltamoe.ops.expand import blocks_matching, expand_blocks, layer_sources, placement
from deltamoe.io.provenance import read_manifest

runner = CliRunner()


def _cli(*args: object) -> tuple[int, str]:
    res = runner.invoke(app, [str(a) for a in args])
    return res.exit_code, res.output


def _logits(path: Path, ids: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(ids).logits


def _bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and a.contiguous().view(torch.uint8).equal(b.contiguous().view(torch.uint8))


# -- placement and parameter matching --------------------------------------------------------
def test_placement_rule() -> None:
    # LLaMA-Pro's rule when N divides L: one new block after every L/N-th layer
    assert placement(32, 8) == [3, 7, 11, 15, 19, 23, 27, 31]
    assert layer_sources(32, 8)[1] == [4, 9, 14, 19, 24, 29, 34, 39]
    # N < L, uneven: groups of 2 and 1; N > L: every layer followed by one or two new blocks
    assert layer_sources(3, 2) == ([0, 1, 1, 2, 2], [2, 4])
    assert layer_sources(3, 4) == ([0, 0, 1, 1, 2, 2, 2], [1, 3, 5, 6])
    assert layer_sources(2, 6) == ([0, 0, 0, 0, 1, 1, 1, 1], [1, 2, 3, 5, 6, 7])
    for n_orig, n_new in [(5, 1), (7, 3), (4, 9)]:
        sources, new = layer_sources(n_orig, n_new)
        assert len(sources) == n_orig + n_new and len(new) == n_new and sources[-1] == n_orig - 1
        assert sorted(set(sources)) == list(range(n_orig)) and sources == sorted(sources)


def test_blocks_matching_by_hand(dense_model) -> None:
    cfg = json.loads((dense_model("llama-untied-gqa") / "config.json").read_text())
    # hidden 32, intermediate 48, 4 heads of 8, 2 KV heads, 3 layers
    ffn = 3 * 32 * 48
    block = 32 * 32 + 2 * 32 * 16 + 32 * 32 + ffn + 2 * 32
    assert block == 7744
    for experts in (2, 4, 8):
        assert blocks_matching(cfg, experts) == math.floor((experts - 1) * 3 * ffn / block + 0.5)
    assert [blocks_matching(cfg, e) for e in (2, 4, 8)] == [2, 5, 12]
    with pytest.raises(Exception, match="at least 2"):
        blocks_matching(cfg, 1)


def test_blocks_matching_counts_the_upcycled_layers_only(dense_model, tmp_path: Path) -> None:
    """With ``layers``, N matches the new experts of the upcycled layers: the new blocks' parameters
    are the closest whole number of blocks to the parameters of the new experts an upcycle of those
    layers trains (a Mixtral upcycle's dense layers hold identical frozen copies, not counted)."""
    import re

    from deltamoe.ops.upcycle import upcycle

    dense = dense_model("llama-untied-gqa")
    cfg = json.loads((dense / "config.json").read_text())
    ffn, block = 3 * 32 * 48, 7744
    for layers, n_moe in (("all", 3), ("1-2", 2), ("0", 1), ([0, 2], 2)):
        assert blocks_matching(cfg, 4, layers) == math.floor(3 * n_moe * ffn / block + 0.5), layers
    assert blocks_matching(cfg, 4) == blocks_matching(cfg, 4, "all") == 5
    assert blocks_matching(cfg, 4, "1-2") == 4  # 3.57
    with pytest.raises(Exception, match="out of range"):
        blocks_matching(cfg, 4, "1-3")
    moe = upcycle(dense, tmp_path / "moe", num_experts=4, top_k=2, layers="1-2", progress=False)
    ck = open_checkpoint(moe)
    new = sum(math.prod(ck.spec(n).shape) for n in ck.keys()
              if (m := re.match(r"model\.layers\.(\d+)\..*experts\.(\d+)\.", n)) and m[1] != "0" and m[2] != "0")
    assert new == 2 * 3 * ffn
    n = blocks_matching(cfg, 4, "1-2")
    assert abs(n * block - new) <= block / 2
    code, text = _cli("expand", dense, tmp_path / "exp", "--match-experts", 4, "--match-layers", "1-2", "-q")
    assert code == 0 and "4 new blocks" in text, text
    from deltamoe.pipeline.accounting import parameter_match

    match = parameter_match(tmp_path / "exp", tmp_path / "moe", dense)  # layer 0's frozen copies not counted
    assert match["moe_added_params"] == new + 2 * 4 * 32 and match["added_params"] == 4 * block
    code, text = _cli("expand", dense, tmp_path / "exp2", "--blocks", 2, "--match-layers", "1-2", "-q")
    assert code == 1 and "--match-layers goes with --match-experts" in text and not (tmp_path / "exp2").exists()


def test_blocks_matching_rounds_halves_up(monkeypatch) -> None:
    import deltamoe.ops.expand as ex

    for (layers, block, ffn, experts), want in {(1, 4, 2, 2): 1, (3, 4, 2, 2): 2, (5, 4, 2, 2): 3, (1, 100, 1, 2): 1}.items():
        monkeypatch.setattr(ex, "_layer_params", lambda c, s, v=(layers, block, ffn): v)
        assert blocks_matching({}, experts) == want  # 0.5 -> 1, 1.5 -> 2, 2.5 -> 3, 0.01 -> at least 1


# -- the expanded model ------------------------------------------------------------------------
@pytest.mark.parametrize(
    "variant,kwargs",
    [("llama-untied-gqa", {}), ("qwen3-bias-tied", {}), ("llama-tied", {"mlp_bias": True, "attention_bias": True}),
     ("qwen3-untied", {"use_sliding_window": True, "sliding_window": 4, "max_window_layers": 1})],
)
def test_expanded_model_computes_the_original(variant: str, kwargs: dict, dense_model, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    dense = dense_model(variant, **kwargs)
    out = expand_blocks(dense, tmp_path / "exp", blocks=4, progress=False)
    ids = torch.randint(0, 97, (2, 24), generator=torch.Generator().manual_seed(0))
    assert torch.allclose(_logits(dense, ids), _logits(out, ids), atol=1e-6, rtol=0)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert type(model).__name__ == type(AutoModelForCausalLM.from_pretrained(dense)).__name__
    cfg_in, cfg = json.loads((dense / "config.json").read_text()), json.loads((out / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 7 and cfg_in["num_hidden_layers"] == 3
    sources, new = layer_sources(3, 4)
    if "layer_types" in cfg_in:
        assert cfg["layer_types"] == [cfg_in["layer_types"][i] for i in sources]
    if kwargs.get("max_window_layers") == 1:  # layers 0 and the new block after it keep full attention
        assert cfg["max_window_layers"] == 2 and cfg["layer_types"][:3] == ["full_attention", "full_attention", "sliding_attention"]
    man = read_manifest(out)
    assert man is not None and man["stage"] == "expand" and "moe" not in man
    assert man["expand"]["sources"] == sources and man["expand"]["new_layers"] == new
    assert man["expand"]["original_layer_outputs"] == [0, 2, 4]
    # every tensor: original layers and non-layer tensors byte-identical, new blocks copies with zero outputs
    src, got = load_all(dense), load_all(out)
    assert set(got) == {n.replace("layers.0.", f"layers.{j}.") for n in src if "layers.0." in n for j in range(7)} | {
        n for n in src if ".layers." not in n}
    for name, t in got.items():
        parts = name.split(".")
        if parts[1] != "layers":
            assert _bits_equal(t, src[name]), name
            continue
        j = int(parts[2])
        orig = src[".".join([*parts[:2], str(sources[j]), *parts[3:]])]
        if j in new and (".o_proj." in name or ".down_proj." in name):
            assert t.dtype == orig.dtype and not t.any(), name
        else:
            assert _bits_equal(t, orig), name


def test_added_parameters_are_n_blocks(dense_model, tmp_path: Path) -> None:
    dense = dense_model("qwen3-bias-tied")
    out = expand_blocks(dense, tmp_path / "exp", blocks=5, progress=False)
    count = lambda ck: sum(math.prod(ck.spec(n).shape) for n in ck.keys())  # noqa: E731
    a, b = open_checkpoint(dense), open_checkpoint(out)
    block = sum(math.prod(a.spec(n).shape) for n in a.keys() if n.startswith("model.layers.0."))
    assert count(b) - count(a) == 5 * block


def test_cli_expand_honours_the_umask_and_match_experts(dense_model, tmp_path: Path) -> None:
    dense = dense_model("llama-untied-gqa")
    old = os.umask(0o022)
    try:
        code, text = _cli("expand", dense, tmp_path / "exp", "--match-experts", 4, "-q")
    finally:
        os.umask(old)
    assert code == 0, text
    assert "5 new blocks" in text
    assert (tmp_path / "exp").stat().st_mode & 0o777 == 0o755
    assert {p.stat().st_mode & 0o777 for p in (tmp_path / "exp").iterdir()} == {0o644}
    man = read_manifest(tmp_path / "exp")
    assert man["expand"]["new_blocks"] == 5 and man["stages"][0]["command"][0] == "deltamoe"
    assert "Block expansion" in (tmp_path / "exp" / "README.md").read_text()


@pytest.mark.parametrize("case", ["zero", "negative", "neither", "both", "moe", "expanded", "unknown", "mixtral-config"])
def test_bad_input(case: str, dense_model, tmp_path: Path) -> None:
    from deltamoe.ops.upcycle import upcycle

    dense = dense_model("llama-untied-gqa")
    parent = tmp_path / "outs"
    parent.mkdir()
    args: list[object] = ["--blocks", 2]
    if case == "zero":
        args, expect = ["--blocks", 0], "--blocks must be a positive integer, got 0"
    elif case == "negative":
        args, expect = ["--blocks", -3], "--blocks must be a positive integer, got -3"
    elif case == "neither":
        args, expect = [], "give exactly one of --blocks N or --match-experts E"
    elif case == "both":
        args, expect = ["--blocks", 2, "--match-experts", 4], "give exactly one of --blocks N or --match-experts E"
    elif case == "moe":
        dense = upcycle(dense, tmp_path / "moe", num_experts=2, top_k=1, progress=False)
        expect = f"{dense / 'config.json'}: model_type 'mixtral' is a Mixture-of-Experts; expand takes a dense model"
    elif case == "expanded":
        dense = expand_blocks(dense, tmp_path / "e1", blocks=1, progress=False)
        expect = f"{dense / 'deltamoe.json'}: this model is block-expanded already"
    elif case == "unknown":
        dense = shutil.copytree(dense, tmp_path / "gpt2")
        cfg = json.loads((dense / "config.json").read_text())
        (dense / "config.json").write_text(json.dumps({**cfg, "model_type": "gpt2"}))
        expect = f"{dense / 'config.json'}: model_type 'gpt2' is not supported; expand supports the dense families llama"
    else:  # an MoE config without deltamoe.json
        dense = upcycle(dense, tmp_path / "moe", num_experts=2, top_k=1, progress=False)
        (dense / "deltamoe.json").unlink()
        expect = "model_type 'mixtral' is a Mixture-of-Experts"
    code, output = _cli("expand", dense, parent / "exp", *args, "-q")
    assert code == 1, output
    assert output.startswith("error: ") and expect in " ".join(output.split()), output
    assert "Traceback" not in output and len(output.strip().splitlines()) == 1
    assert list(parent.iterdir()) == []  # nothing written, no temporary left


# -- graft onto an expanded model ----------------------------------------------------------------
def _simulated_cpt(expanded: Path, out: Path, seed: int) -> Path:
    """The expanded model with every tensor moved (new blocks and all), manifest kept."""
    g = torch.Generator().manual_seed(seed)
    tensors = {n: t + 0.05 * torch.randn(t.shape, generator=g) for n, t in load_all(expanded).items()}
    return save(out, tensors, json.loads((expanded / "config.json").read_text()), copy_from=expanded)


@pytest.mark.parametrize("variant", ["llama-untied-gqa", "qwen3-bias-tied"])
def test_graft_onto_expanded(variant: str, dense_model, tmp_path: Path) -> None:
    import deltamoe

    base = dense_model(variant)
    post = perturbed(base, tmp_path / "post", seed=1, add_rows=3, tokenizer=True)
    exp = expand_blocks(base, tmp_path / "exp", blocks=2, progress=False)
    # freshly expanded: the graft computes P
    fresh = deltamoe.graft(exp, tmp_path / "g0", base=base, post=post, progress=False)
    ids = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(3))
    assert torch.allclose(_logits(fresh, ids), _logits(post, ids), atol=1e-5, rtol=0)
    # after (simulated) training every tensor differs from B: reference computed by hand
    trained = _simulated_cpt(exp, tmp_path / "cpt", seed=2)
    out = deltamoe.graft(trained, tmp_path / "g", base=base, post=post, progress=False)
    b, p, m, got = load_all(base), load_all(post), load_all(trained), load_all(out)
    block = read_manifest(exp)["expand"]
    assert set(got) == set(m)
    for name, t in got.items():
        parts = name.split(".")
        if parts[1] == "layers" and int(parts[2]) in block["new_layers"]:
            assert _bits_equal(t, m[name]), name  # new blocks untouched
            continue
        src = name if parts[1] != "layers" else ".".join([*parts[:2], str(block["sources"][int(parts[2])]), *parts[3:]])
        rows = b[src].shape[0]
        assert torch.equal(t[:rows], m[name] + (p[src][:rows] - b[src])), name
        assert torch.equal(t[rows:], p[src][rows:]), name  # added vocabulary rows take P's values
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["vocab_size"] == 100 and cfg["num_hidden_layers"] == 5
    assert (out / "chat_template.jinja").is_file()
    man = read_manifest(out)
    assert [s["stage"] for s in man["stages"]] == ["expand", "graft"] and man["expand"] == block
    # the same from a delta artifact, byte for byte
    art = deltamoe.extract_delta(base, post, tmp_path / "delta", progress=False)
    via = deltamoe.graft(trained, tmp_path / "g2", delta=art, progress=False)
    assert all(_bits_equal(t, got[n]) for n, t in load_all(via).items())


def test_graft_onto_expanded_refuses(dense_model, tmp_path: Path) -> None:
    import deltamoe
    from deltamoe.errors import DeltaMoEError

    base = dense_model("llama-untied-gqa")
    post = perturbed(base, tmp_path / "post", seed=1)
    exp = expand_blocks(base, tmp_path / "exp", blocks=2, progress=False)
    other = perturbed(base, tmp_path / "other", seed=5)
    with pytest.raises(DeltaMoEError, match="differs from the dense model .* that .* was expanded from"):
        deltamoe.graft(exp, tmp_path / "g1", base=other, post=post, progress=False)
    with pytest.raises(DeltaMoEError, match="--experts and --scale apply to MoEs"):
        deltamoe.graft(exp, tmp_path / "g2", base=base, post=post, experts="new", progress=False)
    q = dense_model("qwen3-untied")
    with pytest.raises(DeltaMoEError, match="expanded from the 'llama' family, but the base is a qwen3 model"):
        deltamoe.graft(exp, tmp_path / "g3", base=q, post=perturbed(q, tmp_path / "qp", seed=1), progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exp", "other", "post", "qp"]
