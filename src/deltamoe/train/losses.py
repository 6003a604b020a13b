"""Training losses: next-token, load balancing, language-prior routing (LPR); routing statistics.

Shapes: ``router_logits`` is a list with one [T, E] tensor per MoE layer (T = batch x seq
tokens, in the order of the flattened input); ``token_lang`` is [T] with a language index, or
-1 for an untagged token.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F


def token_losses(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Per-position next-token cross-entropy in float32: [B, L, V], [B, L] -> [B, L-1]."""
    v = logits.shape[-1]
    return F.cross_entropy(logits[:, :-1].float().reshape(-1, v), input_ids[:, 1:].reshape(-1), reduction="none").view(
        input_ids.shape[0], -1
    )


def balance_loss(router_logits: Sequence[torch.Tensor], top_k: int) -> torch.Tensor:
    """Switch/Mixtral load-balancing loss, per layer, averaged over layers.

    For one layer with E experts: ``E * sum_e f_e * P_e``, where f_e is the share of the T*K
    top-k assignments that went to expert e and P_e is the mean router probability of e. f is
    not differentiable (as in Switch); P carries the gradient. Perfectly uniform routing gives
    exactly 1 for any K (f is normalised by K, unlike transformers' version, which gives K).
    """
    if not router_logits:
        raise ValueError("balance_loss: no router logits")
    total = router_logits[0].new_zeros((), dtype=torch.float32)
    for logits in router_logits:
        probs = torch.softmax(logits.float(), dim=-1)  # [T, E]
        n_tok, n_exp = probs.shape
        with torch.no_grad():
            chosen = torch.topk(probs, top_k, dim=-1).indices  # [T, K]
            f = torch.zeros(n_exp, device=probs.device).scatter_add_(
                0, chosen.reshape(-1), torch.ones(chosen.numel(), device=probs.device)
            ) / (n_tok * top_k)
        total = total + n_exp * (f * probs.mean(dim=0)).sum()
    return total / len(router_logits)


def allowed_matrix(allocation: Mapping[str, Sequence[int]], langs: Sequence[str], num_experts: int) -> torch.Tensor:
    """[n_langs, E] boolean: which experts each language (in ``langs`` order) is allocated."""
    out = torch.zeros(len(langs), num_experts, dtype=torch.bool)
    for i, lang in enumerate(langs):
        out[i, list(allocation[lang])] = True
    return out


def lpr_loss(router_logits: Sequence[torch.Tensor], token_lang: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """Language-prior routing loss: ``-log sum_{e in S_L} p_e`` for each token of language L.

    Averaged over the tokens that carry a language, then over layers. Untagged tokens
    (``token_lang == -1``) contribute nothing; with no tagged token the loss is 0 (and still
    part of the graph, so every process runs the same backward).
    """
    if not router_logits:
        raise ValueError("lpr_loss: no router logits")
    tagged = token_lang >= 0
    n = int(tagged.sum())
    if n == 0:
        return sum(lg.float().sum() * 0.0 for lg in router_logits)  # type: ignore[return-value]
    mask = allowed.to(token_lang.device)[token_lang[tagged]]  # [n, E]
    total = router_logits[0].new_zeros((), dtype=torch.float32)
    for logits in router_logits:
        logp = torch.log_softmax(logits[tagged].float(), dim=-1)
        # log sum_{e in S} p_e, computed stably in log space
        total = total - torch.logsumexp(logp.masked_fill(~mask, float("-inf")), dim=-1).mean()
    return total / len(router_logits)


@torch.no_grad()
def routing_counts(
    router_logits: Sequence[torch.Tensor],
    token_lang: torch.Tensor,
    top_k: int,
    n_langs: int,
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """Top-k assignment counts [layers, E, n_langs + 1]; the last language slot is 'untagged'.

    Dividing by the sum over experts gives, per layer and language, the share of that
    language's top-k assignments that each expert received.
    """
    n_exp = router_logits[0].shape[-1]
    lang = torch.where(token_lang >= 0, token_lang, n_langs)
    if valid is not None:
        lang = lang[valid]
    out = torch.zeros(len(router_logits), n_exp, n_langs + 1, dtype=torch.float64, device=token_lang.device)
    for i, logits in enumerate(router_logits):
        lg = logits if valid is None else logits[valid]
        chosen = torch.topk(torch.softmax(lg.float(), dim=-1), top_k, dim=-1).indices  # as the router does
        flat = chosen * (n_langs + 1) + lang[:, None]
        out[i] = torch.bincount(flat.reshape(-1), minlength=n_exp * (n_langs + 1)).view(n_exp, n_langs + 1).double()
    return out
