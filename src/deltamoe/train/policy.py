"""What trains in a stage.

Stage 1 (post_pretrain) trains the new experts and the routers; stage 2 (router_review) the
routers only; attention, norms and embeddings can be added for ablations. Some groups never
train, whatever the config says, because the method depends on them staying B's weights
exactly: the original expert (expert 0), the FFNs of ``replicated_layers`` (E identical copies
and a zero router that together compute B's dense FFN), dense FFNs of layers the architecture
keeps dense, and inert tensors (Qwen2-MoE's zeroed shared expert).

The dense_cpt stage (a dense model, no experts) trains its FFNs, attention, norms and
embeddings, all by default.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from torch import nn

from deltamoe.train import model as m
from deltamoe.train.config import DenseCptTrainable, TrainableConfig

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

    @property
    def total_params(self) -> int:
        return sum(n for n, _ in self.params_by_group.values())


def apply_policy(model: nn.Module, layout: m.Layout, cfg: TrainableConfig | DenseCptTrainable) -> PolicySummary:
    """Set ``requires_grad`` on every parameter; return what trains."""
    groups = trainable_groups(cfg)
    by_name = dict(model.named_parameters(remove_duplicate=False))
    train_ids: set[int] = set()
    for name, p in by_name.items():
        if layout.groups[name] in groups:
            train_ids.add(id(p))
    names = frozenset(n for n, p in by_name.items() if id(p) in train_ids)
    count: Counter[str] = Counter()
    seen: set[int] = set()
    for name, p in by_name.items():
        p.requires_grad_(id(p) in train_ids)
        if id(p) not in seen:
            seen.add(id(p))
            count[layout.groups[name]] += p.numel()
    return PolicySummary(names, {g: (count[g], g in groups) for g in m.GROUPS if count[g]})
