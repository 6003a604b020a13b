"""Dense -> MoE upcycling (docs/design.md#step-1-upcycle).

Every FFN of the chosen layers becomes E experts plus a router. Expert 0 is the original FFN,
byte for byte; experts 1..E-1 are copies, optionally perturbed (Gaussian noise or
Drop-Upcycling partial re-initialisation). With identical experts and top-k weights that are
renormalised to sum to one, the MoE computes exactly what the dense model computes.

The conversion streams: one dense tensor is in memory at a time, and each is read once however
many experts it is copied into.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch

from deltamoe import arch
from deltamoe._memory import return_large_frees_to_os
from deltamoe.arch import ROLES, ArchSpec, Role
from deltamoe.io import (
    DEFAULT_SHARD_BYTES,
    DTYPE_NAMES,
    Checkpoint,
    ShardedWriter,
    TensorSpec,
    dtype_code,
    open_checkpoint,
    torch_dtype,
)
from deltamoe.choices import RouterInit
from deltamoe.engine import byte_bar, check_finite_tensors, is_float
from deltamoe.errors import CheckpointError, UsageError
from deltamoe.ops.common import check_dtype_arg, config_dtype_name, natural_key, prepare_output, seeded_generator
from deltamoe.io.output import Finished, write_output
from deltamoe.io.provenance import new_manifest

UPCYCLE_STAGE = "upcycle"
_NOISE_BLOCK = 2**18  # elements of noise generated at a time (1 MiB in float32)
_LANG = re.compile(r"^[A-Za-z][\w-]*$")


def parse_layers(text: str | Sequence[int] | None, num_layers: int, field: str = "--layers") -> list[int]:
    """``None``/``"all"`` -> every layer; ``"0-3,8"`` or a list of ints -> those layers. Errors name
    ``field`` (the CLI option, or a recipe's ``upcycle.layers``)."""
    if text is None or (isinstance(text, str) and text.strip().lower() == "all"):
        return list(range(num_layers))
    if isinstance(text, str):
        layers: list[int] = []
        for part in filter(None, (p.strip() for p in text.split(","))):
            m = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
            if not m:
                raise UsageError(f"{field}: cannot parse {part!r}; use e.g. 'all', '0-7' or '0,2,4-6'")
            lo, hi = int(m[1]), int(m[2] or m[1])
            if hi < lo:
                raise UsageError(f"{field}: empty range {part!r}")
            layers.extend(range(lo, hi + 1))
    else:
        layers = [int(x) for x in text]
    bad = sorted({x for x in layers if not 0 <= x < num_layers})
    if bad:
        raise UsageError(f"{field}: {bad} out of range; the model has layers 0..{num_layers - 1}")
    if not layers:
        raise UsageError(f"{field}: selects no layer")
    return sorted(set(layers))


def parse_allocation(items: Sequence[str]) -> dict[str, list[int]]:
    """Parse repeated ``LANG=E1,E2`` arguments into ``{lang: [experts]}``."""
    out: dict[str, list[int]] = {}
    for item in items:
        lang, sep, experts = item.partition("=")
        lang = lang.strip()
        if not sep or not lang:
            raise UsageError(f"--allocate {item!r}: expected LANG=EXPERTS, e.g. en=0 or el=1,2")
        if lang in out:
            raise UsageError(f"--allocate: language {lang!r} given twice")
        try:
            out[lang] = [int(e) for e in experts.split(",") if e.strip()]
        except ValueError:
            raise UsageError(f"--allocate {item!r}: experts must be integers separated by commas") from None
    return out


def _check_allocation(allocation: Mapping[str, Sequence[int]], num_experts: int) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for lang, experts in allocation.items():
        if not _LANG.match(lang):
            raise UsageError(f"allocation: language name {lang!r} must start with a letter (e.g. en, el, zh-Hant)")
        ids = [int(e) for e in experts]
        if not ids:
            raise UsageError(f"allocation: language {lang!r} has no experts")
        if len(set(ids)) != len(ids):
            raise UsageError(f"allocation: language {lang!r} lists an expert twice: {ids}")
        bad = [e for e in ids if not 0 <= e < num_experts]
        if bad:
            raise UsageError(f"allocation: language {lang!r} uses expert(s) {bad}; valid ids are 0..{num_experts - 1}")
        out[lang] = sorted(ids)
    return out


@dataclass(frozen=True)
class _Plan:
    specs: list[TensorSpec]
    # dense tensor name -> (role, layer) for FFN tensors that fan out into experts
    ffn: dict[str, tuple[Role, int]]
    # layer -> names generated from nothing (router, inert tensors), written after its FFN
    generated: dict[int, list[TensorSpec]]


def validate_dense(ckpt: Checkpoint) -> None:
    """The tensors of a dense checkpoint are exactly those its config implies, with their shapes."""
    shapes, optional = arch.expected_dense_tensors(ckpt.config, source=str(ckpt.path / "config.json"))
    present = set(ckpt.tensors)
    missing = sorted(set(shapes) - present - optional)
    if missing:
        raise CheckpointError(
            f"{ckpt.path}: missing tensor(s) {missing[:5]}{' ...' if len(missing) > 5 else ''} that the config requires"
        )
    unexpected = sorted(present - set(shapes))
    if unexpected:
        info = ckpt.tensors[unexpected[0]]
        raise CheckpointError(
            f"{info.file}: unexpected tensor(s) {unexpected[:5]} that a {ckpt.config.get('model_type')} "
            "model with this config does not have"
        )
    for name in sorted(present):
        info = ckpt.tensors[name]
        if info.spec.shape != shapes[name]:
            raise CheckpointError(
                f"{info.file}: tensor {name!r} has shape {list(info.spec.shape)}, but config.json implies "
                f"{list(shapes[name])}; the shard and the config disagree"
            )


def _build_plan(
    ckpt: Checkpoint,
    spec: ArchSpec,
    moe_cfg: dict[str, Any],
    expand_layers: list[int],
    num_experts: int,
    out_dtype: torch.dtype | None,
) -> _Plan:
    ffn: dict[str, tuple[Role, int]] = {}
    for layer in expand_layers:
        for role in ROLES:
            ffn[spec.dense_name(role, layer)] = (role, layer)

    def code(src: str) -> str:
        d = ckpt.spec(src).dtype
        return dtype_code(out_dtype) if out_dtype is not None and is_float(d) else d

    float_code = dtype_code(out_dtype) if out_dtype is not None else ckpt.spec(spec.dense_name("gate", 0)).dtype
    generated: dict[int, list[TensorSpec]] = {}
    hidden = int(moe_cfg["hidden_size"])
    for layer in expand_layers:
        gen = [TensorSpec(spec.router_name(layer), float_code, (num_experts, hidden))]
        for inert in spec.inert:
            gen.append(TensorSpec(inert.name.format(layer=layer), float_code, arch.inert_shape(inert, moe_cfg)))
        generated[layer] = gen

    specs: list[TensorSpec] = []
    for name in sorted(ckpt.keys(), key=natural_key):
        src = ckpt.spec(name)
        if name in ffn:
            role, layer = ffn[name]
            specs += [TensorSpec(spec.expert_name(role, layer, e), code(name), src.shape) for e in range(num_experts)]
            if role == "down":
                specs += generated[layer]
        else:
            specs.append(TensorSpec(name, code(name), src.shape))
    return _Plan(specs, ffn, generated)


def _write_perturbed(
    writer: ShardedWriter, target: str, w: torch.Tensor, *, role: Role, layer: int, expert: int, noise: float,
    reinit_ratio: float, seed: int,
) -> None:
    """Write a new expert's copy of ``w`` (shape [I, H] for gate/up, [H, I] for down), perturbed in
    float32, to ``target`` in row blocks: beside ``w`` only one block (about 1 MiB) is in memory.

    Drop-Upcycling re-initialises the same intermediate neurons (rows of gate/up, columns of
    down) from N(mean, std) of the original matrix; noise adds N(0, (noise * std)^2). The draws
    do not depend on the blocking: the re-initialised values are drawn whole, and the noise in
    row order from one generator.
    """
    full = w.float()
    std = full.std().item() if full.numel() > 1 else 0.0
    mean = full.mean().item() if reinit_ratio > 0 else 0.0
    del full  # a float32 copy only when w is not float32; freed before the blocks
    fresh, rows_of = None, None
    if reinit_ratio > 0:
        n_inter = w.shape[1] if role == "down" else w.shape[0]
        k = round(reinit_ratio * n_inter)
        idx = torch.randperm(n_inter, generator=seeded_generator(seed, "drop", layer, expert))[:k]
        g = seeded_generator(seed, "reinit", layer, expert, role)
        shape = (w.shape[0], k) if role == "down" else (k, w.shape[1])
        fresh = torch.randn(shape, generator=g) * std + mean
        if role != "down":
            rows_of = torch.full((w.shape[0],), -1, dtype=torch.long)
            rows_of[idx] = torch.arange(k)  # row r of w takes row rows_of[r] of fresh
    g = seeded_generator(seed, "noise", layer, expert, role) if noise > 0 else None
    step = max(1, _NOISE_BLOCK // max(1, w[0].numel()))
    for start in range(0, w.shape[0], step):
        x = w[start:start + step].float().clone()
        if fresh is not None and role == "down":
            x[:, idx] = fresh[start:start + step]
        elif fresh is not None:
            local = rows_of[start:start + step]
            hit = (local >= 0).nonzero().flatten()
            x[hit] = fresh[local[hit]]
        if g is not None:
            x.add_(torch.randn(x.shape, generator=g).mul_(noise * std))
        writer.write_rows(target, start, x.to(w.dtype))


def upcycle(
    dense: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    num_experts: int,
    top_k: int,
    layers: str | Sequence[int] | None = None,
    allocation: Mapping[str, Sequence[int]] | None = None,
    router_init: RouterInit = "random",
    router_std: float | None = None,
    noise: float = 0.0,
    reinit_ratio: float = 0.0,
    seed: int = 0,
    dtype: str = "auto",
    force: bool = False,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    progress: bool = True,
    command: list[str] | None = None,
) -> Path:
    """Upcycle the dense checkpoint ``dense`` into an MoE checkpoint at ``out``; return ``out``.

    Args:
        num_experts: experts per MoE layer (E >= 2); expert 0 is the original FFN.
        top_k: experts per token (1 <= K <= E).
        layers: which layers become MoE ("all", "0-7,12", or a list); default all. In
            architectures without per-layer dense FFNs (Mixtral) the other layers get E exact
            copies and a zero router, which computes the dense FFN; they are listed as
            ``replicated_layers`` in ``deltamoe.json`` so training keeps them frozen.
        allocation: language -> expert ids, recorded for training (language-prior routing).
        router_init: "random" (N(0, router_std), seeded) or "zero" (uniform routing).
        router_std: std of the random router; default the config's initializer_range or 0.02.
        noise: Gaussian noise on new experts, relative to each matrix's std (0 = exact copies).
        reinit_ratio: Drop-Upcycling: fraction of intermediate neurons of each new expert
            re-initialised from the matrix's mean/std (0 = none).
        seed: seeds every random choice; same inputs and seed give byte-identical shards.
        dtype: "auto" (keep stored dtype), "float32", "bfloat16" or "float16".
        force: replace an existing ``out``.
        max_shard_bytes: shard size budget (default 5 GB).
    """
    _check_options(num_experts, top_k, router_init, noise, reinit_ratio, dtype)
    alloc = _check_allocation(allocation or {}, num_experts)
    out_path = prepare_output(out, force=force, max_shard_bytes=max_shard_bytes)
    return_large_frees_to_os()

    ckpt = open_checkpoint(dense)
    source = str(ckpt.path / "config.json")
    spec = arch.arch_for(ckpt.config, source=source)
    validate_dense(ckpt)
    n_layers = arch.num_layers(ckpt.config, source=source)
    moe_layers = parse_layers(layers, n_layers)
    # Without per-layer dense FFNs in the target architecture, the remaining layers are replicated.
    replicated = [] if spec.config.dense_layers_field else [i for i in range(n_layers) if i not in moe_layers]
    out_dtype = DTYPE_NAMES[dtype] if dtype != "auto" else None
    dtype_name = dtype if dtype != "auto" else config_dtype_name(ckpt.spec(spec.dense_name("gate", 0)).dtype)
    moe_cfg = arch.moe_config(
        spec, ckpt.config, num_experts=num_experts, top_k=top_k, moe_layers=moe_layers,
        dtype_name=dtype_name, source=source,
    )
    plan = _build_plan(ckpt, spec, moe_cfg, sorted(moe_layers + replicated), num_experts, out_dtype)
    std = router_std if router_std is not None else float(ckpt.config.get("initializer_range", 0.02))
    init = _Init(router_init, std, noise, reinit_ratio, seed)
    params = {
        "num_experts": num_experts, "top_k": top_k, "layers": moe_layers, "router_init": router_init,
        "router_std": std, "noise": noise, "reinit_ratio": reinit_ratio, "seed": seed, "dtype": dtype,
        "max_shard_bytes": max_shard_bytes,
    }
    moe_info = _moe_info(spec, ckpt.config.get("model_type", spec.family), num_experts, top_k, moe_layers,
                         replicated, alloc)
    check_finite_tensors(ckpt)  # refused, not copied: NaN/Inf would spread into every expert

    def tensors(writer: ShardedWriter) -> None:
        with byte_bar(sum(s.nbytes for s in plan.specs), "upcycle", progress) as bar:
            _write_tensors(ckpt, writer, spec, plan, num_experts, moe_layers, out_dtype, init, bar)

    def finish(hashes: list[dict[str, Any]]) -> Finished:
        manifest = new_manifest(None, stage=UPCYCLE_STAGE, params=params, inputs={"dense": hashes[0]},
                                command=command, moe=moe_info)
        return Finished(moe_cfg, manifest)

    write_output(out_path, plan.specs, inputs=[ckpt], aux=ckpt, tensors=tensors, finish=finish, force=force,
                 max_shard_bytes=max_shard_bytes)
    return out_path


def _check_options(num_experts: int, top_k: int, router_init: str, noise: float, reinit_ratio: float,
                   dtype: str) -> None:
    if num_experts < 2:
        raise UsageError(f"--experts must be at least 2, got {num_experts}")
    if not 1 <= top_k <= num_experts:
        raise UsageError(f"--top-k must be between 1 and --experts ({num_experts}), got {top_k}")
    if router_init not in ("random", "zero"):
        raise UsageError(f"--router-init must be 'random' or 'zero', got {router_init!r}")
    if noise < 0:
        raise UsageError(f"--noise must be >= 0, got {noise}")
    if not 0 <= reinit_ratio <= 1:
        raise UsageError(f"--reinit-ratio must be in [0, 1], got {reinit_ratio}")
    check_dtype_arg(dtype)


def _moe_info(spec: ArchSpec, family: str, num_experts: int, top_k: int, moe_layers: list[int],
              replicated: list[int], alloc: dict[str, list[int]]) -> dict[str, Any]:
    """deltamoe.json's ``moe`` block: which tensors are experts and routers, for graft and training."""
    return {
        "family": family,  # the dense family: mistral, not llama
        "architecture": spec.moe_architecture,
        "num_experts": num_experts,
        "top_k": top_k,
        "moe_layers": moe_layers,
        "replicated_layers": replicated,
        "original_experts": [0],
        "new_experts": list(range(1, num_experts)),
        "allocation": alloc,
        "names": {
            "dense_ffn": dict(spec.dense_ffn),
            "expert_ffn": dict(spec.expert_ffn),
            "router": spec.router,
            "inert": [i.name for i in spec.inert],
        },
    }


# -- write ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Init:
    """How new experts and routers start: perturbations of the copies, the router's init (seeded)."""

    router_init: str
    router_std: float
    noise: float
    reinit_ratio: float
    seed: int


def _write_tensors(ckpt: Checkpoint, writer: ShardedWriter, spec: ArchSpec, plan: _Plan, num_experts: int,
                   moe_layers: list[int], out_dtype: torch.dtype | None, init: _Init, bar: Any) -> None:
    """Every dense tensor once, to its own output or to every expert of its layer; each layer's
    router and inert tensors after its FFN."""
    perturb = init.noise > 0 or init.reinit_ratio > 0
    for name in sorted(ckpt.keys(), key=natural_key):
        role, layer = plan.ffn.get(name, (None, -1))
        targets = [name] if role is None else [spec.expert_name(role, layer, e) for e in range(num_experts)]
        new_expert = None
        if role is not None and layer in moe_layers and perturb:
            new_expert = partial(_write_perturbed, role=role, layer=layer, noise=init.noise,
                                 reinit_ratio=init.reinit_ratio, seed=init.seed)
        _write_copies(ckpt, writer, name, targets, out_dtype, bar, new_expert)
        if role == "down":
            router_init = init.router_init if layer in moe_layers else "zero"
            for g in plan.generated[layer]:
                writer.write(g.name, _generated(g, spec, layer, router_init, init.router_std, init.seed))
                bar.update(g.nbytes)


def _write_copies(ckpt: Checkpoint, writer: ShardedWriter, name: str, targets: list[str],
                  out_dtype: torch.dtype | None, bar: Any, new_expert: Callable[..., None] | None) -> None:
    """Tensor ``name`` to each of ``targets``, read at most once; with ``new_expert``, every target
    but the first (expert 0) is written by ``new_expert(writer, target, t, expert=e)``, a perturbed copy."""
    info = ckpt.tensors[name]
    t = None
    for e, target in enumerate(targets):
        perturbed = new_expert is not None and e > 0
        if writer.spec(target).dtype == info.spec.dtype and not perturbed:
            writer.copy_from(target, info)  # unchanged bytes: copied in the kernel
        else:
            if t is None:
                t = ckpt.read(name)
                if out_dtype is not None and t.is_floating_point():
                    t = t.to(out_dtype)
            if perturbed:
                new_expert(writer, target, t, expert=e)
            else:
                writer.write(target, t)
        bar.update(writer.spec(target).nbytes)


def _generated(g: TensorSpec, spec: ArchSpec, layer: int, router_init: str, std: float, seed: int) -> torch.Tensor:
    dt = torch_dtype(g.dtype)
    if g.name == spec.router_name(layer) and router_init == "random":
        return (torch.randn(g.shape, generator=seeded_generator(seed, "router", layer)) * std).to(dt)
    return torch.zeros(g.shape, dtype=dt)  # zero router = uniform routing; inert tensors add exactly 0
