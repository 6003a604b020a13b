"""Continued pre-training of an upcycled MoE (docs/design.md#step-2-continued-pre-training).

``deltamoe.train(config)`` runs one stage: ``post_pretrain`` (new experts and routers learn the
new languages; load balancing) or ``router_review`` (routers only, language-prior routing).

- config.py: the strict YAML schema of a stage
- data.py: language-tagged sources, mixing, tokenisation, packing, held-out split, streaming
- losses.py: next-token, load-balancing and LPR losses; routing statistics
- model.py: loading with one parameter per expert (frozen experts stay bit-identical), writing
- policy.py: what trains
- loop.py: the accelerate loop (bf16, accumulation, checkpoints, logs)
- distributed.py: the engines (DDP, FSDP2 applied with fully_shard, DeepSpeed ZeRO-3)
- pack.py: pre-tokenised data (``deltamoe data pack``) and the stream that reads it

Nothing heavy is imported until it is used.
"""

from __future__ import annotations

import sys
import types
from typing import Any


def __getattr__(name: str) -> Any:
    if name == "train":
        from deltamoe.train.loop import train

        return train
    if name == "load_config":
        from deltamoe.train.config import load_config

        return load_config
    raise AttributeError(f"module 'deltamoe.train' has no attribute {name!r}")


class _CallableModule(types.ModuleType):
    """``deltamoe.train`` is both this package and the function: ``deltamoe.train(cfg)`` works
    whether or not the package has been imported already."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        from deltamoe.train.loop import train

        return train(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
