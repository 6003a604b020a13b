"""Continued pre-training of an upcycled MoE (docs/design.md#step-2-continued-pre-training).

``deltamoe.train(config)`` runs one stage: ``post_pretrain`` (new experts and routers learn the
new languages; load balancing) or ``router_review`` (routers only, language-prior routing).

- config.py: the stages, their defaults and loading; sections.py: the config's sections (strict YAML schema)
- sources.py: finding and opening text sources, the stage's languages
- data.py: language-tagged records, mixing, tokenisation, packing, held-out split, streaming
- pack.py: pre-tokenised data (``deltamoe data pack``) and the stream that reads it
- experts.py: the experts of an MoE layer with one parameter per expert (eager and grouped-GEMM kernels)
- model.py: loading with one parameter per expert (frozen experts stay bit-identical), the disk/memory
  layout and parameter groups, router hooks, the trained tensors written back
- policy.py: what trains
- losses.py: next-token, load-balancing and LPR losses; routing statistics
- routing.py: language-allocated routing and top-k per language (a router mask), LPR's tokens
- setup.py: everything before the first step, as a run state (accelerate, model, optimizer, data, resume)
- step.py: one optimizer step (forward, losses, backward, clipping) and its running statistics
- heldout.py: held-out evaluation; logs.py: JSONL and TensorBoard logs
- checkpointing.py: resumable step checkpoints (own format, DCP, accelerate), RNG state
- output.py: the trained model's output directory, through deltamoe.io.output.write_output
- loop.py: ``train``, which composes them
- distributed.py: the engines (DDP, FSDP2 applied with fully_shard, DeepSpeed ZeRO-3)

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
