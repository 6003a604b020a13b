"""Routing statistics of MoE checkpoints: which experts the tokens of each language go to.

For every language, MoE layer and expert: the fraction of the language's tokens whose top-k
contains the expert (``routed``; a row sums to top_k) and the fraction whose first choice it is
(``top1``; a row sums to 1). Counted on the held-out plain text, padding excluded.

Where the model carries a language -> expert allocation, ``allocated`` is, per layer, the share
of the language's tokens whose first choice lies in the language's allocated experts, and
``allocated_mean`` its mean over layers: whether the premise of the method, experts allocated to
languages, is realised by the routers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch


def moe_shape(config: dict[str, Any]) -> tuple[int, int] | None:
    """(num_experts, top_k) of an MoE config, or None for a dense model."""
    experts = config.get("num_local_experts") or config.get("num_experts")
    top_k = config.get("num_experts_per_tok")
    if experts and top_k:
        return int(experts), int(top_k)
    return None


class RoutingCounter:
    """Accumulates expert choices from ``router_logits`` (one [tokens, experts] tensor per MoE layer)."""

    def __init__(self, num_experts: int, top_k: int):
        self.num_experts = num_experts
        self.top_k = top_k
        self.routed: torch.Tensor | None = None
        self.top1: torch.Tensor | None = None
        self.tokens = 0

    def __call__(self, router_logits: tuple[torch.Tensor, ...], mask: torch.Tensor) -> None:
        flat = mask.reshape(-1)
        n_layers = len(router_logits)
        if self.routed is None:
            self.routed = torch.zeros(n_layers, self.num_experts, dtype=torch.long)
            self.top1 = torch.zeros(n_layers, self.num_experts, dtype=torch.long)
        assert self.top1 is not None
        for layer, logits in enumerate(router_logits):
            logits = logits.reshape(-1, logits.shape[-1])[flat]
            # the same operation the MoE blocks use (top-k of the float softmax), so that even
            # ties (e.g. a zero router) resolve to the experts the model actually ran
            chosen = torch.softmax(logits.float(), dim=-1).topk(self.top_k, dim=-1).indices
            self.routed[layer] += torch.bincount(chosen.reshape(-1), minlength=self.num_experts)
            self.top1[layer] += torch.bincount(chosen[:, 0], minlength=self.num_experts)
        self.tokens += int(flat.sum())

    def result(self, layer_ids: list[int] | None = None, replicated: list[int] | None = None) -> dict[str, Any]:
        """Fractions per MoE layer. ``layer_ids`` are the MoE layers, ``replicated`` the layers a
        Mixtral upcycle kept dense as identical experts behind a zero router: the model returns
        router logits for both, in layer order, and a replicated layer's rows are left out (its
        router is a tie that says nothing about routing)."""
        if self.routed is None or self.top1 is None or self.tokens == 0:
            return {"tokens": 0, "layers": [], "routed": [], "top1": []}
        rows = self.routed.shape[0]
        skip = set(replicated or ())
        hooked = sorted(set(layer_ids or ()) | skip)
        if not layer_ids or len(hooked) != rows:
            hooked, skip = list(range(rows)), set()
        keep = [i for i, layer in enumerate(hooked) if layer not in skip]
        return {
            "tokens": self.tokens,
            "layers": [hooked[i] for i in keep],
            "routed": [[round(float(c) / self.tokens, 6) for c in self.routed[i]] for i in keep],
            "top1": [[round(float(c) / self.tokens, 6) for c in self.top1[i]] for i in keep],
        }


def allocation_shares(top1: list[list[float]], experts: list[int]) -> dict[str, Any]:
    """Per layer, the share of tokens whose first choice is one of ``experts``; and the mean."""
    per_layer = [round(sum(row[e] for e in experts), 6) for row in top1]
    return {"allocated": per_layer, "allocated_mean": round(sum(per_layer) / len(per_layer), 6) if per_layer else None}


def draw_heatmap(routing: dict[str, Any], path: str | Path, *, title: str = "") -> Path:
    """One panel per language: rows are MoE layers, columns experts, colour the fraction of the
    language's tokens routed to the expert. Allocated experts (if known) are marked in the labels."""
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    langs = list(routing["languages"])
    top_k = routing["top_k"]
    allocation = routing.get("allocation") or {}
    n_layers = max(len(routing["languages"][lang]["layers"]) for lang in langs)
    # at least 1.8 inches: the titles, labels and colour bar need room even for one MoE layer
    fig, axes = plt.subplots(1, len(langs), figsize=(2.2 + 1.9 * len(langs), max(1.8, 0.8 + 0.32 * n_layers)),
                             squeeze=False, sharey=True, layout="constrained")
    image = None
    for ax, lang in zip(axes[0], langs, strict=True):
        stats = routing["languages"][lang]
        data = stats["routed"]
        image = ax.imshow(data, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
        share = stats.get("allocated_mean")
        ax.set_title(f"{lang} ({stats['tokens']} tok)" + (f"\nown top-1 {share:.2f}" if share is not None else ""),
                     fontsize=9)
        n_exp = len(data[0]) if data else 0
        owners = {e: lg for lg, exps in allocation.items() for e in exps}
        ax.set_xticks(range(n_exp), [f"{e}\n{owners.get(e, '')}" for e in range(n_exp)], fontsize=7)
        ax.set_yticks(range(len(stats["layers"])), [str(x) for x in stats["layers"]], fontsize=7)
        ax.set_xlabel("expert")
        if n_exp * len(data) <= 64:  # small grids: print the numbers too
            for i, row in enumerate(data):
                for j, v in enumerate(row):
                    ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=6,
                            color="black" if v > 0.6 else "white")
    axes[0][0].set_ylabel("layer")
    if image is not None:
        fig.colorbar(image, ax=axes[0].tolist(), shrink=0.8, label=f"fraction of tokens routed (top-{top_k})")
    fig.suptitle(title or "tokens per expert per layer", fontsize=10)
    path = Path(path)
    fig.savefig(path, dpi=120, bbox_inches="tight", metadata={"Software": None})
    plt.close(fig)
    return path
