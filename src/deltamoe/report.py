"""``report.md``, ``results.json`` and plots for a recipe run.

Every number in ``report.md`` is read from ``results.json``, which names each evaluated checkpoint
by path and sha256.
"""

from __future__ import annotations

import json
import math
import platform
import shutil
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
    "moe_lpr": "MoE-LPR (no Δ)",
    "deltamoe": "DeltaMoE",
}


def collect(systems: dict[str, tuple[Path, Path]], languages: dict[str, list[str]], extra: dict[str, Any]) -> dict[str, Any]:
    """Build results.json: per system the checkpoint, its sha256 and its toy-suite scores.

    ``systems`` maps a system to (checkpoint dir, evaluation dir).
    """
    from deltamoe.checkpoint import Checkpoint
    from deltamoe.provenance import describe_checkpoint

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
                entry["routing_png"] = str(eval_dir / "toy" / "routing.png")
        lm = eval_dir / "lm_eval" / "results.json"
        if lm.is_file():
            entry["lm_eval"] = json.loads(lm.read_text())
        out["systems"][name] = entry
    return out


def _mean(xs: list[float]) -> float:
    xs = [x for x in xs if x is not None and not math.isnan(x)]
    return sum(xs) / len(xs) if xs else math.nan


def summary_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per system: QA accuracy per language, mean over original and new languages, ppl."""
    orig, new = results["languages"]["original"], results["languages"]["new"]
    rows = []
    for name, entry in results["systems"].items():
        toy = entry.get("toy")
        if not toy:
            continue
        row: dict[str, Any] = {"system": name, "label": LABELS.get(name, name)}
        for lang in [*orig, *new]:
            row[f"qa_{lang}"] = toy.get(lang, {}).get("qa", math.nan)
            row[f"ppl_{lang}"] = toy.get(lang, {}).get("ppl", math.nan)
        row["qa_original"] = _mean([row[f"qa_{lang}"] for lang in orig])
        row["qa_new"] = _mean([row[f"qa_{lang}"] for lang in new])
        rows.append(row)
    return rows


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


def format_table(results: dict[str, Any]) -> str:
    """The result table (markdown), as printed by the demo and written to report.md."""
    orig, new = results["languages"]["original"], results["languages"]["new"]
    langs = [*orig, *new]
    head = ["system", *(f"QA {lang}" for lang in langs), "QA orig", "QA new", *(f"ppl {lang}" for lang in langs)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in summary_rows(results):
        cells = [r["label"], *(f"{r[f'qa_{lang}']:.3f}" for lang in langs), f"{r['qa_original']:.3f}",
                 f"{r['qa_new']:.3f}", *(f"{r[f'ppl_{lang}']:.2f}" for lang in langs)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _plots(results: dict[str, Any], loss_logs: dict[str, Path], plots: Path) -> dict[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plots.mkdir(parents=True, exist_ok=True)
    rows = summary_rows(results)
    langs = [*results["languages"]["original"], *results["languages"]["new"]]
    made: dict[str, str] = {}
    if rows:
        fig, ax = plt.subplots(figsize=(max(8, 1.1 * len(rows)), 4.5))
        width = 0.8 / len(langs)
        for j, lang in enumerate(langs):
            ax.bar([i + j * width for i in range(len(rows))], [r[f"qa_{lang}"] for r in rows], width, label=lang)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(rows))], [r["label"] for r in rows], rotation=30, ha="right")
        ax.set_ylabel("chat QA accuracy")
        ax.set_ylim(0, 1)
        ax.legend(title="language")
        ax.set_title("Accuracy per language per system")
        fig.tight_layout()
        fig.savefig(plots / "accuracy.png", dpi=120)
        plt.close(fig)
        made["accuracy"] = "plots/accuracy.png"

        # Systems often coincide (B, B' and MoE-LPR all at 0; task arithmetic with weights (1, 1) is
        # ParamΔ), so points are told apart by marker and colour in a legend, not by text labels.
        fig, ax = plt.subplots(figsize=(8.5, 5))
        markers = "osD^v<>pXhP8"  # "*" is kept for DeltaMoE
        cmap = plt.get_cmap("tab20")
        for i, r in enumerate(rows):
            big = r["system"] == "deltamoe"
            ax.scatter(r["qa_original"], r["qa_new"], s=140 if big else 45, marker="*" if big else markers[i % len(markers)],
                       color=cmap(i % 20), edgecolors="black", linewidths=0.5, alpha=0.85, zorder=3 if big else 2,
                       label=f"{r['label']} ({r['qa_original']:.2f}, {r['qa_new']:.2f})")
        ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5), title="system (orig, new)",
                  title_fontsize=8, frameon=False)
        ax.grid(alpha=0.3)
        ax.set_xlabel("original-language QA accuracy")
        ax.set_ylabel("mean new-language QA accuracy")
        ax.set_xlim(-0.02, 1.02)
        ax.set_ylim(-0.02, 1.02)
        ax.set_title("Trade-off: original vs expanded languages")
        fig.tight_layout()
        fig.savefig(plots / "tradeoff.png", dpi=120)
        plt.close(fig)
        made["tradeoff"] = "plots/tradeoff.png"

    for name in ("deltamoe", "moe_lpr"):
        png = results["systems"].get(name, {}).get("routing_png")
        if png and Path(png).is_file():
            shutil.copyfile(png, plots / f"routing-{name}.png")
            made[f"routing-{name}"] = f"plots/routing-{name}.png"

    curves = {k: _read_losses(p) for k, p in loss_logs.items() if p.is_file()}
    curves = {k: v for k, v in curves.items() if v}
    if curves:
        fig, axes = plt.subplots(1, len(curves), figsize=(4.5 * len(curves), 3.8), squeeze=False)
        for ax, (stage, series) in zip(axes[0], curves.items()):
            for key, pts in series.items():
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="." if len(pts) < 20 else None, label=key)
            ax.set_title(stage)
            ax.set_xlabel("step")
            ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(plots / "training_loss.png", dpi=120)
        plt.close(fig)
        made["training_loss"] = "plots/training_loss.png"
    return made


def _read_losses(path: Path) -> dict[str, list[tuple[int, float]]]:
    series: dict[str, list[tuple[int, float]]] = {}
    for line in path.read_text().splitlines():
        rec = json.loads(line)
        if rec.get("kind") != "train":
            continue
        for k, v in rec.items():
            if k.startswith("loss") and isinstance(v, (int, float)):
                series.setdefault(k, []).append((int(rec["step"]), float(v)))
    return series


def write_report(workdir: Path, results: dict[str, Any], loss_logs: dict[str, Path], recipe_text: str) -> Path:
    """Write results.json, plots/ and report.md into ``workdir``; return the report path."""
    (workdir / "results.json").write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n")
    made = _plots(results, loss_logs, workdir / "plots")
    lines = [
        f"# deltamoe report: {results.get('recipe_name', '')}",
        "",
        f"Generated {results['generated']} by deltamoe {results['deltamoe_version']} on {results['machine']}. "
        "Every number below is read from `results.json`, which names each evaluated checkpoint by path and sha256.",
        "",
        "## Chat QA accuracy (greedy, normalised exact match) and perplexity per language",
        "",
        format_table(results),
        "",
        "QA orig / QA new: mean over the original / new languages.",
        "",
    ]
    kinds = answer_rows(results)
    if kinds:
        lines += [
            "## What the new-language answers are",
            "",
            "Share of all new-language chat answers that are a value word of the asked relation in the question's "
            "language (right or wrong), a value word of the original language, or anything else. A diagnostic: "
            "the score above stays exact match.",
            "",
            "| system | asked relation, question's language | original-language word | other | answers |",
            "|---|---|---|---|---|",
            *(f"| {r['label']} | {r['asked_relation']:.3f} | {r['original_language']:.3f} | {r['other']:.3f} | {r['n']} |"
              for r in kinds),
            "",
        ]
    budget = results.get("budget_matched")
    if budget:
        lines += [
            "## FLOP-matched dense baseline",
            "",
            f"MoE training: {budget['moe_tokens']:,} tokens × 6 × {budget['n_active_moe']:,} active parameters = "
            f"{budget['moe_flops']:.3e} FLOPs. Dense CPT: {budget['dense_steps']} steps × 6 × {budget['n_dense']:,} "
            f"parameters = {budget['dense_flops']:.3e} FLOPs (6·N·tokens; see `deltamoe.pipeline`).",
            "",
        ]
    if made:
        lines += ["## Plots", ""] + [f"![{k}]({v})" for k, v in made.items()] + [""]
    lines += ["## Checkpoints", "", "| system | sha256 | path |", "|---|---|---|"]
    for name, e in results["systems"].items():
        lines.append(f"| {LABELS.get(name, name)} | `{e['sha256'][:16]}…` | `{e['checkpoint']}` |")
    lines += ["", "## Recipe", "", "```yaml", recipe_text.rstrip(), "```", ""]
    report = workdir / "report.md"
    report.write_text("\n".join(lines))
    return report
