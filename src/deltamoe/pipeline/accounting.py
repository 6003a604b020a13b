"""What a recipe's plan costs, counted before anything runs: training FLOPs, parameters, disk.

FLOPs are counted as 6 x N_active x tokens (forward 2N, backward 4N; attention-score FLOPs and
the weight gradients that frozen weights skip are ignored, for both models alike). N_active of the
MoE is the dense parameter count plus (K - 1) FFNs per MoE layer plus the routers, so the dense
model gets N_active_moe / N_dense times the MoE's training tokens (stage 1 + stage 2), in steps of
the same batch (:func:`budget_matched_steps`, the ``budget_matched`` baseline).
:func:`parameter_match` counts what block expansion adds to B against what the upcycle adds.

Disk use (``run --dry-run``) is planned from byte counts. Models: tensor bytes from B's config (the
MoE adds E - 1 FFN copies and a router per layer), plus ~200 bytes of header and index per tensor,
the tokenizer (~40 bytes per vocabulary entry) and ~8 KB of config, manifest and model card.
Training stages add their run directory (logs, and ``keep_last`` step checkpoints of the trainable
weights with two AdamW moments in float32). Evaluations, the toy world's corpora and the report are
sized from their item counts, with per-item byte counts measured on the micro toy run (tested there
to be within 20 % of what the run writes).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deltamoe.errors import UsageError
from deltamoe.pipeline.stages import StageRun
from deltamoe.recipe import Recipe


# -- FLOPs and parameters ----------------------------------------------------------------------
def _param_counts(path: Path) -> dict[str, int]:
    """Total parameters and FFN parameters of a dense checkpoint, from its headers."""
    from deltamoe import arch
    from deltamoe.io import Checkpoint

    ck = Checkpoint(path)
    spec = arch.arch_for(ck.config)
    total = sum(math.prod(t.spec.shape) for t in ck.tensors.values())
    n_layers = arch.num_layers(ck.config)
    ffn = sum(math.prod(ck.spec(spec.dense_name(r, 0)).shape) for r in ("gate", "up", "down"))
    return {"total": total, "ffn_per_layer": ffn, "layers": n_layers, "hidden": int(ck.config["hidden_size"])}


def _tokens_per_step(train: dict[str, Any], data: dict[str, Any]) -> int:
    # sequences per optimizer step; grad_accum x micro_batch_size counts one process's share only
    per_step = train.get("global_batch") or int(train.get("micro_batch_size", 8)) * int(train.get("grad_accum", 1))
    return int(per_step) * int(data["seq_len"])


def moe_token_counts(recipe: Recipe) -> list[tuple[int | None, int]]:
    """(steps, tokens per step) of each MoE training stage, stage 1 and the router review: all that
    the FLOP-matched budget reads of them (so its cache key holds these, not the stages' lr or losses)."""
    return [(None if spec.train.get("steps") is None else int(spec.train["steps"]),
             _tokens_per_step(spec.train, spec.data))
            for spec in (recipe.train.post_pretrain, recipe.train.router_review) if spec is not None]


def budget_matched_steps(recipe: Recipe, base: Path) -> dict[str, Any]:
    """Steps of dense CPT with the same training FLOPs as the MoE's stage 1 + stage 2 (see module doc)."""
    c = _param_counts(base)
    e, k = recipe.upcycle.experts, recipe.upcycle.top_k
    n_moe_layers = c["layers"]  # all layers by default; replicated layers also run K experts
    n_active = c["total"] + (k - 1) * c["ffn_per_layer"] * n_moe_layers + e * c["hidden"] * n_moe_layers
    moe_tokens = 0
    for steps, per_step in moe_token_counts(recipe):
        if steps is None:
            raise UsageError("budget_matched needs explicit train.steps in every training stage")
        moe_tokens += steps * per_step
    dense_train = {**recipe.train.post_pretrain.train, **recipe.dense_cpt.train}
    dense_data = recipe.dense_cpt.data or recipe.train.post_pretrain.data
    flops_moe = 6 * n_active * moe_tokens
    steps = math.ceil(flops_moe / (6 * c["total"] * _tokens_per_step(dense_train, dense_data)))
    return {"n_dense": c["total"], "n_active_moe": n_active, "moe_tokens": moe_tokens, "moe_flops": flops_moe,
            "dense_steps": steps, "dense_flops": 6 * c["total"] * steps * _tokens_per_step(dense_train, dense_data)}


def parameter_match(expanded: Path, moe: Path, base: Path) -> dict[str, Any]:
    """What the block-expansion baseline adds to B against what the upcycle adds (its new experts
    and routers), counted from the checkpoints' headers. The identical frozen experts and the zero
    router of a layer that a Mixtral upcycle keeps dense (``replicated_layers``) add no trained
    parameters and are not counted."""
    from deltamoe.arch import ROLES
    from deltamoe.io import Checkpoint
    from deltamoe.io.provenance import read_manifest

    def params(ck: Checkpoint, names: list[str] | None = None) -> int:
        return sum(math.prod(ck.spec(n).shape) for n in (ck.keys() if names is None else names))

    n_base = params(Checkpoint(base))
    info = (read_manifest(expanded) or {})["expand"]
    m, block = Checkpoint(moe), (read_manifest(moe) or {})["moe"]
    names, replicated = block["names"], block.get("replicated_layers", [])
    frozen = [names["router"].format(layer=layer) for layer in replicated]
    frozen += [names["expert_ffn"][r].format(layer=layer, expert=e)
               for layer in replicated for e in block["new_experts"] for r in ROLES]
    added, moe_added = params(Checkpoint(expanded)) - n_base, params(m) - n_base - params(m, frozen)
    return {"blocks": info["new_blocks"], "new_layers": info["new_layers"], "base_params": n_base,
            "added_params": added, "moe_added_params": moe_added, "ratio": added / moe_added}


# -- disk --------------------------------------------------------------------------------------
_PER_TENSOR = 200  # safetensors header entry + index line
_PER_VOCAB = 40  # tokenizer.json bytes per vocabulary entry
_MODEL_FILES = 8_000  # config, deltamoe.json, README.md, chat template, generation config
_LOG_BYTES = 10_000  # train.jsonl
_STATE_BYTES = 20_000  # state.json of a step checkpoint (data stream position, rng)
_EVAL_BYTES = 10_000  # results.json + predictions.jsonl of a capped evaluation
_PLOT_BYTES = 60_000  # one report plot or routing heatmap (PNG)
_RESULT_BYTES = 800  # results.json per system and language
MOE_STAGES = ("upcycle", "post_pretrain", "router_review", "grafted", "deltamoe", "unallocated_post_pretrain",
              "unallocated_router_review", "unallocated_grafted", "moe_unallocated")
EXPANDED_STAGES = ("expand", "expand_cpt", "block_expansion")  # B with new decoder blocks


@dataclass(frozen=True)
class Shape:
    """What the estimates need of B's config."""

    params: int
    ffn_params: int  # all layers
    layers: int
    hidden: int
    vocab: int
    tensors: int
    width: int  # bytes per stored element
    block_params: int = 0  # one decoder block

    def blocks_matching(self, experts: int, moe_layers: int | None = None) -> int:
        """As :func:`deltamoe.ops.expand.blocks_matching`: blocks with the parameters of E - 1 experts
        in each of ``moe_layers`` layers (default every layer)."""
        ffn = self.ffn_params if moe_layers is None else self.ffn_params // self.layers * moe_layers
        return max(1, math.floor((experts - 1) * ffn / self.block_params + 0.5))

    def expanded(self, blocks: int) -> int:
        return self.model_dir((self.params + blocks * self.block_params) * self.width, self.tensors + 9 * blocks)

    @classmethod
    def from_config(cls, c: dict[str, Any]) -> Shape:
        h, i, n, v = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"], c["vocab_size"]
        heads = c["num_attention_heads"]
        hd = c.get("head_dim") or h // heads
        kv = c.get("num_key_value_heads", heads) * hd
        per_layer = 2 * h * heads * hd + 2 * h * kv + 3 * h * i + 2 * h
        tied = bool(c.get("tie_word_embeddings"))
        params = n * per_layer + (1 if tied else 2) * v * h + h
        width = 4 if str(c.get("torch_dtype", c.get("dtype", "bfloat16"))) == "float32" else 2
        return cls(params, n * 3 * h * i, n, h, v, n * 9 + (2 if tied else 3), width, per_layer)

    def model_dir(self, tensor_bytes: int, tensors: int) -> int:
        return tensor_bytes + _PER_TENSOR * tensors + _PER_VOCAB * self.vocab + _MODEL_FILES

    def dense(self) -> int:
        return self.model_dir(self.params * self.width, self.tensors)

    def moe(self, experts: int) -> int:
        extra = (experts - 1) * self.ffn_params + experts * self.hidden * self.layers
        return self.model_dir((self.params + extra) * self.width, self.tensors + self.layers * (3 * experts - 2))

    def trainable(self, stage: str, experts: int) -> int:
        routers = experts * self.hidden * self.layers
        return {"post_pretrain": (experts - 1) * self.ffn_params + routers, "router_review": routers}.get(
            stage, self.params)


def run_dir_bytes(shape: Shape, stage: str, experts: int, checkpoint: dict[str, Any], trained: int | None = None) -> int:
    """A training stage's ``<out>.run``: logs and the step checkpoints it keeps (``trained``: the
    stage's trainable parameters where the stage name does not say)."""
    if not checkpoint.get("every"):
        return _LOG_BYTES
    keep = int(checkpoint.get("keep_last", 2))
    return _LOG_BYTES + keep * (3 * 4 * (trained or shape.trainable(stage, experts)) + _STATE_BYTES)


def toy_bytes(size: str, shape: Shape) -> int:
    """A toy build: its models (B, the post-trained models, the second architecture's pair), the
    tokenizer, corpora and evaluation sets (document and item counts from its config)."""
    from deltamoe.toy import SIZES
    from deltamoe.toy.builder import model_names

    cfg = SIZES[size]
    cpt_docs = 3 * cfg.cpt_docs * (1 + cfg.replay_fraction)
    chat = 210 * cfg.chat_examples * 5  # chat.jsonl and chat_all.jsonl (four languages)
    qa_items = cfg.eval_rc + cfg.n_people * 5 * cfg.eval_fraction
    evals = 4 * (420 * qa_items + 330 * 2 * cfg.mc_items + 190 * cfg.eval_ppl_docs)
    corpora = 190 * cpt_docs + chat + evals
    models = len(model_names(cfg)) * shape.dense()
    return int(models + _PER_VOCAB * shape.vocab + 4_000 + corpora + 1_300 * cfg.n_people + 4_000)


def stage_bytes(stage: Any, shape: Shape, experts: int, toy_size: str | None, moe_systems: set[str],
                blocks: int | None = None, moe_layers: int | None = None) -> int:
    """Bytes that ``stage`` (a :class:`deltamoe.pipeline.stages.StageRun`) writes: its output and run directory.
    ``blocks``: the block-expansion baseline's new blocks (default: parameter-matched to the experts
    of ``moe_layers`` upcycled layers, default all)."""
    if stage.kind == "toy_build":
        return toy_bytes(toy_size or "small", shape)
    if stage.kind == "eval":
        return _EVAL_BYTES + (_PLOT_BYTES if stage.inputs.get("model") in moe_systems else 0)
    n_blocks = blocks or shape.blocks_matching(experts, moe_layers)
    if stage.name in MOE_STAGES:
        out = shape.moe(experts)
    elif stage.name in EXPANDED_STAGES:
        out = shape.expanded(n_blocks)
    else:  # train, merge, toy_sft
        out = shape.dense()
    if stage.kind == "train":
        trained = n_blocks * shape.block_params if stage.name == "expand_cpt" else None
        out += run_dir_bytes(shape, stage.params["stage"], experts, stage.params.get("checkpoint") or {}, trained)
    return out


def report_bytes(systems: int, languages: int, moe_systems: int) -> int:
    """report.md, results.json and the plots (accuracy, trade-off, training loss, one heatmap per MoE)."""
    return 8_000 + _RESULT_BYTES * systems * languages + _PLOT_BYTES * (3 + moe_systems)


def base_config(recipe: Recipe, recipe_dir: Path) -> dict[str, Any] | None:
    """B's config without downloading B: the toy size, a local directory, or the local Hub cache."""
    if recipe.toy is not None:
        from deltamoe.toy import SIZES

        cfg = SIZES[recipe.toy.size]
        shape = cfg.model if recipe.toy.arch == "llama" or cfg.model2 is None else cfg.model2
        return {**shape.model_dump(), "vocab_size": cfg.vocab_size, "torch_dtype": "float32"}
    assert recipe.models is not None
    p = Path(recipe.models.base).expanduser()
    p = recipe_dir / p if not p.is_absolute() and (recipe_dir / p).exists() else p
    if (p / "config.json").is_file():
        return json.loads((p / "config.json").read_text())
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(recipe.models.base, "config.json")
    except Exception:  # not a valid repo id
        return None
    return json.loads(Path(cached).read_text()) if isinstance(cached, str) else None


def estimate_disk(stages: list[StageRun], recipe: Recipe, recipe_dir: Path) -> dict[str, int | None]:
    """Bytes each stage writes, or None where B's config is not known."""
    c = base_config(recipe, recipe_dir)
    if c is None:
        return {s.name: None for s in stages}
    from deltamoe.ops.upcycle import parse_layers

    shape = Shape.from_config(c)
    toy = recipe.toy.size if recipe.toy else None
    moe_layers = len(parse_layers(recipe.upcycle.layers, shape.layers))
    return {s.name: stage_bytes(s, shape, recipe.upcycle.experts, toy, set(MOE_STAGES), recipe.block_expansion.blocks,
                                moe_layers) for s in stages}


def report_estimate(recipe: Recipe, systems: dict[str, str]) -> int:
    """Bytes of the report of a plan with these systems."""
    langs = len(recipe.languages.all)
    return report_bytes(len(systems), langs, sum(1 for s in ("moe_lpr", "moe_unallocated", "deltamoe") if s in systems))
