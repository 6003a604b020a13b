"""`deltamoe inspect`: norms, ratio and cosine of the CPT update U against Δ = P − B, checked by hand.

Every weight here is a multiple of 2^-10 and small, so B + Δ, B + U and their differences are exact
in float32: the reported numbers are compared with values known in closed form (U = aΔ + bΔ⊥ with
‖Δ⊥‖ = ‖Δ‖ and Δ·Δ⊥ = 0 exactly gives cos = a/√(a²+b²) and ratio √(a²+b²)).
"""

from __future__ import annotations

import json
import math
import os
import stat
from pathlib import Path

import pytest
import torch
from delta_fixtures import load_all, save
from typer.testing import CliRunner

from deltamoe.io import open_checkpoint
from deltamoe.cli import app
from deltamoe.ops.extract import extract_delta
from deltamoe.errors import OutputError
from deltamoe.inspect import group_of, inspect_conflict
from deltamoe.io.provenance import read_manifest
from deltamoe.ops.upcycle import upcycle

runner = CliRunner()
Q = 1024.0  # weights are multiples of 1/Q

# U = a·Δ + b·Δ⊥ per tensor group (in odd layers a changes sign).
COEF = {"attn.q": (1, 0), "attn.k": (-2, 0), "attn.v": (0, 1), "attn.o": (0, 0), "mlp.gate": (1, 1),
        "mlp.up": (3, -4), "mlp.down": (-1, 2), "norm": (2, 0), "embed": (0, 2), "lm_head": (1, 0)}
EXPERT_COEF = {1: (1, 0), 2: (-2, 0), 3: (0, 1)}  # U_e = M_e − M_0 of the new experts


def _coef(layer: int | None, group: str) -> tuple[int, int]:
    a, b = COEF[group]
    return (-a if layer is not None and layer % 2 else a), b


def _expect(a: float, b: float) -> tuple[float | None, float]:
    r = math.hypot(a, b)
    return (a / r if r else None), r


def _perp(d: torch.Tensor) -> torch.Tensor:
    """Δ⊥: the pairs (x, y) of Δ turned to (y, −x): same norm, dot product exactly 0."""
    assert d.numel() % 2 == 0
    p = d.reshape(-1, 2)
    return torch.stack([p[:, 1], -p[:, 0]], 1).reshape(d.shape)


def _world(dense_model, root: Path, variant: str = "llama-untied-gqa") -> dict:
    """B (on the 1/Q grid), Δ per tensor, P = B + Δ, B' = B + U per tensor (COEF)."""
    src = dense_model(variant)
    cfg = open_checkpoint(src).config
    b = {n: (t.double() * Q).round().float() / Q for n, t in load_all(src).items()}
    g = torch.Generator().manual_seed(3)
    d = {n: torch.randint(-8, 9, t.shape, generator=g).float() / Q for n, t in b.items()}
    groups = {n: group_of(n, _ffn(cfg)) for n in b}
    u = {n: _coef(*groups[n])[0] * d[n] + _coef(*groups[n])[1] * _perp(d[n]) for n in b}
    return {"B": save(root / "B", b, cfg), "P": save(root / "P", {n: b[n] + d[n] for n in b}, cfg),
            "C": save(root / "C", {n: b[n] + u[n] for n in b}, cfg), "b": b, "d": d, "cfg": cfg, "groups": groups}


def _ffn(cfg: dict) -> dict[str, tuple[int, str]]:
    from deltamoe.arch import arch_for

    spec = arch_for(cfg)
    return {spec.dense_name(r, i): (i, f"mlp.{r}") for r in ("gate", "up", "down") for i in range(cfg["num_hidden_layers"])}


def _dnorm(w: dict, names: list[str]) -> float:
    return math.sqrt(sum(float((w["d"][n].double() ** 2).sum()) for n in names))


def _check_dense_rows(res: dict, w: dict) -> None:
    seen = set()
    for row in res["rows"]:
        assert row["kind"] == "dense" and row["expert"] is None
        names = [n for n, lg in w["groups"].items() if lg == (row["layer"], row["group"])]
        assert sorted(row["tensors"]) == sorted(names)
        cos, ratio = _expect(*_coef(row["layer"], row["group"]))
        assert row["delta_norm"] == pytest.approx(_dnorm(w, names), rel=1e-12)
        assert row["ratio"] == pytest.approx(ratio, rel=1e-12, abs=0)
        assert row["u_norm"] == pytest.approx(ratio * row["delta_norm"], rel=1e-12, abs=0)
        if cos is None:
            assert row["cosine"] is None and row["frozen"] and row["u_norm"] == 0
        else:
            assert row["cosine"] == pytest.approx(cos, abs=1e-12) and not row["frozen"]
        seen.add(row["group"])
    assert seen == set(COEF)  # every group of the family appears
    assert sum(len(r["tensors"]) for r in res["rows"]) == len(w["b"])


# -- what must hold ---------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", ["llama-untied-gqa", "qwen3-untied"])
def test_dense_cpt_norms_and_cosines_by_hand(variant: str, dense_model, tmp_path: Path) -> None:
    w = _world(dense_model, tmp_path, variant)
    res = inspect_conflict(tmp_path / "out", base=w["B"], post=w["P"], cpt=w["C"], progress=False)
    _check_dense_rows(res, w)
    # the layer-0 cases of the brief: U = Δ, U = −2Δ, U ⟂ Δ
    row = {(r["layer"], r["group"]): r for r in res["rows"]}
    assert row[(0, "attn.q")]["cosine"] == pytest.approx(1.0, abs=1e-12) and row[(0, "attn.q")]["ratio"] == 1.0
    assert row[(0, "attn.k")]["cosine"] == pytest.approx(-1.0, abs=1e-12) and row[(0, "attn.k")]["ratio"] == 2.0
    assert row[(0, "attn.v")]["cosine"] == pytest.approx(0.0, abs=1e-12)
    assert row[(1, "attn.q")]["cosine"] == pytest.approx(-1.0, abs=1e-12)
    on_disk = json.loads((tmp_path / "out" / "inspect.json").read_text())
    assert on_disk["rows"] == res["rows"] and (tmp_path / "out" / "inspect.png").stat().st_size > 0
    # the delta artifact gives the same numbers as B and P
    d = extract_delta(w["B"], w["P"], tmp_path / "D", progress=False)
    res2 = inspect_conflict(tmp_path / "out2", base=w["B"], delta=d, cpt=w["C"], progress=False)
    assert res2["rows"] == res["rows"] and res2["inputs"]["delta"] == str(d)


def _moe_world(dense_model, root: Path, variant: str) -> dict:
    """M upcycled from B; new experts M_e = M_0 + aΔ_ffn + bΔ⊥ (EXPERT_COEF), routers changed, and one
    shared tensor (layer 1's q projection) moved by exactly Δ; everything else as upcycled."""
    w = _world(dense_model, root, variant)
    m = upcycle(w["B"], root / "M", num_experts=4, top_k=2, progress=False)
    info = read_manifest(m)["moe"]  # type: ignore[index]
    t = load_all(m)
    for layer in info["moe_layers"]:
        for role, tmpl in info["names"]["expert_ffn"].items():
            dn = info["names"]["dense_ffn"][role].format(layer=layer)
            for e, (a, b) in EXPERT_COEF.items():
                name = tmpl.format(layer=layer, expert=e)
                t[name] = t[tmpl.format(layer=layer, expert=0)] + a * w["d"][dn] + b * _perp(w["d"][dn])
        t[info["names"]["router"].format(layer=layer)] += 0.5
    q1 = "model.layers.1.self_attn.q_proj.weight"
    t[q1] = t[q1] + w["d"][q1]
    w.update(M=save(root / "Mcpt", t, open_checkpoint(m).config, copy_from=m), info=info, q1=q1)
    return w


@pytest.mark.parametrize("variant", ["llama-untied-gqa", "qwen3-untied"])
def test_moe_new_experts_against_expert0(variant: str, dense_model, tmp_path: Path) -> None:
    w = _moe_world(dense_model, tmp_path, variant)
    res = inspect_conflict(tmp_path / "out", base=w["B"], post=w["P"], moe=w["M"], progress=False)
    assert res["mode"] == "moe"
    n_layers = w["cfg"]["num_hidden_layers"]
    experts = [r for r in res["rows"] if r["kind"] == "expert"]
    assert len(experts) == n_layers * 3 * 4
    for r in experts:
        dn = w["info"]["names"]["dense_ffn"][r["group"].split(".")[1]].format(layer=r["layer"])
        assert r["delta_norm"] == pytest.approx(_dnorm(w, [dn]), rel=1e-12)
        if r["expert"] == 0:  # frozen: M_0 − B = 0
            assert r["frozen"] and r["u_norm"] == 0 and r["cosine"] is None and r["update"] == "M - B"
            continue
        cos, ratio = _expect(*EXPERT_COEF[r["expert"]])
        assert r["update"] == "M_e - M_0" and r["ratio"] == pytest.approx(ratio, rel=1e-12)
        assert r["cosine"] == pytest.approx(cos, abs=1e-12)
    shared = [r for r in res["rows"] if r["kind"] == "shared"]
    assert {(r["layer"], r["group"]) for r in shared} >= {(None, "embed"), (0, "attn.q"), (None, "lm_head")}
    for r in shared:
        if r["tensors"] == [w["q1"]]:
            assert r["cosine"] == pytest.approx(1.0, abs=1e-12) and r["ratio"] == 1.0
        else:
            assert r["frozen"] and r["u_norm"] == 0 and r["delta_norm"] > 0
    # the summary takes the new experts of a group together: [U_1, U_2, U_3] against [Δ, Δ, Δ]
    s = next(r for r in res["summary"] if r["which"] == "new experts" and r["layer"] == 0 and r["group"] == "mlp.up")
    assert s["experts"] == [1, 2, 3]
    assert s["cosine"] == pytest.approx((1 - 2 + 0) / math.sqrt(1 + 4 + 1) / math.sqrt(3), abs=1e-12)
    assert s["ratio"] == pytest.approx(math.sqrt((1 + 4 + 1) / 3), rel=1e-12)
    routers = {w["info"]["names"]["router"].format(layer=i) for i in range(n_layers)}
    assert not routers & {t["name"] for t in res["tensors"]}
    assert any("expert-0 tensors: bit-identical to B" in n for n in res["notes"])
    n_shared = sum(len(r["tensors"]) for r in shared)
    assert f"U = 0 in {n_shared - 1} of {n_shared} shared tensors of M (bit-identical to B there)" in res["notes"]
    # with a delta artifact and no base: the new experts only, same numbers
    d = extract_delta(w["B"], w["P"], tmp_path / "D", progress=False)
    res2 = inspect_conflict(tmp_path / "out2", delta=d, moe=w["M"], progress=False)
    assert res2["rows"] == [r for r in experts if r["expert"] != 0]
    assert any("no --base" in n for n in res2["notes"])


def test_streams_in_row_chunks(dense_model, tmp_path: Path, monkeypatch) -> None:
    """Tiny chunks give the same numbers (to summation order), and no tensor is ever read whole."""
    import deltamoe.io as ck
    import deltamoe.engine as engine

    w = _world(dense_model, tmp_path)
    whole = inspect_conflict(tmp_path / "a", base=w["B"], post=w["P"], cpt=w["C"], progress=False)
    monkeypatch.setattr(engine, "CHUNK_ELEMS", 40)
    monkeypatch.setattr(ck.Checkpoint, "read", lambda self, name: pytest.fail(f"{name} read whole"))
    chunked = inspect_conflict(tmp_path / "b", base=w["B"], post=w["P"], cpt=w["C"], progress=False)
    for r, q in zip(whole["rows"], chunked["rows"], strict=True):
        assert r["tensors"] == q["tensors"] and r["numel"] == q["numel"]
        for key in ("u_norm", "delta_norm", "ratio", "cosine"):
            assert q[key] == (None if r[key] is None else pytest.approx(r[key], rel=1e-12, abs=1e-12))


def test_cli_table_files_and_umask(dense_model, tmp_path: Path) -> None:
    w = _moe_world(dense_model, tmp_path, "llama-untied-gqa")
    old = os.umask(0o022)
    try:
        res = runner.invoke(app, ["inspect", "--out", str(tmp_path / "o"), "--moe", str(w["M"]), "--base",
                                  str(w["B"]), "--post", str(w["P"]), "-q"])
    finally:
        os.umask(old)
    assert res.exit_code == 0, res.output
    lines = res.output.splitlines()
    assert "cos(U,Δ)" in lines[0] and any("frozen" in ln for ln in lines)
    row = next(ln.split() for ln in lines if ln.split()[:4] == ["0", "mlp.gate", "experts", "1-3"])
    assert float(row[-1]) == pytest.approx((1 - 2) / math.sqrt(6) / math.sqrt(3), abs=1e-4)
    assert lines[-1] == f"wrote {tmp_path / 'o'}"
    out = tmp_path / "o"
    assert stat.S_IMODE(out.stat().st_mode) == 0o755
    assert sorted(p.name for p in out.iterdir()) == ["inspect.json", "inspect.png"]
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o644 for p in out.iterdir())


def test_failure_while_writing_leaves_nothing(dense_model, tmp_path: Path, monkeypatch) -> None:
    w = _world(dense_model, tmp_path)
    import deltamoe.inspect as ins

    def broken(result, path):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ins, "plot", broken)
    with pytest.raises(OutputError, match="No space left"):
        inspect_conflict(tmp_path / "out", base=w["B"], post=w["P"], cpt=w["C"], progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["B", "C", "P"]


# -- bad input: one error line naming the file or tensor, exit 1, nothing written ---------------------
CASES = ["post-shape", "cpt-missing-tensor", "cpt-shape", "cpt-other-family", "moe-other-family", "missing-post",
         "cpt-no-config", "cpt-nan", "cpt-without-base", "two-models", "moe-not-moe", "delta-other-base", "exists"]


@pytest.mark.parametrize("case", CASES)
def test_bad_input(case: str, dense_model, tmp_path: Path) -> None:
    w = _world(dense_model, tmp_path)
    b, p, c = w["B"], w["P"], w["C"]
    args = ["--base", str(b), "--post", str(p), "--cpt", str(c)]
    out = tmp_path / "out"
    if case == "post-shape":
        t = load_all(p)
        t["model.layers.1.self_attn.o_proj.weight"] = t["model.layers.1.self_attn.o_proj.weight"][:, :16].contiguous()
        args[3] = str(save(tmp_path / "Pbad", t, w["cfg"]))
        expect = ["model.layers.1.self_attn.o_proj.weight", "[32, 16]", "[32, 32]"]
    elif case in ("cpt-missing-tensor", "cpt-shape", "cpt-nan"):
        t = load_all(c)
        name = "model.layers.2.post_attention_layernorm.weight"
        if case == "cpt-missing-tensor":
            del t[name]
        elif case == "cpt-shape":
            t[name] = t[name][:16].contiguous()
        else:
            t[name][3] = float("nan")
        bad = save(tmp_path / "Cbad", t, w["cfg"])
        args[5] = str(bad)
        expect = {"cpt-missing-tensor": [name, str(bad)], "cpt-shape": [name, "[16]", "[32]"],
                  "cpt-nan": [name, str(bad / "model.safetensors"), "non-finite"]}[case]
    elif case == "cpt-other-family":
        args[5] = str(dense_model("qwen3-untied"))
        expect = ["model_type = 'qwen3'", "'llama'", args[5]]
    elif case == "moe-other-family":
        m = upcycle(dense_model("qwen3-untied"), tmp_path / "Mq", num_experts=2, top_k=1, progress=False)
        args[4:] = ["--moe", str(m)]
        expect = [str(m), "qwen3"]
    elif case == "missing-post":
        args[3] = str(tmp_path / "nope")
        expect = [str(tmp_path / "nope"), "no such directory"]
    elif case == "cpt-no-config":
        (c / "config.json").unlink()
        expect = [str(c), "missing config.json"]
    elif case == "cpt-without-base":
        args = ["--delta", str(extract_delta(b, p, tmp_path / "D", progress=False)), "--cpt", str(c)]
        expect = ["--cpt B' needs --base B"]
    elif case == "two-models":
        args += ["--moe", str(c)]
        expect = ["exactly one updated model"]
    elif case == "moe-not-moe":
        args[4:] = ["--moe", str(c)]
        expect = [str(c), "no deltamoe.json", "--cpt"]
    elif case == "delta-other-base":
        other = dense_model("llama-untied-gqa", intermediate_size=40)
        args = ["--delta", str(extract_delta(b, p, tmp_path / "D", progress=False)), "--base", str(other),
                "--cpt", str(c)]
        expect = [str(other / "config.json"), "intermediate_size = 40"]
    else:  # exists
        out.mkdir()
        (out / "keep").write_text("x")
        expect = ["already exists; pass --force"]
    res = runner.invoke(app, ["inspect", "--out", str(out), *args, "-q"])
    assert res.exit_code == 1, res.output
    assert res.output.startswith("error: ") and "Traceback" not in res.output, res.output
    flat = " ".join(res.output.split())
    for piece in expect:
        assert piece in flat, (piece, res.output)
    if case == "exists":
        assert [q.name for q in out.iterdir()] == ["keep"]
    else:
        assert not out.exists()
    assert not [q for q in tmp_path.iterdir() if q.name.startswith(".out.")], "temporary directory left behind"


def test_group_names() -> None:
    assert group_of("model.layers.3.self_attn.q_proj.weight") == (3, "attn.q")
    assert group_of("model.layers.3.self_attn.k_proj.bias") == (3, "attn.k")
    assert group_of("model.layers.0.self_attn.q_norm.weight") == (0, "norm")
    assert group_of("model.layers.12.post_attention_layernorm.weight") == (12, "norm")
    assert group_of("model.embed_tokens.weight") == (None, "embed")
    assert group_of("model.norm.weight") == (None, "norm")
    assert group_of("lm_head.weight") == (None, "lm_head")
    assert group_of("x.mlp.w1.weight", {"x.mlp.w1.weight": (5, "mlp.gate")}) == (5, "mlp.gate")
