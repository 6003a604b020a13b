"""Synthetic dense checkpoints of realistic shapes, written tensor by tensor.

Used by the streaming tests, the benchmarks and the GPU check: they need models of hundreds of
MB to several GB without training or downloading anything, and without ever holding the whole
model in memory while writing it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from deltamoe.io import DEFAULT_SHARD_BYTES, ShardedWriter, TensorSpec, dtype_code, write_json


def llama_config(
    *, hidden: int, intermediate: int, layers: int, vocab: int, heads: int, kv_heads: int, tied: bool = False,
    dtype: str = "float32",
) -> dict[str, Any]:
    """A Llama config dict (the shape of Llama-3-8B is hidden 4096, intermediate 14336, 32 layers, vocab 128256)."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "vocab_size": vocab,
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0,
        "hidden_act": "silu",
        "tie_word_embeddings": tied,
        "attention_bias": False,
        "mlp_bias": False,
        "torch_dtype": dtype,
    }


def write_dense(
    path: str | os.PathLike[str],
    config: dict[str, Any],
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    std: float = 0.02,
) -> Path:
    """Write a random Llama-layout checkpoint for ``config`` (one tensor in memory at a time)."""
    h, i, v = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    hd = config.get("head_dim") or h // config["num_attention_heads"]
    q, kv = config["num_attention_heads"] * hd, config["num_key_value_heads"] * hd
    shapes: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (v, h))]
    for layer in range(config["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        shapes += [
            (p + "input_layernorm.weight", (h,)),
            (p + "self_attn.q_proj.weight", (q, h)),
            (p + "self_attn.k_proj.weight", (kv, h)),
            (p + "self_attn.v_proj.weight", (kv, h)),
            (p + "self_attn.o_proj.weight", (h, q)),
            (p + "post_attention_layernorm.weight", (h,)),
            (p + "mlp.gate_proj.weight", (i, h)),
            (p + "mlp.up_proj.weight", (i, h)),
            (p + "mlp.down_proj.weight", (h, i)),
        ]
    shapes.append(("model.norm.weight", (h,)))
    if not config.get("tie_word_embeddings"):
        shapes.append(("lm_head.weight", (v, h)))
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    code = dtype_code(dtype)
    writer = ShardedWriter(out, [TensorSpec(n, code, s) for n, s in shapes], max_shard_bytes=max_shard_bytes)
    g = torch.Generator().manual_seed(seed)
    for name, shape in shapes:
        t = torch.ones(shape) if len(shape) == 1 else torch.randn(shape, generator=g) * std
        writer.write(name, t.to(dtype))
    writer.close()
    write_json(out / "config.json", config)
    write_tokenizer(out, v)
    return out


def write_tokenizer(path: str | os.PathLike[str], vocab_size: int) -> None:
    """A word-level tokenizer with ``vocab_size`` tokens, so tools that insist on a tokenizer can run."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab_size)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="t0", eos_token="t1", bos_token="t2").save_pretrained(path)
