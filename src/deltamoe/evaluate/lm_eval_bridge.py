"""Export the toy evaluation sets as lm-eval tasks over local JSON files.

``lm_eval --model hf --model_args pretrained=MODEL --include_path OUT --tasks deltamoe_toy
--apply_chat_template`` then scores any checkpoint, toy or real, on them. The generation tasks
use the prompts, greedy decoding, token budget, stop rule and normalisation of
:mod:`deltamoe.evaluate.qa`, so lm-eval's ``exact_match`` equals deltamoe's accuracy.

Written per language L::

    deltamoe_toy_qa_rc_L      generate_until   reading comprehension (context + question)
    deltamoe_toy_qa_facts_L   generate_until   world facts (question only)
    deltamoe_toy_mc_rc_L      multiple_choice  reading comprehension, 4 options (no chat template)
    deltamoe_toy_mc_facts_L   multiple_choice  world facts, 4 options (no chat template)
    deltamoe_toy_ppl_L        loglikelihood_rolling on the held-out text (word/byte perplexity)

and groups ``deltamoe_toy_qa_L``, ``deltamoe_toy_qa`` (every QA task), ``deltamoe_toy_mc_L``,
``deltamoe_toy_mc`` (every multiple-choice task) and ``deltamoe_toy_ppl``. The multiple-choice
tasks' ``acc`` equals deltamoe's ``mc_rc``/``mc_facts`` (:mod:`deltamoe.evaluate.mc` scores the
way lm-eval does); run them without ``--apply_chat_template``, as deltamoe does.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from deltamoe.errors import UsageError
from deltamoe.evaluate.qa import MAX_NEW_TOKENS, STRIP_REGEXES
from deltamoe.evaluate.mc import DELIMITER
from deltamoe.evaluate.suite import MC_TASKS, QA_TASKS

PREFIX = "deltamoe_toy"


def _yaml(obj: Any, indent: int = 0) -> str:
    """Tiny YAML emitter for the task files (JSON scalars are valid YAML, so strings are quoted
    JSON-style and never misread)."""
    pad = "  " * indent
    lines = []
    if isinstance(obj, dict):
        for k, v in obj.items():
            if isinstance(v, dict | list) and v:
                lines.append(f"{pad}{k}:")
                lines.append(_yaml(v, indent + 1))
            else:
                lines.append(f"{pad}{k}: {json.dumps(v, ensure_ascii=False)}")
    else:
        for v in obj:
            if isinstance(v, dict):
                first, *rest = _yaml(v, indent + 1).split("\n")
                lines.append(f"{pad}- {first.strip()}")
                lines.extend(rest)
            else:
                lines.append(f"{pad}- {json.dumps(v, ensure_ascii=False)}")
    return "\n".join(lines)


def _json_task(name: str, data_file: Path, output_type: str) -> dict[str, Any]:
    """The part every exported task shares: a local JSON file as the test split."""
    return {"task": name, "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(data_file)}},
            "test_split": "test", "output_type": output_type}


def qa_task(name: str, data_file: Path) -> dict[str, Any]:
    return {
        **_json_task(name, data_file, "generate_until"),
        "doc_to_text": "{{prompt}}",
        "doc_to_target": "{{answer}}",
        "target_delimiter": "",
        "num_fewshot": 0,
        # until=[]: lm-eval adds the tokenizer's eos string, which is also where deltamoe stops
        "generation_kwargs": {"until": [], "max_gen_toks": MAX_NEW_TOKENS, "do_sample": False},
        "metric_list": [{
            "metric": "exact_match", "aggregation": "mean", "higher_is_better": True,
            "ignore_case": True, "ignore_punctuation": True, "regexes_to_ignore": list(STRIP_REGEXES),
        }],
        "metadata": {"version": 1.0},
    }


def mc_task(name: str, data_file: Path) -> dict[str, Any]:
    return {
        **_json_task(name, data_file, "multiple_choice"),
        "doc_to_text": "{{prompt}}",
        "doc_to_choice": "options",
        "doc_to_target": "gold",
        "target_delimiter": DELIMITER,
        "num_fewshot": 0,
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
        "metadata": {"version": 1.0},
    }


def ppl_task(name: str, data_file: Path) -> dict[str, Any]:
    return {
        **_json_task(name, data_file, "loglikelihood_rolling"),
        "doc_to_text": "",
        "doc_to_target": "{{text}}",
        "metric_list": [
            {"metric": "word_perplexity"}, {"metric": "byte_perplexity"}, {"metric": "bits_per_byte"},
        ],
        "metadata": {"version": 1.0},
    }


def group(name: str, tasks: list[str], metric: str | None) -> dict[str, Any]:
    g: dict[str, Any] = {"group": name, "task": tasks}
    if metric:
        g["aggregate_metric_list"] = [{"metric": metric, "aggregation": "mean", "weight_by_size": True}]
    g["metadata"] = {"version": 1.0}
    return g


def export_lm_eval(toy_dir: str | Path, out: str | Path, *, force: bool = False) -> dict[str, Any]:
    """Write lm-eval task YAMLs (and copies of the evaluation data they read) for the toy world in
    ``toy_dir`` into ``out``. Returns {"out", "tasks", "groups"}."""
    from deltamoe.io import atomic_output_dir

    toy = Path(toy_dir)
    manifest_path = toy / "toy.json"
    if not manifest_path.is_file():
        raise UsageError(f"{toy}: not a toy world (no toy.json); build one with 'deltamoe toy build'")
    manifest = json.loads(manifest_path.read_text())
    langs = [manifest["original_language"], *manifest["new_languages"]]
    out = Path(out).absolute()
    tasks: list[str] = []
    groups: list[str] = []
    with atomic_output_dir(out, force=force) as tmp:
        qa_all: list[str] = []
        mc_all: list[str] = []
        ppl_all: list[str] = []
        for lang in langs:
            per_lang = []
            per_lang_mc = []
            for kind in (*QA_TASKS, *MC_TASKS, "ppl"):
                src = toy / "eval" / lang / f"{kind}.jsonl"
                if not src.is_file():
                    raise UsageError(f"{src}: missing; the toy directory is incomplete, rebuild it with --force")
                (tmp / "data" / lang).mkdir(parents=True, exist_ok=True)
                shutil.copyfile(src, tmp / "data" / lang / src.name)
                # the YAML names the file's final location (datasets resolves relative paths
                # against the working directory, not the YAML's)
                final = out / "data" / lang / src.name
                name = f"{PREFIX}_{kind}_{lang}"
                spec = (ppl_task if kind == "ppl" else mc_task if kind in MC_TASKS else qa_task)(name, final)
                (tmp / f"{name}.yaml").write_text(_yaml(spec) + "\n", encoding="utf-8")
                tasks.append(name)
                if kind == "ppl":
                    ppl_all.append(name)
                elif kind in MC_TASKS:
                    per_lang_mc.append(name)
                    mc_all.append(name)
                else:
                    per_lang.append(name)
                    qa_all.append(name)
            gname = f"{PREFIX}_qa_{lang}"
            (tmp / f"{gname}.yaml").write_text(_yaml(group(gname, per_lang, "exact_match")) + "\n")
            groups.append(gname)
            gname = f"{PREFIX}_mc_{lang}"
            (tmp / f"{gname}.yaml").write_text(_yaml(group(gname, per_lang_mc, "acc")) + "\n")
            groups.append(gname)
        for gname, members, metric in ((f"{PREFIX}_qa", qa_all, "exact_match"), (f"{PREFIX}_mc", mc_all, "acc"),
                                       (f"{PREFIX}_ppl", ppl_all, None)):
            (tmp / f"{gname}.yaml").write_text(_yaml(group(gname, members, metric)) + "\n")
            groups.append(gname)
        (tmp / "README.md").write_text(
            f"lm-eval tasks for the deltamoe toy world at {toy.absolute()} "
            f"(size {manifest.get('size')}, seed {manifest.get('seed')}, key {manifest.get('key')}).\n\n"
            f"    lm_eval --model hf --model_args pretrained=MODEL --include_path {out} \\\n"
            f"        --tasks {PREFIX}_qa --apply_chat_template\n\n"
            "QA tasks must run with --apply_chat_template to match `deltamoe eval` (same prompt, greedy, "
            f"max {MAX_NEW_TOKENS} new tokens, stop at the tokenizer's eos, normalised exact match). "
            f"Multiple-choice tasks ({PREFIX}_mc) run without --apply_chat_template, as `deltamoe eval` scores them. "
            "Perplexity tasks report lm-eval's word/byte perplexity, not deltamoe's token perplexity.\n"
        )
    return {"out": str(out), "tasks": tasks, "groups": groups}
