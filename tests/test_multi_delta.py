"""Several deltas at once: graft and merge add Σ wᵢ Δᵢ, exactly, with every delta in the provenance."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from delta_fixtures import TOKENIZER_FILES, load_all, perturbed, save, simulate_cpt
from typer.testing import CliRunner

from deltamoe.io import open_checkpoint
from deltamoe.cli import app
from deltamoe.ops.deltas import parse_weight_arg
from deltamoe.ops.extract import extract_delta
from deltamoe.ops.graft import graft
from deltamoe.errors import DeltaMoEError, UsageError
from deltamoe.ops.merge import merge
from deltamoe.io.provenance import describe_checkpoint, read_manifest
from deltamoe.ops.upcycle import upcycle

runner = CliRunner()
E = 4
W1, W2 = 0.5, -0.25  # powers of two: w·Δ is exact in float32, so the float32 reference is bit-exact


@pytest.fixture(scope="module")
def world(dense_model, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """B; P1 (with tokenizer files and its own eos) and P2 post-trained from it; M upcycled from B and
    continued-pretrained; C dense continued-pretrained; the two delta artifacts D1 = P1 - B, D2 = P2 - B."""
    root = tmp_path_factory.mktemp("multi")
    b = dense_model("llama-untied-gqa")
    p1 = perturbed(b, root / "P1", seed=11, tokenizer=True, config_changes={"eos_token_id": 7})
    p2 = perturbed(b, root / "P2", seed=12)
    m = upcycle(b, root / "M", num_experts=E, top_k=2, allocation={"en": [0], "el": [1, 2, 3]}, progress=False)
    mc = simulate_cpt(m, root / "Mcpt", seed=5)
    c = perturbed(b, root / "C", seed=13, scale=0.1)
    d1 = extract_delta(b, p1, root / "D1", progress=False)
    d2 = extract_delta(b, p2, root / "D2", progress=False)
    return {"B": b, "P1": p1, "P2": p2, "M": mc, "C": c, "D1": d1, "D2": d2, "root": root}


def _sha(path: Path) -> str:
    return describe_checkpoint(open_checkpoint(path))["sha256"]


def _cli(*args: str) -> tuple[int, str]:
    res = runner.invoke(app, [*args, "-q"])
    return res.exit_code, res.output


def _no_output(out: Path) -> None:
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")], "temporary dir left behind"


def _ref_delta(t: dict[str, dict[str, torch.Tensor]], name: str) -> torch.Tensor:
    """Σ wᵢ (Pᵢ − B) by hand, in float32 in the documented order: w₁Δ₁, then + w₂Δ₂."""
    b = t["B"][name].float()
    return (t["P1"][name].float() - b) * W1 + (t["P2"][name].float() - b) * W2


def _ref_delta64(t: dict[str, dict[str, torch.Tensor]], name: str) -> torch.Tensor:
    b = t["B"][name].double()
    return (t["P1"][name].double() - b) * W1 + (t["P2"][name].double() - b) * W2


def _check_graft(out: Path, world: dict[str, Path], chosen: set[int], scale: float) -> None:
    t = {k: load_all(world[k]) for k in ("B", "P1", "P2", "M")}
    g, m = load_all(out), t["M"]
    moe = read_manifest(out)["moe"]  # type: ignore[index]
    for layer in moe["moe_layers"]:
        for role, tmpl in moe["names"]["expert_ffn"].items():
            dense = moe["names"]["dense_ffn"][role].format(layer=layer)
            d = _ref_delta(t, dense)
            for e in range(E):
                en = tmpl.format(layer=layer, expert=e)
                want = m[en].float() + scale * d if e in chosen else m[en]
                assert torch.equal(g[en], want), (en, e in chosen)
                if e in chosen:
                    # and the float64 sum: five float32 roundings, each of a value at most 2.5x the
                    # largest operand, stay below 4 float32 ulps of that operand
                    want64 = m[en].double() + scale * _ref_delta64(t, dense)
                    big = torch.stack([m[en].abs(), t["B"][dense].abs(), t["P1"][dense].abs(),
                                       t["P2"][dense].abs()]).amax(0).double()
                    assert ((g[en].double() - want64).abs() <= 4 * 2.0**-23 * big).all(), en
        router = moe["names"]["router"].format(layer=layer)
        assert torch.equal(g[router], m[router])
    shared = [n for n in t["B"] if n in g]
    assert len(shared) > 10
    for n in shared:  # shared tensors get the weighted sum once, unscaled by --scale
        assert torch.equal(g[n], m[n].float() + _ref_delta(t, n)), n


# -- graft ------------------------------------------------------------------------------------
@pytest.mark.parametrize("experts,scale,chosen", [("all", 1.0, {0, 1, 2, 3}), ("new", 0.5, {1, 2, 3})])
def test_graft_two_posts_is_the_weighted_sum(experts: str, scale: float, chosen: set[int], world, tmp_path: Path) -> None:
    out = tmp_path / "G"
    code, text = _cli("graft", str(out), "--moe", str(world["M"]), "--base", str(world["B"]),
                      "--post", f"{world['P1']}:{W1}", "--post", f"{world['P2']}:{W2}",
                      "--experts", experts, "--scale", str(scale))
    assert code == 0, text
    _check_graft(out, world, chosen, scale)
    for name, content in TOKENIZER_FILES.items():  # the first delta is the primary: its tokenizer files
        assert (out / name).read_text() == content
    assert json.loads((out / "config.json").read_text())["eos_token_id"] == 7
    stage = read_manifest(out)["stages"][-1]  # type: ignore[index]
    assert stage["params"]["weights"] == {"post_0": W1, "post_1": W2} and stage["params"]["scale"] == scale
    assert set(stage["inputs"]) == {"moe", "base", "post_0", "post_1"}
    for role, key in (("moe", "M"), ("base", "B"), ("post_0", "P1"), ("post_1", "P2")):
        assert stage["inputs"][role]["sha256"] == _sha(world[key]), role


def test_graft_two_artifacts_equals_two_posts(world, tmp_path: Path) -> None:
    via_posts = graft(world["M"], tmp_path / "Gp", base=world["B"], post=[(world["P1"], W1), (world["P2"], W2)],
                      experts="new", scale=0.5, progress=False)
    out = tmp_path / "Gd"
    code, text = _cli("graft", str(out), "--moe", str(world["M"]), "--delta", f"{world['D1']}:{W1}",
                      "--delta", f"{world['D2']}:{W2}", "--experts", "new", "--scale", "0.5")
    assert code == 0, text
    a, b = load_all(via_posts), load_all(out)
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)  # float32 artifacts are exact
    _check_graft(out, world, {1, 2, 3}, 0.5)
    stage = read_manifest(out)["stages"][-1]  # type: ignore[index]
    assert stage["params"]["weights"] == {"delta_0": W1, "delta_1": W2}
    for role, key in (("delta_0", "D1"), ("delta_1", "D2"), ("base", "B"), ("post_0", "P1"), ("post_1", "P2")):
        assert stage["inputs"][role]["sha256"] == _sha(world[key]), role
    card = (out / "README.md").read_text()
    assert "delta_0" in card and "delta_1" in card


def test_one_weighted_delta_and_the_unweighted_form(world, tmp_path: Path) -> None:
    """A single delta without a weight is the original graft, provenance included; with a weight, the
    weight scales every tensor's delta (shared ones too), and --scale comes on top in the experts."""
    plain = graft(world["M"], tmp_path / "plain", base=world["B"], post=world["P1"], progress=False)
    one = graft(world["M"], tmp_path / "one", base=world["B"], post=[f"{world['P1']}:1"], progress=False)
    for f in sorted(p.name for p in plain.iterdir()):
        assert (plain / f).read_bytes() == (one / f).read_bytes(), f
    assert "weights" not in read_manifest(plain)["stages"][-1]["params"]  # type: ignore[index]
    half = graft(world["M"], tmp_path / "half", base=world["B"], post=f"{world['P1']}:{W1}", experts="0",
                 scale=0.5, progress=False)
    g, m, b, p = load_all(half), load_all(world["M"]), load_all(world["B"]), load_all(world["P1"])
    emb, e0, e1 = ("model.embed_tokens.weight", "model.layers.1.block_sparse_moe.experts.0.w1.weight",
                   "model.layers.1.block_sparse_moe.experts.1.w1.weight")
    dense = "model.layers.1.mlp.gate_proj.weight"
    assert torch.equal(g[emb], m[emb] + (p[emb] - b[emb]) * W1)
    assert torch.equal(g[e0], m[e0] + 0.5 * ((p[dense] - b[dense]) * W1))
    assert torch.equal(g[e1], m[e1])
    assert read_manifest(half)["stages"][-1]["params"]["weights"] == {"post_0": W1}  # type: ignore[index]


def test_graft_added_rows_and_streaming(world, tmp_path: Path, monkeypatch) -> None:
    """The first delta may add vocabulary rows (their values are its P's); streamed in one-row chunks,
    one step read ahead, the result is the same bytes."""
    import deltamoe.engine

    p3 = perturbed(world["B"], tmp_path / "P3", seed=21, add_rows=3, tokenizer=True)
    kw = dict(base=world["B"], post=[(p3, W1), (world["P2"], W2)], experts="0,2", scale=0.5, progress=False)
    monkeypatch.setattr(deltamoe.engine, "CHUNK_ELEMS", 10**9)
    whole = load_all(graft(world["M"], tmp_path / "whole", **kw))  # type: ignore[arg-type]
    monkeypatch.setattr(deltamoe.engine, "CHUNK_ELEMS", 1)
    rows = load_all(graft(world["M"], tmp_path / "rows", buffer_bytes=1, **kw))  # type: ignore[arg-type]
    assert whole.keys() == rows.keys() and all(torch.equal(whole[n], rows[n]) for n in whole)
    p, b, m, p2 = load_all(p3), load_all(world["B"]), load_all(world["M"]), load_all(world["P2"])
    for n in ("model.embed_tokens.weight", "lm_head.weight"):
        assert whole[n].shape == (100, 32)
        assert torch.equal(whole[n][97:], p[n][97:])
        want = m[n] + ((p[n][:97] - b[n]) * W1 + (p2[n] - b[n]) * W2)
        assert torch.equal(whole[n][:97], want)
    with pytest.raises(DeltaMoEError, match="only the first delta may add rows"):
        graft(world["M"], tmp_path / "x", base=world["B"], post=[world["P2"], p3], progress=False)
    _no_output(tmp_path / "x")


# -- merge ------------------------------------------------------------------------------------
def test_paramdelta_with_several_posts_and_artifacts(world, tmp_path: Path) -> None:
    out = tmp_path / "pd"
    code, text = _cli("merge", str(out), "--method", "paramdelta", "--base", str(world["B"]), "--model",
                      str(world["C"]), "--post", f"{world['P1']}:{W1}", "--post", f"{world['P2']}:{W2}")
    assert code == 0, text
    t = {k: load_all(world[k]) for k in ("B", "P1", "P2", "C")}
    o = load_all(out)
    assert o.keys() == t["C"].keys()
    for n in o:
        assert torch.equal(o[n], t["C"][n] + _ref_delta(t, n)), n
    for name, content in TOKENIZER_FILES.items():  # the first --post's tokenizer
        assert (out / name).read_text() == content
    stage = read_manifest(out)["stages"][-1]  # type: ignore[index]
    assert stage["params"]["weights"] == {"post_0": W1, "post_1": W2}
    for role, key in (("base", "B"), ("model_0", "C"), ("post_0", "P1"), ("post_1", "P2")):
        assert stage["inputs"][role]["sha256"] == _sha(world[key]), role

    arts = merge([world["C"]], tmp_path / "pd-d", method="paramdelta",
                 delta=[f"{world['D1']}:{W1}", (world["D2"], W2)], progress=False)  # no base needed
    a = load_all(arts)
    assert all(torch.equal(o[n], a[n]) for n in o)
    stage = read_manifest(arts)["stages"][-1]  # type: ignore[index]
    assert stage["params"]["weights"] == {"delta_0": W1, "delta_1": W2}
    for role, key in (("model_0", "C"), ("delta_0", "D1"), ("delta_1", "D2")):
        assert stage["inputs"][role]["sha256"] == _sha(world[key]), role


@pytest.mark.parametrize("method,extra", [("task_arithmetic", {"lambda_": 0.9}), ("ties", {"density": 0.5}),
                                          ("dare_linear", {"density": 0.5, "seed": 3})])
def test_other_methods_take_several_artifacts(method: str, extra: dict, world, tmp_path: Path) -> None:
    """Artifacts D1, D2 are the task vectors P1 - B, P2 - B: the same merge as with --model P1, P2."""
    kw = dict(base=world["B"], method=method, progress=False, **extra)
    via_models = load_all(merge([(world["C"], 0.7), (world["P1"], W1), (world["P2"], W2)], tmp_path / "m", **kw))
    via_deltas = merge([(world["C"], 0.7)], tmp_path / "d", delta=[(world["D1"], W1), (world["D2"], W2)], **kw)
    d = load_all(via_deltas)
    if method == "dare_linear":  # DARE's masks are seeded by each input's label: other labels, other masks
        assert any(not torch.equal(via_models[n], d[n]) for n in d)
        again = load_all(merge([(world["C"], 0.7)], tmp_path / "d2", delta=[(world["D1"], W1), (world["D2"], W2)],
                               **kw))
        assert all(torch.equal(again[n], d[n]) for n in d)
    else:
        assert via_models.keys() == d.keys() and all(torch.equal(via_models[n], d[n]) for n in d)
    stage = read_manifest(via_deltas)["stages"][-1]  # type: ignore[index]
    assert stage["params"]["weights"] == {"model_0": 0.7, "delta_0": W1, "delta_1": W2}
    assert (via_deltas / "chat_template.jinja").read_text() == TOKENIZER_FILES["chat_template.jinja"]  # D1's


# -- bad input: one error line naming the flag or file, exit 1, nothing written ------------------
def test_weight_parsing(tmp_path: Path) -> None:
    assert parse_weight_arg("some/dir:0.5", "--delta") == ("some/dir", 0.5)
    assert parse_weight_arg("some/dir:-1e-1", "--delta") == ("some/dir", -0.1)
    assert parse_weight_arg("hf://owner/name", "--delta") == ("hf://owner/name", None)
    odd = tmp_path / "a:b"
    odd.mkdir()
    assert parse_weight_arg(str(odd), "--post") == (str(odd), None)  # an existing path keeps its ':'
    for text in ("D:abc", "D:nan", "D:inf", ":0.5"):
        with pytest.raises(UsageError, match="--delta"):
            parse_weight_arg(text, "--delta")


def _bad_artifact(world: dict[str, Path], root: Path, case: str) -> tuple[Path, list[str]]:
    d2 = world["D2"]
    t = load_all(d2)
    if case == "shape":
        name = "model.layers.1.self_attn.o_proj.weight"
        t[name] = t[name][:, :16].contiguous()
        bad = save(root / "D2shape", t, open_checkpoint(d2).config, copy_from=d2)
        return bad, [name, "[32, 16]", "[32, 32]", str(bad / "model.safetensors")]
    assert case == "missing", case
    name = "model.layers.2.post_attention_layernorm.weight"
    del t[name]
    bad = save(root / "D2miss", t, open_checkpoint(d2).config, copy_from=d2)
    return bad, [name, str(bad), "same tensors"]


@pytest.mark.parametrize("case", ["weight-not-a-number", "shape", "missing", "other-arch", "other-base",
                                  "mixed-forms"])
def test_graft_bad_input(case: str, world, dense_model, tmp_path: Path) -> None:
    out = tmp_path / "G"
    d1 = f"{world['D1']}:{W1}"
    if case == "weight-not-a-number":
        args, expect = ["--delta", d1, "--delta", f"{world['D2']}:abc"], ["--delta", "'abc'", "not a number"]
    elif case in ("shape", "missing"):
        bad, expect = _bad_artifact(world, tmp_path, case)
        args = ["--delta", d1, "--delta", f"{bad}:{W2}"]
    elif case == "other-arch":
        bq = dense_model("qwen3-untied")
        dq = extract_delta(bq, perturbed(bq, tmp_path / "Pq", seed=1), tmp_path / "Dq", progress=False)
        args, expect = ["--delta", d1, "--delta", str(dq)], ["model_type", "qwen3", str(dq)]
    elif case == "other-base":
        b2 = perturbed(world["B"], tmp_path / "B2", seed=99)
        d3 = extract_delta(b2, world["P2"], tmp_path / "D3", progress=False)
        args, expect = ["--delta", d1, "--delta", str(d3)], [str(d3), str(b2), "upcycled from"]
    else:
        args, expect = ["--delta", d1, "--base", str(world["B"]), "--post", str(world["P2"])], ["not both"]
    code, text = _cli("graft", str(out), "--moe", str(world["M"]), *args)
    assert code == 1, text
    assert text.startswith("error: ") and "Traceback" not in text
    flat = " ".join(text.split())
    for piece in expect:
        assert piece in flat, (piece, text)
    _no_output(out)


@pytest.mark.parametrize("case", ["weight-not-a-number", "other-base", "shape", "post-for-ties", "weighted-model"])
def test_merge_bad_input(case: str, world, tmp_path: Path) -> None:
    out = tmp_path / "out"
    c, d1 = str(world["C"]), f"{world['D1']}:{W1}"
    if case == "weight-not-a-number":
        args = ["--method", "paramdelta", "--model", c, "--delta", d1, "--delta", f"{world['D2']}:0.5x"]
        expect = ["--delta", "'0.5x'", "not a number"]
    elif case == "other-base":  # no --base: the artifacts must agree with each other
        b2 = perturbed(world["B"], tmp_path / "B2", seed=98)
        d3 = extract_delta(b2, world["P2"], tmp_path / "D3", progress=False)
        args = ["--method", "paramdelta", "--model", c, "--delta", d1, "--delta", str(d3)]
        expect = [str(d3), str(b2), str(world["D1"]), "same base"]
    elif case == "shape":
        bad, expect = _bad_artifact(world, tmp_path, "shape")
        args = ["--method", "paramdelta", "--model", c, "--delta", d1, "--delta", str(bad)]
    elif case == "post-for-ties":
        args = ["--method", "ties", "--density", "0.5", "--base", str(world["B"]), "--model", c,
                "--post", str(world["P1"])]
        expect = ["--post", "paramdelta", "--model P[:WEIGHT]"]
    else:
        args = ["--method", "paramdelta", "--base", str(world["B"]), "--model", f"{c}:0.5", "--post", str(world["P1"])]
        expect = ["no weights on --model"]
    code, text = _cli("merge", str(out), *args)
    assert code == 1, text
    assert text.startswith("error: ") and "Traceback" not in text
    flat = " ".join(text.split())
    for piece in expect:
        assert piece in flat, (piece, text)
    _no_output(out)


# -- streaming ---------------------------------------------------------------------------------
_CHILD = """
import json, sys
import deltamoe.ops.graft, deltamoe.ops.merge, transformers  # imports are the interpreter baseline
def status(key): return int(next(l for l in open("/proc/self/status") if l.startswith(key)).split()[1]) * 1024
open("/proc/self/clear_refs", "w").write("5")  # reset the high-water mark (ru_maxrss would carry the parent's)
base_rss = status("VmRSS:")
kind, out, b, p1, p2, x, buffer = sys.argv[1:]
posts = [(p1, 0.5), (p2, -0.25)]
if kind == "graft":
    deltamoe.ops.graft.graft(x, out, base=b, post=posts, progress=False, buffer_bytes=int(buffer))
else:
    deltamoe.ops.merge.merge([x], out, method="paramdelta", base=b, post=posts, progress=False, buffer_bytes=int(buffer))
print(json.dumps({"baseline": base_rss, "peak": status("VmHWM:")}))
"""


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["graft", "merge"])
def test_several_deltas_peak_rss_is_bounded(kind: str, tmp_path: Path) -> None:
    """Two deltas stream like one: peak memory is the engine's buffers plus a few chunks."""
    import os
    import subprocess
    import sys

    from deltamoe.synthetic import llama_config, write_dense

    cfg = llama_config(hidden=512, intermediate=1536, layers=6, vocab=16384, heads=8, kv_heads=4)
    b, p1, p2, c = (write_dense(tmp_path / n, cfg, seed=s) for s, n in enumerate(["B", "P1", "P2", "C"]))
    x = upcycle(b, tmp_path / "M", num_experts=E, top_k=2, progress=False) if kind == "graft" else c
    buffer = 8 * 2**20
    res = subprocess.run([sys.executable, "-c", _CHILD, kind, str(tmp_path / "out"), *map(str, (b, p1, p2, x)),
                          str(buffer)], capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr
    r = json.loads(res.stdout.strip().splitlines()[-1])
    above = r["peak"] - r["baseline"]
    bound = 2 * buffer + 128 * 2**20  # read-ahead + write-behind, a few 4 MB chunks, what the allocator keeps
    each = open_checkpoint(b).total_bytes
    print(f"{kind}: peak above baseline {above / 2**20:.0f} MiB (bound {bound / 2**20:.0f}), each input "
          f"{each / 2**20:.0f} MiB")
    assert 3 * each > 2 * bound  # holding B, P1 and P2 would break the bound
    assert above < bound
