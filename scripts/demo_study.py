"""Vary one setting of the demo recipe at a time and compare DeltaMoE (and MoE-LPR) across the variants.

    python scripts/demo_study.py DEMO_DIR [--only NAME ...] [--out DIR]

DEMO_DIR is a finished ``deltamoe demo`` work directory. Each variant is the demo recipe with one
change, written to ``OUT/NAME/recipe.yaml`` (default OUT: ``DEMO_DIR/study``) and run with
``deltamoe run``; its ``stages`` directory is a link to the demo's, so the toy world, the dense
baselines and every stage a variant does not change come from the cache (stage keys hash their
parameters, so sharing is safe). Variants keep only the baselines P, ParamΔ and MoE-LPR.

Writes ``OUT/study.md`` (the tables docs/history.md quotes) and ``OUT/study.json``:

- per variant, the QA accuracy and perplexity per language of DeltaMoE and MoE-LPR;
- for the demo's systems and each variant's DeltaMoE, what the new-language chat answers are (the
  evaluator's answer kinds, :func:`deltamoe.evaluate.qa.answer_kinds`): a value word of the asked
  relation in the question's language (the answer behaviour transferred, right or wrong), a value
  word of the original language (answering in the wrong language), or anything else.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from deltamoe.report import answer_rows, summary_rows


def _set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def edit(r: dict[str, Any]) -> None:
        *head, last = path.split(".")
        node = r
        for key in head:
            node = node.setdefault(key, {})
        node[last] = value
    return edit


# name -> (what changes, edit of the recipe dict)
VARIANTS: dict[str, tuple[str, Callable[[dict[str, Any]], None]]] = {
    "graft_new": ("graft --experts new (Δ_FFN only into experts 1-3)", _set("graft.experts", "new")),
    "graft_original": ("graft --experts original (Δ_FFN only into expert 0)", _set("graft.experts", "original")),
    "lpr0": ("router review LPR coefficient 0", _set("train.router_review.losses.lpr", 0.0)),
    "lpr0.5": ("router review LPR coefficient 0.5", _set("train.router_review.losses.lpr", 0.5)),
    "lpr2": ("router review LPR coefficient 2", _set("train.router_review.losses.lpr", 2.0)),
    "lpr_stage1": ("LPR coefficient 0.5 in stage 1 too (routers learn the allocation with the experts)",
                   _set("train.post_pretrain.losses.lpr", 0.5)),
    "top1": ("top-k 1", _set("upcycle.top_k", 1)),
    "top3": ("top-k 3", _set("upcycle.top_k", 3)),
    "top1_graft_new": ("top-k 1 and graft --experts new",
                       lambda r: (_set("upcycle.top_k", 1)(r), _set("graft.experts", "new")(r))),
    "experts7": ("7 experts, two per new language (en 0; vel 1,2; kyr 3,4; tol 5,6)",
                 _set("upcycle", {"experts": 7, "top_k": 2,
                                  "allocation": {"en": [0], "vel": [1, 2], "kyr": [3, 4], "tol": [5, 6]}})),
    "cpt100": ("stage 1: 100 steps (half)", _set("train.post_pretrain.train.steps", 100)),
    "cpt400": ("stage 1: 400 steps (double)", _set("train.post_pretrain.train.steps", 400)),
    "cpt800": ("stage 1: 800 steps (4x)", _set("train.post_pretrain.train.steps", 800)),
    "attention": ("stage 1 also trains attention and norms (departs from the method: B's attention is no longer kept)",
                  _set("train.post_pretrain.trainable",
                       {"new_experts": True, "routers": True, "attention": True, "norms": True})),
}

LANGS = ("en", "vel", "kyr", "tol")


def _require_demo(workdir: Path) -> None:
    if not (workdir / "results.json").is_file() or not any((workdir / "stages").glob("toy-*")):
        raise SystemExit(f"{workdir}: not a finished demo (no results.json or toy build); run 'deltamoe demo' first")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("demo", type=Path, help="a finished 'deltamoe demo' work directory")
    ap.add_argument("--only", nargs="+", choices=sorted(VARIANTS), help="run only these variants")
    ap.add_argument("--out", type=Path, help="default: DEMO/study")
    args = ap.parse_args()
    demo = args.demo.absolute()
    out = (args.out or demo / "study").absolute()
    _require_demo(demo)
    base = yaml.safe_load((demo / "recipe.yaml").read_text())
    deltamoe = str(Path(sys.executable).with_name("deltamoe"))

    runs: dict[str, dict[str, Any]] = {"demo": {"what": "the demo recipe", "results": demo / "results.json"}}
    for name in args.only or VARIANTS:
        what, edit = VARIANTS[name]
        recipe = copy.deepcopy(base)
        edit(recipe)
        recipe["name"] = f"{base['name']}-{name}"
        recipe["workdir"] = "."
        recipe["baselines"] = ["post", "paramdelta", "moe_lpr"]
        d = out / name
        d.mkdir(parents=True, exist_ok=True)
        if not (d / "stages").exists():
            os.symlink(demo / "stages", d / "stages")
        (d / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
        t0 = time.perf_counter()
        print(f"{name}: {what} ...", flush=True)
        with (d / "log.txt").open("w") as log:
            rc = subprocess.call([deltamoe, "run", str(d / "recipe.yaml"), "-q"], stdout=log, stderr=subprocess.STDOUT)
        if rc:
            raise SystemExit(f"{name}: deltamoe run failed (exit {rc}); see {d / 'log.txt'}")
        print(f"{name}: done in {time.perf_counter() - t0:.0f} s", flush=True)
        runs[name] = {"what": what, "results": d / "results.json"}

    table = ["| variant | system | " + " | ".join(f"QA {lang}" for lang in LANGS) + " | QA new | "
             + " | ".join(f"ppl {lang}" for lang in LANGS) + " |", "|---" * (3 + 2 * len(LANGS)) + "|"]
    kinds = ["| system | asked relation, question's language | original-language word | other | QA new (exact match) |",
             "|---|---|---|---|---|"]
    summary: dict[str, Any] = {}
    for name, run in runs.items():
        res = json.loads(Path(run["results"]).read_text())
        rows = {r["system"]: r for r in summary_rows(res)}
        summary[name] = {"what": run["what"], "systems": {}}
        for system in ("moe_lpr", "deltamoe"):
            r = rows[system]
            table.append(f"| {name} | {r['label']} | " + " | ".join(f"{r[f'qa_{lang}']:.3f}" for lang in LANGS)
                         + f" | {r['qa_new']:.3f} | " + " | ".join(f"{r[f'ppl_{lang}']:.2f}" for lang in LANGS) + " |")
            summary[name]["systems"][system] = {k: r[k] for k in r if k.startswith(("qa_", "ppl_"))}
        for k in answer_rows(res):
            if name != "demo" and k["system"] != "deltamoe":
                continue
            summary[name]["systems"].setdefault(k["system"], {})["answer_kinds"] = k
            label = k["label"] if name == "demo" else f"DeltaMoE, {name}"
            kinds.append(f"| {label} | {k['asked_relation']:.3f} | {k['original_language']:.3f} | "
                         f"{k['other']:.3f} | {rows[k['system']]['qa_new']:.3f} |")
    what = "\n".join(f"- `{n}`: {r['what']}" for n, r in runs.items())
    md = f"## Variants\n\n{what}\n\n" + "\n".join(table) + "\n\n## New-language chat answers by kind\n\n" + "\n".join(kinds) + "\n"
    out.mkdir(parents=True, exist_ok=True)
    (out / "study.md").write_text(md)
    (out / "study.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(md)
    print(f"written: {out / 'study.md'}, {out / 'study.json'}")


if __name__ == "__main__":
    main()
