"""Tiny random dense models of every supported family, saved as ordinary HF checkpoints."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

# name -> (model_type, config overrides). Each covers a feature that must carry over exactly.
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "llama-untied-gqa": ("llama", {"num_attention_heads": 4, "num_key_value_heads": 2, "tie_word_embeddings": False}),
    "llama-tied": ("llama", {"tie_word_embeddings": True}),
    "llama31-rope": (
        "llama",
        {
            "num_key_value_heads": 2,
            "max_position_embeddings": 256,
            "rope_scaling": {
                "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 32,
            },
            "rope_theta": 500000.0,
        },
    ),
    "mistral-sliding": ("mistral", {"sliding_window": 8, "num_key_value_heads": 2, "head_dim": 8}),
    "qwen3-bias-tied": (
        "qwen3",
        {"attention_bias": True, "tie_word_embeddings": True, "num_key_value_heads": 2, "head_dim": 16,
         "use_sliding_window": False, "sliding_window": 4},
    ),
    "qwen3-untied": ("qwen3", {"tie_word_embeddings": False, "head_dim": 8}),
    "qwen2-bias": ("qwen2", {"tie_word_embeddings": False, "num_key_value_heads": 2}),
    "qwen2-tied": ("qwen2", {"tie_word_embeddings": True}),
}

BASE = dict(
    vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
    num_key_value_heads=4, max_position_embeddings=128, rms_norm_eps=1e-5,
)


def make_dense(variant: str, path: Path, *, seed: int = 0, dtype: torch.dtype = torch.float32,
               layers: int | None = None, **overrides: Any) -> Path:
    """Build a randomly initialised dense model (every weight randomised, norms included) and save it."""
    from transformers import AutoConfig, AutoModelForCausalLM

    model_type, extra = VARIANTS[variant]
    kwargs = {**BASE, **extra, **overrides}
    if layers is not None:
        kwargs["num_hidden_layers"] = layers
    cfg = AutoConfig.for_model(model_type, **kwargs)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg).to(dtype)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * (0.3 if p.dim() > 1 else 0.1) + (1.0 if p.dim() == 1 and p.shape[0] in (
                cfg.hidden_size, getattr(cfg, "head_dim", 0) or 0) else 0.0))
    model.eval()
    model.save_pretrained(path)
    return path
