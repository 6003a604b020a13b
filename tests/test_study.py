"""`deltamoe study` on the micro toy: seeds x variants sharing one cache, the report's statistics,
resuming after SIGKILL, and bad study files refused before any stage runs."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import yaml
from micro_demo import micro_demo
from typer.testing import CliRunner

from deltamoe.cli import app
from deltamoe.errors import UsageError
from deltamoe.config_files import set_dotted
from deltamoe.study import load_study, plan_runs, run_study
from deltamoe.study_report import bootstrap, study_numbers


def _micro_recipe(tmp: Path) -> Path:
    r = micro_demo(review="before_graft", arch="llama", post="instruct")  # the kill test stops router_review
    r["baselines"] = ["post", "moe_lpr"]
    for stage in ("post_pretrain", "router_review"):
        r["train"][stage]["train"].update(steps=30 if stage == "router_review" else 4, micro_batch_size=4,
                                          warmup_steps=1)
        r["train"][stage]["data"]["seq_len"] = 32
    r["train"]["router_review"]["checkpoint"] = {"every": 1, "keep_last": 1}
    r["eval"].update(max_items=4, batch_size=8)
    p = tmp / "micro.yaml"
    p.write_text(yaml.safe_dump(r))
    return p


def _study(tmp: Path, **fields) -> Path:
    spec = {"name": "s", "recipe": "micro.yaml", "seeds": [0, 1], "bootstrap": 200,
            "variants": {"default": {}, "unmasked": {"train.post_pretrain.routing.allocated": False}}, **fields}
    p = tmp / "study.yaml"
    p.write_text(yaml.safe_dump(spec))
    return p


def _seed_toy(study: Path, toy_micro: Path) -> None:
    """Put the session's micro build where the study's toy stage writes (it is the same build)."""
    from deltamoe.pipeline.graph import build_plan
    from deltamoe.recipe import load_recipe
    from deltamoe.study import _write_run

    spec, sdir = load_study(study)
    workdir, runs = plan_runs(spec, sdir)
    out = build_plan(*load_recipe(_write_run(runs[0], workdir)), local_only=True)[0][0].out
    if not out.exists():
        shutil.copytree(toy_micro, out)


def test_bootstrap_interval_covers_the_mean_and_shrinks_with_items() -> None:
    rng = np.random.default_rng(0)
    small = [rng.random(50) < 0.3 for _ in range(3)]
    large = [rng.random(2000) < 0.3 for _ in range(3)]
    for data in (small, large):
        mean, lo, hi = bootstrap([a.astype(float) for a in data], 500, 1)
        assert lo <= mean <= hi and mean == pytest.approx(np.mean([a.mean() for a in data]))
    assert (bootstrap([a.astype(float) for a in large], 500, 1)[2] - bootstrap([a.astype(float) for a in large], 500, 1)[1]
            < bootstrap([a.astype(float) for a in small], 500, 1)[2] - bootstrap([a.astype(float) for a in small], 500, 1)[1])
    # the same data and seed: the same interval
    assert bootstrap([small[0].astype(float)], 300, 7) == bootstrap([small[0].astype(float)], 300, 7)


def test_rows_follow_the_variants_that_evaluate_each_system(tmp_path: Path) -> None:
    """A variant that leaves a baseline out has no row for it (the other variants keep theirs); a
    baseline two of three variants share is one row named by them; differences pair each
    variant's compare system with the rows that hold its variant."""
    from types import SimpleNamespace

    spec = SimpleNamespace(name="s", seeds=[0, 1], variants={"a": {}, "b": {}, "c": {}}, compare="deltamoe",
                           bootstrap=50)
    evals = {("deltamoe", v): f"d-{v}" for v in "abc"} | {("post", v): "p" for v in "abc"}
    evals |= {("dense_cpt", "a"): "dc", ("dense_cpt", "b"): "dc"}  # c leaves the baseline out
    runs = []
    for v in "abc":
        for seed in (0, 1):
            systems, stages = {}, {}
            for (name, var), key in evals.items():
                if var != v:
                    continue
                d = tmp_path / f"{key}-{seed}"
                (d / "toy").mkdir(parents=True, exist_ok=True)
                rng = np.random.default_rng(zlib.crc32(f"{key}-{seed}".encode()))
                (d / "toy" / "predictions.jsonl").write_text("".join(
                    json.dumps({"lang": lang, "task": "mc_rc", "id": i, "correct": bool(rng.random() < 0.6)}) + "\n"
                    for lang in ("en", "xx") for i in range(20)))
                systems[name] = {"eval_dir": str(d)}
                stages[f"eval-{name}"] = {"key": f"{key}-{seed}"}
            runs.append({"variant": v, "seed": seed, "results": {
                "systems": systems, "stages": stages, "languages": {"original": ["en"], "new": ["xx"]}}})
    numbers = study_numbers(spec, runs)
    assert [(r["system"], r["variant"]) for r in numbers["rows"]] == [
        ("post", "(all)"), ("dense_cpt", "a, b"), ("deltamoe", "a"), ("deltamoe", "b"), ("deltamoe", "c")]
    pairs = {(d["variant"], d["against"], d["against_variant"]) for d in numbers["differences"]}
    assert pairs == {("a", "post", "(all)"), ("b", "post", "(all)"), ("c", "post", "(all)"),
                     ("a", "dense_cpt", "a, b"), ("b", "dense_cpt", "a, b")}


def test_override_sets_nested_fields_and_refuses_values_as_sections() -> None:
    r = {"train": {"post_pretrain": {"train": {"steps": 4}}}, "seed": 0}
    set_dotted(r, "train.post_pretrain.routing.allocated", True, "v")
    set_dotted(r, "train.post_pretrain.train.steps", 9, "v")
    assert r["train"]["post_pretrain"] == {"train": {"steps": 9}, "routing": {"allocated": True}}
    with pytest.raises(UsageError, match="seed is a value, not a section"):
        set_dotted(r, "seed.x", 1, "variant 'v'")
    with pytest.raises(UsageError, match="not a dotted field path"):
        set_dotted(r, "train..x", 1, "variant 'v'")


@pytest.mark.parametrize(("fields", "message"), [
    ({"seeds": []}, "seeds: List should have at least 1 item"),
    ({"seeds": [1, 1]}, "a seed is listed twice"),
    ({"variants": {"bad": {"upcycle.expertz": 3}}}, "variant 'bad', seed 0: .*upcycle.expertz: unknown field"),
    ({"variants": {"bad": {"train.post_pretrain.train.stpes": 3}}}, "variant 'bad', seed 0: .*stpes: unknown field"),
    ({"variants": {"bad": {"train.post_pretrain.routing.alocated": True}}}, "variant 'bad'.*alocated"),
    ({"recipe": "none.yaml"}, "none.yaml: no such recipe file"),
    ({"colour": 1}, "colour: unknown field"),
])
def test_bad_study_files_are_refused_before_any_stage(tmp_path: Path, fields: dict, message: str) -> None:
    _micro_recipe(tmp_path)
    path = _study(tmp_path, **fields)
    res = CliRunner().invoke(app, ["study", str(path)])
    assert res.exit_code == 1, res.output
    err = res.output.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "Traceback" not in res.output
    import re

    assert re.search(message, err[0]), err[0]
    stages = tmp_path / "s" / "stages"
    assert not stages.exists() or not any(stages.iterdir())


@pytest.mark.slow
def test_study_runs_caches_reports_and_resumes_after_sigkill(tmp_path: Path, toy_micro: Path) -> None:
    _micro_recipe(tmp_path)
    study = _study(tmp_path)
    _seed_toy(study, toy_micro)
    work = tmp_path / "s"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-c", "from deltamoe.cli import main; main()", "study", str(study), "--quiet"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    # kill it in the middle of the second run's router review (its step checkpoints appear)
    deadline = time.time() + 600
    target = work / "stages"
    while time.time() < deadline and proc.poll() is None:
        reviews = [p for p in target.glob("router_review-*.run/checkpoints/*") if p.is_dir()]
        if (work / "runs" / "default" / "seed0" / "results.json").is_file() and reviews and len(
                list(target.glob("router_review-*.run"))) >= 2:
            break
        time.sleep(0.2)
    assert proc.poll() is None, proc.stdout.read().decode()[-3000:] if proc.stdout else ""
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before = {p.name for p in target.iterdir() if p.is_dir() and not p.name.startswith(".")}
    assert not (work / "study.md").exists()
    res = run_study(study, progress=False, log=lambda m: None)
    assert Path(res["report"]).is_file()
    numbers = json.loads((work / "study.json").read_text())
    # the toy and B's/P's evaluations are one stage for all four runs; the MoE systems differ by variant
    rows = {(r["system"], r["variant"]): r for r in numbers["rows"]}
    assert set(rows) == {("post", "(all)"), ("moe_lpr", "default"), ("moe_lpr", "unmasked"),
                         ("deltamoe", "default"), ("deltamoe", "unmasked")}
    assert len(list(target.glob("toy-*"))) == 1 and len(list(target.glob("eval-post-*"))) == 1
    assert len([p for p in target.glob("post_pretrain-*") if p.suffix != ".run"]) == 4  # 2 seeds x 2 variants
    for r in numbers["rows"]:
        assert r["seeds"] == [0, 1]
        for cell, st in r["stats"].items():
            assert st["ci"][0] <= st["mean"] <= st["ci"][1], (r["system"], cell)
            assert st["mean"] == pytest.approx(sum(st["per_seed"]) / 2)
    # a per-seed score is the run's own results.json score, pooled over the group's languages
    run0 = json.loads((work / "runs" / "default" / "seed0" / "results.json").read_text())
    toy = run0["systems"]["deltamoe"]["toy"]
    pooled = sum(toy[lang]["qa"] * toy[lang]["qa_n"] for lang in ("vel", "kyr", "tol")) / sum(
        toy[lang]["qa_n"] for lang in ("vel", "kyr", "tol"))
    assert rows[("deltamoe", "default")]["stats"]["qa_new"]["per_seed"][0] == pytest.approx(pooled)
    diffs = {(d["variant"], d["against"], d["against_variant"]) for d in numbers["differences"]}
    assert ("default", "post", "(all)") in diffs and ("unmasked", "moe_lpr", "unmasked") in diffs
    assert ("default", "moe_lpr", "unmasked") not in diffs
    # the stages finished before the kill were not run again
    done_after = {p.name for p in target.iterdir() if p.is_dir() and not p.name.startswith(".")}
    assert done_before <= done_after
    again = run_study(study, progress=False, log=lambda m: None)  # all cached: the same report
    assert json.loads((work / "study.json").read_text()) == numbers and again["runs"] == 4
    for png in ("study_tradeoff_qa", "study_tradeoff_mc"):
        assert (work / "plots" / f"{png}.png").stat().st_size > 1000
