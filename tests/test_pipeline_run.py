"""`deltamoe run` end to end on the micro toy world: every system, traceable numbers, caching,
and a run killed mid-stage that resumes to the same bytes."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from micro_demo import micro_demo

from deltamoe.io import Checkpoint
from deltamoe.pipeline.graph import build_plan
from deltamoe.pipeline.run import run_recipe
from deltamoe.io.provenance import describe_checkpoint
from deltamoe.recipe import ALL_BASELINES, load_recipe
from deltamoe.report import LABELS


def _micro_recipe(tmp: Path) -> Path:
    # MoE-LPR's order (review, then graft): the kill test interrupts the stage named router_review.
    # The demo's order (graft, then review) runs end to end in tests/test_allocation.py.
    r = micro_demo(review="before_graft", arch="llama", post="instruct")
    r["baselines"] = list(ALL_BASELINES)  # every system, not only the demo's selection
    r["train"]["post_pretrain"]["train"].update(steps=6, micro_batch_size=4, warmup_steps=1)
    # Router review is the stage the kill test interrupts: enough steps, a checkpoint after each, that
    # the run is still training well after the first checkpoint appears (with 6 steps it could finish
    # the stage between two polls and the kill came too late).
    r["train"]["router_review"]["train"].update(steps=80, micro_batch_size=4)
    r["train"]["router_review"]["checkpoint"] = {"every": 1, "keep_last": 2}
    r["train"]["post_pretrain"]["data"]["seq_len"] = 32
    r["train"]["router_review"]["data"]["seq_len"] = 32
    r["eval"]["max_items"] = 6
    r["eval"]["batch_size"] = 8
    p = tmp / "recipe.yaml"
    p.write_text(yaml.safe_dump(r))
    return p


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory, toy_micro: Path) -> Path:
    work = tmp_path_factory.mktemp("pipeline")
    recipe = _micro_recipe(work)
    stages, _, _ = build_plan(*load_recipe(recipe))
    shutil.copytree(toy_micro, stages[0].out)  # the toy stage's output: reuse the session's micro build
    return work


@pytest.mark.slow
def test_full_run_cache_and_traceable_numbers(run_dir: Path) -> None:
    recipe = run_dir / "recipe.yaml"
    first = run_recipe(recipe, progress=False, log=lambda m: None)
    assert first["executed"] == [p["stage"] for p in first["plan"] if p["stage"] != "toy"]
    results = json.loads((run_dir / "results.json").read_text())
    assert list(results["systems"]) == [
        "base", "post", "dense_cpt", "paramdelta", "task_arithmetic", "ties", "dare_linear", "dare_ties",
        "budget_matched", "block_expansion", "moe_lpr", "moe_unallocated", "deltamoe", "ceiling",
    ]
    for name, entry in results["systems"].items():
        # every evaluated checkpoint is named by its sha256, recomputed here from the files
        assert describe_checkpoint(Checkpoint(entry["checkpoint"]))["sha256"] == entry["sha256"], name
        assert set(entry["toy"]) == {"en", "vel", "kyr", "tol"}
    # every number in the report's table comes from results.json
    report = (run_dir / "report.md").read_text()
    from deltamoe.evaluate.mc import wilson_interval

    main_table = report.split("## Results", 1)[1].split("## Per language", 1)[0]
    per_lang = report.split("## Per language", 1)[1]
    for name, entry in results["systems"].items():
        toy = entry["toy"]
        row = next(line for line in main_table.splitlines() if line.startswith(f"| {LABELS[name]} |"))
        cells = [c.strip() for c in row.strip("|").split("|")]
        for i, (metric, langs) in enumerate((("mc", ["en"]), ("mc", ["vel", "kyr", "tol"]),
                                             ("qa", ["en"]), ("qa", ["vel", "kyr", "tol"]))):
            # pooled over the group's items, with the Wilson interval of the pooled count
            n = sum(toy[lang][f"{metric}_n"] for lang in langs)
            k = round(sum(toy[lang][metric] * toy[lang][f"{metric}_n"] for lang in langs))
            lo, hi = wilson_interval(k, n)
            assert cells[1 + i] == f"{k / n:.3f} [{lo:.3f}, {hi:.3f}]", (name, metric, langs)
        assert cells[5] == f"{toy['en']['ppl']:.2f}"
        row = next(line for line in per_lang.splitlines() if line.startswith(f"| {LABELS[name]} |"))
        cells = [c.strip() for c in row.strip("|").split("|")]
        lo, hi = toy["vel"]["qa_ci"]
        assert cells[4] == f"{toy['vel']['qa']:.3f} [{lo:.3f}, {hi:.3f}]"
        assert cells[9:13] == [f"{toy[lang]['ppl']:.2f}" for lang in ("en", "vel", "kyr", "tol")]
    # the answer-kind table is read from results.json too (item-weighted over the new languages)
    kinds_section = report.split("## What the new-language answers are", 1)[1]
    for name, entry in results["systems"].items():
        per_lang = [entry["toy"][lang]["answers"] for lang in ("vel", "kyr", "tol")]
        n = sum(a["n"] for a in per_lang)
        share = sum(a["asked_relation"] * a["n"] for a in per_lang) / n
        row = next(line for line in kinds_section.splitlines() if line.startswith(f"| {LABELS[name]} |"))
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[1] == f"{share:.3f}" and cells[4] == str(n), name
    budget = results["budget_matched"]
    assert budget["dense_steps"] > 0 and abs(budget["dense_flops"] - budget["moe_flops"]) / budget["moe_flops"] < 0.1
    assert results["systems"]["deltamoe"]["routing"]["num_experts"] == 4
    _check_block_expansion(results, report)
    # language allocation realised: read from results.json into the report, per system and language
    alloc_section = report.split("## Language allocation realised", 1)[1].split("\n## ", 1)[0]
    for name in ("moe_lpr", "deltamoe"):
        entry = results["systems"][name]
        routing = entry["routing"]["languages"]
        assert set(entry["allocation_realised"]) == {"en", "vel", "kyr", "tol"}
        row = next(line for line in alloc_section.splitlines() if line.startswith(f"| {LABELS[name]} |"))
        cells = [c.strip() for c in row.strip("|").split("|")]
        for i, lang in enumerate(("en", "vel", "kyr", "tol")):
            st = routing[lang]
            top1 = st["top1"]
            own = [sum(r[e] for e in entry["routing"]["allocation"][lang]) for r in top1]
            assert st["allocated"] == pytest.approx(own, abs=1e-6)
            assert entry["allocation_realised"][lang] == pytest.approx(sum(own) / len(own), abs=1e-6)
            assert cells[1 + i].startswith(f"{st['allocated_mean']:.3f} (")
    for png in ("accuracy", "tradeoff_qa", "tradeoff_mc", "routing-deltamoe", "training_loss"):
        assert (run_dir / "plots" / f"{png}.png").stat().st_size > 1000
    # the second run trains and grafts nothing
    second = run_recipe(recipe, progress=False, log=lambda m: None)
    assert second["executed"] == []
    assert json.loads((run_dir / "results.json").read_text())["systems"] == results["systems"]


def _check_block_expansion(results: dict, report: str) -> None:
    """The parameter-matched baseline: as many new parameters as the MoE's new experts (within half a
    block), the original blocks of its CPT model are B's bytes, and the graft puts B + Δ = P there."""
    import torch
    from safetensors.torch import load_file

    match = results["block_expansion"]
    base = Checkpoint(results["systems"]["base"]["checkpoint"])
    per_block = match["added_params"] / match["blocks"]
    assert abs(match["added_params"] - match["moe_added_params"]) <= per_block / 2 + 4 * 4 * base.config["hidden_size"]
    assert f"Block expansion adds {match['blocks']} decoder blocks" in report
    assert f"{match['added_params']:,} parameters, against {match['moe_added_params']:,}" in report
    stages = results["stages"]

    def tensors(path: str) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for f in sorted(Path(path).glob("*.safetensors")):
            out.update(load_file(f))
        return out

    b, cpt = tensors(str(base.path)), tensors(stages["expand_cpt"]["out"])
    p = tensors(results["systems"]["post"]["checkpoint"])
    grafted = tensors(results["systems"]["block_expansion"]["checkpoint"])
    sources = json.loads((Path(stages["expand"]["out"]) / "deltamoe.json").read_text())["expand"]["sources"]
    new = set(match["new_layers"])
    moved = trained = 0
    for name, t in cpt.items():
        m = re.match(r"model\.layers\.(\d+)\.(.*)", name)
        if m is None:  # embeddings, final norm, LM head: frozen in CPT, Δ once in the graft
            assert torch.equal(t, b[name]), name
            assert torch.allclose(grafted[name], p[name], atol=1e-6), name
            continue
        j, rest = int(m.group(1)), m.group(2)
        src = f"model.layers.{sources[j]}.{rest}"
        if j in new:
            assert torch.equal(grafted[name], t), name  # the new blocks are copied unchanged
            trained += not torch.equal(t, b[src])
        else:
            assert torch.equal(t, b[src]), name  # frozen means bit-identical
            assert torch.allclose(grafted[name], p[src], atol=1e-6), name
            moved += 1
    assert moved > 0 and trained > 0


@pytest.mark.slow
def test_dry_run_disk_estimate_is_within_20_percent_of_what_the_run_writes(run_dir: Path, tmp_path: Path) -> None:
    recipe = run_dir / "recipe.yaml"
    if not (run_dir / "results.json").is_file():
        run_recipe(recipe, progress=False, log=lambda m: None)
    fresh = tmp_path / "fresh"  # the same recipe with an empty work directory: nothing cached
    fresh.mkdir()
    shutil.copy(recipe, fresh / "recipe.yaml")
    plan = run_recipe(fresh / "recipe.yaml", dry_run=True, log=lambda m: None)
    assert not any(p["cached"] for p in plan["plan"])
    written = sum(f.stat().st_size for f in run_dir.rglob("*") if f.is_file())
    ratio = plan["est_total_bytes"] / written
    print(f"dry-run estimate {plan['est_total_bytes']} bytes, the run wrote {written} bytes (ratio {ratio:.3f})")
    assert 0.8 <= ratio <= 1.2, (plan["est_total_bytes"], written)


@pytest.mark.slow
def test_killed_mid_stage_resumes_to_the_same_bytes(run_dir: Path) -> None:
    recipe = run_dir / "recipe.yaml"
    before = json.loads((run_dir / "results.json").read_text())
    stages = {s.name: s for s in build_plan(*load_recipe(recipe))[0]}
    downstream = ["router_review", "deltamoe", "eval-moe_lpr", "eval-deltamoe"]
    for name in downstream:
        shutil.rmtree(stages[name].out)
    shutil.rmtree(str(stages["router_review"].out) + ".run")
    exe = Path(sys.executable).parent / "deltamoe"
    # the same intra-op thread count as the run it is compared with: CPU kernels split their sums by
    # thread, so another count gives other last bits (bit-identity holds for a fixed count)
    proc = subprocess.Popen([str(exe), "run", str(recipe), "-q"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())})
    ckpts = Path(str(stages["router_review"].out) + ".run") / "checkpoints"
    deadline = time.time() + 300
    while not (ckpts.is_dir() and any(re.match(r"step-\d+$", p.name) for p in ckpts.iterdir())):
        assert proc.poll() is None, f"run ended before it could be killed: {proc.stderr.read()}"
        assert time.time() < deadline
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)  # no cleanup at all
    proc.wait()
    assert not stages["router_review"].out.exists(), "a killed stage must not leave an output that looks complete"
    again = run_recipe(recipe, progress=False, log=lambda m: None)
    assert again["executed"] == downstream
    after = json.loads((run_dir / "results.json").read_text())
    # resumed training is bit-identical, so the grafted model and all scores are the same bytes
    assert after["systems"]["deltamoe"]["sha256"] == before["systems"]["deltamoe"]["sha256"]
    assert after["systems"] == before["systems"]
    leftovers = [p.name for p in (run_dir / "stages").iterdir() if ".tmp-" in p.name]
    assert leftovers == [], "stale temporary directories are cleaned on the next run"
