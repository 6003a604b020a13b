"""Dense merge baselines agree with mergekit (the field's reference implementation)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from delta_fixtures import TOKENIZER_FILES, load_all, perturbed
from typer.testing import CliRunner

from deltamoe.io import open_checkpoint
from deltamoe.cli import app
from deltamoe.ops.extract import extract_delta
from deltamoe.errors import DeltaMoEError
from deltamoe.ops.merge import merge
from deltamoe.ops.merge_methods import random_drop
from deltamoe.io.provenance import describe_checkpoint, read_manifest

runner = CliRunner()


@pytest.fixture(scope="module")
def bcp(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """B, a continued-pretrained C (norms frozen, as far as this test cares) and a post-trained P."""
    from tiny_models import make_dense

    root = tmp_path_factory.mktemp("merge")
    b = make_dense("llama-untied-gqa", root / "B", seed=0)
    c = perturbed(b, root / "C", seed=1, scale=0.1, keep=lambda n: n.endswith("norm.weight"))
    p = perturbed(b, root / "P", seed=2, scale=0.1, tokenizer=True, config_changes={"eos_token_id": 7})
    return {"B": b, "C": c, "P": p}


def _mergekit(method: str, base: Path, models: list[tuple[Path, dict]], out: Path, params: dict | None = None,
              masks_from_seed: int | None = None, labels: dict[str, str] | None = None) -> dict[str, torch.Tensor]:
    """Run mergekit's own pipeline in this process (float32). With ``masks_from_seed``, DARE's random
    masks are the ones deltamoe draws for (seed, tensor, input): mergekit's randomness, fixed."""
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge
    from mergekit.merge_methods import generalized_task_arithmetic as gta

    from deltamoe.ops.common import seeded_generator as _generator

    cfg = {"merge_method": method, "base_model": str(base), "dtype": "float32",
           "models": [{"model": str(p), "parameters": prm} for p, prm in models]}
    if params:
        cfg["parameters"] = params
    original_merge_group = gta.GeneralizedTaskArithmeticMerge.merge_group
    original_bernoulli = torch.bernoulli

    def merge_group(self, group, **parameters):  # type: ignore[no-untyped-def]
        queue = []
        for entry in group.non_base:
            label = labels[str(entry.id.model.path)]  # type: ignore[index]
            queue.append(_generator(masks_from_seed, group.metadata.name, label))
        it = iter(queue)

        def bernoulli(p, *a, **k):  # type: ignore[no-untyped-def]
            return torch.empty_like(p).bernoulli_(float(p.reshape(-1)[0]), generator=next(it))

        torch.bernoulli = bernoulli  # type: ignore[assignment]
        try:
            return original_merge_group(self, group, **parameters)
        finally:
            torch.bernoulli = original_bernoulli

    if masks_from_seed is not None:
        gta.GeneralizedTaskArithmeticMerge.merge_group = merge_group  # type: ignore[method-assign]
    try:
        run_merge(MergeConfiguration.model_validate(cfg), str(out),
                  MergeOptions(quiet=True, copy_tokenizer=False, write_model_card=False))
    finally:
        gta.GeneralizedTaskArithmeticMerge.merge_group = original_merge_group  # type: ignore[method-assign]
    return load_all(out)


CASES = {
    # name: (our kwargs, mergekit method, per-model params, global params)
    "paramdelta": (dict(method="paramdelta"), "task_arithmetic", [{"weight": 1.0}, {"weight": 1.0}], None),
    "task_arithmetic": (dict(method="task_arithmetic", weights=(0.7, 0.4), lambda_=0.9), "task_arithmetic",
                        [{"weight": 0.7}, {"weight": 0.4}], {"lambda": 0.9}),
    "ties": (dict(method="ties", weights=(0.7, 0.5), density=0.4), "ties",
             [{"weight": 0.7, "density": 0.4}, {"weight": 0.5, "density": 0.4}], None),
    "ties-no-normalize": (dict(method="ties", weights=(1.0, 1.0), density=0.6, normalize=False, lambda_=0.8), "ties",
                          [{"weight": 1.0, "density": 0.6}, {"weight": 1.0, "density": 0.6}],
                          {"normalize": False, "lambda": 0.8}),
    "dare_linear": (dict(method="dare_linear", weights=(0.8, 0.6), density=0.3, seed=5), "dare_linear",
                    [{"weight": 0.8, "density": 0.3}, {"weight": 0.6, "density": 0.3}], None),
    "dare_ties": (dict(method="dare_ties", weights=(1.0, 0.5), density=0.5, seed=6), "dare_ties",
                  [{"weight": 1.0, "density": 0.5}, {"weight": 0.5, "density": 0.5}], None),
}


@pytest.mark.parametrize("case", list(CASES))
def test_agrees_with_mergekit(case: str, bcp: dict[str, Path], tmp_path: Path) -> None:
    kw, mk_method, mk_params, mk_global = CASES[case]
    kw = dict(kw)
    weights = kw.pop("weights", (None, None))
    models = [(bcp["C"], weights[0]), (bcp["P"], weights[1])]
    ours = load_all(merge(models, tmp_path / "ours", base=bcp["B"], progress=False, **kw))  # type: ignore[arg-type]
    seed = kw.get("seed") if mk_method.startswith("dare") else None
    theirs = _mergekit(mk_method, bcp["B"], list(zip([bcp["C"], bcp["P"]], mk_params)), tmp_path / "mk", mk_global,
                       masks_from_seed=seed, labels={str(bcp["C"]): "model_0", str(bcp["P"]): "model_1"})
    assert ours.keys() == theirs.keys()
    for n in ours:
        assert ours[n].dtype == theirs[n].dtype == torch.float32
        torch.testing.assert_close(ours[n], theirs[n], rtol=0, atol=2e-6, msg=n)
    if kw.get("density"):  # sparsification happened: not trivially task arithmetic
        ta = load_all(merge(models, tmp_path / "ta", base=bcp["B"], method="task_arithmetic", progress=False))
        assert any((ours[n] - ta[n]).abs().max() > 1e-3 for n in ours)


def test_paramdelta_keeps_post_where_cpt_did_not_train(bcp: dict[str, Path], tmp_path: Path) -> None:
    out = merge([bcp["C"], bcp["P"]], tmp_path / "pd", base=bcp["B"], method="paramdelta", progress=False)
    o, b, c, p = load_all(out), load_all(bcp["B"]), load_all(bcp["C"]), load_all(bcp["P"])
    for n in o:
        want = (c[n].float() + (p[n].float() - b[n].float()))
        assert torch.equal(o[n], want)
        if n.endswith("norm.weight"):  # C == B there, so C + (P - B) is P up to float32 rounding
            assert ((o[n] - p[n]).abs() <= torch.maximum(p[n].abs(), b[n].abs()) * 2.0**-23).all()
    for name, text in TOKENIZER_FILES.items():  # tokenizer and chat template of P (the last model)
        assert (out / name).read_text() == text
    assert json.loads((out / "config.json").read_text())["eos_token_id"] == 7
    man = read_manifest(out)
    assert man is not None and man["stage"] == "merge:paramdelta"
    for key, path in (("base", bcp["B"]), ("model_0", bcp["C"]), ("model_1", bcp["P"])):
        assert man["stages"][-1]["inputs"][key]["sha256"] == describe_checkpoint(open_checkpoint(path))["sha256"]


def test_delta_artifact_in_merges(bcp: dict[str, Path], tmp_path: Path) -> None:
    d = extract_delta(bcp["B"], bcp["P"], tmp_path / "D", progress=False)
    pair = load_all(merge([bcp["C"], bcp["P"]], tmp_path / "a", base=bcp["B"], method="paramdelta", progress=False))
    res = runner.invoke(app, ["merge", str(tmp_path / "b"), "--method", "paramdelta", "--model", str(bcp["C"]),
                              "--delta", str(d), "-q"])
    assert res.exit_code == 0, res.output
    art = load_all(tmp_path / "b")
    assert all(torch.equal(pair[n], art[n]) for n in pair)
    for name in TOKENIZER_FILES:
        assert (tmp_path / "b" / name).read_bytes() == (bcp["P"] / name).read_bytes()
    ta = load_all(merge([(bcp["C"], 0.7), (bcp["P"], 0.4)], tmp_path / "c", base=bcp["B"], method="task_arithmetic",
                        progress=False))
    ta_d = load_all(merge([(bcp["C"], 0.7)], tmp_path / "d", base=bcp["B"], delta=(d, 0.4), method="task_arithmetic",
                          progress=False))
    assert all(torch.equal(ta[n], ta_d[n]) for n in ta)


@pytest.mark.parametrize("method", ["paramdelta", "task_arithmetic", "ties"])
def test_chunked_streaming_equals_whole_tensors(method: str, bcp: dict[str, Path], tmp_path: Path,
                                                monkeypatch) -> None:
    import deltamoe.engine

    p2 = perturbed(bcp["B"], tmp_path / "P2", seed=4, add_rows=2)
    kw = dict(base=bcp["B"], method=method, progress=False, **({"density": 0.5} if method == "ties" else {}))
    monkeypatch.setattr(deltamoe.engine, "CHUNK_ELEMS", 10**9)
    whole = load_all(merge([bcp["C"], p2], tmp_path / "whole", **kw))  # type: ignore[arg-type]
    monkeypatch.setattr(deltamoe.engine, "CHUNK_ELEMS", 1)
    rows = load_all(merge([bcp["C"], p2], tmp_path / "rows", buffer_bytes=1, **kw))  # type: ignore[arg-type]
    assert whole.keys() == rows.keys() and all(torch.equal(whole[n], rows[n]) for n in whole)


def test_tokenizer_from(bcp: dict[str, Path], tmp_path: Path) -> None:
    """The tokenizer, chat template and config come from the last model unless --tokenizer-from says otherwise."""
    res = runner.invoke(app, ["merge", str(tmp_path / "o"), "--method", "task_arithmetic", "--base", str(bcp["B"]),
                              "--model", str(bcp["P"]), "--model", str(bcp["C"]), "--tokenizer-from", str(bcp["P"]),
                              "-q"])
    assert res.exit_code == 0, res.output
    for name, text in TOKENIZER_FILES.items():
        assert (tmp_path / "o" / name).read_text() == text
    assert json.loads((tmp_path / "o" / "config.json").read_text())["eos_token_id"] == 7
    out = merge([bcp["P"], bcp["C"]], tmp_path / "last", base=bcp["B"], method="task_arithmetic", progress=False)
    assert not (out / "chat_template.jinja").exists()  # C (last) has none
    res = runner.invoke(app, ["merge", str(tmp_path / "x"), "--method", "task_arithmetic", "--base", str(bcp["B"]),
                              "--model", str(bcp["C"]), "--tokenizer-from", str(tmp_path), "-q"])
    assert res.exit_code == 1 and "--tokenizer-from" in res.output


def test_dare_statistics_and_determinism(bcp: dict[str, Path], tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    d = torch.randn(400, 500, generator=g)
    for density in (0.1, 0.5, 0.9):
        kept_inv = random_drop(d, density, "inverse", torch.Generator().manual_seed(1))
        mask = kept_inv != 0
        n = d.numel()
        frac = mask.float().mean().item()
        assert abs(frac - density) < 5 * (density * (1 - density) / n) ** 0.5  # within 5 sigma of Binomial
        assert torch.equal(kept_inv[mask], d[mask] / density)  # rescaled by exactly 1/density
        kept_l1 = random_drop(d, density, "l1", torch.Generator().manual_seed(1))
        assert torch.equal(kept_l1 != 0, mask)  # same seed, same mask
        assert abs(kept_l1.abs().sum().item() / d.abs().sum().item() - 1) < 1e-5  # L1 norm kept
        factor = (kept_l1[mask] / d[mask]).mean().item()
        assert abs(factor * density - 1) < 0.05  # ~1/density
    models = [bcp["C"], bcp["P"]]
    kw = dict(base=bcp["B"], method="dare_ties", density=0.5, progress=False)
    a = load_all(merge(models, tmp_path / "s1", seed=1, **kw))  # type: ignore[arg-type]
    b = load_all(merge(models, tmp_path / "s1b", seed=1, **kw))  # type: ignore[arg-type]
    c = load_all(merge(models, tmp_path / "s2", seed=2, **kw))  # type: ignore[arg-type]
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert (tmp_path / "s1" / "model-00001-of-00001.safetensors").read_bytes() == \
        (tmp_path / "s1b" / "model-00001-of-00001.safetensors").read_bytes()
    assert any(not torch.equal(a[n], c[n]) for n in a)


def test_added_vocabulary_rows_come_from_post(bcp: dict[str, Path], tmp_path: Path) -> None:
    p2 = perturbed(bcp["B"], tmp_path / "P2", seed=3, add_rows=4, tokenizer=True)
    for method, extra in (("paramdelta", {}), ("ties", {"density": 0.5})):
        out = merge([bcp["C"], p2], tmp_path / method, base=bcp["B"], method=method, progress=False, **extra)
        o, p = load_all(out), load_all(p2)
        assert json.loads((out / "config.json").read_text())["vocab_size"] == 101
        for n in ("model.embed_tokens.weight", "lm_head.weight"):
            assert o[n].shape == (101, 32) and torch.equal(o[n][97:], p[n][97:])
    with pytest.raises(DeltaMoEError, match="only the tokenizer source may add vocabulary rows"):
        merge([p2, bcp["C"]], tmp_path / "x", base=bcp["B"], method="task_arithmetic", progress=False)


@pytest.mark.parametrize("case", ["ties-no-density", "density-for-ta", "paramdelta-3", "paramdelta-weights",
                                  "delta-other-base", "nan-model", "shape-mismatch", "no-base"])
def test_bad_input(case: str, bcp: dict[str, Path], tmp_path: Path) -> None:
    from delta_fixtures import save

    b, c, p = (str(bcp[k]) for k in "BCP")
    out = tmp_path / "out"
    args = {
        "ties-no-density": ["--method", "ties", "--base", b, "--model", c, "--model", p],
        "density-for-ta": ["--method", "task_arithmetic", "--base", b, "--model", c, "--density", "0.5"],
        "paramdelta-3": ["--method", "paramdelta", "--base", b, "--model", c, "--model", p, "--model", p],
        "paramdelta-weights": ["--method", "paramdelta", "--base", b, "--model", f"{c}:0.5", "--model", p],
        "no-base": ["--method", "ties", "--model", c, "--model", p, "--density", "0.5"],
    }.get(case)
    expect: list[str]
    if case == "delta-other-base":
        b2 = perturbed(bcp["B"], tmp_path / "B2", seed=9)
        d = extract_delta(b2, bcp["P"], tmp_path / "D", progress=False)
        args = ["--method", "task_arithmetic", "--base", b, "--model", c, "--delta", str(d)]
        expect = [str(d), "extracted against the base", str(b2)]
    elif case == "nan-model":
        t = load_all(bcp["C"])
        t["model.layers.0.self_attn.k_proj.weight"][1, 1] = float("-inf")
        bad = save(tmp_path / "Cinf", t, open_checkpoint(bcp["C"]).config)
        args = ["--method", "ties", "--density", "0.5", "--base", b, "--model", str(bad), "--model", p]
        expect = ["model.layers.0.self_attn.k_proj.weight", str(bad / "model.safetensors"), "non-finite"]
    elif case == "shape-mismatch":
        t = load_all(bcp["C"])
        t["model.layers.1.mlp.down_proj.weight"] = t["model.layers.1.mlp.down_proj.weight"][:, :40].contiguous()
        bad = save(tmp_path / "Cbad", t, open_checkpoint(bcp["C"]).config)
        args = ["--method", "task_arithmetic", "--base", b, "--model", str(bad), "--model", p]
        expect = ["model.layers.1.mlp.down_proj.weight", "[32, 40]", "[32, 48]"]
    else:
        expect = {"ties-no-density": ["--density"], "density-for-ta": ["--density"],
                  "paramdelta-3": ["paramdelta"], "paramdelta-weights": ["weights"], "no-base": ["--base"]}[case]
    assert args is not None
    res = runner.invoke(app, ["merge", str(out), *args, "-q"])
    assert res.exit_code == 1, res.output
    flat = " ".join(res.output.split())
    for piece in expect:
        assert piece in flat, (piece, res.output)
    assert not out.exists() and not [x for x in tmp_path.iterdir() if x.name.startswith(".out.")]


_CHILD = """
import json, sys
import deltamoe.ops.merge, transformers  # imports are the interpreter baseline
# ru_maxrss would carry the parent's peak over fork+exec: reset the high-water mark instead
def status(key): return int(next(l for l in open("/proc/self/status") if l.startswith(key)).split()[1]) * 1024
open("/proc/self/clear_refs", "w").write("5")
base_rss = status("VmRSS:")
deltamoe.ops.merge.merge([sys.argv[3], sys.argv[4]], sys.argv[1], base=sys.argv[2], method="paramdelta", progress=False,
                     buffer_bytes=int(sys.argv[5]))
print(json.dumps({"baseline": base_rss, "peak": status("VmHWM:")}))
"""


@pytest.mark.slow
def test_paramdelta_peak_rss_is_bounded(tmp_path: Path) -> None:
    """Peak memory is the engine's buffers plus a few chunks, whatever the size of the models."""
    from deltamoe.synthetic import llama_config, write_dense

    cfg = llama_config(hidden=512, intermediate=1536, layers=12, vocab=16384, heads=8, kv_heads=4)
    paths = [write_dense(tmp_path / n, cfg, seed=s) for s, n in enumerate("BCP")]
    buffer = 8 * 2**20
    res = subprocess.run([sys.executable, "-c", _CHILD, str(tmp_path / "out"), *map(str, paths), str(buffer)],
                         capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr
    r = json.loads(res.stdout.strip().splitlines()[-1])
    above = r["peak"] - r["baseline"]
    ck = open_checkpoint(paths[0])
    # read-ahead + write-behind buffers, a few 4 MB chunks in flight, and what the allocator keeps
    bound = 2 * buffer + 128 * 2**20
    print(f"peak above baseline {above / 2**20:.0f} MiB (bound {bound / 2**20:.0f}), "
          f"largest tensor {ck.largest_tensor_bytes / 2**20:.0f} MiB, each input {ck.total_bytes / 2**20:.0f} MiB")
    assert ck.total_bytes > 1.4 * bound  # holding even one input model would break the bound
    assert above < bound
