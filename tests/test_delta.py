"""Grafting the post-training delta onto an upcycled MoE, and the delta artifact."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from delta_fixtures import TOKENIZER_FILES, load_all, perturbed, save, simulate_cpt
from typer.testing import CliRunner

from deltamoe.io import open_checkpoint
from deltamoe.cli import app
from deltamoe.ops.extract import extract_delta
from deltamoe.ops.graft import graft
from deltamoe.errors import DeltaMoEError
from deltamoe.io.provenance import describe_checkpoint, read_manifest
from deltamoe.ops.upcycle import upcycle

runner = CliRunner()
E = 4


def _world(dense_model, root: Path, variant: str, *, dtype: torch.dtype = torch.float32, layers: str | None = None,
           add_rows: int = 0) -> dict[str, Path]:
    b = dense_model(variant, dtype=dtype)
    p = perturbed(b, root / "P", seed=11, add_rows=add_rows, tokenizer=True, config_changes={"eos_token_id": 7})
    m = upcycle(b, root / "M", num_experts=E, top_k=2, layers=layers, allocation={"en": [0], "el": [1, 2, 3]},
                progress=False)
    return {"B": b, "P": p, "M": m}


def _moe(path: Path) -> dict:
    man = read_manifest(path)
    assert man is not None
    return man["moe"]


def _expert(moe: dict, role: str, layer: int, e: int) -> str:
    return moe["names"]["expert_ffn"][role].format(layer=layer, expert=e)


def _dense(moe: dict, role: str, layer: int) -> str:
    return moe["names"]["dense_ffn"][role].format(layer=layer)


def _logits(path: Path, ids: torch.Tensor) -> tuple[torch.Tensor, dict]:
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, output_loading_info=True)
    with torch.no_grad():
        return model.eval()(ids).logits, info


def _within_f32_rounding(got: torch.Tensor, want: torch.Tensor, *operands: torch.Tensor) -> bool:
    """|got - want| <= one float32 ulp of the largest operand magnitude, elementwise."""
    scale = torch.stack([want.abs(), *(o.float().abs() for o in operands)]).amax(0)
    return bool(((got.float() - want.float()).abs() <= scale * 2.0**-23).all())


def _no_output(out: Path) -> None:
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")], "temporary dir left behind"


# -- what must hold ---------------------------------------------------------------------------
@pytest.mark.parametrize("variant", ["llama-untied-gqa", "qwen3-bias-tied", "qwen2-bias", "mistral-sliding"])
def test_graft_onto_fresh_upcycle_is_post(variant: str, dense_model, tmp_path: Path) -> None:
    w = _world(dense_model, tmp_path, variant)
    out = graft(w["M"], tmp_path / "G", base=w["B"], post=w["P"], progress=False)
    ids = torch.randint(0, 97, (2, 13), generator=torch.Generator().manual_seed(0))
    got, info = _logits(out, ids)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    want, _ = _logits(w["P"], ids)
    assert (got - want).abs().max().item() <= 1e-5
    # tokenizer, chat template and generation config are P's, byte for byte; eos comes from P's config
    for name, text in TOKENIZER_FILES.items():
        assert (out / name).read_text() == text
    assert json.loads((out / "config.json").read_text())["eos_token_id"] == 7


def test_graft_after_cpt_gives_post_ffn_in_expert0(dense_model, tmp_path: Path) -> None:
    w = _world(dense_model, tmp_path, "llama-untied-gqa")
    mc = simulate_cpt(w["M"], tmp_path / "Mcpt", seed=3)
    out = graft(mc, tmp_path / "G", base=w["B"], post=w["P"], progress=False)
    g, b, p, m = load_all(out), load_all(w["B"]), load_all(w["P"]), load_all(mc)
    moe = _moe(out)
    for layer in moe["moe_layers"]:
        for role in ("gate", "up", "down"):
            dn = _dense(moe, role, layer)
            assert _within_f32_rounding(g[_expert(moe, role, layer, 0)], p[dn], b[dn])
            delta = p[dn].float() - b[dn].float()
            for e in moe["new_experts"]:
                en = _expert(moe, role, layer, e)
                assert not torch.equal(m[en], b[dn])  # CPT changed it
                assert torch.equal(g[en], (m[en].float() + delta).to(g[en].dtype))
        router = moe["names"]["router"].format(layer=layer)
        assert torch.equal(g[router], m[router])
    shared = [n for n in p if n in g]
    assert shared and all(_within_f32_rounding(g[n], p[n], b[n]) for n in shared)


def test_bfloat16_graft_is_exactly_post(dense_model, tmp_path: Path) -> None:
    w = _world(dense_model, tmp_path, "qwen3-untied", dtype=torch.bfloat16)
    mc = simulate_cpt(w["M"], tmp_path / "Mcpt", seed=4)
    out = graft(mc, tmp_path / "G", base=w["B"], post=w["P"], progress=False)
    g, p = load_all(out), load_all(w["P"])
    moe = _moe(out)
    assert all(t.dtype == torch.bfloat16 for t in g.values())
    for layer in moe["moe_layers"]:
        for role in ("gate", "up", "down"):
            assert torch.equal(g[_expert(moe, role, layer, 0)], p[_dense(moe, role, layer)])
    assert all(torch.equal(g[n], p[n]) for n in p if n in g)


@pytest.mark.parametrize("experts,scale", [("new", 0.5), ("original", 1.0), ("0,2", 2.0), ("all", 0.0)])
def test_experts_and_scale_per_expert(experts: str, scale: float, dense_model, tmp_path: Path) -> None:
    w = _world(dense_model, tmp_path, "llama-untied-gqa")
    mc = simulate_cpt(w["M"], tmp_path / "Mcpt", seed=5)
    out = graft(mc, tmp_path / "G", base=w["B"], post=w["P"], experts=experts, scale=scale, progress=False)
    chosen = {"new": {1, 2, 3}, "original": {0}, "0,2": {0, 2}, "all": {0, 1, 2, 3}}[experts]
    g, b, p, m = load_all(out), load_all(w["B"]), load_all(w["P"]), load_all(mc)
    moe = _moe(out)
    for layer in moe["moe_layers"]:
        for role in ("gate", "up", "down"):
            dn = _dense(moe, role, layer)
            delta = p[dn].float() - b[dn].float()
            for e in range(E):
                en = _expert(moe, role, layer, e)
                want = (m[en].float() + scale * delta) if e in chosen else m[en]
                assert torch.equal(g[en], want.to(g[en].dtype)), (en, e in chosen)
    # the scale is for FFN experts only: attention, norms, embeddings get the whole delta once
    for n in ("model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight", "model.norm.weight"):
        assert torch.equal(g[n], (m[n].float() + (p[n].float() - b[n].float())).to(g[n].dtype))
    params = read_manifest(out)["stages"][-1]["params"]  # type: ignore[index]
    assert params["experts"] == sorted(chosen) and params["scale"] == scale


@pytest.mark.parametrize("variant", ["llama-untied-gqa", "qwen3-untied"])
def test_partial_moe_layers(variant: str, dense_model, tmp_path: Path) -> None:
    """Mixtral keeps non-MoE layers as E identical experts: all get the full delta and stay identical.
    Qwen3-MoE keeps them as dense FFNs: they get the delta once."""
    w = _world(dense_model, tmp_path, variant, layers="0,2")
    out = graft(w["M"], tmp_path / "G", base=w["B"], post=w["P"], experts="new", scale=0.5, progress=False)
    g, b, p = load_all(out), load_all(w["B"]), load_all(w["P"])
    moe = _moe(out)
    assert moe["moe_layers"] == [0, 2]
    for role in ("gate", "up", "down"):
        dn = _dense(moe, role, 1)
        if moe["replicated_layers"]:
            assert moe["replicated_layers"] == [1]
            copies = [g[_expert(moe, role, 1, e)] for e in range(E)]
            assert all(torch.equal(c, copies[0]) for c in copies)
            assert _within_f32_rounding(copies[0], p[dn], b[dn])
        else:
            assert _within_f32_rounding(g[dn], p[dn], b[dn])


@pytest.mark.parametrize("variant", ["llama-untied-gqa", "qwen3-bias-tied"])
def test_added_vocabulary_rows(variant: str, dense_model, tmp_path: Path) -> None:
    w = _world(dense_model, tmp_path, variant, add_rows=3)
    out = graft(w["M"], tmp_path / "G", base=w["B"], post=w["P"], progress=False)
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 100
    ids = torch.tensor([[1, 5, 97, 98, 99, 3]])  # new tokens included
    got, info = _logits(out, ids)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    want, _ = _logits(w["P"], ids)
    assert got.shape[-1] == 100 and (got - want).abs().max().item() <= 1e-5
    g, p = load_all(out), load_all(w["P"])
    vocab_tensors = [n for n in g if g[n].dim() == 2 and g[n].shape[0] == 100]
    assert len(vocab_tensors) == (1 if "-tied" in variant else 2)
    for n in vocab_tensors:
        assert torch.equal(g[n][97:], p[n][97:])

    mean_out = graft(w["M"], tmp_path / "Gmean", base=w["B"], post=w["P"], new_rows="mean", progress=False)
    gm = load_all(mean_out)
    for n in vocab_tensors:
        assert torch.equal(gm[n][:97], g[n][:97])
        want_row = gm[n][:97].double().mean(0).float()
        assert torch.allclose(gm[n][97:], want_row.expand(3, -1), atol=1e-7)
    with pytest.raises(DeltaMoEError, match="added vocabulary"):
        graft(w["M"], tmp_path / "Gerr", base=w["B"], post=w["P"], new_rows="error", progress=False)
    _no_output(tmp_path / "Gerr")


def test_delta_artifact_roundtrip_and_provenance(dense_model, tmp_path: Path) -> None:
    w = _world(dense_model, tmp_path, "llama-untied-gqa", add_rows=2)
    mc = simulate_cpt(w["M"], tmp_path / "Mcpt", seed=6)
    code = runner.invoke(app, ["delta", "extract", str(tmp_path / "D"), "--base", str(w["B"]), "--post", str(w["P"]), "-q"])
    assert code.exit_code == 0, code.output
    d = tmp_path / "D"
    for name, text in TOKENIZER_FILES.items():  # the artifact carries P's tokenizer and chat template
        assert (d / name).read_text() == text
    dman = read_manifest(d)
    assert dman is not None
    assert dman["delta"]["base"]["sha256"] == describe_checkpoint(open_checkpoint(w["B"]))["sha256"]
    assert dman["delta"]["post"]["sha256"] == describe_checkpoint(open_checkpoint(w["P"]))["sha256"]
    dt, b, p = load_all(d), load_all(w["B"]), load_all(w["P"])
    emb = "model.embed_tokens.weight"
    assert torch.equal(dt[emb][:97], p[emb][:97] - b[emb]) and torch.equal(dt[emb][97:], p[emb][97:])

    via_pair = graft(mc, tmp_path / "G1", base=w["B"], post=w["P"], experts="new", scale=0.7, progress=False)
    res = runner.invoke(app, ["graft", str(tmp_path / "G2"), "--moe", str(mc), "--delta", str(d),
                              "--experts", "new", "--scale", "0.7", "-q"])
    assert res.exit_code == 0, res.output
    g1, g2 = load_all(via_pair), load_all(tmp_path / "G2")
    assert g1.keys() == g2.keys() and all(torch.equal(g1[n], g2[n]) for n in g1)
    for name in TOKENIZER_FILES:
        assert (tmp_path / "G2" / name).read_bytes() == (w["P"] / name).read_bytes()

    man = read_manifest(via_pair)
    assert man is not None
    assert [s["stage"] for s in man["stages"]] == ["upcycle", "train:cpt", "graft"]
    assert man["moe"] == _moe(mc)
    ins = man["stages"][-1]["inputs"]
    for key, path in (("moe", mc), ("base", w["B"]), ("post", w["P"])):
        assert ins[key]["sha256"] == describe_checkpoint(open_checkpoint(path))["sha256"]
    ins2 = read_manifest(tmp_path / "G2")["stages"][-1]["inputs"]  # type: ignore[index]
    assert ins2["base"]["sha256"] == ins["base"]["sha256"] and ins2["post"]["sha256"] == ins["post"]["sha256"]
    assert ins2["delta"]["sha256"] == describe_checkpoint(open_checkpoint(d))["sha256"]


def test_chunked_streaming_equals_whole_tensors(dense_model, tmp_path: Path, monkeypatch) -> None:
    """Streamed in one-row chunks, one step read ahead, graft and extract give the same bytes."""
    import deltamoe.engine

    w = _world(dense_model, tmp_path, "llama-untied-gqa", add_rows=3)
    mc = simulate_cpt(w["M"], tmp_path / "Mcpt", seed=8)
    kw = dict(base=w["B"], post=w["P"], experts="0,2,3", scale=0.5, progress=False)
    monkeypatch.setattr(deltamoe.engine, "CHUNK_ELEMS", 10**9)
    whole = load_all(graft(mc, tmp_path / "whole", **kw))
    whole_mean = load_all(graft(mc, tmp_path / "whole-mean", new_rows="mean", **kw))
    whole_d = load_all(extract_delta(w["B"], w["P"], tmp_path / "whole-d", progress=False))
    monkeypatch.setattr(deltamoe.engine, "CHUNK_ELEMS", 1)
    kw["buffer_bytes"] = 1  # read exactly one step ahead: plans run ahead of computation
    rows = load_all(graft(mc, tmp_path / "rows", **kw))
    rows_mean = load_all(graft(mc, tmp_path / "rows-mean", new_rows="mean", **kw))
    rows_d = load_all(extract_delta(w["B"], w["P"], tmp_path / "rows-d", progress=False, buffer_bytes=1))
    for a, b in ((whole, rows), (whole_d, rows_d)):
        assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
    for n in whole_mean:
        torch.testing.assert_close(whole_mean[n], rows_mean[n], rtol=0, atol=1e-7)


def test_sha256_cache_never_serves_a_stale_digest(tmp_path: Path, monkeypatch) -> None:
    import hashlib

    from deltamoe.io.provenance import sha256_file

    monkeypatch.setenv("DELTAMOE_CACHE_DIR", str(tmp_path / "cache"))
    f = tmp_path / "shard.safetensors"
    data = bytearray(torch.randint(0, 256, (17 * 2**20,), dtype=torch.uint8).numpy().tobytes())
    f.write_bytes(data)
    assert sha256_file(f) == hashlib.sha256(data).hexdigest()
    assert len(list((tmp_path / "cache" / "sha256").iterdir())) == 1  # cached ...
    assert sha256_file(f) == hashlib.sha256(data).hexdigest()  # ... and served
    data[5] ^= 1
    with open(f, "r+b") as fh:  # same size, rewritten in place
        fh.write(data)
    assert sha256_file(f) == hashlib.sha256(data).hexdigest()
    monkeypatch.setenv("DELTAMOE_HASH_CACHE", "0")
    data[6] ^= 1
    f.write_bytes(data)
    assert sha256_file(f) == hashlib.sha256(data).hexdigest()


def test_background_hashing_matches_describe_checkpoint_and_yields_the_cpu(dense_model, tmp_path: Path,
                                                                            monkeypatch) -> None:
    import os
    import threading

    import deltamoe.io.provenance as prov
    from deltamoe.io import Checkpoint

    monkeypatch.setenv("DELTAMOE_HASH_CACHE", "0")
    w = _world(dense_model, tmp_path, "llama-untied-gqa")
    ckpts = [Checkpoint(w["M"]), Checkpoint(w["B"]), Checkpoint(w["P"])]
    seen: list[tuple[str, int]] = []
    real = prov.sha256_file

    def spy(path):
        if hasattr(os, "getpriority"):
            seen.append((Path(path).name, os.getpriority(os.PRIO_PROCESS, threading.get_native_id())))
        return real(path)

    monkeypatch.setattr(prov, "sha256_file", spy)
    got = prov.hash_in_background(*ckpts).result()
    monkeypatch.setattr(prov, "sha256_file", real)
    assert got == [prov.describe_checkpoint(c) for c in ckpts]  # same descriptions, in input order
    assert len(seen) == sum(len(d["files"]) for d in got)  # every file hashed once, on a worker
    if os.getpriority(os.PRIO_PROCESS, 0) < 19:
        assert {nice for _, nice in seen} == {19}  # the workers yield to the work they run beside
    import shutil

    broken = Checkpoint(shutil.copytree(w["B"], tmp_path / "B-copy"))  # B itself is the session's
    (broken.path / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError):  # an unreadable input surfaces where the caller collects
        prov.hash_in_background(broken).result()


def test_cancel_hashing_drops_the_files_not_yet_hashed(dense_model, tmp_path: Path, monkeypatch) -> None:
    import threading
    from concurrent.futures import CancelledError

    import deltamoe.io.provenance as prov
    from deltamoe.io import Checkpoint

    monkeypatch.setenv("DELTAMOE_HASH_CACHE", "0")
    w = _world(dense_model, tmp_path, "llama-untied-gqa")
    ckpts = [Checkpoint(w[k]) for k in ("M", "B", "P")] * 4
    n_files = sum(len(prov._weight_files(c)) for c in ckpts)
    gate, entered = threading.Event(), threading.Event()
    hashed: list[str] = []

    def slow(path):
        entered.set()
        gate.wait(10)  # every worker stops at its first file until the test has cancelled
        hashed.append(str(path))
        return "0" * 64

    monkeypatch.setattr(prov, "sha256_file", slow)
    fut = prov.hash_in_background(*ckpts)
    assert entered.wait(10)
    prov.cancel_hashing(fut)
    gate.set()
    with pytest.raises(CancelledError):
        fut.result(timeout=30)
    workers = min(prov._HASH_THREADS, os.cpu_count() or 1)
    assert 0 < len(hashed) <= workers < n_files  # only the files already being hashed were finished



def test_prehash_is_taken_over_and_abandoned(dense_model, tmp_path: Path, monkeypatch) -> None:
    """The command line's prehash covers exactly the files provenance hashes (taken over, not hashed
    again, same descriptions); a changed file is hashed afresh; an abandoned prehash stops mid-file."""
    import threading

    import deltamoe.filehash as fh
    import deltamoe.io.provenance as prov
    from deltamoe.io import Checkpoint

    monkeypatch.setenv("DELTAMOE_HASH_CACHE", "0")
    w = _world(dense_model, tmp_path, "llama-untied-gqa")
    ckpts = [Checkpoint(w[k]) for k in ("M", "B", "P")]
    fh.prehash([str(w["M"]), str(w["B"]), f"{w['P']}:0.5", "not/a-local-dir", None])
    assert len(fh._started) == sum(len(prov._weight_files(c)) for c in ckpts)
    monkeypatch.setattr(prov, "sha256_file", lambda path: pytest.fail(f"{path} hashed again"))
    got = prov.hash_in_background(*ckpts).result()
    monkeypatch.undo()
    monkeypatch.setenv("DELTAMOE_HASH_CACHE", "0")
    assert got == [prov.describe_checkpoint(c) for c in ckpts] and not fh._started

    fh.prehash([str(w["B"])])
    cfg = w["B"] / "config.json"
    cfg.write_text(cfg.read_text() + " ")  # changed since: its prehash is not used
    assert fh.take_started(cfg) is None
    fh.abandon()
    assert not fh._started

    big = tmp_path / "big"
    big.mkdir()
    (big / "config.json").write_text("{}")
    (big / "model.safetensors").write_bytes(b"\0" * (64 * 2**20))
    entered, release = threading.Event(), threading.Event()
    real = fh._sha256_file

    def gated(path, stop=None):
        if str(path).endswith(".safetensors"):
            entered.set()
            release.wait(10)
        return real(path, stop)

    monkeypatch.setattr(fh, "_sha256_file", gated)
    fh.prehash([str(big)])
    futures = [f for f, _ in fh._started.values()]
    assert entered.wait(10)
    fh.abandon()  # while the shard is being hashed
    release.set()
    with pytest.raises(fh._Abandoned):
        next(f for f in futures if not f.cancelled() and f.exception(timeout=10)).result()


# -- bad input: a clear error naming the tensor or file, exit 1, nothing written ---------------
def _graft_cli(out: Path, *args: str) -> tuple[int, str]:
    res = runner.invoke(app, ["graft", str(out), *args, "-q"])
    return res.exit_code, res.output


@pytest.mark.parametrize(
    "case",
    ["arch-mismatch", "shape-mismatch", "vocab-shrunk", "moe-other-family", "moe-other-shape", "missing-tensor",
     "nan-post", "inf-moe", "delta-other-base", "base-other-sha", "bad-experts"],
)
def test_bad_input(case: str, dense_model, tmp_path: Path) -> None:
    w = _world(dense_model, tmp_path, "llama-untied-gqa")
    b, p, m = w["B"], w["P"], w["M"]
    args: list[str]
    expect: list[str]
    if case == "arch-mismatch":
        p = perturbed(dense_model("qwen3-untied"), tmp_path / "Pq", seed=1)
        expect = ["model_type", "qwen3", str(p)]
    elif case == "shape-mismatch":
        t = load_all(p)
        t["model.layers.1.self_attn.o_proj.weight"] = t["model.layers.1.self_attn.o_proj.weight"][:, :16].contiguous()
        p = save(tmp_path / "Pbad", t, open_checkpoint(p).config)
        expect = ["model.layers.1.self_attn.o_proj.weight", "[32, 16]", "[32, 32]"]
    elif case == "vocab-shrunk":  # fewer rows than B is not an added vocabulary: refused
        t = load_all(p)
        for n in ("model.embed_tokens.weight", "lm_head.weight"):
            t[n] = t[n][:90].contiguous()
        p = save(tmp_path / "Psmall", t, {**open_checkpoint(p).config, "vocab_size": 90})
        expect = ["lm_head.weight", "[90, 32]", "[97, 32]", str(p / "model.safetensors")]
    elif case == "moe-other-family":
        m = upcycle(dense_model("qwen3-untied"), tmp_path / "Mq", num_experts=E, top_k=2, progress=False)
        expect = [str(m), "qwen3"]
    elif case == "moe-other-shape":
        other = dense_model("llama-untied-gqa", intermediate_size=40)
        m = upcycle(other, tmp_path / "Mo", num_experts=E, top_k=2, progress=False)
        expect = ["w1.weight", "[40, 32]", "[48, 32]"]
    elif case == "missing-tensor":
        t = load_all(p)
        del t["model.layers.2.post_attention_layernorm.weight"]
        p = save(tmp_path / "Pmiss", t, open_checkpoint(p).config)
        expect = ["model.layers.2.post_attention_layernorm.weight", str(p)]
    elif case == "nan-post":
        t = load_all(p)
        t["model.layers.1.mlp.up_proj.weight"][3, 4] = float("nan")
        p = save(tmp_path / "Pnan", t, open_checkpoint(p).config)
        expect = ["model.layers.1.mlp.up_proj.weight", str(p / "model.safetensors"), "non-finite"]
    elif case == "inf-moe":
        t = load_all(m)
        name = "model.layers.2.block_sparse_moe.experts.3.w2.weight"
        t[name][0, 1] = float("inf")
        m = save(tmp_path / "Minf", t, open_checkpoint(m).config, copy_from=m)
        expect = [name, str(m / "model.safetensors"), "non-finite"]
    elif case == "delta-other-base":
        b2 = perturbed(b, tmp_path / "B2", seed=99)
        extract_delta(b2, p, tmp_path / "D", progress=False)
        code, out = _graft_cli(tmp_path / "G", "--moe", str(m), "--delta", str(tmp_path / "D"))
        assert code == 1 and str(tmp_path / "D") in out and "upcycled from" in out, out
        _no_output(tmp_path / "G")
        return
    elif case == "base-other-sha":
        b = perturbed(b, tmp_path / "B2", seed=99)
        expect = [str(b), "sha256", "upcycled"]
    elif case == "bad-experts":
        code, out = _graft_cli(tmp_path / "G", "--moe", str(m), "--base", str(b), "--post", str(p), "--experts", "0,7")
        assert code == 1 and "--experts" in out and "[7]" in out, out
        _no_output(tmp_path / "G")
        return
    args = ["--moe", str(m), "--base", str(b), "--post", str(p)]
    code, out = _graft_cli(tmp_path / "G", *args)
    assert code == 1, out
    flat = " ".join(out.split())
    for piece in expect:
        assert piece in flat, (piece, out)
    _no_output(tmp_path / "G")


# -- streaming ---------------------------------------------------------------------------------
_CHILD = """
import json, sys
import deltamoe.ops.graft, transformers  # imports are the interpreter baseline
# ru_maxrss would carry the parent's peak over fork+exec: reset the high-water mark instead
def status(key): return int(next(l for l in open("/proc/self/status") if l.startswith(key)).split()[1]) * 1024
open("/proc/self/clear_refs", "w").write("5")
base_rss = status("VmRSS:")
deltamoe.ops.graft.graft(sys.argv[1], sys.argv[2], base=sys.argv[3], post=sys.argv[4], progress=False,
                     buffer_bytes=int(sys.argv[5]))
print(json.dumps({"baseline": base_rss, "peak": status("VmHWM:")}))
"""


@pytest.mark.slow
def test_graft_peak_rss_is_bounded(tmp_path: Path) -> None:
    """Peak memory is the engine's buffers plus a few chunks, whatever the size of the models."""
    from deltamoe.synthetic import llama_config, write_dense

    cfg = llama_config(hidden=512, intermediate=1536, layers=6, vocab=16384, heads=8, kv_heads=4)
    b = write_dense(tmp_path / "B", cfg, seed=0)
    p = write_dense(tmp_path / "P", cfg, seed=1)
    m = upcycle(b, tmp_path / "M", num_experts=E, top_k=2, progress=False)
    buffer = 8 * 2**20
    res = subprocess.run([sys.executable, "-c", _CHILD, str(m), str(tmp_path / "G"), str(b), str(p), str(buffer)],
                         capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr
    r = json.loads(res.stdout.strip().splitlines()[-1])
    above = r["peak"] - r["baseline"]
    mk = open_checkpoint(m)
    # read-ahead + write-behind buffers, a few 4 MB chunks in flight, and what the allocator keeps
    bound = 2 * buffer + 128 * 2**20
    print(f"peak above baseline {above / 2**20:.0f} MiB (bound {bound / 2**20:.0f}), largest tensor "
          f"{mk.largest_tensor_bytes / 2**20:.0f} MiB, M {mk.total_bytes / 2**20:.0f} MiB")
    assert mk.total_bytes > 2 * bound  # holding M (or B and P) would break the bound
    assert above < bound
