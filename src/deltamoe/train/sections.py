"""The sections of a training stage's config: data, training, distribution, losses, routing,
what trains, checkpoints and logging.

Every section is frozen and forbids unknown keys (:class:`Strict`), so a misspelt field is an
error that names it. The stages themselves, their defaults and the loading of a config are in
deltamoe.train.config; each helper of the training code takes the section it reads.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from deltamoe.errors import UsageError
from deltamoe.strict import Strict


class SourceConfig(Strict):
    """One text source. Records are documents; each carries a language tag or none."""

    path: str = Field(description="File, glob, or directory (any local path `datasets` can load).")
    format: Literal["auto", "jsonl", "txt", "parquet", "datasets"] = Field(
        "auto", description="auto: from the suffix (.jsonl/.json, .txt, .parquet; a directory -> datasets)."
    )
    lang: str | None = Field(None, description="Language of records that carry no tag of their own; None = untagged.")
    text_field: str = Field("text", description="Field holding the document text (jsonl, parquet, datasets).")
    lang_field: str | None = Field("lang", description="Per-record language field; None ignores record tags.")
    sample_by: Literal["line", "paragraph", "document"] = Field(
        "line", description="txt only: a document is a line, a blank-line separated paragraph, or the whole file."
    )
    split: str = Field("train", description="datasets only: the split to read.")
    weight: float | None = Field(None, gt=0, description="Mixing weight (documents are drawn in proportion).")
    tokens: int | None = Field(
        None, gt=0, description="Token budget: this source contributes exactly this many tokens."
    )
    eval_only: bool = Field(False, description="Held-out evaluation only; never trained on.")

    @model_validator(mode="after")
    def _one_mixing(self) -> SourceConfig:
        if self.weight is not None and self.tokens is not None:
            raise ValueError("give 'weight' or 'tokens', not both")
        if self.eval_only and (self.weight is not None or self.tokens is not None):
            raise ValueError("an eval_only source takes no 'weight' or 'tokens'")
        return self


class DataConfig(Strict):
    left_out_at_default = ("languages",)

    sources: list[SourceConfig] = Field(min_length=1)
    pack: str | None = Field(
        None,
        description="A packed dataset of these sources (deltamoe data pack): read it instead of tokenising them.",
    )
    seq_len: int = Field(gt=1, description="Tokens per packed training sequence.")
    heldout_fraction: float = Field(
        0.01, ge=0.0, lt=1.0, description="Share of each source's documents held out (chosen by a seeded hash)."
    )
    heldout_max_tokens: int = Field(
        100_000, ge=0, description="Cap on held-out tokens per source; held-out documents past it are dropped."
    )
    add_eos: bool = Field(True, description="Append the tokenizer's EOS to every document.")
    shuffle_buffer: int = Field(
        0, ge=0, description="Shuffle training documents through a buffer of this many (0: stream order)."
    )
    languages: list[str] = Field(
        default_factory=list,
        description="Dense models: language tags the records may carry besides the sources' 'lang' (for the "
        "per-language held-out loss), e.g. a mixed replay source. An MoE's languages are its allocation.",
    )


    @model_validator(mode="after")
    def _mixing(self) -> DataConfig:
        train = [s for s in self.sources if not s.eval_only]
        if not train:
            raise ValueError("sources: every source is eval_only; at least one must be trained on")
        budgets = [s.tokens is not None for s in train]
        if any(budgets) and not all(budgets):
            raise ValueError(
                "sources: mix by 'weight' or by 'tokens' budgets, not both (every training source needs a budget)"
            )
        return self

    @property
    def by_budget(self) -> bool:
        return any(s.tokens is not None for s in self.sources)


class TrainingConfig(Strict):
    steps: int | None = Field(
        None,
        gt=0,
        description="Optimizer steps. Required with weights; default with budgets: as many as the budgets fill.",
    )
    micro_batch_size: int = Field(8, gt=0, description="Sequences per forward pass per process.")
    grad_accum: int = Field(1, gt=0, description="Micro-batches per optimizer step.")
    global_batch: int | None = Field(
        None,
        gt=0,
        description="Sequences per optimizer step over all processes; grad_accum is then derived "
        "(global_batch / (micro_batch_size x processes)), so any process count trains on the same batches.",
    )
    lr: float = Field(1e-4, gt=0)
    lr_schedule: Literal["constant", "linear", "cosine"] = "cosine"
    warmup_steps: int = Field(0, ge=0)
    min_lr_ratio: float = Field(0.0, ge=0.0, le=1.0, description="cosine only: final lr as a fraction of lr.")
    weight_decay: float = Field(0.0, ge=0.0, description="AdamW decay of trainable matrices (never of norms).")
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = Field(1e-8, gt=0)
    max_grad_norm: float | None = Field(1.0, gt=0, description="Clip the global gradient norm; None = no clipping.")
    precision: Literal["float32", "bf16"] = Field(
        "float32", description="bf16 = mixed precision: float32 weights and optimizer, bf16 autocast compute."
    )
    gradient_checkpointing: bool = False
    experts_implementation: Literal["auto", "grouped_mm", "eager"] = Field(
        "auto",
        description="MoE expert forward: grouped_mm (one grouped GEMM per projection; CUDA, bf16), eager "
        "(a loop over experts, bit-identical to transformers' eager experts), auto = grouped_mm where it runs.",
    )


    @model_validator(mode="after")
    def _one_batch(self) -> TrainingConfig:
        if self.global_batch is not None and "grad_accum" in self.model_fields_set:
            raise ValueError("give train.grad_accum or train.global_batch, not both")
        if self.global_batch is not None and self.global_batch % self.micro_batch_size:
            raise ValueError(
                f"train.global_batch ({self.global_batch}) is not a multiple of train.micro_batch_size "
                f"({self.micro_batch_size})"
            )
        return self

    def accumulation(self, processes: int) -> int:
        """Micro-batches per optimizer step on each of ``processes`` processes."""
        if self.global_batch is None:
            return self.grad_accum
        per_step = self.micro_batch_size * processes
        if self.global_batch % per_step:
            raise UsageError(
                f"train.global_batch ({self.global_batch}) is not a multiple of train.micro_batch_size x processes "
                f"({self.micro_batch_size} x {processes}); change micro_batch_size or the process count"
            )
        return self.global_batch // per_step


class DistributedConfig(Strict):
    engine: Literal["ddp", "fsdp2", "zero3"] = Field(
        "ddp",
        description="ddp: every process holds the model (torchrun or accelerate launch); fsdp2: torch's "
        "fully_shard per decoder layer and the root, under torchrun (CPU/gloo or GPUs); zero3: DeepSpeed "
        "ZeRO-3 through accelerate launch --config_file recipes/accelerate/zero3.yaml (GPUs).",
    )


class LossConfig(Strict):
    left_out_at_default = ("lpr_tokens",)

    lm: float = Field(1.0, ge=0.0, description="Next-token loss.")
    balance: float = Field(ge=0.0, description="Load-balancing loss (Switch/Mixtral), averaged over MoE layers.")
    lpr: float = Field(ge=0.0, description="Language-prior routing loss: -log sum of allocated experts' probabilities.")
    lpr_tokens: Literal["tagged", "original"] = Field(
        "tagged", description="Tokens the LPR loss covers: every language-tagged token, or only those of the "
        "original languages (MoE-LPR's form: they learn to go to the original experts).")


class RoutingConfig(Strict):
    left_out_at_default = ("top_k",)

    allocated: bool = Field(
        False, description="Language-allocated routing in training: a token tagged with language L may only use "
        "L's experts and the original experts (a router mask; evaluation and serving route freely).")
    top_k: dict[str, int] = Field(
        default_factory=dict, description="Top-k per language in training: a token tagged with language L uses only "
        "its first top_k[L] expert choices (1 up to the model's top-k; e.g. {en: 1}); untagged tokens and languages "
        "not named use the model's top-k. Evaluation and serving use the model's top-k.")

    @field_validator("top_k")
    @classmethod
    def _positive(cls, v: dict[str, int]) -> dict[str, int]:
        for lang, k in v.items():
            if k < 1:
                raise ValueError(f"top_k.{lang} = {k}: a token needs at least one expert (use 1 or more)")
        return v


class TrainableConfig(Strict):
    """What trains. Expert 0 (the original FFN), inert tensors, dense FFNs and the FFNs of
    ``replicated_layers`` never do."""

    new_experts: bool
    routers: bool = True
    attention: bool = False
    norms: bool = False
    embeddings: bool = Field(False, description="Input embeddings and LM head.")


class CheckpointConfig(Strict):
    every: int | None = Field(
        None, gt=0, description="Save a resumable checkpoint every N steps (None: only when stopped)."
    )
    keep_last: int = Field(2, gt=0)
    resume: str = Field(
        "auto", description="'auto' (latest checkpoint in run_dir, if any), 'never', or a checkpoint path."
    )


class LoggingConfig(Strict):
    every: int = Field(10, gt=0, description="Log training losses and routing fractions every N steps.")
    eval_every: int | None = Field(
        None, gt=0, description="Held-out evaluation every N steps (always at start and end)."
    )
    jsonl: bool = True
    tensorboard: bool = True
    progress: bool = True
