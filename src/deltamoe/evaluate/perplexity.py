"""Token-level perplexity on held-out plain text, and (for MoE models) routing statistics
gathered on the same forward passes."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm


@torch.inference_mode()
def perplexity(
    model: Any,
    tokenizer: Any,
    texts: Sequence[str],
    *,
    batch_size: int = 8,
    max_length: int | None = None,
    router: Any | None = None,
    progress: bool = False,
    desc: str = "ppl",
) -> dict[str, float]:
    """Perplexity of ``texts``: exp(total NLL / predicted tokens), each text scored on its own
    (with the tokenizer's usual special tokens, truncated to ``max_length``).

    ``router``, if given, is called with (router_logits, token mask) for every batch.
    """
    max_length = max_length or getattr(model.config, "max_position_embeddings", None) or 2048
    old_side = tokenizer.padding_side
    tokenizer.padding_side = "right"
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    nll = 0.0
    count = 0
    try:
        for start in tqdm(range(0, len(texts), batch_size), desc=desc, disable=not progress, leave=False):
            enc = tokenizer(list(texts[start : start + batch_size]), return_tensors="pt", padding="longest",
                            truncation=True, max_length=max_length)
            ids = enc["input_ids"]
            ids = torch.where(enc["attention_mask"].bool(), ids, torch.full_like(ids, pad_id))
            kwargs: dict[str, Any] = {"output_router_logits": True} if router is not None else {}
            out = model(input_ids=ids, attention_mask=enc["attention_mask"], **kwargs)
            logits = out.logits[:, :-1].float()
            target = ids[:, 1:]
            mask = enc["attention_mask"][:, 1:].bool()
            losses = F.cross_entropy(logits.transpose(1, 2), target, reduction="none")
            nll += float(losses[mask].double().sum())
            count += int(mask.sum())
            if router is not None:
                router(out.router_logits, enc["attention_mask"].bool())
    finally:
        tokenizer.padding_side = old_side
    return {"ppl": math.exp(nll / count) if count else float("nan"), "nll": nll / count if count else float("nan"),
            "tokens": count}
