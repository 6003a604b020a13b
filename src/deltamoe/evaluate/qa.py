"""Chat question answering: greedy generation through the model's chat template, scored by
normalised exact match.

Prompting, stopping and normalisation are those of lm-eval's ``hf`` model with
``--apply_chat_template`` and its ``exact_match`` metric with ``ignore_case``,
``ignore_punctuation`` and whitespace-stripping ``regexes_to_ignore``, so the tasks that
:mod:`deltamoe.evaluate.lm_eval_bridge` exports give the same scores under lm-eval.
"""

from __future__ import annotations

import re
import string
from collections.abc import Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from deltamoe.errors import CheckpointError

MAX_NEW_TOKENS = 16
# Applied in this order, as lm-eval's exact_match does: regexes, case, punctuation.
STRIP_REGEXES = (r"^\s+", r"\s+$")
_PUNCT = str.maketrans("", "", string.punctuation)


def normalize(text: str) -> str:
    """Answer normalisation: strip surrounding whitespace, lowercase, drop ASCII punctuation."""
    for rx in STRIP_REGEXES:
        text = re.sub(rx, "", text)
    return text.lower().translate(_PUNCT)


def exact_match(prediction: str, answer: str) -> bool:
    return normalize(prediction) == normalize(answer)


def require_chat_template(tokenizer: Any, model_path: str) -> None:
    if not getattr(tokenizer, "chat_template", None):
        raise CheckpointError(
            f"{model_path}: the tokenizer has no chat template, and chat QA prompts through it. "
            "Evaluate a checkpoint that ships one (chat_template.jinja or 'chat_template' in "
            "tokenizer_config.json), e.g. copy the instruct model's chat_template.jinja into it, "
            "or skip chat QA with --no-qa (qa=False)."
        )


def chat_prompts(tokenizer: Any, prompts: Sequence[str]) -> list[str]:
    """Each prompt as a single user turn, followed by the assistant's generation prompt."""
    return [
        tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
        for p in prompts
    ]


def _stop_strings(tokenizer: Any) -> list[str]:
    eos = tokenizer.eos_token
    return [eos] if eos else []


@torch.inference_mode()
def generate(
    model: Any,
    tokenizer: Any,
    texts: Sequence[str],
    *,
    max_new_tokens: int = MAX_NEW_TOKENS,
    batch_size: int = 1,
    progress: bool = False,
    desc: str = "generate",
) -> list[str]:
    """Greedy continuations of already-templated ``texts`` (left-padded batches), decoded without
    special tokens and cut at the eos string."""
    stops = _stop_strings(tokenizer)
    bos = getattr(tokenizer, "bos_token", None)
    old_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    outputs: list[str] = []
    try:
        for start in tqdm(range(0, len(texts), batch_size), desc=desc, disable=not progress, leave=False):
            chunk = list(texts[start : start + batch_size])
            # as lm-eval does: no extra BOS if the chat template already wrote one
            special = {"add_special_tokens": False} if bos and chunk[0].startswith(bos) else {}
            enc = tokenizer(chunk, return_tensors="pt", padding="longest", **special)
            out = model.generate(
                input_ids=enc["input_ids"],
                attention_mask=enc["attention_mask"],
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=pad_id,
            )
            for row in out[:, enc["input_ids"].shape[1] :].tolist():
                text = tokenizer.decode(row, skip_special_tokens=True)
                for s in stops:
                    text = text.split(s)[0]
                outputs.append(text)
    finally:
        tokenizer.padding_side = old_side
    return outputs


def score_items(
    model: Any,
    tokenizer: Any,
    items: Sequence[dict[str, Any]],
    *,
    batch_size: int = 1,
    max_new_tokens: int = MAX_NEW_TOKENS,
    progress: bool = False,
    desc: str = "qa",
) -> tuple[float, list[dict[str, Any]]]:
    """Accuracy on ``items`` (each with ``prompt`` and ``answer``) and one record per item."""
    preds = generate(model, tokenizer, chat_prompts(tokenizer, [it["prompt"] for it in items]),
                     max_new_tokens=max_new_tokens, batch_size=batch_size, progress=progress, desc=desc)
    records = [
        {"id": it.get("id"), "answer": it["answer"], "prediction": p, "correct": exact_match(p, it["answer"])}
        for it, p in zip(items, preds, strict=True)
    ]
    acc = sum(r["correct"] for r in records) / len(records) if records else float("nan")
    return acc, records


ANSWER_KINDS = ("asked_relation", "original_language", "other")


def answer_kinds(records: Sequence[dict[str, Any]], items: Sequence[dict[str, Any]],
                 relation_words: dict[str, set[str]], original_words: set[str]) -> dict[str, float]:
    """What a language's chat answers are, beyond right or wrong (a diagnostic; the score stays
    exact match). Each normalised prediction falls in the first kind it matches:

    - ``asked_relation``: a value word of the asked relation in the question's language (the
      answer behaviour carried over to the language, whether or not the value is right);
    - ``original_language``: a value word of the original language (answering in the wrong
      language; for the original language itself: a value of another relation);
    - ``other``: anything else (another relation's word, an inflected form, several words, nothing).

    ``relation_words`` maps each relation to its normalised value words in the question's language.
    Returns the share of each kind and ``n``, the number of answers.
    """
    relation_of = {it.get("id"): it.get("relation") for it in items}
    counts = dict.fromkeys(ANSWER_KINDS, 0)
    for r in records:
        pred = normalize(r["prediction"])
        rel = relation_of.get(r.get("id"))
        if rel is not None and pred in relation_words.get(rel, set()):
            counts["asked_relation"] += 1
        elif pred in original_words:
            counts["original_language"] += 1
        else:
            counts["other"] += 1
    n = len(records)
    return {**{k: (v / n if n else float("nan")) for k, v in counts.items()}, "n": n}
