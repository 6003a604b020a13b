"""Markdown tables of a harness run: ratios first (what we compare), absolute numbers second."""

from __future__ import annotations

from bench.common import mib


def _fmt_ratio(r: dict) -> str:
    return f"{r['value']:.2f}"


def _met(r: dict) -> str:
    if "met" not in r:
        return ""
    return "yes" if r["met"] else "**no**"


def markdown(result: dict) -> str:
    m = result["machine"]
    lines = [
        f"Run `{result['command']}` ({result['mode']}, {result['repeats']} timed repeat(s) per command, "
        f"alternated; medians), {m['date']}.",
        f"Machine: {m['cpu']}, {m['cores']} cores; load average at start {m.get('load_average_at_start', '?')}. "
        f"Python {m['python']}, torch {m['torch']}, transformers {m['transformers']}, mergekit {m['mergekit']}, "
        f"deltamoe {m['deltamoe']}.",
        "",
        "### Ratios",
        "",
        "| scenario | ratio | value | goal | met |",
        "|---|---|---|---|---|",
    ]
    for name, s in result["scenarios"].items():
        for r in s["ratios"]:
            value = _fmt_ratio(r) + (f" ({r['abs']})" if "abs" in r else "")
            lines.append(f"| {name} | {r['what']} | {value} | {r.get('goal', '')} | {_met(r)} |")
    lines += ["", "### Absolute numbers", ""]
    for name, s in result["scenarios"].items():
        lines += [f"**{name}**: {s['title']}. {s['setup']}.", ""]
        if name == "train":
            lines += ["| model | variant | s/step (CPU time) | tokens/s (CPU time) | tokens/s (wall) | runs (tokens/s, CPU) "
                      "| peak RSS |", "|---|---|---|---|---|---|---|"]
            for model, mm in s["models"].items():
                for v, r in mm["rows"].items():
                    cpu = f"{r['step_cpu_s']:.3f}" if "step_cpu_s" in r else "–"
                    tcpu = f"{r['tokens_per_s_cpu']:.0f}" if "tokens_per_s_cpu" in r else "–"
                    runs = ", ".join(map(str, r.get("cpu_runs", []))) or "–"
                    lines.append(f"| {model} | {v} | {cpu} | {tcpu} | {r['tokens_per_s_wall']:.0f} | {runs} "
                                 f"| {mib(r['peak_rss'])} MiB |")
        else:
            if s.get("same_model_as_mergekit"):
                eq = s["same_model_as_mergekit"]
                lines += [f"deltamoe and mergekit wrote the same model: {100 * eq['identical_fraction']:.6f} % of the "
                          f"elements bit-identical, max |difference| {eq['max_abs_diff']:.2g}.", ""]
            lines += ["| command | median wall | runs (wall) | CPU time (median) | GB/s (read + written) | peak RSS |",
                      "|---|---|---|---|---|---|"]
            for k, r in s["rows"].items():
                runs = ", ".join(f"{w:.1f}" for w in r["walls"])
                cpu = f"{r['cpu']:.1f} s" if "cpu" in r else "–"
                lines.append(f"| {k} | {r['wall']:.1f} s | {runs} | {cpu} | {r.get('gb_per_s', '')} "
                             f"| {mib(r['peak_rss'])} MiB |")
        lines.append("")
    return "\n".join(lines)
