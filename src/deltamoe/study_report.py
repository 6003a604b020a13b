"""The study report: every system over seeds and items, paired differences, trade-off plots.

Scores are read from each run's evaluation predictions (one correct/incorrect per item), so the
intervals can resample items as well as seeds. A system whose evaluation is the same stage in
every variant (a baseline no variant changes) is one row, ``(all)``; variants that share a system's
evaluations (a baseline that only some variants change) share its row, named by those variants;
a system a variant leaves out has no row for it.
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path
from typing import Any

import numpy as np

GROUPS = {"qa": ("qa_rc", "qa_facts"), "mc": ("mc_rc", "mc_facts")}
CELLS = [(m, g) for m in ("qa", "mc") for g in ("original", "new")]


def _items(eval_dir: Path, languages: dict[str, list[str]]) -> dict[str, dict[str, bool]]:
    """``{"qa_new": {item id: correct}, ...}`` from an evaluation's predictions."""
    out: dict[str, dict[str, bool]] = {f"{m}_{g}": {} for m, g in CELLS}
    group_of = {lang: g for g, langs in languages.items() for lang in langs}
    task_metric = {t: m for m, tasks in GROUPS.items() for t in tasks}
    path = eval_dir / "toy" / "predictions.jsonl"
    with open(path, encoding="utf-8") as f:
        for line in f:
            r = json.loads(line)
            metric, group = task_metric.get(r["task"]), group_of.get(r["lang"])
            if metric and group:
                out[f"{metric}_{group}"][f"{r['lang']}/{r['task']}/{r['id']}"] = bool(r["correct"])
    return out


def bootstrap(per_seed: list[np.ndarray], resamples: int, seed: int) -> tuple[float, float, float]:
    """Mean over seeds of the per-seed mean, and a 95 % percentile interval from resampling seeds
    (when there are several) and then items within each drawn seed."""
    rng = np.random.default_rng(seed)
    point = float(np.mean([a.mean() for a in per_seed]))
    n_seeds = len(per_seed)
    draws = np.empty(resamples)
    for b in range(resamples):
        picks = rng.integers(0, n_seeds, n_seeds) if n_seeds > 1 else np.zeros(1, dtype=int)
        draws[b] = np.mean([per_seed[s][rng.integers(0, len(per_seed[s]), len(per_seed[s]))].mean() for s in picks])
    lo, hi = np.percentile(draws, [2.5, 97.5])
    return point, float(lo), float(hi)


def _rows(spec: Any, runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (system, variant), variants folded into one row where the system's evaluation
    stage is the same in all of them; each with per-seed item maps."""
    from deltamoe.pipeline.graph import SYSTEM_ORDER
    from deltamoe.report import LABELS

    variants = list(spec.variants)
    names = [s for s in SYSTEM_ORDER if any(s in r["results"]["systems"] for r in runs)]
    rows = []
    for name in names:
        # the variants that evaluate this system (a variant may leave a baseline out), grouped by
        # whether their evaluations are the same stages, seed by seed
        having = [v for v in variants if all(name in r["results"]["systems"] for r in runs if r["variant"] == v)]
        groups: dict[tuple[str, ...], list[str]] = {}
        for v in having:
            keys = tuple(r["results"]["stages"][f"eval-{name}"]["key"] for r in runs if r["variant"] == v)
            groups.setdefault(keys, []).append(v)
        for group in groups.values():
            mine = [r for r in runs if r["variant"] == group[0]]
            label = "(all)" if len(group) == len(variants) else ", ".join(group)
            rows.append({
                "system": name, "label": LABELS.get(name, name), "variant": label, "in_variants": group,
                "seeds": [r["seed"] for r in mine],
                "items": [_items(Path(r["results"]["systems"][name]["eval_dir"]), r["results"]["languages"])
                          for r in mine],
                "allocation": [r["results"]["systems"][name].get("allocation_realised") for r in mine],
            })
    return rows


def _stats(row: dict[str, Any], resamples: int) -> dict[str, Any]:
    out = {}
    for m, g in CELLS:
        cell = f"{m}_{g}"
        per_seed = [np.array([v for _, v in sorted(it[cell].items())], dtype=float) for it in row["items"]]
        if any(len(a) == 0 for a in per_seed):
            continue
        mean, lo, hi = bootstrap(per_seed, resamples, zlib.crc32(f"{row['system']}/{row['variant']}/{cell}".encode()))
        out[cell] = {"mean": mean, "ci": [lo, hi], "per_seed": [float(a.mean()) for a in per_seed],
                     "items": int(sum(len(a) for a in per_seed))}
    return out


def _difference(a: dict[str, Any], b: dict[str, Any], resamples: int) -> dict[str, Any]:
    """a − b, paired by seed and item."""
    out = {}
    for m, g in CELLS:
        cell = f"{m}_{g}"
        per_seed = []
        for ia, ib in zip(a["items"], b["items"], strict=True):
            common = sorted(set(ia[cell]) & set(ib[cell]))
            per_seed.append(np.array([float(ia[cell][k]) - float(ib[cell][k]) for k in common]))
        if any(len(d) == 0 for d in per_seed):
            continue
        mean, lo, hi = bootstrap(per_seed, resamples,
                                 zlib.crc32(f"{a['system']}/{a['variant']}-{b['system']}/{b['variant']}/{cell}".encode()))
        out[cell] = {"mean": mean, "ci": [lo, hi], "excludes_zero": lo > 0 or hi < 0}
    return out


def study_numbers(spec: Any, runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Everything the study report shows, as one JSON-able dict."""
    rows = _rows(spec, runs)
    for r in rows:
        r["stats"] = _stats(r, spec.bootstrap)
    diffs = []
    for a in (r for r in rows if r["system"] == spec.compare):
        for b in rows:  # paired where one row's variants hold the other's
            va, vb = set(a["in_variants"]), set(b["in_variants"])
            if b["system"] == spec.compare or not (va <= vb or vb <= va):
                continue
            diffs.append({"variant": a["variant"], "against": b["system"], "against_label": b["label"],
                          "against_variant": b["variant"], "stats": _difference(a, b, spec.bootstrap)})
    return {"name": spec.name, "seeds": spec.seeds, "variants": spec.variants, "compare": spec.compare,
            "bootstrap": spec.bootstrap,
            "rows": [{k: v for k, v in r.items() if k != "items"} for r in rows], "differences": diffs}


def _fmt(s: dict[str, Any] | None) -> str:
    return "–" if not s else f"{s['mean']:.3f} [{s['ci'][0]:.3f}, {s['ci'][1]:.3f}]"


def _markdown(numbers: dict[str, Any]) -> str:
    seeds = ", ".join(map(str, numbers["seeds"]))
    lines = [f"# Study {numbers['name']}", "",
             f"Seeds {seeds} (every seed that was run). Means over seeds; brackets: 95 % intervals from a two-level "
             f"bootstrap ({numbers['bootstrap']} resamples of seeds, then items within each seed). QA: chat QA, MC: "
             "multiple choice; orig / new: the original / new languages' items.", "",
             "| system | variant | QA orig | QA new | MC orig | MC new | QA new per seed |", "|---|---|---|---|---|---|---|"]
    for r in numbers["rows"]:
        st = r["stats"]
        per = ", ".join(f"{v:.3f}" for v in st.get("qa_new", {}).get("per_seed", []))
        lines.append(f"| {r['label']} | {r['variant']} | {_fmt(st.get('qa_original'))} | {_fmt(st.get('qa_new'))} | "
                     f"{_fmt(st.get('mc_original'))} | {_fmt(st.get('mc_new'))} | {per} |")
    lines += ["", f"## {numbers['compare']} minus each system, paired by seed and item", "",
              "An interval that excludes 0 is marked *.", "",
              "| variant | against | QA orig | QA new | MC orig | MC new |", "|---|---|---|---|---|---|"]
    for d in numbers["differences"]:
        cells = []
        for m, g in CELLS:
            s = d["stats"].get(f"{m}_{g}")
            cells.append("–" if not s else f"{s['mean']:+.3f} [{s['ci'][0]:+.3f}, {s['ci'][1]:+.3f}]"
                         + (" *" if s["excludes_zero"] else ""))
        against = d["against_label"] + (f" ({d['against_variant']})" if d["against_variant"] != "(all)" else "")
        lines.append(f"| {d['variant']} | {against} | " + " | ".join(cells) + " |")
    alloc = [r for r in numbers["rows"] if any(r["allocation"])]
    if alloc:
        langs = sorted({lang for r in alloc for a in r["allocation"] if a for lang in a})
        lines += ["", "## Language allocation realised", "",
                  "Share of each language's tokens routed top-1 to its own experts (mean over layers), per seed.", "",
                  "| system | variant | " + " | ".join(langs) + " |", "|---|---|" + "---|" * len(langs)]
        for r in alloc:
            cells = [", ".join(f"{a[lang]:.3f}" for a in r["allocation"] if a and lang in a) for lang in langs]
            lines.append(f"| {r['label']} | {r['variant']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _tradeoff(numbers: dict[str, Any], metric: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 5), layout="constrained")
    for r in numbers["rows"]:
        o, n = r["stats"].get(f"{metric}_original"), r["stats"].get(f"{metric}_new")
        if not o or not n:
            continue
        ax.errorbar(o["mean"], n["mean"], xerr=[[o["mean"] - o["ci"][0]], [o["ci"][1] - o["mean"]]],
                    yerr=[[n["mean"] - n["ci"][0]], [n["ci"][1] - n["mean"]]], fmt="s" if r["system"] == "ceiling"
                    else "o", mfc="none" if r["system"] == "ceiling" else None, capsize=3,
                    label=r["label"] + ("" if r["variant"] == "(all)" else f" [{r['variant']}]"))
    ax.set_xlabel(f"{metric.upper()} original language")
    ax.set_ylabel(f"{metric.upper()} new languages")
    ax.set_title(f"{numbers['name']}: mean over seeds {numbers['seeds']}, 95 % intervals", fontsize=9)
    ax.legend(fontsize=6, loc="best")
    fig.savefig(path, dpi=120, metadata={"Software": None})
    plt.close(fig)


def write_study_report(workdir: Path, spec: Any, runs: list[dict[str, Any]]) -> Path:
    """``study.json``, ``study.md`` and ``plots/study_tradeoff_{qa,mc}.png`` in ``workdir``."""
    from deltamoe.io import atomic_write_text

    numbers = study_numbers(spec, runs)
    (workdir / "plots").mkdir(parents=True, exist_ok=True)
    for metric in ("qa", "mc"):
        _tradeoff(numbers, metric, workdir / "plots" / f"study_tradeoff_{metric}.png")
    atomic_write_text(workdir / "study.json", json.dumps(numbers, indent=2) + "\n")
    md = _markdown(numbers) + "\n![QA](plots/study_tradeoff_qa.png)\n![MC](plots/study_tradeoff_mc.png)\n"
    atomic_write_text(workdir / "study.md", md)
    return workdir / "study.md"
