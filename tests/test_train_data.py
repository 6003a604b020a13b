"""Sources, tagging, packing, mixing, held-out split and resumable streaming."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch
from train_world import documents, save_tokenizer, write_jsonl, write_txt

from deltamoe.errors import DataError
from deltamoe.train import data as D
from deltamoe.train.config import DataConfig

LANGS = D.Languages({"en": [0], "xx": [1, 2]})


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from transformers import AutoTokenizer

    d = tmp_path_factory.mktemp("tok")
    save_tokenizer(d)
    return AutoTokenizer.from_pretrained(d)


def cfg(sources, **kw) -> DataConfig:
    return DataConfig.model_validate({"sources": sources, "seq_len": 16, "heldout_fraction": 0.0, **kw})


def _all_docs(stream: D.TrainStream, n_seq: int):
    ids, lang = stream.take(n_seq)
    return ids.reshape(-1).tolist(), lang.reshape(-1).tolist()


def test_every_format_reads_with_tags(tmp_path, tokenizer) -> None:
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    en, xx = documents("en", 6, 0), documents("xx", 6, 0)
    jl = write_jsonl(
        tmp_path / "a.jsonl", [{"text": en[0], "lang": "en"}, {"text": xx[0]}, {"text": xx[1], "lang": None}]
    )
    txt = write_txt(tmp_path / "b.txt", en[1:3])
    pq.write_table(pa.table({"body": [xx[2], en[3]], "language": ["xx", "en"]}), tmp_path / "c.parquet")
    datasets.Dataset.from_dict({"text": [en[4]], "lang": ["en"]}).save_to_disk(str(tmp_path / "d"))
    sources = [
        {"path": str(jl), "lang": "xx"},  # records without a tag get the source's tag
        {"path": str(txt), "lang": "en"},
        {"path": str(tmp_path / "c.parquet"), "text_field": "body", "lang_field": "language"},
        {"path": str(tmp_path / "d")},
    ]
    c = cfg(sources)
    D.check_sources(c, LANGS)
    got = []
    for si, src in enumerate(c.sources):
        doc = D._Doc(src, LANGS)
        got += [(si, *doc(r, k)) for k, r in enumerate(D._records(src, 0))]
    assert got == [
        (0, en[0], 0),
        (0, xx[0], 1),
        (0, xx[1], 1),
        (1, en[1], 0),
        (1, en[2], 0),
        (2, xx[2], 1),
        (2, en[3], 0),
        (3, en[4], 0),
    ]


def test_packing_keeps_token_languages_and_document_order(tmp_path, tokenizer) -> None:
    en, xx = documents("en", 3, 1), documents("xx", 3, 1)
    recs = [
        {"text": t, "lang": lang}
        for t, lang in zip([en[0], xx[0], en[1], xx[1]], ["en", "xx", "en", "xx"], strict=True)
    ]
    recs.insert(2, {"text": en[2]})  # untagged, no source tag
    src = write_jsonl(tmp_path / "m.jsonl", recs)
    stream = D.TrainStream(cfg([{"path": str(src)}]), tokenizer, LANGS, seed=0)
    tok = D.Tokenize(tokenizer, add_eos=True)
    expect_ids, expect_lang = [], []
    for r in recs:
        t = tok(r["text"])
        expect_ids += t
        expect_lang += [LANGS.index(r.get("lang"), "x")] * len(t)
    n = len(expect_ids) // 16
    ids, lang = _all_docs(stream, n)
    assert ids == expect_ids[: n * 16] and lang == expect_lang[: n * 16]
    assert tok(en[0])[-1] == tokenizer.eos_token_id
    assert -1 in lang and 0 in lang and 1 in lang


def test_weights_mix_in_proportion_and_epochs_repeat(tmp_path, tokenizer) -> None:
    a = write_txt(tmp_path / "en.txt", documents("en", 20, 2))
    b = write_txt(tmp_path / "xx.txt", documents("xx", 20, 2))
    stream = D.TrainStream(
        cfg([{"path": str(a), "lang": "en", "weight": 3.0}, {"path": str(b), "lang": "xx", "weight": 1.0}]),
        tokenizer,
        LANGS,
        seed=0,
    )
    _all_docs(stream, 400)  # far more than one epoch of either source
    drawn = [stream.cursor[i]["epoch"] * 20 + stream.cursor[i]["docs"] for i in (0, 1)]
    assert 2.6 < drawn[0] / drawn[1] < 3.4  # documents are drawn 3:1
    assert stream.cursor[0]["epoch"] >= 1 and stream.cursor[1]["epoch"] >= 1


def test_token_budgets_are_exact_and_end_the_stream(tmp_path, tokenizer) -> None:
    a = write_txt(tmp_path / "en.txt", documents("en", 10, 3))
    b = write_txt(tmp_path / "xx.txt", documents("xx", 10, 3))
    c = cfg([{"path": str(a), "lang": "en", "tokens": 160}, {"path": str(b), "lang": "xx", "tokens": 480}])
    assert D.budget_sequences(c) == 40
    stream = D.TrainStream(c, tokenizer, LANGS, seed=0)
    _, lang = _all_docs(stream, 40)
    assert Counter(lang) == {0: 160, 1: 480}  # exactly the budgets; xx (10 short documents) repeats
    with pytest.raises(StopIteration):
        stream.take(1)


def test_heldout_is_disjoint_from_training_and_capped(tmp_path, tokenizer) -> None:
    docs = documents("xx", 200, 4)
    src = write_txt(tmp_path / "xx.txt", docs)
    c = cfg([{"path": str(src), "lang": "xx"}], heldout_fraction=0.2, heldout_max_tokens=10_000)
    held = D.build_heldout(c, tokenizer, LANGS, seed=0)
    held_docs = {d for d in docs if D.is_heldout(0, d, 0.2)}
    assert 20 < len(held_docs) < 60
    tok = D.Tokenize(tokenizer, True)
    assert held.tokens == sum(len(tok(d)) for d in docs if d in held_docs)
    stream = D.TrainStream(c, tokenizer, LANGS, seed=0)
    train_tokens = sum(len(tok(d)) for d in docs if d not in held_docs)
    ids, _ = _all_docs(stream, train_tokens // 16)
    expect = [t for d in docs if d not in held_docs for t in tok(d)]
    assert ids == expect[: len(ids)]
    capped = D.build_heldout(
        cfg([{"path": str(src), "lang": "xx"}], heldout_fraction=0.2, heldout_max_tokens=50), tokenizer, LANGS, seed=0
    )
    assert capped.tokens == 50 and all(len(x) <= 16 for x in capped.ids)
    # an eval_only source is held out whole and never trained on
    c2 = cfg(
        [{"path": str(src), "lang": "xx", "eval_only": True}, {"path": str(src), "lang": "en"}],
        heldout_max_tokens=10**6,
    )
    assert D.build_heldout(c2, tokenizer, LANGS, 0).tokens == sum(len(tok(d)) for d in docs)
    assert set(_all_docs(D.TrainStream(c2, tokenizer, LANGS, 0), 5)[1]) == {0}


@pytest.mark.parametrize("shuffle", [0, 7])
def test_stream_state_resumes_exactly(tmp_path, tokenizer, shuffle) -> None:
    a = write_txt(tmp_path / "en.txt", documents("en", 15, 5))
    b = write_jsonl(tmp_path / "xx.jsonl", [{"text": d, "lang": "xx"} for d in documents("xx", 15, 5)])
    c = cfg(
        [{"path": str(a), "lang": "en", "weight": 1}, {"path": str(b), "weight": 2}],
        shuffle_buffer=shuffle,
        heldout_fraction=0.1,
    )
    full = D.TrainStream(c, tokenizer, LANGS, seed=3)
    first = full.take(30)
    state = json.loads(json.dumps(full.state_dict()))  # survives JSON
    rest = full.take(50)
    resumed = D.TrainStream(c, tokenizer, LANGS, seed=3)
    resumed.load_state_dict(state)
    again = resumed.take(50)
    assert torch.equal(rest[0], again[0]) and torch.equal(rest[1], again[1])
    assert not torch.equal(first[0][:5], rest[0][:5])


def test_shuffle_buffer_mixes_a_sorted_source(tmp_path, tokenizer) -> None:
    recs = [{"text": d, "lang": "en"} for d in documents("en", 40, 6)] + [
        {"text": d, "lang": "xx"} for d in documents("xx", 40, 6)
    ]
    src = write_jsonl(tmp_path / "sorted.jsonl", recs)
    plain = D.TrainStream(cfg([{"path": str(src)}]), tokenizer, LANGS, 0)
    mixed = D.TrainStream(cfg([{"path": str(src)}], shuffle_buffer=80), tokenizer, LANGS, 0)
    assert set(_all_docs(plain, 10)[1]) == {0}
    assert set(_all_docs(mixed, 40)[1]) == {0, 1}


def test_bad_sources_are_named(tmp_path, tokenizer) -> None:
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(DataError, match=r"empty\.txt.*empty corpus"):
        D.check_sources(cfg([{"path": str(empty), "lang": "en"}]), LANGS)
    blank = write_jsonl(tmp_path / "blank.jsonl", [{"text": ""}, {"text": None}])
    with pytest.raises(DataError, match=r"blank\.jsonl.*empty corpus"):
        D.check_sources(cfg([{"path": str(blank)}]), LANGS)
    with pytest.raises(DataError, match=r"missing\.txt: no such file"):
        D.check_sources(cfg([{"path": str(tmp_path / "missing.txt")}]), LANGS)
    with pytest.raises(
        DataError, match=r"language tag 'fr' is not in the model's expert allocation \(en=\[0\], xx=\[1, 2\]\)"
    ):
        D.check_sources(cfg([{"path": str(write_txt(tmp_path / "fr.txt", ["bonjour"])), "lang": "fr"}]), LANGS)
    tagged = write_jsonl(tmp_path / "t.jsonl", [{"text": "x", "lang": "en"}, {"text": "y", "lang": "de"}])
    with pytest.raises(DataError, match=r"t\.jsonl, record 1: language tag 'de'"):
        D.check_sources(cfg([{"path": str(tagged)}]), LANGS)
    nofield = write_jsonl(tmp_path / "n.jsonl", [{"body": "x"}])
    with pytest.raises(DataError, match=r"record 0 has no field 'text'.*\['body'\]"):
        D.check_sources(cfg([{"path": str(nofield)}]), LANGS)
    odd = tmp_path / "data.csvx"
    odd.write_text("x")
    with pytest.raises(DataError, match="cannot tell the format"):
        D.check_sources(cfg([{"path": str(odd)}]), LANGS)
