"""Multiple choice: each option scored by its log-likelihood given the prompt, the highest wins.

This is lm-eval's ``multiple_choice`` output type with its ``acc`` metric: the continuation of
option ``o`` is ``" " + o`` (lm-eval's default target delimiter), the prompt and the
continuation are tokenised together and split where the prompt's own tokens end (lm-eval's
``_encode_pair``), no special tokens are added, and the score is the sum of the continuation's
token log-probabilities. Base models get a score too: no chat template is involved.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

DELIMITER = " "


def encode_pair(tokenizer: Any, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Token ids of ``context`` and of ``continuation`` after it, as lm-eval splits them:
    trailing spaces of the context move to the continuation, then the whole string is encoded
    and cut at the length of the context's own encoding."""
    return encode_pairs(tokenizer, [(context, continuation)])[0]


def encode_pairs(tokenizer: Any, pairs: Sequence[tuple[str, str]]) -> list[tuple[list[int], list[int]]]:
    """:func:`encode_pair` of every (context, continuation): each distinct context is encoded once
    (an item's options share it) and the strings go to the tokenizer in batches."""
    split = []
    for context, continuation in pairs:
        n_spaces = len(context) - len(context.rstrip())
        if n_spaces:
            context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
        split.append((context, continuation))
    contexts = list(dict.fromkeys(c for c, _ in split))
    # Through the tokenizer's own call, which sets padding and truncation off for it: the Rust
    # backend called directly keeps whatever padding an earlier call (chat QA's) switched on.
    ctx_ids = dict(zip(contexts, tokenizer(contexts, add_special_tokens=False)["input_ids"], strict=True))
    wholes = tokenizer([c + x for c, x in split], add_special_tokens=False)["input_ids"]
    return [(ctx_ids[c], whole[len(ctx_ids[c]):]) for (c, _), whole in zip(split, wholes, strict=True)]


@torch.inference_mode()
def option_loglikelihoods(
    model: Any, tokenizer: Any, items: Sequence[dict[str, Any]], *, batch_size: int = 32,
    progress: bool = False, desc: str = "mc",
) -> list[list[float]]:
    """Per item, the summed log-probability of each option's tokens after the item's prompt."""
    owners = [i for i, it in enumerate(items) for _ in it["options"]]
    pairs = list(zip(owners, encode_pairs(tokenizer, [(it["prompt"], DELIMITER + opt) for it in items
                                                      for opt in it["options"]]), strict=True))
    max_len = getattr(model.config, "max_position_embeddings", None) or 2048
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    scores: list[list[float]] = [[] for _ in items]
    for start in tqdm(range(0, len(pairs), batch_size), desc=desc, disable=not progress, leave=False):
        chunk = pairs[start:start + batch_size]
        seqs = [(ctx + cont)[-(max_len + 1):] for _, (ctx, cont) in chunk]
        width = max(len(s) for s in seqs) - 1
        ids = torch.full((len(seqs), width), pad, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for r, s in enumerate(seqs):  # the last token is only ever a target
            ids[r, : len(s) - 1] = torch.tensor(s[:-1])
            mask[r, : len(s) - 1] = 1
        logprobs = F.log_softmax(model(input_ids=ids, attention_mask=mask).logits.float(), dim=-1)
        for r, (i, (_, cont)) in enumerate(chunk):
            n = len(seqs[r]) - 1
            rows = logprobs[r, n - len(cont): n]
            scores[i].append(float(rows.gather(1, torch.tensor(cont)[:, None]).sum()))
    return scores


def score_mc(
    model: Any, tokenizer: Any, items: Sequence[dict[str, Any]], *, batch_size: int = 32,
    progress: bool = False, desc: str = "mc",
) -> tuple[float, list[dict[str, Any]]]:
    """Accuracy on multiple-choice ``items`` (``prompt``, ``options``, ``gold``) and a record per
    item (the chosen option, every option's log-likelihood, whether it was right)."""
    lls = option_loglikelihoods(model, tokenizer, items, batch_size=batch_size, progress=progress, desc=desc)
    records = []
    for it, ll in zip(items, lls, strict=True):
        choice = max(range(len(ll)), key=ll.__getitem__)  # first of equal maxima, as numpy.argmax
        records.append({"id": it.get("id"), "gold": it["gold"], "choice": choice, "loglik": ll,
                        "correct": choice == it["gold"]})
    acc = sum(r["correct"] for r in records) / len(records) if records else math.nan
    return acc, records


def wilson_interval(correct: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """95 % Wilson score interval of a proportion (``nan`` bounds for ``n == 0``)."""
    if n == 0:
        return (math.nan, math.nan)
    p = correct / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    # exact at the ends (the formula gives 0 and 1 there up to rounding)
    return (0.0 if correct == 0 else max(0.0, centre - half), 1.0 if correct == n else min(1.0, centre + half))
