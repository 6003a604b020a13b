"""Per-language evaluation: chat QA, perplexity, routing statistics, the lm-eval bridge, bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from deltamoe.errors import CheckpointError, UsageError

LANGS = ("en", "vel", "kyr", "tol")


# -- metric ------------------------------------------------------------------------------------
def test_normalisation_matches_lm_eval_exact_match() -> None:
    from lm_eval.api.metrics import exact_match_hf_evaluate

    from deltamoe.evaluate.qa import STRIP_REGEXES, exact_match, normalize

    cases = [(" Baker", "baker"), ("baker.", "baker"), ("BAKER!\n", "baker"), ("ba ker", "baker"),
             ("Кошка", "кошка"), ("  vänä ", "vänä"), ("baker bread", "baker"), ("", "baker"),
             ("it's", "its"), ("Kyrran?", "kyrran")]
    for pred, ref in cases:
        theirs = exact_match_hf_evaluate([pred], [ref], regexes_to_ignore=list(STRIP_REGEXES), ignore_case=True,
                                         ignore_punctuation=True)["exact_match"]
        assert exact_match(pred, ref) == bool(theirs), (pred, ref)
    assert normalize(" The Cat. ") == "the cat"


def test_answer_kinds_classify_each_answer_once() -> None:
    from deltamoe.evaluate.qa import answer_kinds

    items = [{"id": i, "relation": rel} for i, rel in enumerate(["pet", "pet", "job", "job", "pet", "job"])]
    preds = [" Vulu.", "rarer", "cat", "Baker", "vulu vulu", ""]  # right kind; other relation; en x2; other x2
    records = [{"id": i, "prediction": p} for i, p in enumerate(preds)]
    words = {"pet": {"vulu", "kinki"}, "job": {"rarer", "sadu"}}
    k = answer_kinds(records, items, words, original_words={"cat", "baker"})
    assert k["n"] == 6
    assert k["asked_relation"] == pytest.approx(1 / 6)  # only " Vulu." (normalised); "rarer" is a job word
    assert k["original_language"] == pytest.approx(2 / 6)
    assert k["other"] == pytest.approx(3 / 6)
    # in the original language an original word of the asked relation counts as the asked relation
    k_en = answer_kinds(records[2:4], items[2:4], {"job": {"baker"}}, original_words={"cat", "baker"})
    assert (k_en["asked_relation"], k_en["original_language"]) == (0.5, 0.5)


# -- routing statistics --------------------------------------------------------------------------
def test_routing_counter_counts_top_k_and_top1_without_padding() -> None:
    from deltamoe.evaluate.routing import RoutingCounter

    c = RoutingCounter(num_experts=3, top_k=2)
    logits = torch.tensor([[3.0, 2.0, 1.0], [1.0, 3.0, 2.0], [9.0, 9.5, 0.0], [0.0, 0.0, 9.0]])
    mask = torch.tensor([[True, True], [True, False]])  # the last token is padding
    c((logits, -logits), mask)
    r = c.result([4, 7])
    assert r["tokens"] == 3 and r["layers"] == [4, 7]
    assert r["routed"][0] == pytest.approx([2 / 3, 1.0, 1 / 3])
    assert r["top1"][0] == pytest.approx([1 / 3, 2 / 3, 0.0])
    assert r["top1"][1] == pytest.approx([1 / 3, 0.0, 2 / 3])
    assert all(sum(row) == pytest.approx(2.0) for row in r["routed"])
    # a Mixtral upcycle's replicated layer (kept dense behind a zero router) returns router logits
    # too; its rows are left out
    r = c.result([7], replicated=[4])
    assert r["layers"] == [7] and r["top1"] == [c.result([4, 7])["top1"][1]]


def test_routing_of_a_partial_mixtral_upcycle_covers_its_moe_layers_only(toy_micro: Path, tmp_path: Path) -> None:
    """The micro Llama has 2 layers; upcycling layer 1 only makes layer 0 four identical copies
    behind a zero router (Mixtral has no dense-layer option). The routing statistics, and so the
    allocation shares, are those of layer 1 alone."""
    from deltamoe.evaluate import evaluate
    from deltamoe.ops.upcycle import upcycle

    alloc = {"en": [0], "vel": [1], "kyr": [2], "tol": [3]}
    full = upcycle(toy_micro / "base", tmp_path / "full", num_experts=4, top_k=2, allocation=alloc, progress=False)
    part = upcycle(toy_micro / "base", tmp_path / "part", num_experts=4, top_k=2, layers="1", allocation=alloc,
                   progress=False)
    assert json.loads((part / "deltamoe.json").read_text())["moe"]["replicated_layers"] == [0]
    r_full = evaluate(full, "toy", out=tmp_path / "ev-full", qa=False, mc=False, progress=False, max_items=2)["routing"]
    r_part = evaluate(part, "toy", out=tmp_path / "ev-part", qa=False, mc=False, progress=False, max_items=2)["routing"]
    for lang in LANGS:
        st, ref = r_part["languages"][lang], r_full["languages"][lang]
        assert st["layers"] == [1] and len(st["top1"]) == len(st["allocated"]) == 1
        # the same seeded router in layer 1 and the same inputs to it (layer 0 computes the dense FFN
        # in both): the same choices as the full upcycle's layer 1
        assert st["top1"] == [ref["top1"][1]] and st["allocated_mean"] == ref["allocated"][1]


# -- evaluate() on the micro world ---------------------------------------------------------------
def test_evaluate_writes_results_predictions_and_table(toy_micro: Path, tmp_path: Path) -> None:
    from deltamoe.evaluate import evaluate, format_table

    res = evaluate(toy_micro / "instruct", "toy", out=tmp_path / "ev", progress=False, max_items=3)
    assert set(res["languages"]) == set(LANGS)
    for row in res["languages"].values():
        assert set(row) >= {"qa_rc", "qa_facts", "qa", "ppl", "answers"} and row["ppl"] > 1
        assert row["qa_rc_n"] == 3
        kinds = row["answers"]
        assert kinds["n"] == 6 and sum(kinds[k] for k in ("asked_relation", "original_language", "other")) == pytest.approx(1)
    saved = json.loads((tmp_path / "ev" / "results.json").read_text())
    assert saved["languages"] == json.loads(json.dumps(res["languages"]))
    assert saved["data"] == str(toy_micro)  # found from the model's location
    preds = [json.loads(line) for line in (tmp_path / "ev" / "predictions.jsonl").open()]
    qa_preds = [p for p in preds if p["task"].startswith("qa_")]
    mc_preds = [p for p in preds if p["task"].startswith("mc_")]
    assert len(qa_preds) == 4 * 2 * 3 and {"prediction", "answer", "correct"} <= set(qa_preds[0])
    assert len(mc_preds) == 4 * 2 * 3 and {"choice", "gold", "loglik", "correct"} <= set(mc_preds[0])
    for row in res["languages"].values():  # every accuracy carries its item count and 95 % interval
        for m in ("qa", "qa_rc", "mc", "mc_rc", "mc_facts"):
            lo, hi = row[f"{m}_ci"]
            assert 0 <= lo <= row[m] <= hi <= 1 and row[f"{m}_n"] == (6 if m in ("qa", "mc") else 3)
    table = format_table(res)
    assert all(f"\n{lang} " in table for lang in LANGS) and "qa_rc" in table
    assert "routing" not in res


def test_evaluate_moe_routing_json_and_heatmap(toy_micro: Path, tmp_path: Path) -> None:
    from deltamoe.evaluate import evaluate
    from deltamoe.ops.upcycle import upcycle

    moe = upcycle(toy_micro / "base", tmp_path / "moe", num_experts=4, top_k=1, router_init="zero",
                  allocation={"en": [0], "vel": [1], "kyr": [2], "tol": [3]}, progress=False)
    # outside the toy directory: the toy data is found through the provenance (toy_dir)
    res = evaluate(moe, "toy", out=tmp_path / "ev", qa=False, progress=False, max_items=4)
    routing = json.loads((tmp_path / "ev" / "routing.json").read_text())
    assert routing["num_experts"] == 4 and routing["top_k"] == 1
    assert routing["allocation"] == {"en": [0], "vel": [1], "kyr": [2], "tol": [3]}
    layers = json.loads((moe / "config.json").read_text())["num_hidden_layers"]
    for lang in LANGS:
        st = routing["languages"][lang]
        assert st["layers"] == list(range(layers)) and st["tokens"] == res["languages"][lang]["ppl_tokens"] + 4
        # a zero router ties every expert: every token goes to the one expert that top-k picks
        assert all(sorted(row) == [0.0, 0.0, 0.0, 1.0] for row in st["routed"])
        assert st["routed"] == st["top1"] == routing["languages"]["en"]["routed"]
    # the share of each language's tokens sent top-1 to its own expert: 1 for the language that owns
    # the expert the tie goes to, 0 for the others, in every layer
    winner = st["top1"][0].index(1.0)
    for lang, (expert,) in routing["allocation"].items():
        st = routing["languages"][lang]
        assert st["allocated"] == [1.0 if expert == winner else 0.0] * layers
        assert st["allocated_mean"] == (1.0 if expert == winner else 0.0)
    png = (tmp_path / "ev" / "routing.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    assert "qa" not in res["languages"]["en"]


def test_moe_evaluation_equals_dense_at_initialisation(toy_micro: Path, tmp_path: Path) -> None:
    from deltamoe.evaluate import evaluate
    from deltamoe.ops.upcycle import upcycle

    moe = upcycle(toy_micro / "base", tmp_path / "moe", num_experts=2, top_k=2, progress=False)
    dense = evaluate(toy_micro / "base", "toy", out=tmp_path / "d", progress=False, max_items=4)
    upc = evaluate(moe, "toy", out=tmp_path / "m", progress=False, max_items=4)
    for lang in LANGS:
        assert upc["languages"][lang]["ppl"] == pytest.approx(dense["languages"][lang]["ppl"], rel=1e-4)
        assert upc["languages"][lang]["qa"] == dense["languages"][lang]["qa"]
    st = upc["routing"]["languages"]["en"]
    assert all(sum(row) == pytest.approx(2.0) for row in st["routed"])


# -- bad input -----------------------------------------------------------------------------------
def test_missing_model_path_is_a_clear_error(tmp_path: Path) -> None:
    from deltamoe.evaluate import evaluate

    with pytest.raises(CheckpointError, match="no such model directory"):
        evaluate(tmp_path / "nope", "toy")


def test_unknown_suite_is_a_clear_error(toy_micro: Path) -> None:
    from deltamoe.evaluate import evaluate

    with pytest.raises(UsageError, match="unknown suite 'mmlu'; available suites: toy"):
        evaluate(toy_micro / "instruct", "mmlu")


def test_checkpoint_without_chat_template_is_a_clear_error(toy_micro: Path, tmp_path: Path) -> None:
    from deltamoe.evaluate import evaluate

    model = tmp_path / "no-template"
    shutil.copytree(toy_micro / "instruct", model)
    (model / "chat_template.jinja").unlink()
    cfg = json.loads((model / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (model / "tokenizer_config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="no chat template"):
        evaluate(model, "toy", data=toy_micro, out=tmp_path / "ev", progress=False)
    assert not (tmp_path / "ev").exists()  # nothing written
    res = evaluate(model, "toy", data=toy_micro, out=tmp_path / "ev", qa=False, progress=False, max_items=2)
    assert "qa" not in res["languages"]["en"] and res["languages"]["en"]["ppl"] > 1


def test_missing_toy_data_and_unknown_language(toy_micro: Path, tmp_path: Path) -> None:
    from deltamoe.evaluate import evaluate

    model = tmp_path / "elsewhere"
    shutil.copytree(toy_micro / "instruct", model)
    (model / "deltamoe.json").unlink()
    with pytest.raises(UsageError, match="pass --data TOYDIR"):
        evaluate(model, "toy")
    with pytest.raises(UsageError, match="not a toy world"):
        evaluate(model, "toy", data=tmp_path)
    with pytest.raises(UsageError, match="unknown language"):
        evaluate(model, "toy", data=toy_micro, languages=["xx"])


def test_cli_eval_reports_errors_and_prints_table(toy_micro: Path, tmp_path: Path) -> None:
    from deltamoe.cli import app

    runner = CliRunner()
    r = runner.invoke(app, ["eval", str(tmp_path / "missing")])
    assert r.exit_code == 1 and "error:" in r.output and "no such model directory" in r.output
    r = runner.invoke(app, ["eval", str(toy_micro / "instruct"), "--suite", "nope"])
    assert r.exit_code == 1 and "unknown suite 'nope'" in r.output
    r = runner.invoke(app, ["eval", str(toy_micro / "instruct"), "--out", str(tmp_path / "o"), "-q",
                            "--max-items", "2", "--lang", "en", "--lang", "kyr"])
    assert r.exit_code == 0, r.output
    assert "qa_facts" in r.output and "\nkyr " in r.output and "\nvel " not in r.output
    assert (tmp_path / "o" / "results.json").is_file()


# -- lm-eval bridge -------------------------------------------------------------------------------
def test_export_writes_tasks_groups_and_data(toy_micro: Path, tmp_path: Path) -> None:
    import yaml

    from deltamoe.errors import OutputError
    from deltamoe.evaluate import export_lm_eval

    info = export_lm_eval(toy_micro, tmp_path / "lme")
    assert len(info["tasks"]) == 4 * 5 and {"deltamoe_toy_qa", "deltamoe_toy_mc"} <= set(info["groups"])
    mc = yaml.safe_load((tmp_path / "lme" / "deltamoe_toy_mc_rc_kyr.yaml").read_text())
    assert mc["output_type"] == "multiple_choice" and mc["doc_to_choice"] == "options" and mc["doc_to_target"] == "gold"
    spec = yaml.safe_load((tmp_path / "lme" / "deltamoe_toy_qa_rc_vel.yaml").read_text())
    data = Path(spec["dataset_kwargs"]["data_files"]["test"])
    assert data.is_file() and data.read_bytes() == (toy_micro / "eval" / "vel" / "qa_rc.jsonl").read_bytes()
    assert spec["output_type"] == "generate_until" and spec["generation_kwargs"]["do_sample"] is False
    group = yaml.safe_load((tmp_path / "lme" / "deltamoe_toy_qa_en.yaml").read_text())
    assert group["task"] == ["deltamoe_toy_qa_rc_en", "deltamoe_toy_qa_facts_en"]
    with pytest.raises(OutputError):
        export_lm_eval(toy_micro, tmp_path / "lme")
    with pytest.raises(UsageError, match="not a toy world"):
        export_lm_eval(tmp_path, tmp_path / "x")


@pytest.mark.slow
def test_lm_eval_agrees_with_deltamoe_on_an_exported_task(toy_small: Path, toy_small_regime: dict,
                                                          tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import lm_eval
    from lm_eval.tasks import TaskManager

    from deltamoe.evaluate import export_lm_eval

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    task = "deltamoe_toy_qa_facts_en"
    export_lm_eval(toy_small, tmp_path / "lme")
    out = lm_eval.simple_evaluate(
        model="hf", model_args={"pretrained": str(toy_small / "instruct"), "dtype": "float32"}, tasks=[task],
        task_manager=TaskManager(include_path=str(tmp_path / "lme")), apply_chat_template=True, batch_size=1,
        device="cpu", log_samples=True,
    )
    theirs = float(out["results"][task]["exact_match,none"])
    ours = toy_small_regime["scores"]["instruct"]["en"]["qa_facts"]
    assert theirs == pytest.approx(ours, abs=1e-12)
    assert ours >= 0.5  # the comparison is about a model that answers, not an all-wrong one
    # item by item: same predictions after stripping
    preds = {p["id"]: p["prediction"].strip()
             for p in map(json.loads, (toy_small / "eval-results" / "instruct" / "predictions.jsonl").open())
             if p["task"] == "qa_facts" and p["lang"] == "en"}
    for s in out["samples"][task]:
        assert s["filtered_resps"][0].strip() == preds[s["doc"]["id"]]


@pytest.mark.slow
def test_lm_eval_multiple_choice_agrees_item_by_item(toy_small: Path, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """lm-eval's multiple_choice on the exported tasks picks the same option as deltamoe for every
    item, from the same log-likelihoods, for the base model (no chat template)."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    from deltamoe.evaluate import evaluate, export_lm_eval

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    limit = 100
    ours = evaluate(toy_small / "base", "toy", out=tmp_path / "ours", languages=["en", "vel"], qa=False,
                    max_items=limit, progress=False)
    export_lm_eval(toy_small, tmp_path / "lme")
    tasks = ["deltamoe_toy_mc_rc_vel", "deltamoe_toy_mc_facts_en"]
    out = lm_eval.simple_evaluate(
        model="hf", model_args={"pretrained": str(toy_small / "base"), "dtype": "float32"}, tasks=tasks,
        task_manager=TaskManager(include_path=str(tmp_path / "lme")), batch_size=16, device="cpu", log_samples=True,
        limit=limit,
    )
    records = {p["id"]: p for p in map(json.loads, (tmp_path / "ours" / "predictions.jsonl").open()) if "loglik" in p}
    for task in tasks:
        lang, kind = task.rsplit("_", 1)[1], "mc_" + task.split("_mc_")[1].rsplit("_", 1)[0]
        theirs = float(out["results"][task]["acc,none"])
        assert theirs == pytest.approx(ours["languages"][lang][kind], abs=1e-12), task
        assert len(out["samples"][task]) == limit
        for s in out["samples"][task]:
            mine = records[s["doc"]["id"]]
            lls = [r[0] for r in s["filtered_resps"]]
            assert lls == pytest.approx(mine["loglik"], abs=1e-3)
            assert max(range(len(lls)), key=lls.__getitem__) == mine["choice"]


def test_wilson_interval_matches_the_formula() -> None:
    from deltamoe.evaluate.mc import wilson_interval

    lo, hi = wilson_interval(20, 400)  # p = 0.05
    assert lo == pytest.approx(0.03265, abs=1e-4) and hi == pytest.approx(0.07592, abs=1e-4)
    lo, hi = wilson_interval(0, 50)
    assert lo == 0.0 and hi == pytest.approx(0.07135, abs=1e-4)
    assert wilson_interval(400, 400)[1] == 1.0
    # 400 items: the half-width at p = 0.5 is under 0.05, the issue's bound
    lo, hi = wilson_interval(200, 400)
    assert (hi - lo) / 2 < 0.05


def test_batched_encoding_gives_the_ids_of_one_pair_at_a_time(toy_micro: Path) -> None:
    """encode_pairs (the path scoring uses) splits every (prompt, option) as encode_pair does, on
    every multiple-choice item of the micro toy; trailing spaces of a prompt move to its
    continuation; and a padded batch call before it (chat QA pads its prompts) changes nothing."""
    from transformers import AutoTokenizer

    from deltamoe.evaluate.mc import DELIMITER, encode_pair, encode_pairs

    tok = AutoTokenizer.from_pretrained(toy_micro / "base")
    pairs = [(it["prompt"], DELIMITER + opt) for lang in ("en", "vel", "kyr", "tol") for task in ("mc_rc", "mc_facts")
             for it in map(json.loads, (toy_micro / "eval" / lang / f"{task}.jsonl").open()) for opt in it["options"]]
    pairs += [("Q: What pet does Ana have? A:  ", "cat"), ("", " cat")]
    assert len(pairs) > 100
    expected = [encode_pair(tok, c, x) for c, x in pairs]
    assert encode_pairs(tok, pairs) == expected
    tok.padding_side = "left"
    tok(["a", "a much longer prompt than the first"], padding=True, return_tensors="pt")
    assert encode_pairs(tok, pairs) == expected


def test_multiple_choice_scoring_by_loglikelihood(toy_micro: Path) -> None:
    """The option with the highest summed log-probability wins; the prompt/continuation split is
    lm-eval's (trailing spaces move to the continuation); ties go to the first option."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from deltamoe.evaluate.mc import encode_pair, option_loglikelihoods, score_mc

    tok = AutoTokenizer.from_pretrained(toy_micro / "base")
    model = AutoModelForCausalLM.from_pretrained(toy_micro / "base", dtype=torch.float32)
    ctx, cont = encode_pair(tok, "Q: What pet does Ana have? A: ", "cat")
    ctx2, cont2 = encode_pair(tok, "Q: What pet does Ana have? A:", " cat")
    assert (ctx, cont) == (ctx2, cont2)
    items = [{"prompt": "Q: What pet does Ana have? A:", "options": ["cat", "dog", "cat"], "gold": 2}]
    (lls,) = option_loglikelihoods(model, tok, items, batch_size=2)
    # reference: one forward pass over each full sequence
    for opt, ll in zip(items[0]["options"], lls, strict=True):
        c, t = encode_pair(tok, items[0]["prompt"], " " + opt)
        ids = torch.tensor([c + t])
        logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
        ref = sum(float(logp[len(c) - 1 + j, t[j]]) for j in range(len(t)))
        assert ll == pytest.approx(ref, abs=1e-4)
    assert lls[0] == lls[2]
    acc, records = score_mc(model, tok, items)
    best = max(lls[:2])
    assert records[0]["choice"] == lls.index(best) and acc == float(records[0]["choice"] == 2)
