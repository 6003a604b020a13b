"""Per-family knowledge as data: dense and MoE tensor names, config mapping.

Each file in ``_data/architectures/*.json`` describes one dense -> MoE conversion. Adding a
family means adding a file; nothing in the code branches on ``model_type``. Files are validated
on load (unknown keys, bad templates and role mismatches are errors).

Everything that is not an FFN tensor of an MoE layer passes through under its own name; the
dense tensor names and shapes are checked against the model that transformers builds from the
config (on the meta device, so no memory is used).
"""

from __future__ import annotations

import json
from functools import cache
from importlib import resources
from typing import Any, Literal

from pydantic import ValidationError, field_validator, model_validator

from deltamoe.errors import ArchitectureError
from deltamoe.strict import Strict

Role = Literal["gate", "up", "down"]
ROLES: tuple[Role, ...] = ("gate", "up", "down")

# Config keys every transformers config understands (or that only describe the file itself),
# even when a given config class does not list them among its own fields.
_UNIVERSAL_KEYS = frozenset(
    {"architectures", "model_type", "transformers_version", "_name_or_path", "torch_dtype", "dtype",
     "rope_theta", "rope_scaling", "rope_parameters", "use_cache"}
)
# Generic PretrainedConfig fields that change what the model computes or generates.
_SEMANTIC_GENERIC_KEYS = frozenset({"tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id"})
# Keys that would need code this tool cannot vouch for.
_FORBIDDEN_KEYS = {"auto_map": "it needs trust_remote_code", "quantization_config": "deltamoe needs unquantized weights"}


class Requirement(Strict):
    """A dense config field that must have a given value (when present) to be convertible."""

    field: str
    equals: Any = None
    each: Any = None
    why: str

    @model_validator(mode="after")
    def _one_check(self) -> Requirement:
        if (self.equals is None) == (self.each is None):
            raise ValueError(f"requirement on {self.field!r}: give exactly one of 'equals' or 'each'")
        return self

    def violated_by(self, value: Any) -> bool:
        if self.equals is not None:
            return value != self.equals
        return not isinstance(value, list) or any(v != self.each for v in value)


class InertTensor(Strict):
    """A tensor the MoE architecture requires but that must contribute nothing (written as zeros)."""

    name: str
    shape: list[int | str]  # ints, or config field names of the MoE config


class ConfigMapping(Strict):
    experts_field: str
    top_k_field: str
    expert_intermediate_field: str | None
    dense_layers_field: str | None  # None: every layer must be an MoE layer in this architecture
    set: dict[str, Any]
    require: list[Requirement]
    drop: list[str]
    carry: list[str]


class ArchSpec(Strict):
    family: str
    description: str
    dense_model_types: list[str]
    moe_model_type: str
    moe_architecture: str
    dense_ffn: dict[Role, str]
    expert_ffn: dict[Role, str]
    router: str
    inert: list[InertTensor]
    config: ConfigMapping

    @field_validator("dense_ffn", "expert_ffn")
    @classmethod
    def _all_roles(cls, v: dict[str, str]) -> dict[str, str]:
        if set(v) != set(ROLES):
            raise ValueError(f"needs exactly the roles {ROLES}, got {sorted(v)}")
        return v

    @model_validator(mode="after")
    def _templates(self) -> ArchSpec:
        for role, t in self.dense_ffn.items():
            if "{layer}" not in t or "{expert}" in t:
                raise ValueError(f"dense_ffn.{role}: {t!r} needs {{layer}} and no {{expert}}")
        for role, t in self.expert_ffn.items():
            if "{layer}" not in t or "{expert}" not in t:
                raise ValueError(f"expert_ffn.{role}: {t!r} needs {{layer}} and {{expert}}")
        for t in [self.router, *(i.name for i in self.inert)]:
            if "{layer}" not in t:
                raise ValueError(f"{t!r} needs {{layer}}")
        return self

    # -- names ------------------------------------------------------------------------
    def dense_name(self, role: Role, layer: int) -> str:
        return self.dense_ffn[role].format(layer=layer)

    def expert_name(self, role: Role, layer: int, expert: int) -> str:
        return self.expert_ffn[role].format(layer=layer, expert=expert)

    def router_name(self, layer: int) -> str:
        return self.router.format(layer=layer)


@cache
def _load_specs() -> dict[str, ArchSpec]:
    """model_type -> spec, from the packaged data files."""
    by_type: dict[str, ArchSpec] = {}
    for entry in sorted(resources.files("deltamoe").joinpath("_data/architectures").iterdir(), key=str):
        if not entry.name.endswith(".json"):
            continue
        try:
            spec = ArchSpec.model_validate(json.loads(entry.read_text()))
        except (json.JSONDecodeError, ValidationError) as e:
            raise ArchitectureError(f"architecture table {entry.name} is invalid: {e}") from None
        for mt in spec.dense_model_types:
            if mt in by_type:
                raise ArchitectureError(f"model_type {mt!r} is claimed by two architecture tables")
            by_type[mt] = spec
    return by_type


def supported_model_types() -> list[str]:
    return sorted(_load_specs())


def families() -> list[ArchSpec]:
    seen: dict[str, ArchSpec] = {}
    for spec in _load_specs().values():
        seen.setdefault(spec.family, spec)
    return list(seen.values())


def arch_for(config: dict[str, Any], *, source: str = "config.json") -> ArchSpec:
    """The conversion table for a dense model's config, or a clear error."""
    mt = config.get("model_type")
    specs = _load_specs()
    if mt not in specs:
        raise ArchitectureError(
            f"{source}: model_type {mt!r} is not supported. Supported dense families: "
            + ", ".join(f"{t} -> {s.moe_model_type}" for t, s in sorted(specs.items()))
        )
    return specs[mt]


def _num_layers(config: dict[str, Any], source: str) -> int:
    n = config.get("num_hidden_layers")
    if not isinstance(n, int) or n <= 0:
        raise ArchitectureError(f"{source}: num_hidden_layers must be a positive integer, got {n!r}")
    return n


def num_layers(config: dict[str, Any], *, source: str = "config.json") -> int:
    return _num_layers(config, source)


def moe_config(
    spec: ArchSpec,
    dense: dict[str, Any],
    *,
    num_experts: int,
    top_k: int,
    moe_layers: list[int],
    dtype_name: str | None,
    source: str = "config.json",
) -> dict[str, Any]:
    """Map a dense config dict to the MoE config dict; every dense field is carried or refused."""
    from transformers import CONFIG_MAPPING, PretrainedConfig

    for key, why in _FORBIDDEN_KEYS.items():
        if dense.get(key):
            raise ArchitectureError(f"{source}: field {key!r} is set; deltamoe cannot convert it ({why})")
    m = spec.config
    target_cls = CONFIG_MAPPING[spec.moe_model_type]
    # Fields the dense config.json leaves to its class defaults must not silently take the MoE
    # class's defaults instead (Llama's rms_norm_eps is 1e-6, Mixtral's 1e-5; rope_theta 1e4 vs
    # 1e6): make the dense model's effective values explicit.
    try:
        effective = CONFIG_MAPPING[dense["model_type"]](**{k: v for k, v in dense.items() if k != "model_type"}).to_dict()
    except Exception as e:
        raise ArchitectureError(f"{source}: transformers rejects this config: {e}") from None
    bookkeeping = set(PretrainedConfig().to_dict()) - _SEMANTIC_GENERIC_KEYS
    defaults = {k: v for k, v in effective.items() if k not in dense and k not in bookkeeping}
    dense = {**defaults, **dense}
    for req in m.require:
        if req.field in dense and req.violated_by(dense[req.field]):
            raise ArchitectureError(
                f"{source}: {req.field} = {dense[req.field]!r} cannot be carried over to "
                f"{spec.moe_architecture} ({req.why}); only {req.equals if req.each is None else 'all ' + repr(req.each)} can"
            )
    known = set(target_cls().to_dict()) | _UNIVERSAL_KEYS | set(m.carry) | set(m.drop)
    known |= set(getattr(target_cls, "attribute_map", {}))
    unknown = sorted(k for k in dense if k not in known and k not in defaults)
    if unknown:
        raise ArchitectureError(
            f"{source}: field(s) {unknown} of the dense {dense.get('model_type')} config have no "
            f"counterpart in {spec.moe_architecture}; refusing to drop them silently"
        )
    n_layers = _num_layers(dense, source)
    out = {k: v for k, v in dense.items() if k not in m.drop and (k in known or k not in defaults)}
    _add_legacy_rope(out)
    out["model_type"] = spec.moe_model_type
    out["architectures"] = [spec.moe_architecture]
    out.update(m.set)
    out[m.experts_field] = num_experts
    out[m.top_k_field] = top_k
    if m.expert_intermediate_field:
        out[m.expert_intermediate_field] = dense["intermediate_size"]
    if m.dense_layers_field:
        out[m.dense_layers_field] = [i for i in range(n_layers) if i not in set(moe_layers)]
    if dtype_name:
        for key in ("torch_dtype", "dtype"):
            if key in out or (key == "torch_dtype" and "dtype" not in out):
                out[key] = dtype_name
    out.pop("_name_or_path", None)
    try:
        target_cls(**{k: v for k, v in out.items() if k != "model_type"})
    except Exception as e:  # transformers validates its own fields
        raise ArchitectureError(f"{source}: the mapped {spec.moe_model_type} config is invalid: {e}") from None
    return out


def _add_legacy_rope(cfg: dict[str, Any]) -> None:
    """Also state RoPE in the transformers 4.x keys, which 4.x reads (5.x reads ``rope_parameters``)."""
    rp = cfg.get("rope_parameters")
    if not isinstance(rp, dict):
        return
    if "rope_theta" not in cfg and "rope_theta" in rp:
        cfg["rope_theta"] = rp["rope_theta"]
    if "rope_scaling" not in cfg and rp.get("rope_type", "default") != "default":
        cfg["rope_scaling"] = {k: v for k, v in rp.items() if k != "rope_theta"}


def inert_shape(inert: InertTensor, moe_cfg: dict[str, Any]) -> tuple[int, ...]:
    return tuple(d if isinstance(d, int) else int(moe_cfg[d]) for d in inert.shape)


def expected_dense_tensors(config: dict[str, Any], *, source: str = "config.json") -> tuple[dict[str, tuple[int, ...]], set[str]]:
    """Names and shapes of the tensors a dense checkpoint with this config must hold.

    Built by transformers itself on the meta device. Returns (shapes, optional names), where
    optional names are tied parameters that checkpoints may omit.
    """
    import torch
    import transformers
    from transformers import CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    try:
        # Import just this family's classes: the Auto* factories import far more (seconds).
        model_type = config["model_type"]
        cfg = CONFIG_MAPPING[model_type](**{k: v for k, v in config.items() if k != "model_type"})
        model_cls = getattr(transformers, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type])
        with torch.device("meta"):
            model = model_cls(cfg)
    except Exception as e:
        raise ArchitectureError(f"{source}: transformers cannot build a model from this config: {e}") from None
    shapes: dict[str, tuple[int, ...]] = {}
    optional: set[str] = set()
    first_owner: dict[int, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        shapes[name] = tuple(p.shape)
        key = id(p)
        if key in first_owner:
            optional.add(name)
        else:
            first_owner[key] = name
    persistent = set(model.state_dict())  # rotary caches are non-persistent buffers
    for name, b in model.named_buffers():
        if name in persistent:
            shapes[name] = tuple(b.shape)
    if getattr(cfg, "tie_word_embeddings", False) and "lm_head.weight" in shapes:
        optional.add("lm_head.weight")
    return shapes, optional
