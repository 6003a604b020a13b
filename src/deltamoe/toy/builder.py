"""``deltamoe toy build``: the world, its corpora and tokenizer, and the toy models.

Output layout (all text files are jsonl)::

    OUT/
      toy.json            key, seed, size, config, sha256 of every file, training curves, regime
      world.json          languages (lexicons, grammar), people, facts, held-out fact pairs
      tokenizer/          HF tokenizer with chat template
      chat.jsonl          {"messages", "task"}: post-training data, original language only
      chat_all.jsonl      {"messages", "task", "lang"}: chat data in every language (the ceiling only)
      cpt/<lang>.jsonl    {"text", "lang"}: continued-pretraining corpus per new language
      replay.jsonl        {"text", "lang"}: small mixed replay set (router review)
      eval/<lang>/qa_rc.jsonl, qa_facts.jsonl   chat QA items {"id","lang","task","prompt","answer",...}
      eval/<lang>/mc_rc.jsonl, mc_facts.jsonl   multiple choice {"id","lang","task","prompt","options","gold",...}
      eval/<lang>/ppl.jsonl                     held-out plain text {"text", "lang"}
      base/, instruct/, instruct2/              the first architecture (Llama): B and two post-trained models
      qwen3-base/, qwen3-instruct/              the second architecture (Qwen3), when the size has one

Every model directory is a stock HF checkpoint (safetensors, tokenizer, chat template,
deltamoe.json). A build is named by a hash of (generator version, seed, size config) stored in
``toy.json``; building again into a directory that holds the same key does nothing.

Two ways to a build, with the same bytes:

- **from the shipped set** (the default where one ships for the size and seed): the models are
  copied from the package and checked against their sha256; corpora and evaluation sets are
  regenerated (they are cheap and deterministic) and checked too;
- **trained** (``train=True``, ``deltamoe toy build --train``, or any size that ships no set):
  pre-training and post-training run here. The work goes to a staging directory beside ``OUT``
  with step checkpoints, so a killed build resumes where it stopped.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from deltamoe.errors import OutputError, UsageError
from deltamoe.toy.config import GENERATOR_VERSION, SIZES, ModelShape, PostTraining, ToyConfig, TrainPhase
from deltamoe.toy.corpora import chat_items, pretrain_stream, text_makers, write_corpora
from deltamoe.toy.languages import NEW_LANGUAGES, ORIGINAL, RELATIONS
from deltamoe.toy.world import World, chat_messages, make_world

TOY_MANIFEST = "toy.json"
QA_TASKS = ("qa_rc", "qa_facts")
MC_TASKS = ("mc_rc", "mc_facts")
# Files of a model directory that the build determines (deltamoe.json and README.md record where
# the build was written, so they are written afresh for every copy).
MODEL_FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
               "tokenizer_config.json", "chat_template.jinja")


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


def model_names(cfg: ToyConfig) -> list[str]:
    """The model directories of a build: base and its post-trained models, then the second
    architecture's base and instruct model."""
    names = ["base", *(p.name for p in cfg.posts)]
    if cfg.model2 is not None and cfg.arch2_post is not None:
        names += [f"{cfg.model2.family}-base", cfg.arch2_post.name]
    return names


def build(
    out: str | Path,
    size: str | ToyConfig = "small",
    seed: int = 0,
    *,
    force: bool = False,
    progress: bool = True,
    threads: int | None = None,
    command: list[str] | None = None,
    train: bool = False,
) -> Path:
    """Build the toy world into ``out`` and return its path.

    If ``out`` already holds a build with the same key (seed, size, generator version) this is a
    no-op. A directory holding anything else is refused unless ``force``. Without ``train`` a
    shipped set for (size, seed) is copied instead of trained, when the package has one.
    """
    import torch  # noqa: F401  (fail early if the ML stack is missing)

    from deltamoe.io import atomic_output_dir, check_output
    from deltamoe.toy.shipped import shipped_dir
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
    shipped = None if train or isinstance(size, ToyConfig) else shipped_dir(cfg.name, seed)
    threads = threads or default_threads()
    t0 = time.perf_counter()
    if shipped is not None:
        from deltamoe.toy.shipped import materialise

        with atomic_output_dir(out, force=force) as tmp:
            materialise(shipped, tmp, out, cfg, seed, key, progress, command)
        _log(progress, f"toy world {cfg.name} seed {seed} from the shipped set in {time.perf_counter() - t0:.0f} s: {out}")
        return out
    staging = out.parent / f".{out.name}.build-{key}"
    with deterministic(TRAIN_THREADS):
        manifest = _train_into(staging, out, cfg, seed, key, progress, command, threads)
    with atomic_output_dir(out, force=force) as tmp:
        for p in staging.iterdir():
            if p.name != "work":
                shutil.move(str(p), tmp / p.name)
        (tmp / TOY_MANIFEST).write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
    shutil.rmtree(staging, ignore_errors=True)
    _log(progress, f"built toy world {cfg.name} seed {seed} in {time.perf_counter() - t0:.0f} s: {out}")
    return out


def _log(progress: bool, msg: str) -> None:
    if progress:
        print(msg, file=sys.stderr, flush=True)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def arch_jobs(cfg: ToyConfig) -> list[tuple[str, list[str]]]:
    """(base model, its post-trained models) per architecture, in build order."""
    names = model_names(cfg)
    jobs = [("base", [p.name for p in cfg.posts])]
    if cfg.arch2_post is not None:
        jobs.append((names[len(cfg.posts) + 1], [cfg.arch2_post.name]))
    return jobs


# Every toy model trains on one intra-op thread: the bytes then do not depend on how many cores
# the build uses, only on the machine and the software. More cores train the architectures at
# the same time (one process each).
TRAIN_THREADS = 1


def _train_arch(staging: Path, cfg: ToyConfig, seed: int, index: int, progress: bool) -> dict[str, Any]:
    """Pre-train architecture ``index``'s base and post-train its instruct models into
    ``staging``, skipping models that are done and resuming from step checkpoints. Runs in a
    worker process when architectures train in parallel."""
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    from deltamoe.toy.train import deterministic

    base_name, post_names = arch_jobs(cfg)[index]
    shape = cfg.model if index == 0 else cfg.model2
    assert shape is not None
    posts = {p.name: p for p in (*cfg.posts, *([cfg.arch2_post] if cfg.arch2_post else []))}
    work = staging / "work"
    world = make_world(seed, cfg.n_people, cfg.eval_fraction, cfg.n_fresh_names)
    tokenizer = AutoTokenizer.from_pretrained(staging / "tokenizer")
    stream = load_file(str(work / "stream.safetensors"))["ids"]
    maker = text_makers(world, cfg, seed)
    history: dict[str, Any] = {}
    with deterministic(TRAIN_THREADS):
        for name in (base_name, *post_names):
            out, record = staging / name, work / f"{name}.json"
            if (out / "model.safetensors").is_file() and record.is_file():
                history[name] = json.loads(record.read_text())
                continue
            if name == base_name:
                curve_docs = {lang: maker(lang, "curve").documents(cfg.curve_docs, world.rc_names)
                              for lang in (ORIGINAL, *NEW_LANGUAGES)}
                history[name] = _pretrain(shape, cfg.pretrain_of(index), tokenizer, stream, curve_docs, cfg, seed,
                                          work / name, out, progress)
            else:
                history[name] = _post_train(staging / base_name, posts[name], tokenizer, world, cfg, seed, stream,
                                            work / name, out, progress)
            record.write_text(json.dumps(history[name]))
    return history


def _train_into(staging: Path, final: Path, cfg: ToyConfig, seed: int, key: str, progress: bool,
                command: list[str] | None, threads: int) -> dict[str, Any]:
    """Train every model of the build into ``staging`` (resuming what a killed build left there)
    and write the corpora; returns the manifest."""
    import torch
    import transformers

    from deltamoe.toy.tokenizer import DOC_SEP, train_tokenizer

    staging.mkdir(parents=True, exist_ok=True)
    world = make_world(seed, cfg.n_people, cfg.eval_fraction, cfg.n_fresh_names)
    _log(progress, f"generating corpora (staging in {staging})")
    write_corpora(staging, world, cfg, seed)
    maker = text_makers(world, cfg, seed)
    chat = chat_items(world, cfg, cfg.posts[0], ORIGINAL, seed)
    tok_texts = [d for lang in (ORIGINAL, *NEW_LANGUAGES)
                 for d in maker(lang, "tokenizer").documents(cfg.tokenizer_docs_per_language, world.rc_names)]
    tok_texts += [it["prompt"] for it in chat[:200]]
    tokenizer = train_tokenizer(tok_texts, cfg.vocab_size, cfg.model.max_position_embeddings)
    tokenizer.save_pretrained(staging / "tokenizer")
    sep = tokenizer.convert_tokens_to_ids(DOC_SEP)
    stream = pretrain_stream(world, cfg, seed, tokenizer, sep)
    work = staging / "work"
    work.mkdir(exist_ok=True)
    from safetensors.torch import save_file

    save_file({"ids": stream}, str(work / "stream.safetensors"))
    names = model_names(cfg)
    params = {"size": cfg.name, "seed": seed, "key": key, "generator_version": GENERATOR_VERSION,
              "toy_dir": str(final), "config": cfg.model_dump()}
    jobs = arch_jobs(cfg)
    base_of = {name: base for base, posts in jobs for name in (base, *posts)}
    history: dict[str, Any] = {}
    n_workers = min(threads, len(jobs))
    if n_workers > 1:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(n_workers, mp_context=mp.get_context("spawn")) as pool:
            futures = [pool.submit(_train_arch, staging, cfg, seed, i, progress) for i in range(len(jobs))]
            for f in futures:
                history.update(f.result())
    else:
        for i in range(len(jobs)):
            history.update(_train_arch(staging, cfg, seed, i, progress))
    history = {name: history[name] for name in names}
    for name in names:
        finish_model_dir(staging / name, final, name, base_of[name], params, command)
    files = build_files(staging)
    return {
        "format": 2,
        "key": key,
        "size": cfg.name,
        "seed": seed,
        "generator_version": GENERATOR_VERSION,
        "original_language": ORIGINAL,
        "new_languages": list(NEW_LANGUAGES),
        "relations": list(RELATIONS),
        "models": names,
        "base_of": {n: base_of[n] for n in names},
        "config": cfg.model_dump(),
        "tokens": {"pretrain": int(stream.numel())},
        "train_threads": TRAIN_THREADS,
        "training": history,
        "files": files,
        "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,  # the configs carry no stamp of it
    }


def build_files(root: Path) -> dict[str, str]:
    """sha256 of every file a build determines: corpora, evaluation sets, tokenizer, configs and
    shards (not toy.json itself, nor the provenance files that record where it was written)."""
    # not the staging area's work/, nor the evaluations `deltamoe toy measure` writes into eval-results/
    files = sorted(p for p in root.rglob("*") if p.is_file()
                   and p.relative_to(root).parts[0] not in ("work", "eval-results")
                   and p.suffix in (".jsonl", ".safetensors", ".json", ".jinja")
                   and p.name not in (TOY_MANIFEST, "deltamoe.json"))
    return {str(p.relative_to(root)): _sha256(p) for p in files}


def finish_model_dir(directory: Path, final: Path, name: str, base_name: str, params: dict[str, Any],
                     command: list[str] | None) -> None:
    """Write a model directory's deltamoe.json and model card (they name ``final``, where the
    build is installed; a post-trained model records its base as input)."""
    from deltamoe.io import open_checkpoint
    from deltamoe.io.provenance import describe_checkpoint, new_manifest, write_manifest, write_model_card

    stage = "toy-base" if name.endswith("base") else "toy-instruct"
    inputs: dict[str, Any] = {}
    previous = None
    if stage == "toy-instruct":
        base_desc = describe_checkpoint(open_checkpoint(directory.parent / base_name))
        base_desc["path"] = str(final / base_name)
        inputs = {"base": base_desc}
        previous = new_manifest(None, stage="toy-base", params=params, inputs={}, command=command)
    manifest = new_manifest(previous, stage=stage, params={**params, "model": name}, inputs=inputs, command=command)
    write_manifest(directory, manifest)
    write_model_card(directory, manifest)


def _pretrain(shape: ModelShape, phase: TrainPhase, tokenizer: Any, stream: Any, curve_docs: dict[str, list[str]],
              cfg: ToyConfig, seed: int, work: Path, out: Path, progress: bool) -> dict[str, Any]:
    """Pre-train a base model on the packed stream; the held-out loss per language is measured
    ``curve_points`` times along the way (the curve in toy.json)."""
    from deltamoe.toy.tokenizer import encode_plain
    from deltamoe.toy.train import heldout_loss, make_model, packed_batches, train_loop

    model = make_model(shape, tokenizer, seed)
    n_params = sum(p.numel() for p in model.parameters())
    n_embed = model.get_input_embeddings().weight.numel() * (1 if shape.tie_word_embeddings else 2)
    tokens = phase.steps * phase.batch_size * cfg.seq_len  # what the steps read (the stream may be longer)
    _log(progress, f"pre-training {out.name} ({shape.family}, {n_params / 1e6:.2f} M parameters, "
                   f"{(n_params - n_embed) / 1e6:.2f} M non-embedding, {tokens / 1e6:.2f} M tokens)")
    every = max(1, phase.steps // cfg.curve_points)
    encoded = {lang: encode_plain(tokenizer, docs) for lang, docs in curve_docs.items()}

    def on_step(step: int) -> dict[str, Any] | None:
        if (step + 1) % every and step + 1 != phase.steps:
            return None
        return {"step": step + 1, "heldout_loss": {lang: heldout_loss(model, ids) for lang, ids in encoded.items()}}

    losses, curve = train_loop(model, packed_batches(stream, cfg.seq_len, phase.batch_size, seed), phase,
                               desc=f"pretrain {out.name}", progress=progress, checkpoint=work, on_step=on_step)
    _save_model(model, tokenizer, out)
    return {"params": n_params, "non_embedding_params": n_params - n_embed, "tokens": tokens,
            "final_loss": _mean_tail(losses), "curve": curve}


def _post_train(base_dir: Path, post: PostTraining, tokenizer: Any, world: World, cfg: ToyConfig, seed: int,
                stream: Any, work: Path, out: Path, progress: bool) -> dict[str, Any]:
    """Post-train a copy of the base: chat data of the recipe's mix (loss on assistant tokens)
    plus language-model replay on pre-training rows."""
    from transformers import AutoModelForCausalLM

    from deltamoe.toy.train import chat_batches, encode_chat, packed_batches, train_loop

    from deltamoe.evaluate.run import hf_progress

    with hf_progress(False):
        model = AutoModelForCausalLM.from_pretrained(base_dir, dtype="float32")
    chat = chat_items(world, cfg, post, ORIGINAL, seed)
    examples = [encode_chat(tokenizer, chat_messages(it)) for it in chat]
    _log(progress, f"post-training {out.name} ({len(examples)} conversations, {post.rc_chat_share:.0%} reading comprehension)")
    chat_at = chat_batches(examples, post.phase.batch_size, tokenizer.pad_token_id, seed + post.seed_offset)
    if cfg.sft_lm_rows:
        # pre-training rows in another seeded order
        text_at = packed_batches(stream, cfg.seq_len, cfg.sft_lm_rows, seed + 1 + post.seed_offset)
        step_at = lambda step: [(1.0, chat_at(step)), (cfg.sft_lm_weight, text_at(step))]  # noqa: E731
    else:
        step_at = chat_at
    losses, _ = train_loop(model, step_at, post.phase, desc=f"post-train {out.name}", progress=progress,
                           checkpoint=work)
    _save_model(model, tokenizer, out)
    return {"final_loss": _mean_tail(losses), "recipe": post.model_dump()}


def _mean_tail(losses: list[float], n: int = 10) -> float:
    tail = losses[-n:]
    return round(sum(tail) / len(tail), 4)


def _save_model(model: Any, tokenizer: Any, directory: Path) -> None:
    from transformers import GenerationConfig

    from deltamoe.evaluate.run import hf_progress
    from deltamoe.toy.train import drop_version_stamps

    model.generation_config = GenerationConfig(
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, do_sample=False
    )
    tmp = directory.with_name(directory.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    with hf_progress(False):
        model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    drop_version_stamps(tmp)
    tmp.rename(directory)
