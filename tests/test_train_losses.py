"""Losses against direct reference computations; the split-experts forward against stock transformers."""

from __future__ import annotations

import math

import pytest
import torch

from deltamoe.train import losses as L

# 2 layers, 5 tokens, 3 experts; fixed logits with distinct values (no top-k ties)
LOGITS = [
    torch.tensor([[2.0, 0.5, -1.0], [0.1, 0.3, 0.2], [-0.5, 1.5, 0.0], [1.0, -1.0, 0.7], [0.0, 0.2, 2.5]]),
    torch.tensor([[0.3, -0.2, 0.9], [1.2, 1.1, -0.4], [-2.0, 0.4, 0.6], [0.8, 0.1, -0.3], [0.5, 2.0, 1.0]]),
]
ALLOCATION = {"en": [0], "xx": [1, 2]}
LANGS = ["en", "xx"]  # index order
TOKEN_LANG = torch.tensor([0, 1, -1, 1, 0])  # en, xx, untagged, xx, en


def _softmax(row: list[float]) -> list[float]:
    z = [math.exp(v) for v in row]
    return [v / sum(z) for v in z]


def ref_balance(logits: list[torch.Tensor], k: int) -> float:
    per_layer = []
    for lg in logits:
        rows = [_softmax(r) for r in lg.tolist()]
        n_tok, n_exp = len(rows), len(rows[0])
        f = [0.0] * n_exp
        for p in rows:
            for e in sorted(range(n_exp), key=lambda e: -p[e])[:k]:
                f[e] += 1 / (n_tok * k)
        mean_p = [sum(p[e] for p in rows) / n_tok for e in range(n_exp)]
        per_layer.append(n_exp * sum(f[e] * mean_p[e] for e in range(n_exp)))
    return sum(per_layer) / len(per_layer)


def ref_lpr(logits: list[torch.Tensor], token_lang: list[int]) -> float:
    per_layer = []
    for lg in logits:
        terms = []
        for row, lang in zip(lg.tolist(), token_lang, strict=True):
            if lang < 0:
                continue
            p = _softmax(row)
            terms.append(-math.log(sum(p[e] for e in ALLOCATION[LANGS[lang]])))
        per_layer.append(sum(terms) / len(terms))
    return sum(per_layer) / len(per_layer)


@pytest.mark.parametrize("k", [1, 2])
def test_balance_loss_equals_reference(k: int) -> None:
    got = L.balance_loss(LOGITS, k).item()
    assert got == pytest.approx(ref_balance(LOGITS, k), rel=1e-6)


def test_balance_loss_matches_transformers_up_to_its_top_k_scale() -> None:
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    # transformers counts K assignments per token without dividing by K: its value is K x ours
    for k in (1, 2):
        hf = load_balancing_loss_func((LOGITS[0],), 3, k).item()
        assert hf == pytest.approx(k * L.balance_loss([LOGITS[0]], k).item(), rel=1e-6)


def test_balance_loss_is_one_when_uniform_and_has_router_gradient() -> None:
    uniform = [torch.zeros(7, 4)]
    assert L.balance_loss(uniform, 2).item() == pytest.approx(1.0)
    lg = [t.clone().requires_grad_(True) for t in LOGITS]
    L.balance_loss(lg, 1).backward()
    assert all(t.grad is not None and t.grad.abs().sum() > 0 for t in lg)


def test_lpr_loss_equals_reference() -> None:
    allowed = L.allowed_matrix(ALLOCATION, LANGS, 3)
    got = L.lpr_loss(LOGITS, TOKEN_LANG, allowed).item()
    assert got == pytest.approx(ref_lpr(LOGITS, TOKEN_LANG.tolist()), rel=1e-6)


def test_lpr_untagged_tokens_contribute_nothing() -> None:
    allowed = L.allowed_matrix(ALLOCATION, LANGS, 3)
    lg = [t.clone().requires_grad_(True) for t in LOGITS]
    L.lpr_loss(lg, TOKEN_LANG, allowed).backward()
    for t in lg:
        assert torch.equal(t.grad[2], torch.zeros(3))  # the untagged token gets no gradient
        assert t.grad[0].abs().sum() > 0
    # changing an untagged token's logits leaves the loss unchanged
    moved = [t.clone() for t in LOGITS]
    for t in moved:
        t[2] = torch.tensor([9.0, -9.0, 3.0])
    assert L.lpr_loss(moved, TOKEN_LANG, allowed).item() == pytest.approx(
        L.lpr_loss(LOGITS, TOKEN_LANG, allowed).item()
    )
    # nothing tagged: exactly zero, with a (zero) gradient path
    lg2 = [t.clone().requires_grad_(True) for t in LOGITS]
    zero = L.lpr_loss(lg2, torch.full((5,), -1), allowed)
    zero.backward()
    assert zero.item() == 0.0 and all(torch.equal(t.grad, torch.zeros_like(t)) for t in lg2)


def test_lpr_pushes_probability_to_allocated_experts() -> None:
    allowed = L.allowed_matrix(ALLOCATION, LANGS, 3)
    lg = LOGITS[0].clone().requires_grad_(True)
    L.lpr_loss([lg], TOKEN_LANG, allowed).backward()
    # en tokens (rows 0, 4): descending the gradient raises expert 0's logit relative to the others
    for row in (0, 4):
        assert lg.grad[row, 0] < 0 and (lg.grad[row, 1:] > 0).all()


def test_token_losses_and_routing_counts() -> None:
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 11)
    ids = torch.randint(0, 11, (2, 5))
    tl = L.token_losses(logits, ids)
    assert tl.shape == (2, 4)
    assert tl[1, 2].item() == pytest.approx(-torch.log_softmax(logits[1, 2], -1)[ids[1, 3]].item(), rel=1e-6)
    counts = L.routing_counts(LOGITS, TOKEN_LANG, 1, 2)
    assert counts.shape == (2, 3, 3)
    # layer 0 top-1 experts: 0, 1, 1, 0, 2 ; langs en, xx, untagged, xx, en
    expected = torch.zeros(3, 3, dtype=torch.float64)
    for e, lang in zip([0, 1, 1, 0, 2], [0, 1, 2, 1, 0], strict=True):
        expected[e, lang] += 1
    assert torch.equal(counts[0], expected)
    valid = torch.tensor([True, False, True, True, True])
    assert L.routing_counts(LOGITS, TOKEN_LANG, 2, 2, valid).sum().item() == 2 * 2 * 4
