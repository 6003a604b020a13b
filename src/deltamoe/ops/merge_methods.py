"""The per-tensor arithmetic of the merge methods (float32 in, float32 out), as mergekit defines it.

TIES trims each task vector to its largest-magnitude entries (:func:`magnitude_prune`), DARE drops
entries at random and rescales the survivors (:func:`random_drop`); both then go through
:func:`combine`, which TIES and DARE-TIES give a sign election (``consensus``). :func:`mix` applies
a method to the task vectors of one tensor.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from deltamoe.choices import Rescale
from deltamoe.arith import f32
from deltamoe.ops.common import seeded_generator

SPARSE = {"ties": "magnitude", "dare_linear": "random", "dare_ties": "random"}  # method -> how it drops entries
CONSENSUS = ("ties", "dare_ties")  # the methods with TIES's sign election


def magnitude_prune(d: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the ``max(1, int(density * numel))`` entries of largest magnitude, zero the rest."""
    if density >= 1 or d.numel() == 0:
        return d
    k = max(1, int(density * d.numel()))
    flat = d.reshape(-1)
    keep = torch.topk(flat.abs(), k, sorted=False).indices
    out = torch.zeros_like(flat)
    out[keep] = flat[keep]
    return out.reshape(d.shape)


def random_drop(d: torch.Tensor, density: float, rescale: Rescale, gen: torch.Generator) -> torch.Tensor:
    """DARE: keep each entry with probability ``density``; rescale the survivors."""
    if density >= 1:
        return d
    mask = torch.empty_like(d).bernoulli_(density, generator=gen)
    kept = d * mask
    if rescale == "inverse":
        return kept.div_(density)
    if rescale == "l1":
        before, after = d.abs().sum(), kept.abs().sum()
        if before >= 1e-7 and after >= 1e-7:  # mergekit's guard against empty masks
            return kept.mul_(before / after)
    return kept


def combine(
    deltas: list[torch.Tensor],
    weights: Sequence[float],
    *,
    consensus: bool,
    normalize: bool,
    lambda_: float,
) -> torch.Tensor:
    """Σ w_i δ_i (with TIES sign election if ``consensus``), optionally / Σ w_i, times λ."""
    if consensus:
        weighted = [d * w for d, w in zip(deltas, weights)]
        total = torch.stack(weighted).sum(0)
        elected = torch.where(total >= 0, 1.0, -1.0)
        del total
        mixed = torch.zeros_like(deltas[0])
        divisor = torch.zeros_like(deltas[0])
        for wd, w in zip(weighted, weights):
            agree = wd.sign() == elected  # a zero entry has sign 0 and never agrees
            mixed.add_(torch.where(agree, wd, 0.0))
            divisor.add_(agree.to(mixed.dtype), alpha=w)
        divisor[divisor == 0] = 1
    else:
        mixed = deltas[0] * weights[0]
        for d, w in zip(deltas[1:], weights[1:]):
            mixed.add_(d, alpha=w)
        s = float(sum(weights))
        divisor = torch.tensor(1.0 if abs(s) < 1e-8 else s)
    if normalize:
        mixed.div_(divisor)
    if lambda_ != 1:
        mixed.mul_(lambda_)
    return mixed


def mix(
    deltas: list[torch.Tensor],
    weights: list[float],
    labels: list[str],
    *,
    method: str,
    tensor: str,
    density: float | None,
    rescale: Rescale,
    seed: int,
    normalize: bool,
    lambda_: float,
) -> torch.Tensor:
    """The task vectors ``deltas`` of one tensor (``tensor``, or rows of it) combined by ``method``.

    DARE's masks come from (seed, tensor, the vector's label), so they do not depend on the order
    in which tensors are processed. paramdelta is C + Σ wᵢ δᵢ, in float32 in the order given.
    """
    sparse = SPARSE.get(method)
    if sparse == "magnitude":
        deltas = [magnitude_prune(d, density) for d in deltas]  # type: ignore[arg-type]
    elif sparse == "random":
        deltas = [
            random_drop(d, density, rescale, seeded_generator(seed, tensor, label))  # type: ignore[arg-type]
            for d, label in zip(deltas, labels)
        ]
    if method == "paramdelta" and len(deltas) == 1 and weights[0] == 1:
        return deltas[0]
    if method == "paramdelta":
        return combine([f32(d) for d in deltas], weights, consensus=False, normalize=False, lambda_=1.0)
    return combine(deltas, weights, consensus=method in CONSENSUS, normalize=normalize, lambda_=lambda_)
