"""``deltamoe toy build``: generate the world, its corpora and tokenizer, pre-train the base
model and post-train the instruct model. Output layout (all text files are jsonl)::

    OUT/
      toy.json            key, seed, size, config, sha256 of every file, training losses
      world.json          languages (lexicons, grammar), people, facts, held-out fact pairs
      tokenizer/          HF tokenizer with chat template
      pretrain.jsonl      {"text", "lang"}: the base model's corpus (mostly the original language)
      chat.jsonl          {"messages", "task"}: post-training data, original language only
      cpt/<lang>.jsonl    {"text", "lang"}: continued-pretraining corpus per new language
      replay.jsonl        {"text", "lang"}: small mixed replay set (router review)
      eval/<lang>/qa_rc.jsonl, qa_facts.jsonl   chat QA items {"id","lang","task","prompt","answer",...}
      eval/<lang>/ppl.jsonl                     held-out plain text {"text", "lang"}
      base/, instruct/    HF checkpoints (safetensors) with tokenizer, chat template, deltamoe.json

A build is named by a hash of (generator version, seed, size config) stored in ``toy.json``;
building again into a directory that holds the same key does nothing.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from pathlib import Path
from typing import Any

from deltamoe.errors import OutputError, UsageError
from deltamoe.toy.config import GENERATOR_VERSION, SIZES, ToyConfig
from deltamoe.toy.languages import NEW_LANGUAGES, ORIGINAL, RELATIONS
from deltamoe.toy.world import TextMaker, World, chat_messages, make_world, rng_for

TOY_MANIFEST = "toy.json"
QA_TASKS = ("qa_rc", "qa_facts")


def resolve_config(size: str | ToyConfig) -> ToyConfig:
    if isinstance(size, ToyConfig):
        return size
    if size not in SIZES:
        raise UsageError(f"unknown toy size {size!r}; choose one of {', '.join(SIZES)}")
    return SIZES[size]


def read_toy_manifest(directory: str | Path) -> dict[str, Any] | None:
    p = Path(directory) / TOY_MANIFEST
    if not p.is_file():
        return None
    try:
        return json.loads(p.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise OutputError(f"{p}: not valid JSON ({e}); remove the directory or pass --force") from None


def build(
    out: str | Path,
    size: str | ToyConfig = "tiny",
    seed: int = 0,
    *,
    force: bool = False,
    progress: bool = True,
    threads: int | None = None,
    command: list[str] | None = None,
) -> Path:
    """Build the toy world into ``out`` and return its path.

    If ``out`` already holds a build with the same key (seed, size, generator version) this is a
    no-op. A directory holding anything else is refused unless ``force``.
    """
    import torch  # noqa: F401  (fail early if the ML stack is missing)

    from deltamoe.checkpoint import atomic_output_dir, check_output
    from deltamoe.toy.train import default_threads, deterministic

    cfg = resolve_config(size)
    if seed < 0:
        raise UsageError(f"seed must be >= 0, got {seed}")
    key = cfg.cache_key(seed)
    out = Path(out).absolute()
    existing = read_toy_manifest(out) if out.is_dir() else None
    if existing is not None and existing.get("key") == key and not force:
        _log(progress, f"{out}: toy world {cfg.name} seed {seed} already built (key {key}); nothing to do")
        return out
    if out.exists() and not force:
        what = (f"a toy world with size {existing.get('size')!r} seed {existing.get('seed')} (key {existing.get('key')})"
                if existing else "other files")
        raise OutputError(f"{out}: already holds {what}; pass --force (force=True) to replace it, "
                          f"or choose another directory")
    check_output(out, force=force)
    threads = threads or default_threads()
    t0 = time.perf_counter()
    with deterministic(threads), atomic_output_dir(out, force=force) as tmp:
        manifest = _build_into(tmp, out, cfg, seed, key, progress, command)
        manifest["threads"] = threads
        (tmp / TOY_MANIFEST).write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
    _log(progress, f"built toy world {cfg.name} seed {seed} in {time.perf_counter() - t0:.0f} s: {out}")
    return out


def _log(progress: bool, msg: str) -> None:
    if progress:
        print(msg, file=sys.stderr, flush=True)


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _build_into(tmp: Path, final: Path, cfg: ToyConfig, seed: int, key: str, progress: bool,
                command: list[str] | None) -> dict[str, Any]:
    import torch

    from deltamoe.toy.tokenizer import DOC_SEP, train_tokenizer
    from deltamoe.toy.train import chat_batches, encode_chat, make_model, packed_batches, train_loop

    world = make_world(seed, cfg.n_people, cfg.eval_fraction, cfg.n_fresh_names)
    (tmp / "world.json").write_text(json.dumps(world.to_json(), indent=2, ensure_ascii=False) + "\n")

    def maker(lang: str, purpose: str) -> TextMaker:
        return TextMaker(world, lang, rng_for(seed, f"{purpose}:{lang}"), cfg.rc_people, cfg.rc_statements)

    # -- corpora that do not depend on the tokenizer ------------------------------------
    _log(progress, "generating corpora")
    cpt = {lang: maker(lang, "cpt").documents(cfg.cpt_docs, world.rc_names) for lang in NEW_LANGUAGES}
    for lang, docs in cpt.items():
        _write_jsonl(tmp / "cpt" / f"{lang}.jsonl", [{"text": d, "lang": lang} for d in docs])
    _write_replay(tmp, world, cfg, seed, cpt, maker)
    _write_eval(tmp, world, cfg, maker)
    chat = _chat_items(world, cfg, maker(ORIGINAL, "chat"))
    _write_jsonl(tmp / "chat.jsonl", [{"messages": chat_messages(it), "task": it["task"],
                                       **{k: it[k] for k in ("person", "relation") if k in it}} for it in chat])

    # -- tokenizer: trained on every language ---------------------------------------------
    tok_texts = [d for lang in (ORIGINAL, *NEW_LANGUAGES)
                 for d in maker(lang, "tokenizer").documents(cfg.tokenizer_docs_per_language, world.rc_names)]
    tok_texts += [it["prompt"] for it in chat[:200]]
    tokenizer = train_tokenizer(tok_texts, cfg.vocab_size, cfg.model.max_position_embeddings)
    tokenizer.save_pretrained(tmp / "tokenizer")
    sep = tokenizer.convert_tokens_to_ids(DOC_SEP)

    # -- pre-training corpus: mostly the original language, a trace of each new one ----------
    pre_rows, stream = _pretrain_corpus(world, cfg, seed, maker, tokenizer, sep)
    _write_jsonl(tmp / "pretrain.jsonl", pre_rows)

    # -- base model ----------------------------------------------------------------------
    model = make_model(cfg.model, tokenizer, seed)
    _log(progress, f"pre-training the base model ({sum(p.numel() for p in model.parameters()) / 1e6:.2f} M "
                   f"parameters, {stream.numel() / 1e6:.2f} M tokens)")
    pre_losses = train_loop(model, packed_batches(stream, cfg.seq_len, cfg.pretrain.batch_size, seed),
                            cfg.pretrain, desc="pretrain", progress=progress)
    params = {"size": cfg.name, "seed": seed, "key": key, "generator_version": GENERATOR_VERSION,
              "toy_dir": str(final), "config": cfg.model_dump()}
    base_manifest = _save_model(model, tokenizer, tmp / "base", stage="toy-base", previous=None,
                                params=params, inputs={}, command=command)

    # -- instruct model: chat data, loss on assistant tokens --------------------------------
    examples = [encode_chat(tokenizer, chat_messages(it)) for it in chat]
    _log(progress, f"post-training the instruct model ({len(examples)} conversations)")
    chat_at = chat_batches(examples, cfg.sft.batch_size, tokenizer.pad_token_id, seed)
    if cfg.sft_lm_rows:
        # the same pre-training rows in another seeded order
        text_at = packed_batches(stream, cfg.seq_len, cfg.sft_lm_rows, seed + 1)
        step_at = lambda step: [(1.0, chat_at(step)), (cfg.sft_lm_weight, text_at(step))]  # noqa: E731
    else:
        step_at = chat_at
    sft_losses = train_loop(model, step_at, cfg.sft, desc="post-train", progress=progress)
    from deltamoe.checkpoint import open_checkpoint
    from deltamoe.provenance import describe_checkpoint

    base_desc = describe_checkpoint(open_checkpoint(tmp / "base"))
    base_desc["path"] = str(final / "base")
    _save_model(model, tokenizer, tmp / "instruct", stage="toy-instruct", previous=base_manifest,
                params=params, inputs={"base": base_desc}, command=command)

    # Everything a seed determines: corpora, evaluation sets, tokenizer, configs and shards
    # (deltamoe.json is left out: it records where the build was written).
    files = sorted(p for p in tmp.rglob("*") if p.is_file() and p.suffix in (".jsonl", ".safetensors", ".json")
                   and p.name not in (TOY_MANIFEST, "deltamoe.json"))
    return {
        "format": 1,
        "key": key,
        "size": cfg.name,
        "seed": seed,
        "generator_version": GENERATOR_VERSION,
        "original_language": ORIGINAL,
        "new_languages": list(NEW_LANGUAGES),
        "relations": list(RELATIONS),
        "config": cfg.model_dump(),
        "tokens": {"pretrain": int(stream.numel())},
        "losses": {"pretrain_final": _mean_tail(pre_losses), "sft_final": _mean_tail(sft_losses)},
        "files": {str(p.relative_to(tmp)): _sha256(p) for p in files},
        "torch_version": torch.__version__,
    }


def _mean_tail(losses: list[float], n: int = 10) -> float:
    tail = losses[-n:]
    return round(sum(tail) / len(tail), 4)


def _chat_items(world: World, cfg: ToyConfig, tm: TextMaker) -> list[dict[str, str]]:
    items = []
    for _ in range(cfg.chat_examples):
        if tm.rng.random() < cfg.rc_chat_share:
            items.append(tm.rc_item(world.rc_names))
        else:
            items.append(tm.fact_item(*tm.rng.choice(world.train_pairs)))
    return items


def _write_eval(tmp: Path, world: World, cfg: ToyConfig, maker: Any) -> None:
    for lang in (ORIGINAL, *NEW_LANGUAGES):
        tm = maker(lang, "eval")
        rc = [tm.rc_item(world.rc_names) for _ in range(cfg.eval_rc)]
        facts = [tm.fact_item(p, r) for p, r in world.eval_pairs]
        for task, items in (("qa_rc", rc), ("qa_facts", facts)):
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


def _pretrain_corpus(world: World, cfg: ToyConfig, seed: int, maker: Any, tokenizer: Any, sep: int
                     ) -> tuple[list[dict[str, str]], Any]:
    """Documents until the corpus holds the tokens that pre-training consumes (one epoch)."""
    import torch

    target = cfg.pretrain.steps * cfg.pretrain.batch_size * cfg.seq_len
    rng = rng_for(seed, "pretrain-languages")
    makers = {lang: maker(lang, "pretrain") for lang in (ORIGINAL, *NEW_LANGUAGES)}
    langs = [ORIGINAL, *NEW_LANGUAGES]
    weights = [1 - cfg.new_language_share * len(NEW_LANGUAGES)] + [cfg.new_language_share] * len(NEW_LANGUAGES)
    rows: list[dict[str, str]] = []
    chunks: list[torch.Tensor] = []
    total = 0
    while total < target + cfg.pretrain.batch_size * cfg.seq_len:
        block = [(lang, makers[lang].parallel_document(lang, world.rc_names)
                  if lang != ORIGINAL and rng.random() < cfg.parallel_share
                  else makers[lang].document_random(world.rc_names))
                 for lang in rng.choices(langs, weights, k=2000)]
        # the Rust tokenizer directly: documents are packed, so a long one is no problem (the
        # transformers wrapper would warn about model_max_length)
        encs = tokenizer.backend_tokenizer.encode_batch([t for _, t in block], add_special_tokens=False)
        flat = [i for enc in encs for i in (*enc.ids, sep)]
        chunks.append(torch.tensor(flat, dtype=torch.long))
        total += len(flat)
        rows += [{"text": t, "lang": lang} for lang, t in block]
    return rows, torch.cat(chunks)


def _save_model(model: Any, tokenizer: Any, directory: Path, *, stage: str, previous: dict[str, Any] | None,
                params: dict[str, Any], inputs: dict[str, Any], command: list[str] | None) -> dict[str, Any]:
    from transformers import GenerationConfig

    from deltamoe.provenance import new_manifest, write_manifest, write_model_card

    model.generation_config = GenerationConfig(
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, do_sample=False
    )
    from deltamoe.evaluate.run import hf_progress

    with hf_progress(False):
        model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    manifest = new_manifest(previous, stage=stage, params=params, inputs=inputs, command=command)
    write_manifest(directory, manifest)
    write_model_card(directory, manifest)
    return manifest
