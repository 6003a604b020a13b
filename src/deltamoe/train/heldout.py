"""Held-out evaluation during training: next-token loss per language and routing shares.

Every process evaluates its share of the held-out sequences (``rank``, ``rank + world``, ...) in
batches of ``micro_batch_size``, padding with empty batches so that all run the same number of
forwards (FSDP needs it); the sums are reduced over processes, so the result does not depend on
the process count.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from deltamoe.train import losses as L
from deltamoe.train.data import HeldOut
from deltamoe.train.logs import routing_json
from deltamoe.train.model import Layout, RouterCapture
from deltamoe.train.sources import UNTAGGED


@torch.no_grad()
def evaluate(
    acc: Any,
    model: Any,
    heldout: HeldOut,
    capture: RouterCapture,
    layout: Layout,
    lang_names: list[str],
    batch_size: int,
) -> dict[str, Any]:
    """Held-out next-token loss per language and routing shares, over all processes."""
    n_langs = len(lang_names)
    world, rank = acc.num_processes, acc.process_index
    mine = list(range(rank, len(heldout), world))
    n_batches = math.ceil(math.ceil(len(heldout) / world) / batch_size) if len(heldout) else 0
    loss_sum = torch.zeros(n_langs + 1, dtype=torch.float64, device=acc.device)
    count = torch.zeros(n_langs + 1, dtype=torch.float64, device=acc.device)
    routing = torch.zeros(
        len(layout.routed_layers), layout.num_experts, n_langs + 1, dtype=torch.float64, device=acc.device
    )
    was_training = model.training
    model.eval()
    for b in range(n_batches):
        chunk = mine[b * batch_size : (b + 1) * batch_size]
        weight = 1.0 if chunk else 0.0  # every process runs the same number of forwards (FSDP needs it)
        chunk = chunk or [0]
        width = max(len(heldout.ids[i]) for i in chunk)
        ids = torch.zeros(len(chunk), width, dtype=torch.long)
        langs = torch.full((len(chunk), width), UNTAGGED, dtype=torch.long)
        valid = torch.zeros(len(chunk), width, dtype=torch.bool)
        for r, i in enumerate(chunk):
            n = len(heldout.ids[i])
            ids[r, :n] = torch.tensor(heldout.ids[i])
            langs[r, :n] = torch.tensor(heldout.langs[i])
            valid[r, :n] = weight > 0
        ids, langs, valid = ids.to(acc.device), langs.to(acc.device), valid.to(acc.device)
        with capture.capture():
            logits = model(input_ids=ids, use_cache=False).logits
        tl = L.token_losses(logits, ids).double()
        tgt_valid = valid[:, 1:]
        slot = torch.where(langs[:, 1:] >= 0, langs[:, 1:], n_langs)
        loss_sum.index_add_(0, slot[tgt_valid], tl[tgt_valid])
        count.index_add_(0, slot[tgt_valid], torch.ones_like(tl[tgt_valid]))
        if layout.routed_layers:
            routing += L.routing_counts(capture.ordered(), langs.reshape(-1), layout.top_k, n_langs, valid.reshape(-1))
    if was_training:
        model.train()
    loss_sum, count, routing = acc.reduce(loss_sum, "sum"), acc.reduce(count, "sum"), acc.reduce(routing, "sum")
    names = [*lang_names, "untagged"]
    per_lang = {names[j]: float(loss_sum[j] / count[j]) for j in range(n_langs + 1) if count[j] > 0}
    if count.sum() > 0:
        per_lang["all"] = float(loss_sum.sum() / count.sum())
    return {
        "heldout_loss": per_lang,
        "heldout_tokens": int(count.sum()),
        "routing": routing_json(routing.cpu(), layout, lang_names),
    }
