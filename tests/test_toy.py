"""The toy world: generator, corpora, tokenizer, caching, determinism and the sanity pattern.

The sanity pattern is what makes the toy a measuring stick (docs/design.md#the-toy-world-as-a-measuring-stick). Thresholds, and why:

- base chat-QA accuracy <= 0.05 in every language: the base model never saw the chat
  special tokens, so it cannot end an assistant turn; a correct answer needs the exact word
  followed by ``<|end|>``. 0.05 leaves room for a lucky item or two, never for a skill.
- instruct chat-QA accuracy >= 0.8 in the original language (the issue's bar) and, in every
  new language, at most 0.3 and at least 0.4 below the original language: the new languages'
  question words and answer forms were only a trace in pre-training, so the instruct model
  should be near the floor there, and a 0.4 gap is far outside the noise of ~90 items
  (binomial standard error <= 0.05).
- continued pre-training of the base on one new language (200 steps on its CPT corpus)
  lowers that language's held-out perplexity by at least 30 %: the base saw ~1 % of such text,
  so a short CPT run must help a lot; 30 % is well clear of run-to-run noise (which is zero
  here: everything is seeded) and of the drift that training on any text would cause.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from deltamoe.errors import OutputError, UsageError

ORIG = "en"
NEW = ("vel", "kyr", "tol")


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# -- generator (no training) -----------------------------------------------------------------
def test_languages_differ_in_vocabulary_order_morphology_and_script() -> None:
    from deltamoe.toy.languages import make_languages
    from deltamoe.toy.world import rng_for

    langs = make_languages(rng_for(0, "world"), reserved=set())
    assert set(langs) == {ORIG, *NEW}
    orders = {lang.order for lang in langs.values()}
    morph = {lang.morphology for lang in langs.values()}
    assert len(orders) == 4 and len(morph) == 4
    assert {lang.script for lang in langs.values()} == {"latin", "cyrillic"}
    assert all("\u0400" <= ch <= "\u04ff" for ch in langs["kyr"].words["cat"])
    for code in NEW:  # no shared content words with the original language or each other
        assert not set(langs[code].words.values()) & set(langs[ORIG].words.values())
    assert len({langs[c].words["cat"] for c in langs}) == 4
    # answers are citation forms; inflected forms in statements differ from them
    vel = langs["vel"]
    sentence = vel.statement("Mira", "job", "baker", variant=0)
    assert vel.words["baker"] in sentence and f" {vel.words['baker']} " not in f" {sentence[:-1]} "


def test_every_language_has_statements_and_qa_passages_with_question_words() -> None:
    from deltamoe.toy.world import TextMaker, make_world, rng_for

    world = make_world(3, n_people=10, eval_fraction=0.3, n_fresh_names=20)
    for code, lang in world.languages.items():
        tm = TextMaker(world, code, rng_for(3, f"t:{code}"), 2, 3)
        docs = " ".join(tm.documents(50, world.rc_names))
        wh = "What" if code == ORIG else lang.words["wh_thing"]
        assert " A: " in docs and wh in docs and "?" in docs
        person = world.people[0]
        assert person in docs or any(p in docs for p in world.people)  # names are shared, Latin script


def test_fact_split_and_chat_only_in_original_language(toy_micro: Path) -> None:
    world = json.loads((toy_micro / "world.json").read_text())
    eval_pairs = {tuple(p) for p in world["eval_pairs"]}
    assert eval_pairs and len(eval_pairs) < len(world["people"]) * len(world["relations"])
    chat = [json.loads(line) for line in (toy_micro / "chat.jsonl").open()]
    en_words = set(world["languages"][ORIG]["words"].values())
    assert all(c["messages"][1]["content"] in en_words for c in chat)
    asked = {(c["person"], c["relation"]) for c in chat if c["task"] == "facts"}
    assert asked and not asked & eval_pairs  # chat never asks about a held-out fact
    for lang in (ORIG, *NEW):
        facts = [json.loads(line) for line in (toy_micro / "eval" / lang / "qa_facts.jsonl").open()]
        assert {(f["person"], f["relation"]) for f in facts} == eval_pairs
    for lang in (ORIG, *NEW):
        for task in ("qa_rc", "qa_facts"):
            rows = [json.loads(line) for line in (toy_micro / "eval" / lang / f"{task}.jsonl").open()]
            assert rows and all(r["lang"] == lang and r["answer"] for r in rows)
    cpt_langs = {p.stem for p in (toy_micro / "cpt").glob("*.jsonl")}
    assert cpt_langs == set(NEW)
    replay = [json.loads(line) for line in (toy_micro / "replay.jsonl").open()]
    cpt_docs = sum(1 for lang in NEW for _ in (toy_micro / "cpt" / f"{lang}.jsonl").open())
    assert {r["lang"] for r in replay} == {ORIG, *NEW} and len(replay) < 0.1 * cpt_docs


def test_pretraining_corpus_is_mostly_original_language(toy_micro: Path) -> None:
    rows = [json.loads(line) for line in (toy_micro / "pretrain.jsonl").open()]
    share = {lang: sum(r["lang"] == lang for r in rows) / len(rows) for lang in (ORIG, *NEW)}
    assert share[ORIG] > 0.85
    assert all(0 < share[lang] < 0.06 for lang in NEW)


def test_tokenizer_chat_template_and_consistent_word_tokens(toy_micro: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(toy_micro / "instruct")
    text = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
    assert text == "<|user|>\nHi<|end|>\n<|assistant|>\n"
    assert tok.eos_token == "<|end|>"
    # a word is the same tokens at the start, after a newline, after a special token and mid-sentence
    word = tok(" baker", add_special_tokens=False)["input_ids"]
    for ctx in ("baker", "x\nbaker", "<|assistant|>\nbaker", "a baker"):
        ids = tok(ctx, add_special_tokens=False)["input_ids"]
        assert ids[-len(word):] == word, ctx
    base_cfg = json.loads((toy_micro / "base" / "config.json").read_text())
    assert base_cfg["architectures"] == ["LlamaForCausalLM"]
    assert (toy_micro / "base" / "model.safetensors").is_file()
    manifest = json.loads((toy_micro / "instruct" / "deltamoe.json").read_text())
    assert [s["stage"] for s in manifest["stages"]] == ["toy-base", "toy-instruct"]


def test_sft_labels_cover_only_the_answer_and_end(toy_micro: Path) -> None:
    from transformers import AutoTokenizer

    from deltamoe.toy.train import IGNORE, encode_chat

    tok = AutoTokenizer.from_pretrained(toy_micro / "instruct")
    ids, labels = encode_chat(tok, [{"role": "user", "content": "What is it?"},
                                    {"role": "assistant", "content": "cat"}])
    learned = [t for t, y in zip(ids, labels, strict=True) if y != IGNORE]
    assert tok.decode(learned) == " cat<|end|>"
    assert all(y in (IGNORE, t) for t, y in zip(ids, labels, strict=True))


# -- caching and determinism -------------------------------------------------------------------
@pytest.mark.slow
def test_same_seed_gives_byte_identical_corpora_and_shards(tmp_path: Path, toy_micro: Path) -> None:
    from deltamoe.toy import build

    again = build(tmp_path / "again", "micro", seed=0, progress=False)
    first = json.loads((toy_micro / "toy.json").read_text())
    second = json.loads((again / "toy.json").read_text())
    assert first["files"] == second["files"]  # sha256 of every corpus, eval set and shard
    for rel in ("pretrain.jsonl", "cpt/vel.jsonl", "base/model.safetensors", "instruct/model.safetensors",
                "tokenizer/tokenizer.json"):
        assert _sha(toy_micro / rel) == _sha(again / rel), rel
    other = build(tmp_path / "other", "micro", seed=1, progress=False)
    assert _sha(other / "pretrain.jsonl") != _sha(toy_micro / "pretrain.jsonl")
    assert _sha(other / "base" / "model.safetensors") != _sha(toy_micro / "base" / "model.safetensors")


@pytest.mark.slow
def test_rebuild_with_same_key_is_a_noop_and_other_key_is_refused(toy_micro: Path) -> None:
    from deltamoe.toy import build

    before = {p: p.stat().st_mtime_ns for p in toy_micro.rglob("*") if p.is_file()}
    assert build(toy_micro, "micro", seed=0, progress=False) == toy_micro
    assert {p: p.stat().st_mtime_ns for p in toy_micro.rglob("*") if p.is_file()} == before
    with pytest.raises(OutputError, match="seed 0"):
        build(toy_micro, "micro", seed=5, progress=False)


def test_bad_build_arguments(tmp_path: Path) -> None:
    from deltamoe.toy import build

    with pytest.raises(UsageError, match="unknown toy size"):
        build(tmp_path / "x", "huge")
    with pytest.raises(UsageError, match="seed"):
        build(tmp_path / "x", "micro", seed=-1)
    (tmp_path / "occupied").mkdir()
    (tmp_path / "occupied" / "f").write_text("x")
    with pytest.raises(OutputError, match="already holds other files"):
        build(tmp_path / "occupied", "micro")
    assert not (tmp_path / "x").exists()


# -- the sanity pattern (size tiny) ------------------------------------------------------------
@pytest.mark.slow
def test_sanity_pattern_base_and_instruct(toy_tiny_results: dict) -> None:
    base, instruct = toy_tiny_results["base"], toy_tiny_results["instruct"]
    for lang in (ORIG, *NEW):
        assert base["languages"][lang]["qa"] <= 0.05, (lang, base["languages"][lang])
    orig = instruct["languages"][ORIG]["qa"]
    assert orig >= 0.8, instruct["languages"][ORIG]
    for lang in NEW:
        acc = instruct["languages"][lang]["qa"]
        assert acc <= 0.3 and acc <= orig - 0.4, (lang, acc, orig)


@pytest.mark.slow
def test_sanity_pattern_cpt_lowers_new_language_perplexity(toy_tiny: Path, tmp_path: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from deltamoe.evaluate.perplexity import perplexity
    from deltamoe.toy.config import TrainPhase
    from deltamoe.toy.tokenizer import DOC_SEP
    from deltamoe.toy.train import deterministic, packed_batches, train_loop

    lang = "vel"
    tok = AutoTokenizer.from_pretrained(toy_tiny / "base")
    held_out = [json.loads(line)["text"] for line in (toy_tiny / "eval" / lang / "ppl.jsonl").open()]
    orig_held_out = [json.loads(line)["text"] for line in (toy_tiny / "eval" / ORIG / "ppl.jsonl").open()]
    corpus = [json.loads(line)["text"] for line in (toy_tiny / "cpt" / f"{lang}.jsonl").open()]
    sep = tok.convert_tokens_to_ids(DOC_SEP)
    stream = torch.tensor([i for ids in tok(corpus, add_special_tokens=False)["input_ids"] for i in (*ids, sep)])
    with deterministic(2):
        model = AutoModelForCausalLM.from_pretrained(toy_tiny / "base", dtype=torch.float32)
        before = perplexity(model, tok, held_out)["ppl"]
        train_loop(model, packed_batches(stream, 128, 16, seed=0), TrainPhase(steps=200, batch_size=16, lr=1e-3, warmup=10),
                   desc="cpt", progress=False)
        after = perplexity(model, tok, held_out)["ppl"]
        orig_after = perplexity(model, tok, orig_held_out)["ppl"]
    assert after <= 0.7 * before, (before, after)
    assert orig_after < 100  # still a language model of the original language, not noise
