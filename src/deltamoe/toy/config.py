"""Sizes of the toy world: how much text, how big a model, how long to train.

``tiny`` is what the tests build (about 3 minutes on 2 CPU cores); ``small`` is the demo's size
(about 8 minutes). ``micro`` is smaller than tiny and only exists for fast checks (determinism,
caching); its models do not satisfy the sanity pattern.
"""

from __future__ import annotations

import hashlib
import json

from pydantic import BaseModel, ConfigDict, Field, model_validator

# Bump when the generator, the tokenizer recipe or the training recipe changes in a way that
# changes outputs: it is part of the cache key.
GENERATOR_VERSION = 1


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelShape(_Strict):
    """Llama-architecture shape of the toy base model."""

    hidden_size: int = Field(gt=0)
    num_hidden_layers: int = Field(gt=0)
    num_attention_heads: int = Field(gt=0)
    num_key_value_heads: int = Field(gt=0)
    intermediate_size: int = Field(gt=0)
    max_position_embeddings: int = Field(gt=0)
    tie_word_embeddings: bool = False

    @model_validator(mode="after")
    def _heads(self) -> ModelShape:
        if self.hidden_size % self.num_attention_heads:
            raise ValueError("hidden_size must be a multiple of num_attention_heads")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError("num_attention_heads must be a multiple of num_key_value_heads")
        return self


class TrainPhase(_Strict):
    steps: int = Field(gt=0)
    batch_size: int = Field(gt=0)
    lr: float = Field(gt=0)
    warmup: int = Field(ge=0)


class ToyConfig(_Strict):
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
    rc_chat_share: float = Field(ge=0, le=1)  # reading comprehension vs world-fact chat examples
    # Post-training also continues the language-model loss on pre-training text (rows of seq_len
    # per step, weighted): without it a tiny model's chat fine-tuning wrecks its perplexity and
    # memorises the chat facts instead of answering from what it knows -- a poor stand-in for a
    # real instruct model, whose post-training delta is small.
    sft_lm_rows: int = Field(ge=0)
    sft_lm_weight: float = Field(ge=0)
    eval_rc: int = Field(gt=0)  # reading-comprehension questions per language
    eval_ppl_docs: int = Field(gt=0)  # held-out documents per language
    # model and training
    model: ModelShape
    pretrain: TrainPhase
    sft: TrainPhase

    @model_validator(mode="after")
    def _fits(self) -> ToyConfig:
        if self.seq_len > self.model.max_position_embeddings:
            raise ValueError("seq_len must not exceed model.max_position_embeddings")
        if self.rc_people > self.n_fresh_names // 4:
            raise ValueError("n_fresh_names is too small for rc_people")
        if self.rc_people > self.rc_statements:
            raise ValueError("rc_people must not exceed rc_statements")
        return self

    def cache_key(self, seed: int) -> str:
        """Hash of (generator version, seed, every size setting): names a build."""
        blob = json.dumps({"v": GENERATOR_VERSION, "seed": seed, "config": self.model_dump()}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


SIZES: dict[str, ToyConfig] = {
    "micro": ToyConfig(
        name="micro", n_people=8, eval_fraction=1 / 3, rc_people=2, rc_statements=3, n_fresh_names=40,
        vocab_size=400, seq_len=64, new_language_share=0.02, parallel_share=0.5, tokenizer_docs_per_language=200,
        cpt_docs=200, replay_fraction=0.05, chat_examples=200, rc_chat_share=0.5, sft_lm_rows=4, sft_lm_weight=1.0, eval_rc=8,
        eval_ppl_docs=8,
        model=ModelShape(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         intermediate_size=64, max_position_embeddings=256),
        pretrain=TrainPhase(steps=20, batch_size=8, lr=3e-3, warmup=2),
        sft=TrainPhase(steps=10, batch_size=8, lr=1e-3, warmup=1),
    ),
    "tiny": ToyConfig(
        name="tiny", n_people=24, eval_fraction=1 / 3, rc_people=2, rc_statements=3, n_fresh_names=120,
        vocab_size=1536, seq_len=128, new_language_share=0.01, parallel_share=0.5, tokenizer_docs_per_language=3000,
        cpt_docs=8000, replay_fraction=0.01, chat_examples=6000, rc_chat_share=0.5, sft_lm_rows=8, sft_lm_weight=1.0, eval_rc=50,
        eval_ppl_docs=40,
        model=ModelShape(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                         intermediate_size=384, max_position_embeddings=256),
        pretrain=TrainPhase(steps=500, batch_size=32, lr=3e-3, warmup=30),
        sft=TrainPhase(steps=300, batch_size=32, lr=1e-3, warmup=20),
    ),
    "small": ToyConfig(
        name="small", n_people=32, eval_fraction=1 / 3, rc_people=2, rc_statements=3, n_fresh_names=150,
        vocab_size=2048, seq_len=128, new_language_share=0.01, parallel_share=0.5, tokenizer_docs_per_language=4000,
        cpt_docs=20000, replay_fraction=0.01, chat_examples=10000, rc_chat_share=0.5, sft_lm_rows=8, sft_lm_weight=1.0,
        eval_rc=100, eval_ppl_docs=60,
        model=ModelShape(hidden_size=192, num_hidden_layers=6, num_attention_heads=6, num_key_value_heads=2,
                         intermediate_size=512, max_position_embeddings=256),
        pretrain=TrainPhase(steps=700, batch_size=32, lr=2e-3, warmup=40),
        sft=TrainPhase(steps=400, batch_size=32, lr=7e-4, warmup=20),
    ),
}
