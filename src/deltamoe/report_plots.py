"""The plots of a recipe run's report: accuracy per language and system, the original- vs
new-language trade-off, the routing heatmaps of the MoE systems, and the training losses."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from deltamoe.report import METRICS, summary_rows


def _err(row: dict[str, Any], key: str) -> list[float]:
    v, (lo, hi) = row[key], row[f"{key}_ci"]
    return [max(0.0, v - lo), max(0.0, hi - v)]


def draw_plots(results: dict[str, Any], loss_logs: dict[str, Path], plots: Path) -> dict[str, str]:
    """Draw the plots into ``plots``; return {name: path relative to the report}."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plots.mkdir(parents=True, exist_ok=True)
    rows = summary_rows(results)
    langs = [*results["languages"]["original"], *results["languages"]["new"]]
    made: dict[str, str] = {}
    if rows:
        fig, axes = plt.subplots(2, 1, figsize=(max(8, 1.1 * len(rows)), 8), sharex=True)
        width = 0.8 / len(langs)
        for ax, m, title in zip(axes, METRICS, ("multiple choice (log-likelihood)", "chat QA (exact match)"), strict=True):
            for j, lang in enumerate(langs):
                errs = list(zip(*(_err(r, f"{m}_{lang}") for r in rows), strict=True))
                ax.bar([i + j * width for i in range(len(rows))], [r[f"{m}_{lang}"] for r in rows], width, label=lang,
                       yerr=errs, capsize=2, error_kw={"linewidth": 0.7})
            ax.set_ylabel(f"{title} accuracy")
            ax.set_ylim(0, 1)
            ax.legend(title="language", fontsize=7)
        axes[-1].set_xticks([i + 0.4 - width / 2 for i in range(len(rows))], [r["label"] for r in rows],
                            rotation=30, ha="right")
        axes[0].set_title("Accuracy per language per system (bars: 95 % Wilson intervals over items)")
        fig.tight_layout()
        fig.savefig(plots / "accuracy.png", dpi=120)
        plt.close(fig)
        made["accuracy"] = "plots/accuracy.png"
        for m, what in (("qa", "chat QA"), ("mc", "multiple-choice")):
            made[f"tradeoff_{m}"] = _tradeoff(plt, rows, m, what, plots / f"tradeoff_{m}.png")

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


def _tradeoff(plt: Any, rows: list[dict[str, Any]], m: str, what: str, path: Path) -> str:
    """Original- vs new-language accuracy, one point per system with its 95 % intervals. Systems
    often coincide, so they are told apart by marker and colour in a legend, not by text labels;
    DeltaMoE is the star, upper bounds are hollow squares."""
    fig, ax = plt.subplots(figsize=(8.5, 5))
    markers = "osD^v<>pXhP8"  # "*" is kept for DeltaMoE
    cmap = plt.get_cmap("tab20")
    for i, r in enumerate(rows):
        x, y = r[f"{m}_original"], r[f"{m}_new"]
        big = r["system"] == "deltamoe"
        marker = "*" if big else "s" if r["upper_bound"] else markers[i % len(markers)]
        color = cmap(i % 20)
        ax.errorbar(x, y, xerr=[[e] for e in _err(r, f"{m}_original")], yerr=[[e] for e in _err(r, f"{m}_new")],
                    fmt="none", ecolor=color, elinewidth=0.8, capsize=2, zorder=1)
        ax.scatter(x, y, s=140 if big else 45, marker=marker, color="none" if r["upper_bound"] else color,
                   edgecolors=color if r["upper_bound"] else "black", linewidths=1.2 if r["upper_bound"] else 0.5,
                   alpha=0.9, zorder=3 if big else 2, label=f"{r['label']} ({x:.2f}, {y:.2f})")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5), title="system (orig, new)",
              title_fontsize=8, frameon=False)
    ax.grid(alpha=0.3)
    ax.set_xlabel(f"original-language {what} accuracy")
    ax.set_ylabel(f"new-language {what} accuracy")
    ax.set_xlim(-0.02, 1.02)
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(f"Trade-off ({what}): original vs expanded languages, 95 % intervals")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return f"plots/{path.name}"


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
