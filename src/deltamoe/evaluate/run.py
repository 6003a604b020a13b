"""``deltamoe eval``: per-language chat QA, perplexity and (for MoE models) routing statistics."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from deltamoe.errors import CheckpointError, UsageError
from deltamoe.evaluate.suite import MC_TASKS, QA_TASKS, check_suite, find_toy_data, load_toy_suite
from deltamoe.preflight import writable_dir

RESULTS_NAME = "results.json"
# What the evaluator measures and records; part of the eval stages' cache key in `deltamoe run`, so
# a cached evaluation from an older evaluator is redone. 2: per-language answer kinds. 3: multiple
# choice, 95 % Wilson intervals. 4: routing shares of the allocated experts.
EVAL_VERSION = 4
PREDICTIONS_NAME = "predictions.jsonl"
ROUTING_JSON = "routing.json"
ROUTING_PNG = "routing.png"


@contextmanager
def hf_progress(enabled: bool) -> Iterator[None]:
    """Silence transformers' own progress bars (weight loading) when ours are off."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    if not enabled:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was and not enabled:
            hf_logging.enable_progress_bar()


def default_out(model: str | Path, suite: str) -> Path:
    return Path(model) / "eval" / suite


def evaluate(
    model: str | Path,
    suite: str = "toy",
    *,
    data: str | Path | None = None,
    out: str | Path | None = None,
    languages: list[str] | None = None,
    qa: bool = True,
    mc: bool = True,
    batch_size: int = 16,
    max_items: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Evaluate ``model`` on ``suite`` per language and write ``results.json`` (plus
    ``predictions.jsonl`` and, for MoE models, ``routing.json``/``routing.png``) to ``out``
    (default ``MODEL/eval/SUITE``). Returns the results.

    Per language: ``qa_rc`` and ``qa_facts`` (chat QA accuracy, greedy, normalised exact
    match), ``qa`` (accuracy over both), ``answers`` (what kind of answers they are; see
    :func:`deltamoe.evaluate.qa.answer_kinds`), ``mc_rc`` and ``mc_facts`` (multiple-choice
    accuracy by option log-likelihood, no chat template; see :mod:`deltamoe.evaluate.mc`),
    ``mc`` (over both), ``ppl`` (token perplexity of held-out text). Every accuracy ``X`` comes
    with ``X_n`` (items) and ``X_ci`` (95 % Wilson interval over items).
    """
    check_suite(suite)
    if batch_size < 1:
        raise UsageError(f"batch_size must be >= 1, got {batch_size}")
    if max_items is not None and max_items < 1:
        raise UsageError(f"max_items must be >= 1, got {max_items}")
    model_path = Path(model)
    if not model_path.is_dir():
        raise CheckpointError(f"{model_path}: no such model directory")
    from deltamoe.checkpoint import open_checkpoint

    ckpt = open_checkpoint(model_path)  # checks config and safetensors shards, refuses pickles
    require_causal_lm(ckpt.config, model_path)
    data_path = find_toy_data(model_path, data)
    toy = load_toy_suite(data_path, languages, max_items)
    out_path = Path(out) if out is not None else default_out(model_path, suite)
    writable_dir(out_path, "--out (where results.json goes)")
    from deltamoe.engine import check_finite_tensors

    check_finite_tensors(ckpt)  # a NaN weight would give NaN perplexities, not an error

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from deltamoe.evaluate.mc import score_mc
    from deltamoe.evaluate.perplexity import perplexity
    from deltamoe.evaluate.qa import MAX_NEW_TOKENS, answer_kinds, require_chat_template, score_items
    from deltamoe.evaluate.routing import RoutingCounter, allocation_shares, draw_heatmap, moe_shape

    try:
        tokenizer = AutoTokenizer.from_pretrained(model_path)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{model_path}: cannot load its tokenizer ({e})") from None
    if qa:
        require_chat_template(tokenizer, str(model_path))
    with hf_progress(progress):
        lm = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    lm.eval()
    shape = moe_shape(ckpt.config)
    moe_info = _moe_block(model_path)

    results: dict[str, Any] = {
        "model": str(model_path.absolute()),
        "suite": suite,
        "data": str(data_path.absolute()),
        "toy": {k: toy.manifest.get(k) for k in ("key", "size", "seed")},
        "settings": {"max_new_tokens": MAX_NEW_TOKENS, "batch_size": batch_size, "max_items": max_items,
                     "qa": qa, "mc": mc},
        "languages": {},
    }
    predictions: list[dict[str, Any]] = []
    routing: dict[str, Any] = {}
    for lang in toy.languages:
        row: dict[str, Any] = {}
        if qa:
            lang_items: list[dict[str, Any]] = []
            lang_records: list[dict[str, Any]] = []
            for task in QA_TASKS:
                items = toy.qa[lang][task]
                _, records = score_items(lm, tokenizer, items, batch_size=batch_size, progress=progress,
                                         desc=f"{lang} {task}")
                _accuracy(row, task, records)
                lang_items += items
                lang_records += records
                predictions += [{"lang": lang, "task": task, **r} for r in records]
            _accuracy(row, "qa", lang_records)
            if lang in toy.relation_words:
                row["answers"] = answer_kinds(lang_records, lang_items, toy.relation_words[lang], toy.original_words)
        if mc:
            mc_records: list[dict[str, Any]] = []
            for task in MC_TASKS:
                _, records = score_mc(lm, tokenizer, toy.mc[lang][task], batch_size=batch_size, progress=progress,
                                      desc=f"{lang} {task}")
                _accuracy(row, task, records)
                mc_records += records
                predictions += [{"lang": lang, "task": task, **r} for r in records]
            _accuracy(row, "mc", mc_records)
        counter = RoutingCounter(*shape) if shape else None
        ppl = perplexity(lm, tokenizer, toy.ppl[lang], batch_size=batch_size, router=counter,
                         progress=progress, desc=f"{lang} ppl")
        row["ppl"] = ppl["ppl"]
        row["ppl_tokens"] = ppl["tokens"]
        results["languages"][lang] = row
        if counter is not None:
            routing[lang] = counter.result(moe_info.get("moe_layers"))
            experts = (moe_info.get("allocation") or {}).get(lang)
            if experts and routing[lang]["top1"]:
                routing[lang].update(allocation_shares(routing[lang]["top1"], [int(e) for e in experts]))

    out_path.mkdir(parents=True, exist_ok=True)
    if routing:
        assert shape is not None
        results["routing"] = {"num_experts": shape[0], "top_k": shape[1], "allocation": moe_info.get("allocation"),
                              "languages": routing}
        (out_path / ROUTING_JSON).write_text(json.dumps(results["routing"], indent=2) + "\n")
        draw_heatmap(results["routing"], out_path / ROUTING_PNG, title=f"{model_path.name}: tokens per expert")
        results["routing_files"] = [ROUTING_JSON, ROUTING_PNG]
    with open(out_path / PREDICTIONS_NAME, "w", encoding="utf-8") as f:
        for p in predictions:
            f.write(json.dumps(p, ensure_ascii=False) + "\n")
    (out_path / RESULTS_NAME).write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n")
    results["out"] = str(out_path)
    return results


def _accuracy(row: dict[str, Any], name: str, records: list[dict[str, Any]]) -> None:
    """``row[name]`` (accuracy), ``row[name_n]`` and ``row[name_ci]`` (95 % Wilson interval)."""
    from deltamoe.evaluate.mc import wilson_interval

    n = len(records)
    correct = sum(bool(r["correct"]) for r in records)
    row[name] = correct / n if n else math.nan
    row[f"{name}_n"] = n
    row[f"{name}_ci"] = list(wilson_interval(correct, n))


def require_causal_lm(config: dict[str, Any], model_path: Path) -> None:
    """Perplexity and generation are only meaningful for a causal (decoder) language model: a BERT
    checkpoint would load with a fresh LM head and give a plausible-looking but meaningless score."""
    archs = config.get("architectures") or []
    causal = [a for a in archs if isinstance(a, str) and (
        a.endswith("ForCausalLM") or (a.endswith("LMHeadModel") and config.get("is_decoder", True)))]
    if not causal:
        named = ", ".join(map(str, archs)) or "none"
        raise CheckpointError(
            f"{model_path / 'config.json'}: architectures = {named} (model_type {config.get('model_type')!r}) is not a "
            "causal language model (a ...ForCausalLM class); eval scores only causal LMs, such as the models "
            "deltamoe writes"
        )


def _moe_block(model_path: Path) -> dict[str, Any]:
    from deltamoe.provenance import read_manifest

    manifest = read_manifest(model_path) or {}
    return manifest.get("moe") or {}


def format_table(results: dict[str, Any]) -> str:
    """The per-language results as a fixed-width table (and the routing summary for MoE models)."""
    langs = results["languages"]
    cols = [c for c in ("qa_rc", "qa_facts", "qa", "mc_rc", "mc_facts", "mc", "ppl") if any(c in r for r in langs.values())]
    toy = results.get("toy") or {}
    lines = [f"{results['model']}  (suite {results['suite']}: {toy.get('size')}, seed {toy.get('seed')})",
             f"{'lang':6}" + "".join(f"{c:>10}" for c in cols)]
    for lang, row in langs.items():
        cells = []
        for c in cols:
            v = row.get(c)
            cells.append(f"{'-':>10}" if v is None else (f"{v:>10.2f}" if c == "ppl" else f"{v:>10.3f}"))
        lines.append(f"{lang:6}" + "".join(cells))
    routing = results.get("routing")
    if routing:
        lines.append(f"routing (fraction of tokens per expert, mean over layers, top-{routing['top_k']}):")
        for lang, st in routing["languages"].items():
            if st["routed"]:
                means = [sum(col) / len(col) for col in zip(*st["routed"], strict=True)]
                own = st.get("allocated_mean")
                lines.append(f"{lang:6}" + "".join(f"{m:>7.2f}" for m in means)
                             + (f"   own experts top-1: {own:.2f}" if own is not None else ""))
    return "\n".join(lines)

