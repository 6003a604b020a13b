"""Sizes of the toy world: how much text, how big a model, how long to train.

``small`` is the demo's size and the measuring stick: its models are trained once (about 45
minutes on 2 CPU cores) and ship with the package, so the demo and the tests start from them.
``micro`` only exists for fast checks (determinism, caching, the pipeline's mechanics); its
models meet none of the regime targets.
"""

from __future__ import annotations

import hashlib
import json
from typing import Literal

from pydantic import Field, model_validator

from deltamoe.strict import Strict

# Bump when the generator, the tokenizer recipe or the training recipe changes in a way that
# changes outputs: it is part of the cache key, and the shipped set is rebuilt when it changes.
GENERATOR_VERSION = 3


class ModelShape(Strict):
    """Llama-architecture shape of the toy base model."""

    hidden_size: int = Field(gt=0)
    num_hidden_layers: int = Field(gt=0)
    num_attention_heads: int = Field(gt=0)
    num_key_value_heads: int = Field(gt=0)
    intermediate_size: int = Field(gt=0)
    max_position_embeddings: int = Field(gt=0)
    tie_word_embeddings: bool = False
    # llama: LlamaForCausalLM (upcycled to Mixtral); qwen3: Qwen3ForCausalLM with q/k norms
    # (upcycled to Qwen3-MoE)
    family: Literal["llama", "qwen3"] = "llama"
    head_dim: int | None = Field(default=None, gt=0)

    @model_validator(mode="after")
    def _heads(self) -> ModelShape:
        if self.hidden_size % self.num_attention_heads:
            raise ValueError("hidden_size must be a multiple of num_attention_heads")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError("num_attention_heads must be a multiple of num_key_value_heads")
        return self


class TrainPhase(Strict):
    steps: int = Field(gt=0)
    batch_size: int = Field(gt=0)
    lr: float = Field(gt=0)
    warmup: int = Field(ge=0)
    checkpoint_every: int = Field(default=0, ge=0)  # steps between resumable checkpoints (0: none)


class PostTraining(Strict):
    """One post-training recipe: chat data in the original language (and, for ``ceiling``-like
    uses, others), the loss on assistant tokens, plus language-model replay."""

    name: str
    phase: TrainPhase
    rc_chat_share: float = Field(ge=0, le=1)  # reading comprehension vs world-fact chat examples
    seed_offset: int = Field(ge=0)  # the chat data and its order are drawn from seed + offset


class ToyConfig(Strict):
    """Everything that determines a toy build besides the seed."""

    name: str
    # world
    n_people: int = Field(gt=1)
    eval_fraction: float = Field(gt=0, lt=1)  # of (person, relation) pairs held out of chat data
    rc_people: int = Field(ge=2)  # people per reading-comprehension context
    rc_statements: int = Field(ge=2, le=5)  # statements per context, each of another relation
    n_fresh_names: int = Field(gt=4)  # names outside the world, for reading comprehension
    # corpora
    vocab_size: int = Field(ge=300)
    seq_len: int = Field(gt=8)  # pre-training sequence length (documents are packed)
    new_language_share: float = Field(ge=0, lt=0.25)  # of pre-training documents, per new language
    parallel_share: float = Field(ge=0, le=1)  # of those, original + new-language translation pairs
    tokenizer_docs_per_language: int = Field(gt=0)
    cpt_docs: int = Field(gt=0)  # continued-pretraining documents per new language
    replay_fraction: float = Field(gt=0, lt=0.2)  # replay documents / all CPT documents
    chat_examples: int = Field(gt=0)
    # Post-training also continues the language-model loss on pre-training text (rows of seq_len
    # per step, weighted): without it a tiny model's chat fine-tuning wrecks its perplexity and
    # memorises the chat facts instead of answering from what it knows -- a poor stand-in for a
    # real instruct model, whose post-training delta is small.
    sft_lm_rows: int = Field(ge=0)
    sft_lm_weight: float = Field(ge=0)
    eval_rc: int = Field(gt=0)  # chat reading-comprehension questions per language
    mc_items: int = Field(gt=0)  # multiple-choice items per language and task (mc_rc, mc_facts)
    eval_ppl_docs: int = Field(gt=0)  # held-out documents per language
    curve_docs: int = Field(gt=0)  # held-out documents per language for the pre-training curve
    curve_points: int = Field(gt=1)  # held-out loss measured this many times during pre-training
    # models and training: the base of each architecture is pre-trained on the same corpus;
    # ``posts`` are the instruct models of the first architecture (the first is "instruct", the
    # second the other post-training delta), ``arch2_post`` the second architecture's.
    model: ModelShape
    model2: ModelShape | None = None
    pretrain: TrainPhase
    posts: tuple[PostTraining, ...]
    arch2_post: PostTraining | None = None
    # the second architecture's pre-training (default: ``pretrain``); it reads the same packed
    # corpus, which is long enough for the longer of the two
    pretrain2: TrainPhase | None = None

    def pretrain_of(self, index: int) -> TrainPhase:
        """The pre-training phase of architecture ``index`` (0: ``model``, 1: ``model2``)."""
        return self.pretrain2 if index == 1 and self.pretrain2 is not None else self.pretrain

    @model_validator(mode="after")
    def _fits(self) -> ToyConfig:
        if self.seq_len > self.model.max_position_embeddings:
            raise ValueError("seq_len must not exceed model.max_position_embeddings")
        if self.rc_people > self.n_fresh_names // 4:
            raise ValueError("n_fresh_names is too small for rc_people")
        if self.rc_people > self.rc_statements:
            raise ValueError("rc_people must not exceed rc_statements")
        if self.mc_items > self.n_people * 5:
            raise ValueError("mc_items must not exceed the number of (person, relation) facts")
        if not self.posts or self.posts[0].name != "instruct":
            raise ValueError("posts must start with the post-training recipe named 'instruct'")
        if (self.model2 is None) != (self.arch2_post is None):
            raise ValueError("model2 and arch2_post go together")
        if self.pretrain2 is not None and self.model2 is None:
            raise ValueError("pretrain2 needs model2")
        if self.pretrain2 is not None and self.pretrain2.batch_size != self.pretrain.batch_size:
            raise ValueError("pretrain2 must use pretrain's batch size (both read the same packed corpus)")
        return self

    def cache_key(self, seed: int) -> str:
        """Hash of (generator version, seed, every size setting): names a build."""
        config = self.model_dump(exclude_none=False)
        if config["pretrain2"] is None:  # keys of configs without it stay as they were
            del config["pretrain2"]
        blob = json.dumps({"v": GENERATOR_VERSION, "seed": seed, "config": config}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _post(name: str, steps: int, lr: float, rc_share: float, offset: int, batch: int = 32) -> PostTraining:
    return PostTraining(name=name, phase=TrainPhase(steps=steps, batch_size=batch, lr=lr, warmup=max(1, steps // 15)),
                        rc_chat_share=rc_share, seed_offset=offset)


SIZES: dict[str, ToyConfig] = {
    "micro": ToyConfig(
        name="micro", n_people=8, eval_fraction=1 / 3, rc_people=2, rc_statements=3, n_fresh_names=40,
        vocab_size=400, seq_len=64, new_language_share=0.02, parallel_share=0.5, tokenizer_docs_per_language=200,
        cpt_docs=200, replay_fraction=0.05, chat_examples=200, sft_lm_rows=4, sft_lm_weight=1.0, eval_rc=8,
        mc_items=8, eval_ppl_docs=8, curve_docs=4, curve_points=2,
        model=ModelShape(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         intermediate_size=64, max_position_embeddings=256),
        model2=ModelShape(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                          intermediate_size=64, max_position_embeddings=256, family="qwen3", head_dim=8,
                          tie_word_embeddings=True),
        pretrain=TrainPhase(steps=20, batch_size=8, lr=3e-3, warmup=2, checkpoint_every=10),
        posts=(_post("instruct", 10, 1e-3, 0.5, 0, batch=8), _post("instruct2", 10, 1e-3, 0.2, 1, batch=8)),
        arch2_post=_post("qwen3-instruct", 10, 1e-3, 0.5, 0, batch=8),
    ),
    # The measuring stick (README, "The toy world"): ~0.4 M non-embedding parameters pre-trained on
    # 28 tokens each (the Qwen3 base 36); 480 facts about 96 people; new languages 0.7 % of pre-training.
    "small": ToyConfig(
        name="small", n_people=96, eval_fraction=1 / 3, rc_people=2, rc_statements=3, n_fresh_names=400,
        vocab_size=1536, seq_len=128, new_language_share=0.007, parallel_share=0.9, tokenizer_docs_per_language=3000,
        cpt_docs=28000, replay_fraction=0.02, chat_examples=10000, sft_lm_rows=32, sft_lm_weight=1.0, eval_rc=240,
        mc_items=480, eval_ppl_docs=100, curve_docs=100, curve_points=10,
        model=ModelShape(hidden_size=96, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                         intermediate_size=256, max_position_embeddings=256),
        model2=ModelShape(hidden_size=96, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                          intermediate_size=256, max_position_embeddings=256, family="qwen3", head_dim=24,
                          tie_word_embeddings=True),
        pretrain=TrainPhase(steps=2800, batch_size=32, lr=3e-3, warmup=100, checkpoint_every=100),
        pretrain2=TrainPhase(steps=3600, batch_size=32, lr=3e-3, warmup=100, checkpoint_every=100),
        posts=(_post("instruct", 300, 4e-4, 0.5, 0), _post("instruct2", 400, 3e-4, 0.2, 1)),
        arch2_post=_post("qwen3-instruct", 300, 4e-4, 0.5, 0),
    ),
}
