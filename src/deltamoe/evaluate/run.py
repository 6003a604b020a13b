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
# choice, 95 % Wilson intervals. 4: routing shares of the allocated experts. 5: routing leaves out the
# layers a Mixtral upcycle kept dense (replicated experts behind a zero router).
EVAL_VERSION = 5
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
    from deltamoe.io import open_checkpoint

    ckpt = open_checkpoint(model_path)  # checks config and safetensors shards, refuses pickles
    require_causal_lm(ckpt.config, model_path)
    data_path = find_toy_data(model_path, data)
    toy = load_toy_suite(data_path, languages, max_items)
    out_path = Path(out) if out is not None else default_out(model_path, suite)
    writable_dir(out_path, "--out (where results.json goes)")
    from deltamoe.engine import check_finite_tensors

    check_finite_tensors(ckpt)  # a NaN weight would give NaN perplexities, not an error
    from deltamoe.evaluate.qa import MAX_NEW_TOKENS

    lm, tokenizer = _load_lm(model_path, qa, progress)
    results: dict[str, Any] = {
        "model": str(model_path.absolute()),
        "suite": suite,
        "data": str(data_path.absolute()),
        "toy": {k: toy.manifest.get(k) for k in ("key", "size", "seed")},
        "settings": {"max_new_tokens": MAX_NEW_TOKENS, "batch_size": batch_size, "max_items": max_items,
                     "qa": qa, "mc": mc},
        "languages": {},
    }
    scorer = _Scorer(lm, tokenizer, toy, batch_size, progress, ckpt.config, _moe_block(model_path))
    for lang in toy.languages:
        results["languages"][lang] = scorer.language(lang, qa, mc)
    _write(out_path, results, scorer, model_path)
    results["out"] = str(out_path)
    return results


def _load_lm(model_path: Path, qa: bool, progress: bool) -> tuple[Any, Any]:
    """The model (float32, eval mode) and its tokenizer, which must have a chat template for QA."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from deltamoe.evaluate.qa import require_chat_template

    try:
        tokenizer = AutoTokenizer.from_pretrained(model_path)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{model_path}: cannot load its tokenizer ({e})") from None
    if qa:
        require_chat_template(tokenizer, str(model_path))
    with hf_progress(progress):
        lm = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    lm.eval()
    return lm, tokenizer


class _Scorer:
    """Scores one language at a time; keeps every prediction and, for MoE models, the routing."""

    def __init__(self, lm: Any, tokenizer: Any, toy: Any, batch_size: int, progress: bool, config: dict[str, Any],
                 moe_info: dict[str, Any]) -> None:
        from deltamoe.evaluate.routing import moe_shape

        self.lm, self.tokenizer, self.toy = lm, tokenizer, toy
        self.batch_size, self.progress = batch_size, progress
        self.shape = moe_shape(config)
        self.moe_info = moe_info
        self.predictions: list[dict[str, Any]] = []
        self.routing: dict[str, Any] = {}

    def _tasks(self, row: dict[str, Any], lang: str, tasks: tuple[str, ...], sets: dict[str, Any], score: Any,
               group: str) -> list[dict[str, Any]]:
        """Score ``tasks`` of ``sets`` with ``score``; the accuracy of each and of ``group`` (all of them)."""
        all_records: list[dict[str, Any]] = []
        for task in tasks:
            _, records = score(self.lm, self.tokenizer, sets[task], batch_size=self.batch_size,
                               progress=self.progress, desc=f"{lang} {task}")
            _accuracy(row, task, records)
            all_records += records
            self.predictions += [{"lang": lang, "task": task, **r} for r in records]
        _accuracy(row, group, all_records)
        return all_records

    def language(self, lang: str, qa: bool, mc: bool) -> dict[str, Any]:
        """The row of ``lang``: QA, multiple choice, perplexity (and routing, kept aside)."""
        from deltamoe.evaluate.mc import score_mc
        from deltamoe.evaluate.perplexity import perplexity
        from deltamoe.evaluate.qa import answer_kinds, score_items
        from deltamoe.evaluate.routing import RoutingCounter, allocation_shares

        toy = self.toy
        row: dict[str, Any] = {}
        if qa:
            records = self._tasks(row, lang, QA_TASKS, toy.qa[lang], score_items, "qa")
            if lang in toy.relation_words:
                items = [item for task in QA_TASKS for item in toy.qa[lang][task]]
                row["answers"] = answer_kinds(records, items, toy.relation_words[lang], toy.original_words)
        if mc:
            self._tasks(row, lang, MC_TASKS, toy.mc[lang], score_mc, "mc")
        counter = RoutingCounter(*self.shape) if self.shape else None
        ppl = perplexity(self.lm, self.tokenizer, toy.ppl[lang], batch_size=self.batch_size, router=counter,
                         progress=self.progress, desc=f"{lang} ppl")
        row["ppl"] = ppl["ppl"]
        row["ppl_tokens"] = ppl["tokens"]
        if counter is not None:
            self.routing[lang] = counter.result(self.moe_info.get("moe_layers"), self.moe_info.get("replicated_layers"))
            experts = (self.moe_info.get("allocation") or {}).get(lang)
            if experts and self.routing[lang]["top1"]:
                self.routing[lang].update(allocation_shares(self.routing[lang]["top1"], [int(e) for e in experts]))
        return row


def _write(out_path: Path, results: dict[str, Any], scorer: _Scorer, model_path: Path) -> None:
    """results.json, predictions.jsonl and, for MoE models, routing.json and its heatmap."""
    from deltamoe.evaluate.routing import draw_heatmap

    out_path.mkdir(parents=True, exist_ok=True)
    if scorer.routing:
        assert scorer.shape is not None
        results["routing"] = {"num_experts": scorer.shape[0], "top_k": scorer.shape[1],
                              "allocation": scorer.moe_info.get("allocation"), "languages": scorer.routing}
        (out_path / ROUTING_JSON).write_text(json.dumps(results["routing"], indent=2) + "\n")
        draw_heatmap(results["routing"], out_path / ROUTING_PNG, title=f"{model_path.name}: tokens per expert")
        results["routing_files"] = [ROUTING_JSON, ROUTING_PNG]
    with open(out_path / PREDICTIONS_NAME, "w", encoding="utf-8") as f:
        for p in scorer.predictions:
            f.write(json.dumps(p, ensure_ascii=False) + "\n")
    (out_path / RESULTS_NAME).write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n")


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
    from deltamoe.io.provenance import read_manifest

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

