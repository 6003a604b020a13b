"""The toy world: generator, corpora, tokenizer, caching, determinism, the shipped set, the regime
targets and the sanity pattern.

The regime targets (docs/toy-world.md) are asserted on the shipped set with the thresholds of
:data:`deltamoe.toy.regime.TARGETS`, each stated there with its reason. The sanity pattern is what
makes the toy a measuring stick (docs/design.md#the-toy-world-as-a-measuring-stick). Its
thresholds, and why:

- base chat-QA accuracy <= 0.05 in every language: the base model never saw the chat
  special tokens, so it cannot end an assistant turn; a correct answer needs the exact word
  followed by ``<|end|>``. 0.05 leaves room for a lucky item or two, never for a skill.
- instruct chat-QA accuracy >= 0.9 in the original language and, in every new language, at
  most 0.3 and at least 0.4 below the original language: P was post-trained on original-language
  chat only, and the base is weak in the new languages; a 0.4 gap is far outside the noise of
  400 items (95 % interval about +-0.05).
- continued pre-training of the base on one new language (200 steps on its CPT corpus,
  :func:`deltamoe.toy.regime.cpt_sanity`, also a regime target) lowers that language's held-out
  perplexity by at least 30 %: the base saw 3 % of such text when this bar was set (0.7 % in the
  shipped set, 90 % of it in translation pairs), so a short CPT run must help a lot; 30 % is
  well clear of run-to-run noise (which is zero here: everything is seeded) and of the drift that
  training on any text would cause.
- the ceiling (B' post-trained on chat data in every language) reaches >= 0.6 chat QA in every
  new language and at least 0.2 above P: the toy can separate systems.
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


def test_pretraining_corpus_is_mostly_original_language() -> None:
    from itertools import islice

    from deltamoe.toy.corpora import pretrain_documents
    from deltamoe.toy.config import SIZES
    from deltamoe.toy.world import make_world

    cfg = SIZES["small"]
    world = make_world(0, cfg.n_people, cfg.eval_fraction, cfg.n_fresh_names)
    docs = list(islice(pretrain_documents(world, cfg, 0), 20000))
    share = {lang: sum(lang_ == lang for lang_, _ in docs) / len(docs) for lang in (ORIG, *NEW)}
    assert share[ORIG] > 0.88
    assert all(abs(share[lang] - cfg.new_language_share) < 0.006 for lang in NEW), share


def test_multiple_choice_items_need_reading_and_the_relation() -> None:
    from deltamoe.toy.languages import RELATIONS
    from deltamoe.toy.world import TextMaker, make_world, rng_for

    world = make_world(0, n_people=10, eval_fraction=0.3, n_fresh_names=40)
    for code, lang in world.languages.items():
        tm = TextMaker(world, code, rng_for(0, f"mc:{code}"), 2, 3)
        value_of = {lang.value(c): (r, c) for r, vs in RELATIONS.items() for c in vs}
        for _ in range(30):
            it = tm.mc_rc_item(world.rc_names)
            assert len(it["options"]) == 4 == len(set(it["options"])) and it["prompt"].endswith(" A:")
            gold = it["options"][it["gold"]]
            assert value_of[gold][0] == it["relation"]
            # the other options: context values of other relations, and values of the asked relation
            # that are not in the context
            same = [o for o in it["options"] if value_of[o][0] == it["relation"] and o != gold]
            others = [o for o in it["options"] if value_of[o][0] != it["relation"]]
            assert len(same) == 1 and len(others) == 2
        person, rel = world.people[0], "pet"
        it = tm.mc_fact_item(person, rel)
        assert it["options"][it["gold"]] == lang.value(world.facts[(person, rel)])
        assert {value_of[o][0] for o in it["options"]} == {rel}


def test_encode_plain_ignores_the_padding_an_earlier_call_left(toy_micro: Path) -> None:
    """The toy's corpus packing, CPT count, CPT sanity check, chat replay and loss curve encode with
    encode_plain.
    After a padded, truncated call (as chat QA makes) the fast tokenizer's backend still pads and
    truncates; encode_plain must give the ids of a fresh tokenizer and leave that state alone."""
    from transformers import AutoTokenizer

    from deltamoe.toy.tokenizer import encode_plain

    texts = [json.loads(line)["text"] for line in (toy_micro / "cpt" / "vel.jsonl").open()][:20]
    fresh = AutoTokenizer.from_pretrained(toy_micro / "tokenizer")
    want = encode_plain(fresh, texts)
    assert want == [fresh(t, add_special_tokens=False)["input_ids"] for t in texts]
    assert len({len(ids) for ids in want}) > 1  # texts of several lengths, so padding would show
    used = AutoTokenizer.from_pretrained(toy_micro / "tokenizer")
    used(texts[:2], padding="max_length", truncation=True, max_length=4)
    assert [e.ids for e in used.backend_tokenizer.encode_batch(texts, add_special_tokens=False)] != want
    assert encode_plain(used, texts) == want
    assert used.backend_tokenizer.padding is not None and used.backend_tokenizer.truncation is not None


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

    again = build(tmp_path / "again", "micro", seed=0, progress=False, threads=2)  # architectures in parallel
    first = json.loads((toy_micro / "toy.json").read_text())
    second = json.loads((again / "toy.json").read_text())
    assert first["files"] == second["files"]  # sha256 of every corpus, eval set and shard
    for rel in ("cpt/vel.jsonl", "eval/kyr/mc_rc.jsonl", "base/model.safetensors", "instruct/model.safetensors",
                "instruct2/model.safetensors", "qwen3-base/model.safetensors", "qwen3-instruct/model.safetensors",
                "tokenizer/tokenizer.json"):
        assert _sha(toy_micro / rel) == _sha(again / rel), rel
    assert first["files"]["instruct/model.safetensors"] != first["files"]["instruct2/model.safetensors"]
    other = build(tmp_path / "other", "micro", seed=1, progress=False, threads=1)
    assert _sha(other / "cpt/vel.jsonl") != _sha(toy_micro / "cpt/vel.jsonl")
    assert _sha(other / "base" / "model.safetensors") != _sha(toy_micro / "base" / "model.safetensors")


def test_toy_configs_carry_no_library_stamp(toy_micro: Path, tmp_path: Path) -> None:
    """A toy model's config files do not record which transformers release wrote them (a rebuild
    with another release gives the same bytes); the release is in toy.json, and the configs load."""
    from transformers import AutoConfig, GenerationConfig

    from deltamoe.toy.shipped import shipped_dir
    from deltamoe.toy.train import STAMPED, drop_version_stamps

    shipped = shipped_dir("small", 0)
    assert shipped is not None
    for root in (toy_micro, shipped):
        manifest = json.loads((root / "toy.json").read_text())
        assert manifest["transformers_version"]
        for name in manifest["models"]:
            for f in STAMPED:
                assert "transformers_version" not in json.loads((root / name / f).read_text()), (root, name, f)
        assert AutoConfig.from_pretrained(root / "instruct").model_type == "llama"
        assert GenerationConfig.from_pretrained(root / "instruct").eos_token_id is not None
    # the stamp goes, everything else stays
    d = tmp_path / "m"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"b": 1, "a": [2], "transformers_version": "0.0"}))
    drop_version_stamps(d)
    assert json.loads((d / "config.json").read_text()) == {"a": [2], "b": 1}
    assert not (d / "generation_config.json").exists()


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


@pytest.mark.slow
def test_killed_build_resumes_to_the_same_bytes(tmp_path: Path) -> None:
    """SIGKILL during pre-training, then build again: it resumes from the step checkpoint in the
    staging directory and ends with the bytes of an uninterrupted build."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from deltamoe.toy import build

    script = ("import sys; from deltamoe.toy import build; from deltamoe.toy.config import SIZES, TrainPhase; "
              "cfg = SIZES['micro'].model_copy(update={'pretrain': TrainPhase(steps=400, batch_size=8, lr=3e-3, "
              "warmup=2, checkpoint_every=5)}); build(sys.argv[1], cfg, 0, progress=False, threads=1)")
    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-c", script, str(killed)], env=os.environ.copy())
    deadline = time.monotonic() + 300
    state = None
    while time.monotonic() < deadline and proc.poll() is None:
        states = list(tmp_path.glob(".killed.build-*/work/base/state.json"))
        if states:
            state = json.loads(states[0].read_text())
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.01)
    proc.wait()
    assert state is not None and 0 < state["step"] < 400, "the build was not killed mid pre-training"
    assert not killed.exists()  # nothing half-built in place
    from deltamoe.toy.config import SIZES, TrainPhase

    cfg = SIZES["micro"].model_copy(update={"pretrain": TrainPhase(steps=400, batch_size=8, lr=3e-3, warmup=2,
                                                                   checkpoint_every=5)})
    resumed = build(killed, cfg, 0, progress=False, threads=1)
    fresh = build(tmp_path / "fresh", cfg, 0, progress=False, threads=1)
    assert json.loads((resumed / "toy.json").read_text())["files"] == json.loads((fresh / "toy.json").read_text())["files"]
    assert json.loads((resumed / "toy.json").read_text())["training"] == json.loads((fresh / "toy.json").read_text())["training"]
    assert not list(tmp_path.glob(".killed.build-*"))  # the staging directory is gone


def test_cli_accepts_every_size(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from deltamoe.cli import app

    res = CliRunner().invoke(app, ["toy", "build", str(tmp_path / "m"), "--size", "micro", "--threads", "1", "-q"])
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "m" / "toy.json").read_text())["size"] == "micro"
    res = CliRunner().invoke(app, ["toy", "build", str(tmp_path / "h"), "--size", "huge"])
    assert res.exit_code != 0 and not (tmp_path / "h").exists()


# -- the shipped set -------------------------------------------------------------------------
def _copy_shipped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    import shutil

    from deltamoe.toy import shipped

    root = tmp_path / "shipped-root"
    shutil.copytree(shipped.SHIPPED_ROOT, root)
    monkeypatch.setattr(shipped, "SHIPPED_ROOT", root)
    return root / "small-seed0"


def test_shipped_set_is_complete_and_small() -> None:
    from deltamoe.toy.config import SIZES
    from deltamoe.toy.shipped import shipped_dir

    d = shipped_dir("small", 0)
    assert d is not None
    manifest = json.loads((d / "toy.json").read_text())
    assert manifest["key"] == SIZES["small"].cache_key(0)
    assert manifest["models"] == ["base", "instruct", "instruct2", "qwen3-base", "qwen3-instruct"]
    total = sum(p.stat().st_size for p in d.rglob("*") if p.is_file())
    assert total < 60e6
    for name in manifest["models"]:
        assert (d / name / "model.safetensors").is_file()


@pytest.mark.slow
def test_corrupt_or_missing_shipped_file_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from deltamoe.toy import build
    from deltamoe.toy.shipped import ShippedToyError

    d = _copy_shipped(tmp_path, monkeypatch)
    shard = d / "instruct" / "model.safetensors"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(ShippedToyError, match=r"instruct/model.safetensors: sha256 does not match.*--train"):
        build(tmp_path / "out", "small", 0, progress=False)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.*"))
    (d / "qwen3-base" / "config.json").unlink()
    shard.unlink()
    with pytest.raises(ShippedToyError, match="missing from the shipped toy set"):
        build(tmp_path / "out", "small", 0, progress=False)
    assert not (tmp_path / "out").exists()


def test_cli_reports_a_corrupt_shipped_set_in_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    from deltamoe.cli import app

    d = _copy_shipped(tmp_path, monkeypatch)
    (d / "tokenizer" / "tokenizer.json").write_text("{}")
    res = CliRunner().invoke(app, ["toy", "build", str(tmp_path / "out"), "-q"])
    assert res.exit_code == 1
    assert "tokenizer.json: sha256 does not match" in res.output and "Traceback" not in res.output
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_shipped_set_materialises_with_the_manifest_bytes(toy_small: Path) -> None:
    from deltamoe.toy.builder import build_files
    from deltamoe.toy.shipped import shipped_dir

    manifest = json.loads((shipped_dir("small", 0) / "toy.json").read_text())  # type: ignore[operator]
    assert build_files(toy_small) == manifest["files"]  # corpora and evaluation sets regenerated byte for byte
    prov = json.loads((toy_small / "instruct2" / "deltamoe.json").read_text())
    assert prov["stages"][-1]["params"]["toy_dir"] == str(toy_small)
    assert prov["stages"][-1]["inputs"]["base"]["path"] == str(toy_small / "base")
    cfg = json.loads((toy_small / "qwen3-base" / "config.json").read_text())
    assert cfg["architectures"] == ["Qwen3ForCausalLM"] and cfg["tie_word_embeddings"] is True
    for lang in (ORIG, *NEW):
        for task in ("mc_rc", "mc_facts"):
            assert sum(1 for _ in (toy_small / "eval" / lang / f"{task}.jsonl").open()) >= 400


# -- the regime targets and the sanity pattern (the shipped set) ---------------------------------


@pytest.mark.slow
def test_regime_targets_hold_on_the_shipped_set(toy_small_regime: dict) -> None:
    from deltamoe.toy.regime import TARGETS

    seen = set()
    for c in toy_small_regime["checks"]:
        _, threshold, op, _ = TARGETS[c["target"]]
        v = c["value"]
        met = {">=": v >= threshold, "<": v < threshold, "<=": v <= threshold}[op]
        assert met == c["ok"], c
        assert met is ((c["model"], c["target"]) not in REGIME_KNOWN_MISSES), c
        seen.add(c["target"])
    assert seen == set(TARGETS)
    # every model of the build was checked: both bases, all three post-trained models
    assert {c["model"] for c in toy_small_regime["checks"]} == {"base", "instruct", "instruct2", "qwen3-base",
                                                                "qwen3-instruct"}
    # the demo's architecture (Llama) meets every target but the known misses
    assert all(c["ok"] for c in toy_small_regime["checks"] if c["model"] in ("base", "instruct", "instruct2")
               and (c["model"], c["target"]) not in REGIME_KNOWN_MISSES)


# (model, target) pairs that the shipped set misses, each stated in docs/toy-world.md. A pair listed
# here must miss, so the list cannot go stale. None on generator 3's set. Generator 2's one miss,
# the CPT sanity check (vel perplexity 3.13 -> 2.29, 26.9 % lower), is met: 3.60 -> 2.39, 33.5 %.
REGIME_KNOWN_MISSES: set[tuple[str, str]] = set()


@pytest.mark.slow
def test_regime_matches_the_shipped_record(toy_small: Path, toy_small_regime: dict) -> None:
    """The numbers in toy.json (and so in the README) are what the shipped models score here:
    accuracies and every target's verdict exactly; perplexities (and ratios of them) to 1e-7
    relative, because a float reduction's order depends on the intra-op thread count (measured:
    the shipped record and a measure on 2 threads differ by at most 3e-8 relative)."""
    from deltamoe.toy.regime import regime_differences

    shipped = json.loads((toy_small / "toy.json").read_text())["regime"]
    for part in ("scores", "checks", "cpt_sanity"):
        assert regime_differences(shipped[part], toy_small_regime[part], where=part) == []


def test_regime_differences_tolerate_thread_order_only() -> None:
    from deltamoe.toy.regime import regime_differences

    a = {"scores": {"en": {"mc": 0.5, "ppl": 1.8336832496954638, "n": 960}}, "checks": [{"ok": True, "target": "t"}]}
    same = {"scores": {"en": {"mc": 0.5, "ppl": 1.833683297128626, "n": 960}}, "checks": [{"ok": True, "target": "t"}]}
    assert regime_differences(a, same) == []  # 2.6e-8 relative: another thread count
    one_item = {**same, "scores": {"en": {**same["scores"]["en"], "mc": 0.5 + 1 / 960}}}
    assert regime_differences(a, one_item) == ["regime.scores.en.mc: 0.5 against 0.5010416666666667"]
    assert regime_differences(a, {**same, "checks": [{"ok": False, "target": "t"}]}) == [
        "regime.checks[0].ok: True against False"]
    assert regime_differences(a, {"scores": a["scores"]}) == ["regime: keys ['checks'] in one record only"]
    assert regime_differences({"p": 1.0}, {"p": 1.0 + 1e-6}) != []


def test_second_delta_differs_from_the_first() -> None:
    """Δ₂ = P₂ − B is another delta, not a rescaled Δ₁: both small, and far from parallel (cosine over
    every weight well below 1)."""
    import torch
    from safetensors.torch import load_file

    from deltamoe.toy.shipped import shipped_dir

    d = shipped_dir("small", 0)
    assert d is not None
    b, p1, p2 = (load_file(str(d / m / "model.safetensors")) for m in ("base", "instruct", "instruct2"))
    d1 = torch.cat([(p1[k] - b[k]).flatten().double() for k in b])
    d2 = torch.cat([(p2[k] - b[k]).flatten().double() for k in b])
    b_norm = torch.cat([t.flatten().double() for t in b.values()]).norm()
    assert 0 < d1.norm() / b_norm < 0.5 and 0 < d2.norm() / b_norm < 0.5
    assert float(d1 @ d2 / (d1.norm() * d2.norm())) < 0.9


@pytest.mark.slow
def test_sanity_pattern_base_and_instruct(toy_small_regime: dict) -> None:
    scores = toy_small_regime["scores"]
    for base, post in (("base", "instruct"), ("base", "instruct2"), ("qwen3-base", "qwen3-instruct")):
        for lang in (ORIG, *NEW):
            assert scores[base][lang]["qa"] <= 0.05, (base, lang, scores[base][lang])
        orig = scores[post][ORIG]["qa"]
        assert orig >= 0.9, (post, scores[post][ORIG])
        for lang in NEW:
            acc = scores[post][lang]["qa"]
            assert acc <= 0.3 and acc <= orig - 0.4, (post, lang, acc, orig)


@pytest.mark.slow
def test_sanity_pattern_cpt_lowers_new_language_perplexity(toy_small_regime: dict) -> None:
    """``measure`` ran :func:`deltamoe.toy.regime.cpt_sanity` on the shipped base: 200 steps of dense
    CPT on vel's corpus."""
    from deltamoe.toy.regime import CPT_SANITY

    s = toy_small_regime["cpt_sanity"]
    assert CPT_SANITY["lang"] == "vel" and CPT_SANITY["steps"] == 200
    assert s["after"] < s["before"], s
    assert s["drop"] == 1 - s["after"] / s["before"]
    assert (s["after"] <= 0.7 * s["before"]) is (("base", "cpt_sanity_drop") not in REGIME_KNOWN_MISSES), s
    assert s["original_after"] < 100, s  # still a language model of the original language, not noise


# Languages where the ceiling misses its absolute target (>= 0.6 chat QA) on the shipped set with
# the demo's settings. None on the generator-3 set (seed 0, the main study of 2026-12-07, the same
# bytes this test trains): vel 0.800, kyr 0.840, tol 0.850. On the generator-2 set it met them once
# the ceiling post-trained at lr 1e-3 (the ceiling screen, docs/results/ceiling-screen.md: vel 0.762,
# kyr 0.940, tol 0.718); at that set's P lr, 5e-4, it missed in tol (0.535). A language listed here
# must miss, so the list cannot go stale.
CEILING_KNOWN_MISSES: set[str] = set()


@pytest.mark.slow
def test_ceiling_margin_the_toy_can_separate_systems(demo_small_run: dict, toy_small_regime: dict) -> None:
    """B' (the demo's dense CPT) post-trained on chat data in every language, as the demo recipe
    builds it (conftest.py ``demo_small_run``), reaches at least 0.2 above P's chat QA in every new
    language, and >= 0.6 where it is not a known miss: systems that learn the new languages and
    their chat can be told apart from those that do not."""
    ceiling = demo_small_run["systems"]["ceiling"]["toy"]
    for lang in NEW:
        acc, p = ceiling[lang]["qa"], toy_small_regime["scores"]["instruct"][lang]["qa"]
        assert acc >= p + 0.2, (lang, acc, p)
        assert (acc >= 0.6) != (lang in CEILING_KNOWN_MISSES), (lang, acc)


def test_ceiling_post_training_replays_text_and_refuses_bad_corpora(toy_micro: Path, tmp_path: Path) -> None:
    """Chat post-training with language-model replay trains on the replayed text (other weights than
    without it, recorded in the provenance); a replay file that is not text is a one-line error that
    names the file and line, and nothing is written."""
    import torch
    from safetensors.torch import load_file

    from deltamoe.errors import UsageError
    from deltamoe.io.provenance import read_manifest
    from deltamoe.toy.sft import post_train_chat

    kw = {"steps": 3, "lr": 1e-3, "batch_size": 4, "seed": 0, "progress": False}
    files = [toy_micro / "cpt" / "vel.jsonl", toy_micro / "replay.jsonl"]
    plain = post_train_chat(toy_micro / "base", toy_micro / "chat_all.jsonl", tmp_path / "plain", **kw)
    replay = post_train_chat(toy_micro / "base", toy_micro / "chat_all.jsonl", tmp_path / "replay", lm_files=files,
                             lm_rows=2, seq_len=32, **kw)
    again = post_train_chat(toy_micro / "base", toy_micro / "chat_all.jsonl", tmp_path / "again", lm_files=files,
                            lm_rows=2, seq_len=32, **kw)
    a, b, c = (load_file(str(d / "model.safetensors")) for d in (plain, replay, again))
    assert any(not torch.equal(a[k], b[k]) for k in a)
    assert all(torch.equal(b[k], c[k]) for k in b)  # deterministic
    params = read_manifest(replay)["stages"][-1]["params"]
    n_docs = sum(1 for f in files for line in f.open() if line.strip())
    assert params["lm_rows"] == 2 and params["lm_documents"] == n_docs > 0
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a b"}\n[1, 2]\n')
    with pytest.raises(UsageError, match=r"bad.jsonl:2: not a text document"):
        post_train_chat(toy_micro / "base", toy_micro / "chat_all.jsonl", tmp_path / "x", lm_files=[bad], lm_rows=2,
                        seq_len=32, **kw)
    assert not (tmp_path / "x").exists()
    with pytest.raises(UsageError, match="lm_rows needs lm_files"):
        post_train_chat(toy_micro / "base", toy_micro / "chat_all.jsonl", tmp_path / "y", lm_rows=2, **kw)
