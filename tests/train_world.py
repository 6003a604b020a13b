"""A tiny two-language world for the training tests: corpora, a BPE tokenizer, an upcycled MoE.

"en" (the original language) and "xx" (the new one) use disjoint vocabularies and different,
very regular word orders, so that a 2-layer model with hidden size 32 learns "xx" within a few
dozen steps on a CPU.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

EN_WORDS = {
    "det": ["the", "a", "this", "that"],
    "noun": ["cat", "dog", "bird", "man", "house", "tree", "river", "car"],
    "verb": ["sees", "likes", "finds", "takes", "wants", "hears"],
    "adj": ["big", "small", "red", "old", "new", "green"],
}
XX_WORDS = {
    "verb": ["kumo", "zati", "pelu", "rako"],
    "noun": ["vani", "doru", "sefa", "mibo", "tule", "gaxo"],
    "part": ["ke", "no"],
}


def en_sentence(rng: random.Random) -> str:
    w = EN_WORDS
    return (
        f"{rng.choice(w['det'])} {rng.choice(w['adj'])} {rng.choice(w['noun'])} {rng.choice(w['verb'])} "
        f"{rng.choice(w['det'])} {rng.choice(w['noun'])} ."
    )


def xx_sentence(rng: random.Random) -> str:
    # verb-first, with a particle that agrees with the verb: highly predictable
    w = XX_WORDS
    v = rng.randrange(len(w["verb"]))
    return f"{w['verb'][v]} {w['part'][v % 2]} {rng.choice(w['noun'])} {w['part'][v % 2]} {rng.choice(w['noun'])} !"


def documents(lang: str, n: int, seed: int) -> list[str]:
    rng = random.Random(f"{lang}:{seed}")
    make = en_sentence if lang == "en" else xx_sentence
    return [" ".join(make(rng) for _ in range(rng.randint(2, 4))) for _ in range(n)]


def write_txt(path: Path, docs: list[str]) -> Path:
    path.write_text("\n".join(docs) + "\n")
    return path


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def save_tokenizer(directory: Path) -> None:
    """Train a small BPE tokenizer (vocab <= 90) on both languages; save it HF-style."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=90, special_tokens=["<pad>", "<s>", "</s>", "<unk>"], show_progress=False)
    tok.train_from_iterator(documents("en", 200, 99) + documents("xx", 200, 99), trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    fast.save_pretrained(directory)


def make_moe(
    root: Path,
    *,
    variant: str = "llama-untied-gqa",
    experts: int = 3,
    top_k: int = 1,
    layers: str = "all",
    seed: int = 0,
    allocation: dict | None = None,
    noise: float = 0.0,
    **dense_overrides,
) -> Path:
    """Tiny dense model + tokenizer, upcycled with en -> expert 0 and xx -> the new experts."""
    from tiny_models import make_dense

    from deltamoe.ops.upcycle import upcycle

    dense = make_dense(
        variant, root / "dense", seed=seed, layers=dense_overrides.pop("num_layers", 2), **dense_overrides
    )
    save_tokenizer(dense)
    alloc = allocation if allocation is not None else {"en": [0], "xx": list(range(1, experts))}
    return upcycle(
        dense,
        root / "moe",
        num_experts=experts,
        top_k=top_k,
        layers=layers,
        allocation=alloc,
        noise=noise,
        seed=seed,
        progress=False,
    )


def base_config(moe: Path, out: Path, sources: list[dict], **sections) -> dict:
    """A small stage-1 config dict; ``sections`` replace or extend top-level keys."""
    cfg = {
        "stage": "post_pretrain",
        "model": str(moe),
        "output": str(out),
        "seed": 0,
        "data": {"sources": sources, "seq_len": 32, "heldout_fraction": 0.1, "heldout_max_tokens": 2000},
        "train": {
            "steps": 20,
            "micro_batch_size": 4,
            "grad_accum": 1,
            "lr": 3e-3,
            "lr_schedule": "constant",
            "max_grad_norm": 1.0,
        },
        "logging": {"every": 5, "tensorboard": False, "progress": False},
    }
    for k, v in sections.items():
        cfg[k] = {**cfg[k], **v} if isinstance(v, dict) and isinstance(cfg.get(k), dict) else v
    return cfg


class World:
    """Paths of the shared tiny world: the upcycled MoE and corpora (built once per session)."""

    def __init__(self, root: Path):
        self.root = root
        self.moe = make_moe(root / "llama")
        self.en = write_txt(root / "en.txt", documents("en", 300, 1))
        self.xx = write_txt(root / "xx.txt", documents("xx", 300, 1))
        # held-out text for measurements made outside the training code, never trained on
        self.en_eval = " ".join(documents("en", 25, 12345))
        self.xx_eval = " ".join(documents("xx", 25, 12345))


_WORLDS: dict[str, World] = {}


def get_world(tmp_path_factory) -> World:
    key = str(tmp_path_factory.getbasetemp())
    if key not in _WORLDS:
        _WORLDS[key] = World(tmp_path_factory.mktemp("train-world"))
    return _WORLDS[key]


def stock_measure(model_dir: Path, text: str, max_tokens: int = 400) -> tuple[float, list[float]]:
    """Next-token loss and, per MoE layer, the share of tokens whose top-1 expert is 0,
    computed with stock transformers (independent of deltamoe's training code)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.eval()
    ids = torch.tensor([tok(text)["input_ids"][:max_tokens]])
    with torch.no_grad():
        out = model(ids, output_router_logits=True)
    lm = torch.nn.functional.cross_entropy(out.logits[0, :-1], ids[0, 1:]).item()
    return lm, [(lg.argmax(-1) == 0).float().mean().item() for lg in out.router_logits]


def torchrun_train(config: dict, path: Path, nproc: int, *args: str, timeout: int = 300):
    """Write ``config`` to ``path`` and run ``deltamoe train`` on ``nproc`` CPU processes (torchrun,
    gloo, one compute thread each); return the completed process."""
    import os
    import shutil
    import subprocess
    import sys

    import yaml

    path.write_text(yaml.safe_dump(config))
    bindir = Path(sys.executable).parent
    torchrun = shutil.which("torchrun", path=str(bindir)) or "torchrun"
    cmd = [torchrun, "--standalone", "--nproc_per_node", str(nproc), "--no-python", str(bindir / "deltamoe"),
           "train", str(path), "--quiet", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
