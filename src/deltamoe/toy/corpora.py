"""The text of a toy build: corpora, chat data, evaluation sets and the pre-training stream.

Everything here is deterministic in (world, size config, seed) and cheap (no model), so a build from
the shipped set regenerates these files instead of shipping them (docs/toy.md).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from deltamoe.toy.config import PostTraining, ToyConfig
from deltamoe.toy.languages import NEW_LANGUAGES, ORIGINAL
from deltamoe.toy.tokenizer import encode_plain
from deltamoe.toy.world import TextMaker, World, chat_messages, rng_for


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def write_corpora(tmp: Path, world: World, cfg: ToyConfig, seed: int) -> None:
    """Every text file of a build except the tokenizer: world.json, chat data, CPT and replay
    corpora, evaluation sets. Deterministic and cheap (no tokenizer, no model)."""
    (tmp / "world.json").write_text(json.dumps(world.to_json(), indent=2, ensure_ascii=False) + "\n")
    maker = text_makers(world, cfg, seed)
    cpt = {lang: maker(lang, "cpt").documents(cfg.cpt_docs, world.rc_names) for lang in NEW_LANGUAGES}
    for lang, docs in cpt.items():
        _write_jsonl(tmp / "cpt" / f"{lang}.jsonl", [{"text": d, "lang": lang} for d in docs])
    _write_replay(tmp, world, cfg, seed, cpt, maker)
    _write_eval(tmp, world, cfg, maker)
    _write_jsonl(tmp / "chat.jsonl", _chat_rows(chat_items(world, cfg, cfg.posts[0], ORIGINAL, seed)))
    rows = []
    for lang in (ORIGINAL, *NEW_LANGUAGES):
        rows += [{**r, "lang": lang} for r in _chat_rows(chat_items(world, cfg, cfg.posts[0], lang, seed, "chat_all"))]
    _write_jsonl(tmp / "chat_all.jsonl", rows)


def text_makers(world: World, cfg: ToyConfig, seed: int) -> Any:
    """``maker(lang, purpose)``: a :class:`TextMaker` whose randomness is named by purpose and language."""
    def maker(lang: str, purpose: str) -> TextMaker:
        return TextMaker(world, lang, rng_for(seed, f"{purpose}:{lang}"), cfg.rc_people, cfg.rc_statements)

    return maker


def _chat_rows(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"messages": chat_messages(it), "task": it["task"], **{k: it[k] for k in ("person", "relation") if k in it}}
            for it in items]


def chat_items(world: World, cfg: ToyConfig, post: PostTraining, lang: str, seed: int,
               purpose: str = "chat") -> list[dict[str, str]]:
    """Chat examples of one post-training recipe: its mix of reading comprehension and world
    facts (about the facts that are not held out), in ``lang``."""
    suffix = f"+{post.seed_offset}" if post.seed_offset else ""
    tm = TextMaker(world, lang, rng_for(seed, f"{purpose}{suffix}:{lang}"), cfg.rc_people, cfg.rc_statements)
    items = []
    for _ in range(cfg.chat_examples):
        if tm.rng.random() < post.rc_chat_share:
            items.append(tm.rc_item(world.rc_names))
        else:
            items.append(tm.fact_item(*tm.rng.choice(world.train_pairs)))
    return items


def _write_eval(tmp: Path, world: World, cfg: ToyConfig, maker: Any) -> None:
    for lang in (ORIGINAL, *NEW_LANGUAGES):
        tm = maker(lang, "eval")
        rc = [tm.rc_item(world.rc_names) for _ in range(cfg.eval_rc)]
        facts = [tm.fact_item(p, r) for p, r in world.eval_pairs]
        mc_rc = [tm.mc_rc_item(world.rc_names) for _ in range(cfg.mc_items)]
        pairs = sorted(world.facts)
        tm.rng.shuffle(pairs)
        mc_facts = [tm.mc_fact_item(p, r) for p, r in sorted(pairs[: cfg.mc_items])]
        for task, items in (("qa_rc", rc), ("qa_facts", facts), ("mc_rc", mc_rc), ("mc_facts", mc_facts)):
            _write_jsonl(tmp / "eval" / lang / f"{task}.jsonl",
                         [{"id": f"{lang}-{task}-{i}", "lang": lang, **it} for i, it in enumerate(items)])
        docs = tm.documents(cfg.eval_ppl_docs, world.rc_names)
        _write_jsonl(tmp / "eval" / lang / "ppl.jsonl", [{"text": d, "lang": lang} for d in docs])


def _write_replay(tmp: Path, world: World, cfg: ToyConfig, seed: int, cpt: dict[str, list[str]], maker: Any) -> None:
    """About ``replay_fraction`` of the CPT documents: half fresh original-language text, half
    drawn from the new-language CPT corpora."""
    n = max(len(NEW_LANGUAGES) * 2, round(cfg.replay_fraction * sum(len(d) for d in cpt.values())))
    rows = [{"text": d, "lang": ORIGINAL} for d in maker(ORIGINAL, "replay").documents(n // 2, world.rc_names)]
    rng = rng_for(seed, "replay-sample")
    per_lang = (n - n // 2) // len(NEW_LANGUAGES)
    for lang in NEW_LANGUAGES:
        rows += [{"text": d, "lang": lang} for d in rng.sample(cpt[lang], per_lang)]
    rng.shuffle(rows)
    _write_jsonl(tmp / "replay.jsonl", rows)


def pretrain_documents(world: World, cfg: ToyConfig, seed: int):  # noqa: ANN201 (generator)
    """The pre-training documents, in order, as (language, text): mostly the original language,
    ``new_language_share`` per new language, ``parallel_share`` of those as translation pairs
    (an original-language document followed by the same document in the new language)."""
    rng = rng_for(seed, "pretrain-languages")
    maker = text_makers(world, cfg, seed)
    makers = {lang: maker(lang, "pretrain") for lang in (ORIGINAL, *NEW_LANGUAGES)}
    langs = [ORIGINAL, *NEW_LANGUAGES]
    weights = [1 - cfg.new_language_share * len(NEW_LANGUAGES)] + [cfg.new_language_share] * len(NEW_LANGUAGES)
    while True:
        for lang in rng.choices(langs, weights, k=2000):
            yield lang, (makers[lang].parallel_document(lang, world.rc_names)
                         if lang != ORIGINAL and rng.random() < cfg.parallel_share
                         else makers[lang].document_random(world.rc_names))


def pretrain_stream(world: World, cfg: ToyConfig, seed: int, tokenizer: Any, sep: int) -> Any:
    """Token ids of the pre-training documents (each closed by ``sep``) until they fill the
    steps of the longer pre-training phase once, plus one batch."""
    import torch

    steps = max(cfg.pretrain_of(i).steps for i in range(2 if cfg.model2 is not None else 1))
    target = (steps + 1) * cfg.pretrain.batch_size * cfg.seq_len
    chunks: list[torch.Tensor] = []
    total = 0
    docs = pretrain_documents(world, cfg, seed)
    while total < target:
        block = [next(docs)[1] for _ in range(2000)]
        flat = [i for ids in encode_plain(tokenizer, block) for i in (*ids, sep)]
        chunks.append(torch.tensor(flat, dtype=torch.long))
        total += len(flat)
    return torch.cat(chunks)
