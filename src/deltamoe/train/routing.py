"""Language-allocated routing in training: a router mask built from the tokens' language tags.

With ``routing.allocated`` a token tagged with language L may only be routed to the experts
allocated to L and the original experts (expert 0, the frozen copy of the dense FFN); for an
original language that is its own experts alone, so with top-k > 1 its extra choices get weight
0. Untagged tokens route freely. The mask acts in training forwards only: the routers still
emit their unmasked logits, which the routing losses (LPR, balance) and the logged routing
shares read, so the routers learn to choose by themselves what the mask enforces, and
evaluation and serving run without language tags, as a served model must.

With ``routing.top_k`` (per language) a token tagged with language L uses only its first
``top_k[L]`` choices: the later ones get weight 0 and the kept weights are renormalised where the
family renormalises (``{en: 1}``: an original-language token goes top-1 to its best expert, which
under the mask is expert 0). Like the mask it acts in training forwards only.

The mask is a forward hook on each router module that recomputes the top-k choice and weights
from the masked logits, the same way the router computes them (float softmax, top-k, and the
renormalisation the family uses), so the experts implementation is untouched.

With ``losses.lpr_tokens: original`` the LPR loss sees only the tokens of the original languages
(:func:`lpr_tokens`). :func:`routing_rules` turns a stage's routing options into the mask and that
choice, checking them against the model's languages and top-k.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from deltamoe.errors import UsageError
from deltamoe.train.sources import UNTAGGED

if TYPE_CHECKING:
    from deltamoe.train.model import Layout
    from deltamoe.train.sections import RoutingConfig


def route_matrix(allocation: Mapping[str, Sequence[int]], langs: Sequence[str], num_experts: int,
                 original_experts: Sequence[int]) -> torch.Tensor:
    """[n_langs, E] boolean: the experts a token of each language (in ``langs`` order) may use,
    its allocated experts and the original experts."""
    out = torch.zeros(len(langs), num_experts, dtype=torch.bool)
    for i, lang in enumerate(langs):
        out[i, list(allocation[lang])] = True
        out[i, list(original_experts)] = True
    return out


def original_languages(allocation: Mapping[str, Sequence[int]], original_experts: Sequence[int]) -> list[str]:
    """The languages served by original experts only (``en -> 0``): MoE-LPR's original languages."""
    orig = set(original_experts)
    return [lang for lang, experts in allocation.items() if set(experts) <= orig]


def masked_choice(logits: torch.Tensor, allowed: torch.Tensor, top_k: int, normalise: bool
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k weights and expert ids of router ``logits`` [T, E] restricted to ``allowed`` [T, E]:
    the router's own computation on the masked logits."""
    probs = torch.softmax(logits.float().masked_fill(~allowed, float("-inf")), dim=-1)
    weights, index = torch.topk(probs, top_k, dim=-1)
    if normalise:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, index


def keep_first(weights: torch.Tensor, tagged: torch.Tensor, keep: torch.Tensor, normalise: bool) -> torch.Tensor:
    """Top-k ``weights`` [T, K] (best first) with the choices after each tagged token's ``keep`` [T]
    set to 0, renormalised to sum 1 where ``normalise``; untagged tokens unchanged."""
    slot = torch.arange(weights.shape[1], device=weights.device)
    drop = tagged[:, None] & (slot[None, :] >= keep[:, None])
    out = weights.masked_fill(drop, 0.0)
    if normalise:
        out = out / out.sum(dim=-1, keepdim=True)
    return torch.where(tagged[:, None], out, weights)


class RouterMask:
    """Forward hooks that restrict each router's choice to the experts its token's language may
    use, while :meth:`tokens` is active."""

    def __init__(self, routers: Sequence[nn.Module], route: torch.Tensor, top_k: torch.Tensor | None = None):
        self.route = route
        self.top_k = top_k  # [n_langs] expert choices each language keeps; None: the router's top-k
        self._lang: torch.Tensor | None = None
        self._handles = [r.register_forward_hook(self._hook) for r in routers]

    @contextmanager
    def tokens(self, token_lang: torch.Tensor) -> Iterator[None]:
        """Mask the forwards inside the block with these [T] language ids (-1: untagged)."""
        self._lang = token_lang
        try:
            yield
        finally:
            self._lang = None

    def _hook(self, module: nn.Module, args: Any, output: Any) -> Any:
        lang = self._lang
        if lang is None:
            return None
        logits, scores, _ = output
        if logits.shape[0] != lang.shape[0]:
            raise RuntimeError(f"router mask: {logits.shape[0]} routed tokens but {lang.shape[0]} language ids")
        allowed = torch.ones_like(logits, dtype=torch.bool)
        tagged = lang >= 0
        allowed[tagged] = self.route.to(logits.device)[lang[tagged]]
        # Mixtral always renormalises the top-k weights; Qwen3-MoE only with norm_topk_prob
        normalise = bool(getattr(module, "norm_topk_prob", True))
        weights, index = masked_choice(logits, allowed, module.top_k, normalise)
        if self.top_k is not None:
            weights = keep_first(weights, tagged, self.top_k.to(logits.device)[lang.clamp(min=0)], normalise)
        return logits, weights.to(scores.dtype), index

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


def routing_rules(routing: RoutingConfig | None, lpr_mode: str, model: str, moe: Mapping[str, Any] | None,
                  layout: Layout, allocation: Mapping[str, list[int]], lang_names: list[str], device: Any
                  ) -> tuple[RouterMask | None, torch.Tensor | None]:
    """A stage's routing options (``routing``: None for a stage without them; ``lpr_mode``: its
    ``losses.lpr_tokens``) for the model at ``model``: the router mask of language-allocated
    routing and of top-k per language (or None) and, for ``lpr_tokens: original``, which language
    ids the LPR loss keeps (None: all tagged)."""
    if moe is None:
        return None, None
    original = [int(e) for e in moe.get("original_experts", [0])]
    need_allocation = (routing is not None and routing.allocated) or lpr_mode == "original"
    if need_allocation and not allocation:
        raise UsageError(
            f"{'routing.allocated' if routing is not None and routing.allocated else 'losses.lpr_tokens: original'} "
            f"needs a language -> expert allocation, and {model} has none; upcycle with --allocate "
            "(e.g. --allocate en=0 --allocate el=1,2)"
        )
    mask = None
    per_lang = dict(routing.top_k) if routing is not None else {}
    for lang, k in per_lang.items():
        if lang not in lang_names:
            raise UsageError(f"routing.top_k.{lang}: {lang!r} is not one of the model's languages "
                             f"({', '.join(lang_names) or 'none'}); name a language of its allocation")
        if k > layout.top_k:
            raise UsageError(f"routing.top_k.{lang} = {k}: more than the model's top-k ({layout.top_k}); "
                             f"use 1 to {layout.top_k}")
    if routing is not None and (routing.allocated or per_lang):
        if routing.allocated:
            route = route_matrix(allocation, lang_names, layout.num_experts, original)
        else:
            route = torch.ones(len(lang_names), layout.num_experts, dtype=torch.bool)
        kept = torch.tensor([per_lang.get(name, layout.top_k) for name in lang_names]) if per_lang else None
        mask = RouterMask([lay.router for lay in layout.routed_layers], route.to(device),
                          kept.to(device) if kept is not None else None)
    keep = None
    if lpr_mode == "original":
        orig_langs = set(original_languages(allocation, original))
        keep = torch.tensor([name in orig_langs for name in lang_names], dtype=torch.bool, device=device)
    return mask, keep


def lpr_tokens(tok_lang: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    """The language ids the LPR loss sees: all, or only those ``keep`` marks (others untagged)."""
    if keep is None:
        return tok_lang
    kept = (tok_lang >= 0) & keep[tok_lang.clamp(min=0)]
    return torch.where(kept, tok_lang, torch.full_like(tok_lang, UNTAGGED))
