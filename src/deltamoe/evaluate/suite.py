"""Evaluation suites: where their data lives and how it is loaded. The ``toy`` suite reads the
evaluation sets that ``deltamoe toy build`` wrote."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from deltamoe.errors import DeltaMoEError, UsageError

SUITES = ("toy",)
QA_TASKS = ("qa_rc", "qa_facts")
MC_TASKS = ("mc_rc", "mc_facts")


@dataclass
class ToySuite:
    path: Path
    manifest: dict[str, Any]
    languages: list[str]
    qa: dict[str, dict[str, list[dict[str, Any]]]] = field(default_factory=dict)  # lang -> task -> items
    mc: dict[str, dict[str, list[dict[str, Any]]]] = field(default_factory=dict)  # lang -> task -> items
    ppl: dict[str, list[str]] = field(default_factory=dict)  # lang -> texts
    # From world.json (absent in foreign data): lang -> relation -> normalised value words, and the
    # original language's value words; used to classify answers (deltamoe.evaluate.qa.answer_kinds).
    relation_words: dict[str, dict[str, set[str]]] = field(default_factory=dict)
    original_words: set[str] = field(default_factory=set)


def check_suite(suite: str) -> None:
    if suite not in SUITES:
        raise UsageError(f"unknown suite {suite!r}; available suites: {', '.join(SUITES)}")


def _is_toy_dir(p: Path) -> bool:
    return (p / "toy.json").is_file()


def find_toy_data(model: Path, data: str | Path | None) -> Path:
    """The toy directory to evaluate on: ``data`` if given; otherwise found by following the
    model's provenance: a model inside a toy directory (toy builds keep base/ and instruct/
    inside) or one whose deltamoe.json records a ``toy_dir``, directly or through the inputs
    it was made from (upcycle, training, graft and merge outputs name their inputs)."""
    if data is not None:
        p = Path(data)
        if not p.is_dir():
            raise UsageError(f"{p}: no such directory (--data must be a directory written by 'deltamoe toy build')")
        if not _is_toy_dir(p):
            raise UsageError(f"{p}: not a toy world (no toy.json); build one with 'deltamoe toy build {p}'")
        return p
    from deltamoe.io.provenance import read_manifest

    seen: set[Path] = set()
    queue = [model]
    while queue and len(seen) < 64:
        m = queue.pop(0).absolute()
        if m in seen or not m.is_dir():
            continue
        seen.add(m)
        if _is_toy_dir(m.parent):
            return m.parent
        try:
            manifest = read_manifest(m) or {}
        except DeltaMoEError:
            continue
        for stage in reversed(manifest.get("stages", [])):
            toy_dir = (stage.get("params") or {}).get("toy_dir")
            if toy_dir and _is_toy_dir(Path(toy_dir)):
                return Path(toy_dir)
            queue += [Path(i["path"]) for i in (stage.get("inputs") or {}).values()
                      if isinstance(i, dict) and i.get("path")]
    raise UsageError(
        f"{model}: cannot tell which toy world to evaluate on (neither the model nor the inputs named in "
        "its deltamoe.json lie in a toy directory); pass --data TOYDIR"
    )


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        raise UsageError(f"{path}: missing; the toy directory is incomplete, rebuild it with --force")
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise UsageError(f"{path}:{n}: not valid JSON ({e})") from None
    return rows


def _check_mc(path: Path, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    for n, r in enumerate(rows, 1):
        options, gold = r.get("options"), r.get("gold")
        if not (isinstance(r.get("prompt"), str) and isinstance(options, list) and len(options) >= 2
                and isinstance(gold, int) and 0 <= gold < len(options)):
            raise UsageError(f"{path}:{n}: not a multiple-choice item (needs 'prompt', 'options' (2 or more) and "
                             f"'gold' (an index into options)); rebuild the toy world with --force")
    return rows


def load_toy_suite(path: Path, languages: list[str] | None = None, max_items: int | None = None) -> ToySuite:
    manifest = json.loads((path / "toy.json").read_text())
    available = [manifest["original_language"], *manifest["new_languages"]]
    if languages:
        unknown = [lang for lang in languages if lang not in available]
        if unknown:
            raise UsageError(f"unknown language(s) {', '.join(unknown)} for {path}; it has {', '.join(available)}")
    suite = ToySuite(path, manifest, list(languages or available))
    for lang in suite.languages:
        suite.qa[lang] = {t: _read_jsonl(path / "eval" / lang / f"{t}.jsonl")[:max_items] for t in QA_TASKS}
        suite.mc[lang] = {t: _check_mc(path / "eval" / lang / f"{t}.jsonl", _read_jsonl(path / "eval" / lang / f"{t}.jsonl"))[:max_items]
                          for t in MC_TASKS}
        suite.ppl[lang] = [r["text"] for r in _read_jsonl(path / "eval" / lang / "ppl.jsonl")[:max_items]]
    world_path = path / "world.json"
    if world_path.is_file():
        from deltamoe.evaluate.qa import normalize

        try:
            world = json.loads(world_path.read_text())
            relations: dict[str, list[str]] = world["relations"]
            words = {code: lang["words"] for code, lang in world["languages"].items()}
            suite.original_words = {normalize(words[world["original_language"]][c])
                                    for values in relations.values() for c in values}
            suite.relation_words = {code: {rel: {normalize(w[c]) for c in values} for rel, values in relations.items()}
                                    for code, w in words.items()}
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise UsageError(f"{world_path}: not a toy world description ({type(e).__name__}: {e}); "
                             f"rebuild the toy world with 'deltamoe toy build'") from None
    return suite
