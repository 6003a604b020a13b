"""The logs of a training run: ``<run_dir>/logs/train.jsonl`` and TensorBoard.

Each record is one JSON object with a ``kind`` (``setup``, ``train``, ``eval``) and a ``step``;
TensorBoard gets every number of it as a scalar ``kind/field``, the held-out loss per language
and the routing shares per layer, language and expert. Only the main process logs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from deltamoe.errors import UsageError
from deltamoe.train.model import Layout
from deltamoe.train.sections import LoggingConfig


class RunLogger:
    """Writes the records of a run (a fresh run starts the JSONL file over, a resumed one appends)."""

    def __init__(self, log_dir: Path, logging: LoggingConfig, enabled: bool, fresh: bool):
        self.jsonl = None
        self.tb = None
        if not enabled:
            return
        log_dir.mkdir(parents=True, exist_ok=True)
        if logging.jsonl:
            self.jsonl = open(log_dir / "train.jsonl", "w" if fresh else "a")
        if logging.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise UsageError(
                    "logging.tensorboard: the tensorboard package is not installed (pip install tensorboard), "
                    "or set logging.tensorboard: false"
                ) from None
            self.tb = SummaryWriter(str(log_dir / "tensorboard"))

    def log(self, record: dict[str, Any]) -> None:
        if self.jsonl is not None:
            self.jsonl.write(json.dumps(record) + "\n")
            self.jsonl.flush()
        if self.tb is not None:
            step = record["step"]
            kind = record["kind"]
            for k, v in record.items():
                if isinstance(v, (int, float)) and k not in ("step",):
                    self.tb.add_scalar(f"{kind}/{k}", v, step)
            for lang, v in record.get("heldout_loss", {}).items():
                self.tb.add_scalar(f"{kind}/heldout_loss/{lang}", v, step)
            for layer, per_lang in record.get("routing", {}).items():
                for lang, fracs in per_lang.items():
                    for e, f in enumerate(fracs):
                        self.tb.add_scalar(f"{kind}_routing/layer{layer}/{lang}/expert{e}", f, step)
            self.tb.flush()

    def close(self) -> None:
        if self.jsonl is not None:
            self.jsonl.close()
        if self.tb is not None:
            self.tb.close()


def routing_json(counts: torch.Tensor, layout: Layout, lang_names: list[str]) -> dict[str, dict[str, list[float]]]:
    """[layers, E, langs+1] counts -> {layer: {lang: [share of expert e]}} for languages seen."""
    out: dict[str, dict[str, list[float]]] = {}
    names = [*lang_names, "untagged"]
    for li, lay in enumerate(layout.routed_layers):
        per: dict[str, list[float]] = {}
        for j, lang in enumerate(names):
            col = counts[li, :, j]
            total = float(col.sum())
            if total > 0:
                per[lang] = [round(float(c) / total, 6) for c in col]
        out[str(lay.index)] = per
    return out
