"""One optimizer step of a training stage: forward, losses, backward, clipping, optimizer step.

Every process takes its rows of each global batch: micro-batch ``j`` of process ``rank`` is rows
``(j * world + rank) * micro_batch_size`` onwards, so a run on N processes sees the same data per
optimizer step as a run on one process with N times the accumulation. accelerate's
``accumulate`` skips the needless all-reduces of the first micro-batches and lets the optimizer
step only on the last. The router mask (language-allocated routing, top-k per language) stays on
through backward, as gradient checkpointing recomputes the forward there. The step also keeps the
running sums the train log reports: mean losses and the routing counts per layer, expert and
language.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext
from typing import Any

import torch

from deltamoe.train import distributed as dist_engine
from deltamoe.train import losses as L
from deltamoe.train.logs import routing_json
from deltamoe.train.model import Layout, RouterCapture
from deltamoe.train.routing import RouterMask, lpr_tokens


def process_rows(world: int, rank: int, micro_batch: int, accum: int) -> list[int]:
    """The rows of a global batch that process ``rank`` of ``world`` trains on, micro-batch by micro-batch."""
    return [(j * world + rank) * micro_batch + r for j in range(accum) for r in range(micro_batch)]


class Stepper:
    """Runs the optimizer steps of one process and sums what the train log reports."""

    def __init__(
        self,
        acc: Any,
        model: Any,
        optimizer: Any,
        layout: Layout,
        capture: RouterCapture,
        mask: RouterMask | None,
        *,
        coefficients: tuple[float, float, float],
        allowed: torch.Tensor,
        lpr_keep: torch.Tensor | None,
        max_grad_norm: float | None,
        engine: str,
        micro_batch: int,
        accum: int,
        lang_names: Sequence[str],
    ):
        self.acc, self.model, self.optimizer, self.layout = acc, model, optimizer, layout
        self.capture, self.mask = capture, mask
        self.coef_lm, self.coef_balance, self.coef_lpr = coefficients  # next-token, balance, LPR
        self.allowed, self.lpr_keep = allowed, lpr_keep
        self.max_grad_norm, self.engine = max_grad_norm, engine
        self.micro_batch, self.accum = micro_batch, accum
        self.lang_names = list(lang_names)
        self.params = [p for p in model.parameters() if p.requires_grad]  # after sharding and prepare
        self.sums = torch.zeros(4, dtype=torch.float64, device=acc.device)  # total, lm, balance, lpr
        self.micro = 0
        self.counts = torch.zeros(len(layout.routed_layers), layout.num_experts, len(self.lang_names) + 1,
                                  dtype=torch.float64, device=acc.device)
        self.grad_norm = float("nan")

    def _clip(self, max_norm: float) -> float:
        if self.engine == "fsdp2":
            return dist_engine.clip_grad_norm(self.params, max_norm)
        gn = self.acc.clip_grad_norm_(self.params, max_norm)
        return float(gn) if gn is not None else float("nan")  # DeepSpeed clips itself

    def step(self, ids_mine: torch.Tensor, lang_mine: torch.Tensor) -> None:
        """One optimizer step over this process's rows (:func:`process_rows`) of a global batch."""
        acc, mb, device = self.acc, self.micro_batch, self.acc.device
        for j in range(self.accum):
            ids = ids_mine[j * mb : (j + 1) * mb].to(device)
            tok_lang = lang_mine[j * mb : (j + 1) * mb].reshape(-1).to(device)
            # the mask stays on through backward: gradient checkpointing recomputes the forward there
            with acc.accumulate(self.model), self.mask.tokens(tok_lang) if self.mask else nullcontext():
                with self.capture.capture():
                    logits = self.model(input_ids=ids, use_cache=False).logits
                router = self.capture.ordered()
                lm = L.token_losses(logits, ids).mean()
                if router:
                    bal = L.balance_loss(router, self.layout.top_k)
                    lpr = L.lpr_loss(router, lpr_tokens(tok_lang, self.lpr_keep), self.allowed)
                else:  # a dense model
                    bal = lpr = torch.zeros((), device=device)
                total = self.coef_lm * lm + self.coef_balance * bal + self.coef_lpr * lpr
                acc.backward(total)
                if acc.sync_gradients and self.max_grad_norm is not None:
                    self.grad_norm = self._clip(self.max_grad_norm)
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
            self.sums += torch.stack([total.detach(), lm.detach(), bal.detach(), lpr.detach()]).double()
            self.micro += 1
            if router:
                self.counts += L.routing_counts(router, tok_lang, self.layout.top_k, len(self.lang_names))

    def report(self) -> tuple[dict[str, float], dict[str, dict[str, list[float]]]]:
        """The mean losses since the last report over all processes, with the last gradient norm,
        and the routing shares (collective); the sums then start over."""
        s = self.acc.reduce(self.sums / max(self.micro, 1), "mean")
        c = self.acc.reduce(self.counts, "sum")
        losses = {
            "loss": float(s[0]),
            "loss_lm": float(s[1]),
            "loss_balance": float(s[2]),
            "loss_lpr": float(s[3]),
            "grad_norm": self.grad_norm,
        }
        routing = routing_json(c.cpu(), self.layout, self.lang_names)
        self.sums.zero_()
        self.counts.zero_()
        self.micro = 0
        return losses, routing
