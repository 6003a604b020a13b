"""The training configuration: one strict schema per stage, loaded from YAML.

``stage: post_pretrain`` (docs/design.md#stage-1-post-pretraining) and ``stage: router_review`` (stage 2) share the
same sections; they differ only in their defaults (which losses are on, what trains).
``stage: dense_cpt`` is continued pre-training of a dense model (the baselines' B'): next-token
loss only, every parameter trainable by default. Every
model is frozen and forbids unknown keys, so a misspelt field is an error that names it
(``train.lrr: unknown field (did you mean 'lr'?)``) instead of a silently ignored setting.

Relative paths in a YAML file are resolved against the directory of that file, so a config
and its data can move together.
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Literal, Union

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_serializer,
    model_validator,
)

from deltamoe.errors import UsageError


def run_dir_of(output: str | os.PathLike[str]) -> Path:
    """A training stage's default run directory (logs, step checkpoints): ``<output>.run``."""
    return Path(str(output) + ".run")

Stage = Literal["post_pretrain", "router_review", "dense_cpt"]
STAGES: tuple[str, ...] = ("post_pretrain", "router_review", "dense_cpt")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    # Fields added after configs were first recorded in outputs' provenance and in stage digests (the
    # cache keys): left out of every dump while they hold their default, so those stay as they were.
    left_out_at_default: ClassVar[tuple[str, ...]] = ()

    @model_serializer(mode="wrap")
    def _dump(self, handler: Any) -> dict[str, Any]:
        out = handler(self)
        for name in self.left_out_at_default:
            if getattr(self, name) == type(self).model_fields[name].get_default(call_default_factory=True):
                out.pop(name, None)
        return out


class SourceConfig(_Strict):
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


class DataConfig(_Strict):
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


class TrainingConfig(_Strict):
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


class DistributedConfig(_Strict):
    engine: Literal["ddp", "fsdp2", "zero3"] = Field(
        "ddp",
        description="ddp: every process holds the model (torchrun or accelerate launch); fsdp2: torch's "
        "fully_shard per decoder layer and the root, under torchrun (CPU/gloo or GPUs); zero3: DeepSpeed "
        "ZeRO-3 through accelerate launch --config_file recipes/accelerate/zero3.yaml (GPUs).",
    )


class LossConfig(_Strict):
    left_out_at_default = ("lpr_tokens",)

    lm: float = Field(1.0, ge=0.0, description="Next-token loss.")
    balance: float = Field(ge=0.0, description="Load-balancing loss (Switch/Mixtral), averaged over MoE layers.")
    lpr: float = Field(ge=0.0, description="Language-prior routing loss: -log sum of allocated experts' probabilities.")
    lpr_tokens: Literal["tagged", "original"] = Field(
        "tagged", description="Tokens the LPR loss covers: every language-tagged token, or only those of the "
        "original languages (MoE-LPR's form: they learn to go to the original experts).")


class RoutingConfig(_Strict):
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


class PostPretrainLosses(LossConfig):
    balance: float = Field(0.01, ge=0.0)
    lpr: float = Field(0.0, ge=0.0)


class RouterReviewLosses(LossConfig):
    balance: float = Field(0.0, ge=0.0)
    lpr: float = Field(0.1, ge=0.0)


class TrainableConfig(_Strict):
    """What trains. Expert 0 (the original FFN), inert tensors, dense FFNs and the FFNs of
    ``replicated_layers`` never do."""

    new_experts: bool
    routers: bool = True
    attention: bool = False
    norms: bool = False
    embeddings: bool = Field(False, description="Input embeddings and LM head.")


class PostPretrainTrainable(TrainableConfig):
    new_experts: bool = True


class RouterReviewTrainable(TrainableConfig):
    new_experts: bool = False


class CheckpointConfig(_Strict):
    every: int | None = Field(
        None, gt=0, description="Save a resumable checkpoint every N steps (None: only when stopped)."
    )
    keep_last: int = Field(2, gt=0)
    resume: str = Field(
        "auto", description="'auto' (latest checkpoint in run_dir, if any), 'never', or a checkpoint path."
    )


class LoggingConfig(_Strict):
    every: int = Field(10, gt=0, description="Log training losses and routing fractions every N steps.")
    eval_every: int | None = Field(
        None, gt=0, description="Held-out evaluation every N steps (always at start and end)."
    )
    jsonl: bool = True
    tensorboard: bool = True
    progress: bool = True


class _StageConfig(_Strict):
    model: str = Field(description="The upcycled MoE checkpoint (or the previous stage's output).")
    output: str = Field(description="Output directory for the trained MoE.")
    run_dir: str | None = Field(None, description="Logs and checkpoints; default '<output>.run'.")
    seed: int = 0
    data: DataConfig
    train: TrainingConfig = TrainingConfig()
    distributed: DistributedConfig = DistributedConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    logging: LoggingConfig = LoggingConfig()

    @model_validator(mode="after")
    def _steps(self) -> _StageConfig:
        if self.train.steps is None and not self.data.by_budget:
            raise ValueError("train.steps is required when sources are mixed by weight (or give token budgets)")
        if self.train.warmup_steps and self.train.steps and self.train.warmup_steps > self.train.steps:
            raise ValueError(f"train.warmup_steps ({self.train.warmup_steps}) exceeds train.steps ({self.train.steps})")
        return self

    @property
    def resolved_run_dir(self) -> Path:
        return Path(self.run_dir) if self.run_dir else run_dir_of(self.output)


class _RoutedStageConfig(_StageConfig):
    """An MoE stage with routing options. Each subclass declares ``routing`` after its own fields
    (the field order is the order of the config dump recorded in every output's provenance)."""

    left_out_at_default = ("routing",)

    if TYPE_CHECKING:
        routing: RoutingConfig


class PostPretrainConfig(_RoutedStageConfig):
    """Stage 1: train the new experts and the routers on new-language text."""

    stage: Literal["post_pretrain"]
    losses: PostPretrainLosses = PostPretrainLosses()
    trainable: PostPretrainTrainable = PostPretrainTrainable()
    routing: RoutingConfig = RoutingConfig()


class RouterReviewConfig(_RoutedStageConfig):
    """Stage 2: train the routers only, on a small replay mix, with language-prior routing."""

    stage: Literal["router_review"]
    losses: RouterReviewLosses = RouterReviewLosses()
    trainable: RouterReviewTrainable = RouterReviewTrainable()
    routing: RoutingConfig = RoutingConfig()


class DenseCptLosses(_Strict):
    lm: float = Field(1.0, ge=0.0, description="Next-token loss (a dense model has no routing losses).")


class DenseCptTrainable(_Strict):
    """What trains in dense continued pre-training (default: everything).

    ``layers`` restricts training to those decoder blocks (their FFN, attention and norms, as
    the three flags say); everything outside them (embeddings, final norm, LM head) stays frozen.
    ``new`` means the blocks that ``deltamoe expand`` added (read from the model's deltamoe.json).
    Without ``layers`` the field is left out of the dumped config, so configs, their digests and
    cache keys read as they did before it existed.
    """

    left_out_at_default = ("layers",)

    ffn: bool = True
    attention: bool = True
    norms: bool = True
    embeddings: bool = Field(True, description="Input embeddings and LM head.")
    layers: list[int] | Literal["new"] | None = Field(
        None, description="Train only these decoder blocks (indices, or 'new': the blocks deltamoe expand added)."
    )

    @model_validator(mode="before")
    @classmethod
    def _layers_freeze_embeddings(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("layers") is not None:
            if data.get("embeddings"):
                raise ValueError("embeddings cannot train with trainable.layers (only the listed decoder blocks train)")
            data = {**data, "embeddings": False}
        return data

    @field_validator("layers")
    @classmethod
    def _layer_list(cls, v: list[int] | str | None) -> list[int] | str | None:
        if isinstance(v, list):
            if not v:
                raise ValueError("selects no layer")
            if min(v) < 0 or len(set(v)) != len(v):
                raise ValueError(f"layer indices must be distinct and non-negative, got {v}")
        return v



class DenseCptConfig(_StageConfig):
    """Baseline: continued pre-training of the dense model itself (B -> B')."""

    stage: Literal["dense_cpt"]
    losses: DenseCptLosses = DenseCptLosses()
    trainable: DenseCptTrainable = DenseCptTrainable()


StageConfig = Annotated[
    Union[PostPretrainConfig, RouterReviewConfig, DenseCptConfig],  # noqa: UP007
    Field(discriminator="stage"),
]
_ADAPTER: TypeAdapter[PostPretrainConfig | RouterReviewConfig | DenseCptConfig] = TypeAdapter(StageConfig)
AnyStageConfig = PostPretrainConfig | RouterReviewConfig | DenseCptConfig

_PATH_KEYS = ("model", "output", "run_dir")


def _resolve_paths(raw: dict[str, Any], base: Path) -> dict[str, Any]:
    """Make relative paths in a YAML dict relative to ``base`` (the YAML file's directory)."""

    def fix(v: Any) -> Any:
        if isinstance(v, str) and v and not os.path.isabs(os.path.expanduser(v)):
            return str(base / v)
        return os.path.expanduser(v) if isinstance(v, str) else v

    out = dict(raw)
    for k in _PATH_KEYS:
        if k in out:
            out[k] = fix(out[k])
    data = out.get("data")
    if isinstance(data, dict) and isinstance(data.get("sources"), list):
        data = dict(data)
        data["sources"] = [
            {**s, "path": fix(s["path"])} if isinstance(s, dict) and "path" in s else s for s in data["sources"]
        ]
        if isinstance(data.get("pack"), str):
            data["pack"] = fix(data["pack"])
        out["data"] = data
    ck = out.get("checkpoint")
    if isinstance(ck, dict) and isinstance(ck.get("resume"), str) and ck["resume"] not in ("auto", "never"):
        out["checkpoint"] = {**ck, "resume": fix(ck["resume"])}
    return out


_STAGE_CLASSES: dict[str, Any] = {
    "post_pretrain": PostPretrainConfig, "router_review": RouterReviewConfig, "dense_cpt": DenseCptConfig,
}


def _fields_at(stage: str | None, loc: tuple[Any, ...]) -> list[str]:
    """Valid field names of the model at ``loc`` (for 'did you mean' suggestions)."""
    from deltamoe.preflight import fields_at

    cls = _STAGE_CLASSES.get(stage or "")
    return fields_at(cls, loc) if cls is not None else []


def _from_override(loc: tuple[Any, ...], overrides: list[str]) -> str | None:
    """The ``--set`` item that set the field at ``loc`` (or a section above it), if any."""
    path = [str(p) for p in loc]
    for item in reversed(overrides):
        parts = item.partition("=")[0].strip().split(".")
        if parts and path[: len(parts)] == parts:
            return item
    return None


def _format_errors(e: ValidationError, source: str, overrides: list[str] | None = None) -> str:
    lines = []
    blamed = 0
    for err in e.errors():
        loc = tuple(err["loc"])
        stage = loc[0] if loc and loc[0] in STAGES else None
        if stage:
            loc = loc[1:]
        where = ".".join(str(p) for p in loc) or "(top level)"
        item = _from_override(loc, overrides or [])
        if item is not None:  # the command line, not the YAML file, holds this value
            where = f"--set {item}: {where}"
            blamed += 1
        kind = err["type"]
        if kind == "extra_forbidden":
            known = _fields_at(stage, loc[:-1])
            near = difflib.get_close_matches(str(loc[-1]), known, n=1)
            hint = f" (did you mean '{near[0]}'?)" if near else (f"; valid fields: {', '.join(known)}" if known else "")
            lines.append(f"{where}: unknown field{hint}")
        elif kind == "union_tag_not_found":
            lines.append(f"stage: required; one of {', '.join(STAGES)}")
        elif kind == "union_tag_invalid":
            lines.append(f"stage: {err['input'].get('stage')!r} is not a stage; use one of {', '.join(STAGES)}")
        elif kind == "missing":
            lines.append(f"{where}: required field is missing")
        else:
            lines.append(f"{where}: {err['msg']}")
    if blamed == len(lines):
        source = "command line"
    return f"{source}: invalid training config:\n  " + "\n  ".join(lines)


def _apply_override(raw: dict[str, Any], item: str) -> None:
    """Apply one ``dotted.key=value`` override (value parsed as YAML) to ``raw`` in place."""
    import yaml

    from deltamoe.config_files import set_dotted

    key, sep, value = item.partition("=")
    if not sep or not key.strip():
        raise UsageError(f"--set {item!r}: expected KEY=VALUE, e.g. train.steps=100")
    set_dotted(raw, key.strip(), yaml.safe_load(value), f"--set {item!r}")


def load_config(
    config: str | os.PathLike[str] | dict[str, Any] | AnyStageConfig,
    overrides: list[str] | None = None,
) -> AnyStageConfig:
    """Validate a config from a YAML path, a dict or a config object; apply ``key=value`` overrides."""
    if isinstance(config, (PostPretrainConfig, RouterReviewConfig, DenseCptConfig)):
        if not overrides:
            return config
        raw: dict[str, Any] = config.model_dump(mode="json", exclude_unset=True)
        source = "config"
    elif isinstance(config, dict):
        raw, source = dict(config), "config"
    else:
        from deltamoe.config_files import read_yaml_mapping

        path = Path(config)
        loaded = read_yaml_mapping(path, "config", "a mapping of config fields")
        raw, source = _resolve_paths(loaded, path.parent.absolute()), str(path)
    for item in overrides or []:
        _apply_override(raw, item)
    try:
        return _ADAPTER.validate_python(raw)
    except ValidationError as e:
        raise UsageError(_format_errors(e, source, overrides)) from None


def config_schema() -> dict[str, Any]:
    """JSON schema of the training config (both stages)."""
    return _ADAPTER.json_schema()
