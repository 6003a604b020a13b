"""``report.md``, ``results.json`` and plots for a recipe run.

Every number in ``report.md`` is read from ``results.json``, which names each evaluated checkpoint
by path and sha256.
"""

from __future__ import annotations

import json
import math
import platform
import time
from pathlib import Path
from typing import Any

from deltamoe import __version__

LABELS = {
    "base": "B (base)",
    "post": "P (post-trained)",
    "dense_cpt": "B' (dense CPT)",
    "paramdelta": "B' + Δ (ParamΔ)",
    "task_arithmetic": "task arithmetic",
    "ties": "TIES",
    "dare_linear": "DARE linear",
    "dare_ties": "DARE-TIES",
    "budget_matched": "B'' + Δ (FLOP-matched CPT)",
    "block_expansion": "B + new blocks + Δ (parameter-matched, LLaMA-Pro)",
    "moe_lpr": "MoE-LPR (no Δ)",
    "moe_unallocated": "MoE, learned routing only, + Δ",
    "deltamoe": "DeltaMoE",
    "ceiling": "ceiling: B' + chat SFT in every language (upper bound)",
}
# Systems that are not baselines: they use data the method does without (chat data in the new
# languages), so they bound what alignment could reach; tables and plots mark them.
UPPER_BOUNDS = ("ceiling",)
METRICS = ("mc", "qa")


def collect(systems: dict[str, tuple[Path, Path]], languages: dict[str, list[str]], extra: dict[str, Any]) -> dict[str, Any]:
    """Build results.json: per system the checkpoint, its sha256 and its toy-suite scores.

    ``systems`` maps a system to (checkpoint dir, evaluation dir).
    """
    from deltamoe.io import Checkpoint
    from deltamoe.io.provenance import describe_checkpoint

    out: dict[str, Any] = {
        "deltamoe_version": __version__,
        "generated": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {platform.system()}, Python {platform.python_version()}",
        "languages": languages,
        "systems": {},
        **extra,
    }
    for name, (ckpt_dir, eval_dir) in systems.items():
        desc = describe_checkpoint(Checkpoint(ckpt_dir))
        entry: dict[str, Any] = {"checkpoint": desc["path"], "sha256": desc["sha256"], "eval_dir": str(eval_dir)}
        toy = eval_dir / "toy" / "results.json"
        if toy.is_file():
            res = json.loads(toy.read_text())
            entry["toy"] = res["languages"]
            if "routing" in res:
                entry["routing"] = res["routing"]
                # per language: share of tokens whose top-1 expert is one of its own (mean over layers)
                entry["allocation_realised"] = {lang: st["allocated_mean"]
                                                for lang, st in res["routing"]["languages"].items()
                                                if st.get("allocated_mean") is not None}
                entry["routing_png"] = str(eval_dir / "toy" / "routing.png")
        lm = eval_dir / "lm_eval" / "results.json"
        if lm.is_file():
            entry["lm_eval"] = json.loads(lm.read_text())
        out["systems"][name] = entry
    return out


def _mean(xs: list[float]) -> float:
    xs = [x for x in xs if x is not None and not math.isnan(x)]
    return sum(xs) / len(xs) if xs else math.nan


def _pooled(toy: dict[str, Any], langs: list[str], metric: str) -> tuple[float, float, float]:
    """Accuracy over the items of ``langs`` pooled (the mean over languages when they have as many
    items each) and its 95 % Wilson interval."""
    from deltamoe.evaluate.mc import wilson_interval

    n = sum(int(toy.get(lang, {}).get(f"{metric}_n", 0)) for lang in langs)
    if not n:
        return (math.nan, math.nan, math.nan)
    correct = round(sum(toy[lang][metric] * toy[lang][f"{metric}_n"] for lang in langs
                        if toy.get(lang, {}).get(f"{metric}_n")))
    lo, hi = wilson_interval(correct, n)
    return (correct / n, lo, hi)


def summary_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per system: per language QA and multiple-choice accuracy with 95 % intervals and
    perplexity; the same accuracies over the original and over the new languages' items."""
    orig, new = results["languages"]["original"], results["languages"]["new"]
    rows = []
    for name, entry in results["systems"].items():
        toy = entry.get("toy")
        if not toy:
            continue
        row: dict[str, Any] = {"system": name, "label": LABELS.get(name, name), "upper_bound": name in UPPER_BOUNDS}
        for lang in [*orig, *new]:
            res = toy.get(lang, {})
            for m in METRICS:
                row[f"{m}_{lang}"] = res.get(m, math.nan)
                row[f"{m}_{lang}_ci"] = tuple(res.get(f"{m}_ci", (math.nan, math.nan)))
            row[f"ppl_{lang}"] = res.get("ppl", math.nan)
        for group, langs in (("original", orig), ("new", new)):
            for m in METRICS:
                acc, lo, hi = _pooled(toy, langs, m)
                row[f"{m}_{group}"], row[f"{m}_{group}_ci"] = acc, (lo, hi)
            row[f"ppl_{group}"] = _mean([row[f"ppl_{lang}"] for lang in langs])
        rows.append(row)
    return rows


def _cell(row: dict[str, Any], key: str) -> str:
    v, (lo, hi) = row[key], row[f"{key}_ci"]
    return "–" if math.isnan(v) else f"{v:.3f} [{lo:.3f}, {hi:.3f}]"


def answer_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per system whose evaluation classified its answers: the share of each answer kind
    over all new-language QA items (see ``deltamoe.evaluate.qa.answer_kinds``)."""
    from deltamoe.evaluate.qa import ANSWER_KINDS

    rows = []
    for name, entry in results["systems"].items():
        per_lang = [entry.get("toy", {}).get(lang, {}).get("answers") for lang in results["languages"]["new"]]
        if not per_lang or any(a is None for a in per_lang):
            continue
        n = sum(a["n"] for a in per_lang)
        if not n:
            continue
        row: dict[str, Any] = {"system": name, "label": LABELS.get(name, name), "n": n}
        for kind in ANSWER_KINDS:
            row[kind] = sum(a[kind] * a["n"] for a in per_lang) / n
        rows.append(row)
    return rows


def allocation_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per MoE system whose evaluation measured routing: per language, the share of its
    tokens whose top-1 expert lies in its allocated set, per layer and averaged over layers."""
    rows = []
    for name, entry in results["systems"].items():
        langs = (entry.get("routing") or {}).get("languages") or {}
        if not any("allocated" in st for st in langs.values()):
            continue
        rows.append({"system": name, "label": LABELS.get(name, name),
                     "languages": {lang: {"mean": st["allocated_mean"], "layers": st["allocated"]}
                                   for lang, st in langs.items() if "allocated" in st}})
    return rows


def format_allocation_table(results: dict[str, Any]) -> str:
    """Markdown: per MoE system and language, the mean over layers of the share of tokens routed
    top-1 to the language's own experts, with the per-layer shares."""
    rows = allocation_rows(results)
    if not rows:
        return ""
    langs = [lang for lang in (*results["languages"]["original"], *results["languages"]["new"])
             if any(lang in r["languages"] for r in rows)]
    lines = ["| system | " + " | ".join(langs) + " |", "|" + "---|" * (len(langs) + 1)]
    for r in rows:
        cells = []
        for lang in langs:
            st = r["languages"].get(lang)
            cells.append("–" if st is None else
                         f"{st['mean']:.3f} ({', '.join(f'{v:.2f}' for v in st['layers'])})")
        lines.append(f"| {r['label']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_table(results: dict[str, Any]) -> str:
    """The result table (markdown), as printed by the demo and written to report.md: multiple
    choice and chat QA over the original and the new languages, with 95 % Wilson intervals over
    items, and mean perplexity."""
    head = ["system", "MC orig", "MC new", "QA orig", "QA new", "ppl orig", "ppl new"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in summary_rows(results):
        cells = [r["label"], *(_cell(r, f"{m}_{g}") for m in METRICS for g in ("original", "new")),
                 f"{r['ppl_original']:.2f}", f"{r['ppl_new']:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_language_table(results: dict[str, Any]) -> str:
    """Per language: multiple choice, chat QA (with 95 % intervals) and perplexity of every system."""
    langs = [*results["languages"]["original"], *results["languages"]["new"]]
    head = ["system", *(f"{m.upper()} {lang}" for lang in langs for m in METRICS), *(f"ppl {lang}" for lang in langs)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in summary_rows(results):
        cells = [r["label"], *(_cell(r, f"{m}_{lang}") for lang in langs for m in METRICS),
                 *(f"{r[f'ppl_{lang}']:.2f}" for lang in langs)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_report(workdir: Path, results: dict[str, Any], loss_logs: dict[str, Path], recipe_text: str) -> Path:
    """Write results.json, plots/ and report.md into ``workdir``; return the report path."""
    from deltamoe.report_plots import draw_plots

    (workdir / "results.json").write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n")
    made = draw_plots(results, loss_logs, workdir / "plots")
    lines = _results_section(results) + _answers_section(results) + _allocation_section(results)
    if results.get("budget_matched"):
        lines += _budget_section(results["budget_matched"])
    if results.get("block_expansion"):
        lines += _match_section(results["block_expansion"])
    if made:
        lines += ["## Plots", ""] + [f"![{k}]({v})" for k, v in made.items()] + [""]
    lines += ["## Checkpoints", "", "| system | sha256 | path |", "|---|---|---|"]
    for name, e in results["systems"].items():
        lines.append(f"| {LABELS.get(name, name)} | `{e['sha256'][:16]}…` | `{e['checkpoint']}` |")
    lines += ["", "## Recipe", "", "```yaml", recipe_text.rstrip(), "```", ""]
    report = workdir / "report.md"
    report.write_text("\n".join(lines))
    return report


def _results_section(results: dict[str, Any]) -> list[str]:
    return [
        f"# deltamoe report: {results.get('recipe_name', '')}",
        "",
        f"Generated {results['generated']} by deltamoe {results['deltamoe_version']} on {results['machine']}. "
        "Every number below is read from `results.json`, which names each evaluated checkpoint by path and sha256.",
        "",
        "## Results",
        "",
        format_table(results),
        "",
        "MC: multiple choice (reading comprehension and world facts, 4 options, the option with the highest "
        "log-likelihood wins, no chat template). QA: chat QA (greedy through the chat template, normalised exact "
        "match). orig / new: over the items of the original / new languages. Brackets: 95 % Wilson intervals over "
        "items. ppl: mean token perplexity of held-out text. The ceiling is an upper bound, not a baseline: it is "
        "post-trained on chat data in the new languages, which the method does without.",
        "",
        "## Per language",
        "",
        format_language_table(results),
        "",
    ]


def _section(title: str, *paragraphs: str) -> list[str]:
    """A report section: its heading and paragraphs (a table is one paragraph), blank lines between."""
    lines = [f"## {title}", ""]
    for para in paragraphs:
        lines += [para, ""]
    return lines


def _answers_section(results: dict[str, Any]) -> list[str]:
    kinds = answer_rows(results)
    if not kinds:
        return []
    table = [
        "| system | asked relation, question's language | original-language word | other | answers |",
        "|---|---|---|---|---|",
        *(f"| {r['label']} | {r['asked_relation']:.3f} | {r['original_language']:.3f} | {r['other']:.3f} | {r['n']} |"
          for r in kinds),
    ]
    return _section(
        "What the new-language answers are",
        "Share of all new-language chat answers that are a value word of the asked relation in the question's "
        "language (right or wrong), a value word of the original language, or anything else. A diagnostic: "
        "the score above stays exact match.",
        "\n".join(table))


def _allocation_section(results: dict[str, Any]) -> list[str]:
    alloc = format_allocation_table(results)
    if not alloc:
        return []
    return _section(
        "Language allocation realised",
        "Per MoE system and language: the share of the language's held-out tokens whose top-1 expert is one of "
        "the experts allocated to it (the original language: expert 0), the mean over MoE layers and, in "
        "brackets, layer by layer. Measured without language tags, as the model is served.",
        alloc)


def _budget_section(budget: dict[str, Any]) -> list[str]:
    return _section(
        "FLOP-matched dense baseline",
        f"MoE training: {budget['moe_tokens']:,} tokens × 6 × {budget['n_active_moe']:,} active parameters = "
        f"{budget['moe_flops']:.3e} FLOPs. Dense CPT: {budget['dense_steps']} steps × 6 × {budget['n_dense']:,} "
        f"parameters = {budget['dense_flops']:.3e} FLOPs (6·N·tokens; see `deltamoe.pipeline`).")


def _match_section(match: dict[str, Any]) -> list[str]:
    return _section(
        "Parameter-matched dense baseline",
        f"Block expansion adds {match['blocks']} decoder blocks (output layers {match['new_layers']}): "
        f"{match['added_params']:,} parameters, against {match['moe_added_params']:,} for the MoE's new experts "
        f"and routers (ratio {match['ratio']:.3f}). Only the new blocks train, on stage 1's data and steps; "
        "Δ is grafted onto the original blocks.")
