"""Training loops for the toy models: causal-LM pre-training on packed documents, and
supervised fine-tuning on chat conversations with the loss on assistant tokens only.

Deterministic by construction: fixed seeds for initialisation and data order,
``torch.use_deterministic_algorithms`` and a fixed thread count while training (see
:func:`deterministic`), no dropout.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from deltamoe.toy.config import ModelShape, TrainPhase

IGNORE = -100


@contextmanager
def deterministic(threads: int) -> Iterator[None]:
    """Deterministic kernels and a fixed intra-op thread count for the duration of a build.

    On CPU, results can depend on how a reduction is split over threads; fixing the count
    makes a build reproducible bit for bit on the same machine and software.
    """
    old_threads = torch.get_num_threads()
    old_det = torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(old_det)
        torch.set_num_threads(old_threads)


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity where the OS has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def default_threads() -> int:
    return max(1, min(2, usable_cores()))


# The files of a saved model that ``save_pretrained`` stamps with the installed transformers release.
STAMPED = ("config.json", "generation_config.json")


def drop_version_stamps(directory: Path) -> None:
    """Remove the ``transformers_version`` field that ``save_pretrained`` writes into a model's
    config files, so that a toy build's bytes depend on the generator, the seed and the kernels,
    not on which transformers release wrote them (the release is recorded in the provenance).
    transformers and vLLM load configs without it."""
    import json

    for name in STAMPED:
        path = Path(directory) / name
        if not path.is_file():
            continue
        cfg = json.loads(path.read_text(encoding="utf-8"))
        if cfg.pop("transformers_version", None) is not None:
            path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def make_model(shape: ModelShape, tokenizer: Any, seed: int) -> Any:
    """A freshly initialised causal LM (float32) of ``shape.family`` for ``tokenizer``'s vocabulary:
    ``LlamaForCausalLM``, or ``Qwen3ForCausalLM`` (per-head q/k RMS norms, explicit head_dim)."""
    common = dict(
        vocab_size=len(tokenizer),
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_hidden_layers,
        num_attention_heads=shape.num_attention_heads,
        num_key_value_heads=shape.num_key_value_heads,
        max_position_embeddings=shape.max_position_embeddings,
        rope_theta=10000.0,
        tie_word_embeddings=shape.tie_word_embeddings,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        dtype="float32",
    )
    if shape.family == "qwen3":
        from transformers import Qwen3Config, Qwen3ForCausalLM

        cfg = Qwen3Config(**common, head_dim=shape.head_dim or shape.hidden_size // shape.num_attention_heads,
                          rms_norm_eps=1e-6, use_sliding_window=False, attention_bias=False)
        cls = Qwen3ForCausalLM
    else:
        from transformers import LlamaConfig, LlamaForCausalLM

        cfg = LlamaConfig(**common, rms_norm_eps=1e-5, **({"head_dim": shape.head_dim} if shape.head_dim else {}))
        cls = LlamaForCausalLM
    torch.manual_seed(seed)
    return cls(cfg)


def _lr_at(step: int, phase: TrainPhase) -> float:
    """Linear warm-up, then cosine decay to 10 % of the peak."""
    if step < phase.warmup:
        return phase.lr * (step + 1) / phase.warmup
    t = (step - phase.warmup) / max(1, phase.steps - phase.warmup)
    return phase.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


Batch = dict[str, torch.Tensor]


def train_loop(
    model: Any,
    batch_at: Callable[[int], Batch | list[tuple[float, Batch]]],
    phase: TrainPhase,
    *,
    desc: str,
    progress: bool = True,
    params: Sequence[torch.nn.Parameter] | None = None,
    checkpoint: Path | None = None,
    on_step: Callable[[int], dict[str, Any] | None] | None = None,
) -> tuple[list[float], list[dict[str, Any]]]:
    """Run ``phase.steps`` AdamW steps. ``batch_at(step)`` gives the model's keyword inputs (with
    ``labels``), or a list of (weight, inputs) whose weighted losses are summed (e.g. chat data
    plus plain text). ``on_step(step)`` runs after each step and may return a record (e.g. a
    held-out loss) to keep. Returns the loss per step and the records.

    With ``checkpoint`` (a directory) the weights, the optimiser state, the losses and the
    records are saved there every ``phase.checkpoint_every`` steps, and a loop that finds a
    checkpoint continues from it: data order and learning rate are functions of the step, so a
    resumed run ends with the same bytes as an uninterrupted one.
    """
    model.train()
    params = list(params) if params is not None else [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}],
        lr=phase.lr, betas=(0.9, 0.95), eps=1e-8,
    )
    losses: list[float] = []
    records: list[dict[str, Any]] = []
    start = 0
    if checkpoint is not None and (checkpoint / _CKPT_STATE).is_file():
        start, losses, records = _load_checkpoint(checkpoint, model, opt)
    bar = tqdm(range(start, phase.steps), desc=desc, disable=not progress, unit="step", dynamic_ncols=True,
               initial=start, total=phase.steps)
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = _lr_at(step, phase)
        parts = batch_at(step)
        if isinstance(parts, dict):
            parts = [(1.0, parts)]
        loss = sum(w * model(**b).loss for w, b in parts)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if on_step is not None and (rec := on_step(step)) is not None:
            model.train()
            records.append(rec)
        if step % 10 == 0 or step == phase.steps - 1:
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
        every = phase.checkpoint_every
        if checkpoint is not None and every and (step + 1) % every == 0 and step + 1 < phase.steps:
            _save_checkpoint(checkpoint, model, opt, step + 1, losses, records)
    model.eval()
    return losses, records


_CKPT_STATE = "state.json"


def _save_checkpoint(directory: Path, model: Any, opt: torch.optim.Optimizer, step: int, losses: list[float],
                     records: list[dict[str, Any]]) -> None:
    """Weights and AdamW moments as safetensors (never pickles), step and history as JSON. The
    state file is written last and atomically: a checkpoint without it is ignored."""
    import json

    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()
               if not _is_tied_alias(model, k)}, str(directory / "model.safetensors"))
    moments: dict[str, torch.Tensor] = {}
    for gi, group in enumerate(opt.param_groups):
        for pi, p in enumerate(group["params"]):
            st = opt.state.get(p)
            if st:
                for name in ("exp_avg", "exp_avg_sq", "step"):
                    moments[f"{gi}.{pi}.{name}"] = st[name].detach().reshape(st[name].shape).contiguous()
    save_file(moments, str(directory / "optimizer.safetensors"))
    tmp = directory / (_CKPT_STATE + ".tmp")
    tmp.write_text(json.dumps({"step": step, "losses": losses, "records": records}))
    os.replace(tmp, directory / _CKPT_STATE)


def _is_tied_alias(model: Any, key: str) -> bool:
    return key == "lm_head.weight" and bool(getattr(model.config, "tie_word_embeddings", False))


def _load_checkpoint(directory: Path, model: Any, opt: torch.optim.Optimizer
                     ) -> tuple[int, list[float], list[dict[str, Any]]]:
    import json

    from safetensors.torch import load_file

    state = json.loads((directory / _CKPT_STATE).read_text())
    weights = load_file(str(directory / "model.safetensors"))
    model.load_state_dict(weights, strict=False)
    moments = load_file(str(directory / "optimizer.safetensors"))
    for gi, group in enumerate(opt.param_groups):
        for pi, p in enumerate(group["params"]):
            if f"{gi}.{pi}.step" in moments:
                opt.state[p] = {name: moments[f"{gi}.{pi}.{name}"] for name in ("step", "exp_avg", "exp_avg_sq")}
    return int(state["step"]), list(state["losses"]), list(state["records"])


@torch.no_grad()
def heldout_loss(model: Any, docs: Sequence[Sequence[int]], max_len: int = 256) -> float:
    """Mean next-token loss (nats) over the tokens of ``docs``, each scored on its own."""
    was_training = model.training
    model.eval()
    total = 0.0
    count = 0
    for ids in docs:
        x = torch.tensor(list(ids)[:max_len])[None]
        if x.shape[1] < 2:
            continue
        out = model(input_ids=x, labels=x)
        total += float(out.loss) * (x.shape[1] - 1)
        count += x.shape[1] - 1
    model.train(was_training)
    return round(total / count, 5) if count else float("nan")


def packed_batches(stream: torch.Tensor, seq_len: int, batch_size: int, seed: int) -> Callable[[int], dict[str, torch.Tensor]]:
    """Cut a token stream into rows of ``seq_len`` and serve them in a seeded shuffled order
    (a new permutation each epoch)."""
    n_rows = stream.numel() // seq_len
    if n_rows < batch_size:
        raise ValueError(f"corpus too small: {n_rows} rows of {seq_len} tokens for batch size {batch_size}")
    rows = stream[: n_rows * seq_len].view(n_rows, seq_len)
    per_epoch = n_rows // batch_size
    perms: dict[int, torch.Tensor] = {}

    def batch_at(step: int) -> dict[str, torch.Tensor]:
        epoch, i = divmod(step, per_epoch)
        if epoch not in perms:
            perms.clear()
            perms[epoch] = torch.randperm(n_rows, generator=torch.Generator().manual_seed(seed * 1000 + epoch))
        ids = rows[perms[epoch][i * batch_size : (i + 1) * batch_size]]
        return {"input_ids": ids, "labels": ids}

    return batch_at


def encode_chat(tokenizer: Any, messages: list[dict[str, str]]) -> tuple[list[int], list[int]]:
    """Token ids of a conversation (up to its last assistant turn) and labels: the ids of each
    assistant answer and its closing ``<|end|>``, IGNORE everywhere else."""
    ids: list[int] = []
    labels: list[int] = []
    eos = tokenizer.eos_token_id
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prompt = tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True)
        upto = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
        p_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        u_ids = tokenizer(upto, add_special_tokens=False)["input_ids"]
        # the byte-level pre-tokenizer splits at special tokens and newlines, so the prompt
        # tokenizes exactly as a prefix of the conversation (the same ids evaluation feeds)
        if u_ids[: len(p_ids)] != p_ids or p_ids[: len(ids)] != ids:  # pragma: no cover
            raise ValueError("chat prompt does not tokenize as a prefix of the conversation")
        answer = u_ids[len(p_ids):]
        k = answer.index(eos)  # learn the answer and <|end|>, not the newline after it
        labels += [IGNORE] * (len(p_ids) - len(ids)) + answer[: k + 1] + [IGNORE] * (len(answer) - k - 1)
        ids = u_ids
    return ids, labels


def chat_batches(examples: list[tuple[list[int], list[int]]], batch_size: int, pad_id: int, seed: int
                 ) -> Callable[[int], dict[str, torch.Tensor]]:
    """Right-padded batches of chat examples in a seeded shuffled order."""
    per_epoch = len(examples) // batch_size
    if per_epoch == 0:
        raise ValueError(f"{len(examples)} chat examples are fewer than the batch size {batch_size}")
    perms: dict[int, list[int]] = {}

    def batch_at(step: int) -> dict[str, torch.Tensor]:
        epoch, i = divmod(step, per_epoch)
        if epoch not in perms:
            perms.clear()
            perms[epoch] = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed * 1000 + epoch)).tolist()
        chosen = [examples[j] for j in perms[epoch][i * batch_size : (i + 1) * batch_size]]
        width = max(len(ids) for ids, _ in chosen)
        ids = torch.full((len(chosen), width), pad_id, dtype=torch.long)
        labels = torch.full((len(chosen), width), IGNORE, dtype=torch.long)
        mask = torch.zeros((len(chosen), width), dtype=torch.long)
        for r, (x, y) in enumerate(chosen):
            ids[r, : len(x)] = torch.tensor(x)
            labels[r, : len(y)] = torch.tensor(y)
            mask[r, : len(x)] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    return batch_at
