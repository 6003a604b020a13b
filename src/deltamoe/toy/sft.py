"""Chat post-training of a toy model on a chat file: the alignment ceiling's stage.

The ceiling is the path the method avoids: B' (dense CPT on the new languages) post-trained on
chat data in every language, which real projects do not have. On the toy it shows how far
alignment in the new languages can go, so the study can tell "the toy cannot separate systems"
from "the method does not transfer".
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from deltamoe.errors import UsageError


def read_chat(path: Path) -> list[list[dict[str, str]]]:
    """The conversations (``messages``) of a chat jsonl file."""
    if not path.is_file():
        raise UsageError(f"{path}: missing; the toy directory is incomplete, rebuild it with --force")
    out = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                msgs = json.loads(line)["messages"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise UsageError(f"{path}:{n}: not a chat example (a JSON object with 'messages')") from None
            out.append(msgs)
    if not out:
        raise UsageError(f"{path}: no chat examples")
    return out


def read_texts(paths: list[Path]) -> list[str]:
    """The ``text`` of every line of some jsonl corpora, in order."""
    texts = []
    for path in paths:
        if not path.is_file():
            raise UsageError(f"{path}: missing; the toy directory is incomplete, rebuild it with --force")
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    texts.append(json.loads(line)["text"])
                except (json.JSONDecodeError, KeyError, TypeError):
                    raise UsageError(f"{path}:{n}: not a text document (a JSON object with 'text')") from None
    return texts


def post_train_chat(model: Path, chat_file: Path, out: Path, *, steps: int, lr: float, batch_size: int, seed: int,
                    lm_files: list[Path] | None = None, lm_rows: int = 0, lm_weight: float = 1.0, seq_len: int = 128,
                    threads: int | None = None, progress: bool = True) -> Path:
    """Post-train ``model`` on every conversation of ``chat_file`` (loss on assistant tokens;
    linear warm-up, cosine decay) and write a stock checkpoint with provenance to ``out``.

    With ``lm_rows`` each step also takes that many packed rows of ``seq_len`` tokens from the
    documents of ``lm_files`` (language-model loss, weighted ``lm_weight``): the replay the toy's
    own post-training recipe uses, so that chat fine-tuning does not wreck the language model.

    It trains on ``threads`` intra-op threads (default: the process's count, as the pipeline's other
    training stages do). The toy's own models train on one thread, so that the shipped bytes do not
    depend on the build's cores; the ceiling is a pipeline stage, and on 2 cores 2 threads train the
    demo's ceiling 1.2 times as fast as one, to the same bytes."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from deltamoe.io import atomic_output_dir, check_output, open_checkpoint
    from deltamoe.evaluate.run import hf_progress
    from deltamoe.io.provenance import describe_checkpoint, new_manifest, read_manifest, write_manifest, write_model_card
    from deltamoe.toy.config import TrainPhase
    from deltamoe.toy.tokenizer import DOC_SEP, encode_plain
    from deltamoe.toy.train import chat_batches, deterministic, drop_version_stamps, encode_chat, packed_batches, train_loop

    check_output(out, force=False)
    conversations = read_chat(chat_file)
    if lm_rows and not lm_files:
        raise UsageError("chat post-training: lm_rows needs lm_files, the documents to replay")
    texts = read_texts(list(lm_files)) if lm_rows and lm_files else []
    tokenizer = AutoTokenizer.from_pretrained(model)
    examples = [encode_chat(tokenizer, m) for m in conversations]
    phase = TrainPhase(steps=steps, batch_size=batch_size, lr=lr, warmup=max(1, steps // 15))
    chat_at = chat_batches(examples, batch_size, tokenizer.pad_token_id, seed)
    step_at: Any = chat_at
    if texts:
        sep = tokenizer.convert_tokens_to_ids(DOC_SEP)
        stream = torch.tensor([i for ids in encode_plain(tokenizer, texts) for i in (*ids, sep)], dtype=torch.long)
        text_at = packed_batches(stream, seq_len, lm_rows, seed + 1)
        step_at = lambda step: [(1.0, chat_at(step)), (lm_weight, text_at(step))]  # noqa: E731
    with deterministic(threads or torch.get_num_threads()), hf_progress(False):
        lm = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
        train_loop(lm, step_at, phase, desc="chat sft", progress=progress)
    with atomic_output_dir(out) as tmp, hf_progress(False):
        lm.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        drop_version_stamps(tmp)
        desc = describe_checkpoint(open_checkpoint(model))
        manifest = new_manifest(read_manifest(model), stage="chat-sft",
                                params={"chat": str(chat_file), "examples": len(examples), **phase.model_dump(),
                                        "seed": seed, "lm_files": [str(p) for p in lm_files or []],
                                        "lm_documents": len(texts), "lm_rows": lm_rows, "lm_weight": lm_weight,
                                        "seq_len": seq_len},
                                inputs={"model": desc}, command=None)
        write_manifest(tmp, manifest)
        write_model_card(tmp, manifest)
    return out
