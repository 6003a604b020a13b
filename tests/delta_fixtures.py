"""Tiny B / P / C / M checkpoints for the graft and merge tests.

P and C are B plus small perturbations, like real post-training and continued pre-training
(which move weights by a small fraction of their magnitude); M is B upcycled; a "CPT" M has
its new experts and routers changed and everything of B frozen, as DeltaMoE's stage 1 does.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import save_file

from deltamoe.io import open_checkpoint
from deltamoe.io.provenance import new_manifest, read_manifest, write_manifest

TOKENIZER_FILES = {
    "tokenizer_config.json": json.dumps({"model_max_length": 128, "eos_token": "<|end|>", "marker": "post"}),
    "chat_template.jinja": "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}<|end|>{% endfor %}",
    "generation_config.json": json.dumps({"eos_token_id": 7, "max_new_tokens": 5, "marker": "post"}),
}


def load_all(path: Path) -> dict[str, torch.Tensor]:
    ck = open_checkpoint(path)
    return {n: ck.read(n) for n in ck.keys()}


def save(path: Path, tensors: dict[str, torch.Tensor], config: dict, *, copy_from: Path | None = None) -> Path:
    """Write a one-shard checkpoint; copy the other files (manifest, tokenizer) of ``copy_from``."""
    path.mkdir(parents=True, exist_ok=True)
    if copy_from is not None:
        for f in copy_from.iterdir():
            if f.is_file() and not f.name.endswith(".safetensors") and f.name != "model.safetensors.index.json":
                shutil.copyfile(f, path / f.name)
    for f in path.glob("*.safetensors"):
        f.unlink()
    (path / "model.safetensors.index.json").unlink(missing_ok=True)
    save_file({n: t.contiguous() for n, t in tensors.items()}, str(path / "model.safetensors"), metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps(config, indent=2))
    return path


def perturbed(base: Path, out: Path, *, seed: int, scale: float = 0.02, add_rows: int = 0,
              tokenizer: bool = False, config_changes: dict | None = None,
              keep: Callable[[str], bool] = lambda n: False) -> Path:
    """``base`` + N(0, scale^2 * std^2) on every tensor (except ``keep``), optionally more vocabulary rows."""
    ck = open_checkpoint(base)
    cfg = dict(ck.config)
    g = torch.Generator().manual_seed(seed)
    vocab = cfg["vocab_size"]
    out_t = {}
    for n in ck.keys():
        t = ck.read(n)
        x = t.float()
        if not keep(n):
            x = x + torch.randn(x.shape, generator=g) * scale * (x.std().item() if x.numel() > 1 else 1.0)
        if add_rows and x.dim() == 2 and x.shape[0] == vocab:
            x = torch.cat([x, torch.randn((add_rows, x.shape[1]), generator=g) * 0.3])
        out_t[n] = x.to(t.dtype)
    if add_rows:
        cfg["vocab_size"] = vocab + add_rows
    cfg.update(config_changes or {})
    save(out, out_t, cfg)
    if tokenizer:
        for name, text in TOKENIZER_FILES.items():
            (out / name).write_text(text)
    return out


def simulate_cpt(moe: Path, out: Path, *, seed: int, scale: float = 0.05) -> Path:
    """Change M's new experts and routers (stage-1 CPT); keep expert 0 and all shared weights."""
    ck = open_checkpoint(moe)
    manifest = read_manifest(moe)
    assert manifest is not None
    info = manifest["moe"]
    trainable = set()
    for layer in info["moe_layers"]:
        trainable.add(info["names"]["router"].format(layer=layer))
        for e in info["new_experts"]:
            trainable.update(t.format(layer=layer, expert=e) for t in info["names"]["expert_ffn"].values())
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for n in ck.keys():
        t = ck.read(n)
        if n in trainable:
            x = t.float()
            t = (x + torch.randn(x.shape, generator=g) * scale * max(x.std().item(), 0.1)).to(t.dtype)
        tensors[n] = t
    save(out, tensors, ck.config, copy_from=moe)
    write_manifest(out, new_manifest(manifest, stage="train:cpt", params={"simulated": True},
                                     inputs={"moe": {"path": str(moe), "sha256": "0" * 64}}, command=None))
    return out
