"""The training configuration: one strict schema per stage, loaded from YAML.

``stage: post_pretrain`` (docs/design.md#stage-1-post-pretraining) and ``stage: router_review`` (stage 2) share the
same sections; they differ only in their defaults (which losses are on, what trains).
``stage: dense_cpt`` is continued pre-training of a dense model (the baselines' B'): next-token
loss only, every parameter trainable by default. Every
model is frozen and forbids unknown keys, so a misspelt field is an error that names it
(``train.lrr: unknown field (did you mean 'lr'?)``) instead of a silently ignored setting.

The sections themselves (data, train, distributed, losses, routing, trainable, checkpoint,
logging) are in deltamoe.train.sections; this module holds the stages, their defaults and loading.
Relative paths in a YAML file are resolved against the directory of that file, so a config
and its data can move together.
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, Union

from pydantic import Field, TypeAdapter, ValidationError, field_validator, model_validator

from deltamoe.errors import UsageError
from deltamoe.train.sections import (
    CheckpointConfig,
    DataConfig,
    DistributedConfig,
    LoggingConfig,
    LossConfig,
    RoutingConfig,
    Strict,
    TrainableConfig,
    TrainingConfig,
)


def run_dir_of(output: str | os.PathLike[str]) -> Path:
    """A training stage's default run directory (logs, step checkpoints): ``<output>.run``."""
    return Path(str(output) + ".run")

Stage = Literal["post_pretrain", "router_review", "dense_cpt"]
STAGES: tuple[str, ...] = ("post_pretrain", "router_review", "dense_cpt")


class PostPretrainLosses(LossConfig):
    balance: float = Field(0.01, ge=0.0)
    lpr: float = Field(0.0, ge=0.0)


class RouterReviewLosses(LossConfig):
    balance: float = Field(0.0, ge=0.0)
    lpr: float = Field(0.1, ge=0.0)


class PostPretrainTrainable(TrainableConfig):
    new_experts: bool = True


class RouterReviewTrainable(TrainableConfig):
    new_experts: bool = False


class _StageConfig(Strict):
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


class DenseCptLosses(Strict):
    lm: float = Field(1.0, ge=0.0, description="Next-token loss (a dense model has no routing losses).")


class DenseCptTrainable(Strict):
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
