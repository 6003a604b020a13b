"""What trains in a stage.

Stage 1 (post_pretrain) trains the new experts and the routers; stage 2 (router_review) the
routers only; attention, norms and embeddings can be added for ablations. Some groups never
train, whatever the config says, because the method depends on them staying B's weights
exactly: the original expert (expert 0), the FFNs of ``replicated_layers`` (E identical copies
and a zero router that together compute B's dense FFN), dense FFNs of layers the architecture
keeps dense, and inert tensors (Qwen2-MoE's zeroed shared expert).

The dense_cpt stage (a dense model, no experts) trains its FFNs, attention, norms and
embeddings, all by default. With ``trainable.layers`` it trains only those decoder blocks
(LLaMA-Pro's block expansion: ``new`` = the blocks ``deltamoe expand`` added); every tensor
outside them, embeddings, final norm and LM head included, stays bit-identical.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from deltamoe.errors import UsageError
from deltamoe.train import model as m
from deltamoe.train.config import DenseCptTrainable
from deltamoe.train.sections import TrainableConfig

NEVER_TRAINED = (m.ORIGINAL_EXPERT, m.REPLICATED_FFN, m.DENSE_FFN, m.INERT)


def trainable_groups(cfg: TrainableConfig | DenseCptTrainable) -> set[str]:
    """The parameter groups (see deltamoe.train.model) that ``cfg`` trains."""
    if isinstance(cfg, DenseCptTrainable):  # a dense model: its FFNs are the dense_ffn group
        dense = {m.DENSE_FFN: cfg.ffn, m.ATTENTION: cfg.attention, m.NORM: cfg.norms, m.EMBEDDING: cfg.embeddings}
        return {g for g, on in dense.items() if on}
    chosen = {
        m.NEW_EXPERT: cfg.new_experts,
        m.ROUTER: cfg.routers,
        m.ATTENTION: cfg.attention,
        m.NORM: cfg.norms,
        m.EMBEDDING: cfg.embeddings,
    }
    return {g for g, on in chosen.items() if on}


@dataclass(frozen=True)
class PolicySummary:
    trainable_names: frozenset[str]  # every in-memory name (tied aliases included) that trains
    params_by_group: dict[str, tuple[int, bool]]  # group -> (parameter count, trains)

    @property
    def trainable_params(self) -> int:
        return sum(n for n, on in self.params_by_group.values() if on)


def resolve_layers(
    cfg: TrainableConfig | DenseCptTrainable, manifest: Mapping[str, Any] | None, num_layers: int, model: Path
) -> list[int] | None:
    """The decoder blocks ``trainable.layers`` selects (``new``: from the ``expand`` block), checked
    against the model's ``num_layers``; None when the option is not given."""
    layers = getattr(cfg, "layers", None)
    if layers is None:
        return None
    if layers == "new":
        block = (manifest or {}).get("expand")
        if not isinstance(block, dict) or "new_layers" not in block:
            raise UsageError(
                f"trainable.layers: 'new' needs a block-expanded model (deltamoe expand); {model / 'deltamoe.json'} "
                "has no 'expand' block"
            )
        layers = [int(i) for i in block["new_layers"]]
    bad = sorted(i for i in layers if not 0 <= i < num_layers)
    if bad:
        raise UsageError(f"trainable.layers: {bad} out of range; {model} has layers 0..{num_layers - 1}")
    return sorted(layers)


def _layer_of(name: str, prefix: str) -> int | None:
    hit = re.match(re.escape(prefix) + r"\.layers\.(\d+)\.", name)
    return int(hit[1]) if hit else None


def apply_policy(
    model: nn.Module,
    layout: m.Layout,
    cfg: TrainableConfig | DenseCptTrainable,
    *,
    layers: Collection[int] | None = None,
) -> PolicySummary:
    """Set ``requires_grad`` on every parameter; return what trains.

    ``layers`` (dense models): only parameters of those decoder blocks may train; they are
    counted as ``layers.<group>`` in the summary, the rest under their own group.
    """
    groups = trainable_groups(cfg)
    by_name = dict(model.named_parameters(remove_duplicate=False))
    prefix = getattr(model, "base_model_prefix", "model")
    chosen = set(layers) if layers is not None else None

    def key(name: str) -> str:
        group = layout.groups[name]
        if chosen is not None and _layer_of(name, prefix) in chosen:
            return f"layers.{group}"
        return group

    def trains(name: str) -> bool:
        k = key(name)
        return k.removeprefix("layers.") in groups and (chosen is None or k.startswith("layers."))

    train_ids = {id(p) for name, p in by_name.items() if trains(name)}
    names = frozenset(n for n, p in by_name.items() if id(p) in train_ids)
    count: Counter[str] = Counter()
    on: dict[str, bool] = {}
    seen: set[int] = set()
    for name, p in by_name.items():
        p.requires_grad_(id(p) in train_ids)
        if id(p) not in seen:
            seen.add(id(p))
            count[key(name)] += p.numel()
            on[key(name)] = trains(name)
    order = [*m.GROUPS, *(f"layers.{g}" for g in m.GROUPS)]
    return PolicySummary(names, {g: (count[g], on[g]) for g in order if count[g]})
