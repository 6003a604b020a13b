"""The weight commands: upcycle, expand, graft, merge, inspect, delta extract, archs."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from deltamoe.cli.common import (
    NEW_ROWS_HELP,
    DtypeChoice,
    Force,
    MergeMethodChoice,
    NewRowsChoice,
    Quiet,
    RescaleChoice,
    RouterInitChoice,
    ShardSize,
    parse_size,
    reports_errors,
)
from deltamoe.filehash import prehash


@reports_errors
def upcycle(
    dense: Annotated[str, typer.Argument(help="Dense checkpoint: local directory or Hugging Face Hub id.")],
    out: Annotated[Path, typer.Argument(help="Output directory for the MoE checkpoint.")],
    experts: Annotated[int, typer.Option("--experts", "-e", help="Experts per MoE layer (expert 0 = original FFN).")],
    top_k: Annotated[int, typer.Option("--top-k", "-k", help="Experts used per token.")],
    layers: Annotated[str, typer.Option(help="Layers that become MoE: 'all', '0-7', '0,2,4-6'.")] = "all",
    allocate: Annotated[
        list[str] | None,
        typer.Option("--allocate", help="LANG=EXPERTS, repeatable, e.g. --allocate en=0 --allocate el=1,2."),
    ] = None,
    router_init: Annotated[RouterInitChoice, typer.Option(help="Router initialisation.")] = RouterInitChoice.random,
    router_std: Annotated[
        float | None, typer.Option(help="Std of a random router (default: config initializer_range).")
    ] = None,
    noise: Annotated[float, typer.Option(help="Gaussian noise on new experts, relative to each matrix's std.")] = 0.0,
    reinit_ratio: Annotated[
        float, typer.Option(help="Drop-Upcycling: fraction of each new expert's neurons re-initialised.")
    ] = 0.0,
    seed: Annotated[int, typer.Option(help="Seed for every random choice.")] = 0,
    dtype: Annotated[DtypeChoice, typer.Option(help="Output dtype ('auto' keeps the stored one).")] = DtypeChoice.auto,
    shard_size: ShardSize = "5GB",
    force: Force = False,
    quiet: Quiet = False,
) -> None:
    """Upcycle a dense model into a Mixture-of-Experts whose expert 0 is the original FFN."""
    prehash([dense])
    from deltamoe.ops.upcycle import parse_allocation
    from deltamoe.ops.upcycle import upcycle as run

    path = run(
        dense,
        out,
        num_experts=experts,
        top_k=top_k,
        layers=layers,
        allocation=parse_allocation(allocate or []),
        router_init=router_init.value,
        router_std=router_std,
        noise=noise,
        reinit_ratio=reinit_ratio,
        seed=seed,
        dtype=dtype.value,
        force=force,
        max_shard_bytes=parse_size(shard_size),
        progress=not quiet,
        command=["deltamoe", *sys.argv[1:]],
    )
    typer.echo(f"wrote {path}")


@reports_errors
def expand(
    dense: Annotated[str, typer.Argument(help="Dense checkpoint: local directory or Hugging Face Hub id.")],
    out: Annotated[Path, typer.Argument(help="Output directory for the expanded dense checkpoint.")],
    blocks: Annotated[int | None, typer.Option("--blocks", "-n", help="New decoder blocks to add (N >= 1).")] = None,
    match_experts: Annotated[
        int | None,
        typer.Option(help="Instead of --blocks: as many new parameters as the new experts of an E-expert upcycle."),
    ] = None,
    match_layers: Annotated[
        str,
        typer.Option(help="With --match-experts: the layers that upcycle makes MoE layers (as upcycle --layers)."),
    ] = "all",
    shard_size: ShardSize = "5GB",
    force: Force = False,
    quiet: Quiet = False,
) -> None:
    """Block expansion (LLaMA-Pro): add N identity decoder blocks; the model computes what it computed."""
    from deltamoe.errors import UsageError
    from deltamoe.ops.expand import blocks_matching, expand_blocks

    if (blocks is None) == (match_experts is None):
        raise UsageError("give exactly one of --blocks N or --match-experts E")
    if match_experts is None and match_layers != "all":
        raise UsageError("--match-layers goes with --match-experts E, not with --blocks N")
    n = blocks if blocks is not None else blocks_matching(dense, int(match_experts), match_layers)  # type: ignore[arg-type]
    path = expand_blocks(dense, out, blocks=n, force=force, max_shard_bytes=parse_size(shard_size),
                         progress=not quiet, command=["deltamoe", *sys.argv[1:]])
    typer.echo(f"wrote {path} ({n} new blocks)")


@reports_errors
def archs() -> None:
    """List the supported dense families and the MoE architecture each becomes."""
    from deltamoe.arch import families

    for spec in families():
        typer.echo(f"{', '.join(spec.dense_model_types):16} -> {spec.moe_architecture:22} {spec.description}")


@reports_errors
def graft(
    out: Annotated[Path, typer.Argument(help="Output directory for the grafted MoE.")],
    moe: Annotated[str, typer.Option("--moe", "-m", help="The MoE M (upcycled from B, usually continued-pretrained), "
                                      "or a block-expanded dense model (deltamoe expand).")],
    base: Annotated[str | None, typer.Option("--base", "-b", help="Base dense model B.")] = None,
    post: Annotated[
        list[str] | None,
        typer.Option("--post", "-p", help="Post-trained (instruct) model P[:WEIGHT]; repeatable: "
                                          "adds sum of w_i (P_i - B)."),
    ] = None,
    delta: Annotated[
        list[str] | None,
        typer.Option("--delta", "-d", help="Delta artifact D[:WEIGHT] from 'deltamoe delta extract' (instead of "
                                           "B and P); repeatable: adds sum of w_i D_i."),
    ] = None,
    experts: Annotated[
        str, typer.Option(help="Experts that get the FFN delta: all, original, new, or ids like 0,2,3.")
    ] = "all",
    scale: Annotated[
        float, typer.Option(help="Factor alpha on the FFN delta (the whole weighted sum) in the chosen experts.")
    ] = 1.0,
    new_rows: Annotated[NewRowsChoice, typer.Option(help=NEW_ROWS_HELP)] = NewRowsChoice.post,
    check_base: Annotated[
        bool, typer.Option(help="Refuse a B whose sha256 differs from the dense model M was upcycled from.")
    ] = True,
    dtype: Annotated[DtypeChoice, typer.Option(help="Output dtype ('auto' keeps M's).")] = DtypeChoice.auto,
    shard_size: ShardSize = "5GB",
    force: Force = False,
    quiet: Quiet = False,
) -> None:
    """Graft the post-training delta P - B onto an upcycled MoE: M + expand(P - B), or M + expand(sum of w_i delta_i)."""
    prehash([moe, base, *(post or [])])  # while torch is imported
    from deltamoe.ops.graft import graft as run

    path = run(
        moe, out, base=base, post=post, delta=delta, experts=experts, scale=scale, new_rows=new_rows.value,
        dtype=dtype.value, check_base=check_base, force=force, max_shard_bytes=parse_size(shard_size),
        progress=not quiet, command=["deltamoe", *sys.argv[1:]],
    )
    typer.echo(f"wrote {path}")


@reports_errors
def merge(
    out: Annotated[Path, typer.Argument(help="Output directory for the merged dense model.")],
    method: Annotated[MergeMethodChoice, typer.Option("--method", help="Merge method.")],
    model: Annotated[
        list[str],
        typer.Option("--model", help="PATH[:WEIGHT], repeatable. paramdelta: --model C --model P (P last)."),
    ],
    base: Annotated[str | None, typer.Option("--base", "-b", help="Common base model B.")] = None,
    delta: Annotated[
        list[str] | None,
        typer.Option("--delta", "-d", help="Delta artifact D[:WEIGHT], repeatable: more task vectors "
                                           "(paramdelta: C + sum w_i D_i)."),
    ] = None,
    post: Annotated[
        list[str] | None,
        typer.Option("--post", "-p", help="paramdelta only: post-trained model P[:WEIGHT] with --model C, "
                                          "repeatable: C + sum w_i (P_i - B)."),
    ] = None,
    density: Annotated[float | None, typer.Option(help="ties/dare: fraction of each task vector kept.")] = None,
    lambda_: Annotated[float, typer.Option("--lambda", help="Factor on the combined task vector.")] = 1.0,
    seed: Annotated[int, typer.Option(help="Seed of DARE's random masks.")] = 0,
    normalize: Annotated[
        bool | None, typer.Option("--normalize/--no-normalize", help="Divide by the sum of weights (default: ties only).")
    ] = None,
    rescale: Annotated[
        RescaleChoice, typer.Option(help="DARE rescaling: keep L1 norm (l1, as mergekit), 1/density (inverse), none.")
    ] = RescaleChoice.l1,
    new_rows: Annotated[NewRowsChoice, typer.Option(help=NEW_ROWS_HELP)] = NewRowsChoice.post,
    tokenizer_from: Annotated[
        str | None, typer.Option(help="Input whose tokenizer/chat template/config to copy (default: the first --post, "
                                      "else the first --delta, else the last --model).")
    ] = None,
    dtype: Annotated[DtypeChoice, typer.Option(help="Output dtype ('auto' keeps the first model's).")] = DtypeChoice.auto,
    shard_size: ShardSize = "5GB",
    force: Force = False,
    quiet: Quiet = False,
) -> None:
    """Dense data-free merge baselines: paramdelta (C + P - B), task_arithmetic, ties, dare_linear, dare_ties."""
    prehash([*model, base, *(post or [])])
    from deltamoe.ops.merge import merge as run

    path = run(
        model, out, method=method.value, base=base, delta=delta, post=post, density=density, lambda_=lambda_, seed=seed,
        normalize=normalize, rescale=rescale.value, new_rows=new_rows.value, tokenizer_from=tokenizer_from,
        dtype=dtype.value, force=force, max_shard_bytes=parse_size(shard_size), progress=not quiet,
        command=["deltamoe", *sys.argv[1:]],
    )
    typer.echo(f"wrote {path}")


@reports_errors
def inspect_(
    out: Annotated[Path, typer.Option("--out", "-o", help="Output directory for inspect.json and inspect.png.")],
    base: Annotated[str | None, typer.Option("--base", "-b", help="Base dense model B.")] = None,
    post: Annotated[str | None, typer.Option("--post", "-p", help="Post-trained model P (Δ = P - B).")] = None,
    delta: Annotated[
        str | None, typer.Option("--delta", "-d", help="Delta artifact from 'deltamoe delta extract' (instead of --post).")
    ] = None,
    cpt: Annotated[str | None, typer.Option("--cpt", help="Dense continued-pretrained model B' (U = B' - B).")] = None,
    moe: Annotated[
        str | None, typer.Option("--moe", "-m", help="MoE after CPT (U = expert e - expert 0; M - B elsewhere).")
    ] = None,
    force: Force = False,
    quiet: Quiet = False,
) -> None:
    """Where the CPT update U and the post-training delta P - B collide: norms, ratio, cosine per layer and group."""
    from deltamoe.inspect import format_table, inspect_conflict

    result = inspect_conflict(out, base=base, post=post, delta=delta, cpt=cpt, moe=moe, force=force, progress=not quiet)
    typer.echo(format_table(result))
    typer.echo(f"wrote {result['out']}")


@reports_errors
def delta_extract(
    out: Annotated[Path, typer.Argument(help="Output directory for the delta artifact.")],
    base: Annotated[str, typer.Option("--base", "-b", help="Base dense model B.")],
    post: Annotated[str, typer.Option("--post", "-p", help="Post-trained model P.")],
    dtype: Annotated[
        DtypeChoice, typer.Option(help="Storage dtype of the delta (float32 stores it exactly).")
    ] = DtypeChoice.float32,
    shard_size: ShardSize = "5GB",
    force: Force = False,
    quiet: Quiet = False,
) -> None:
    """Write P - B once (with P's tokenizer, chat template and provenance) for grafting onto many MoEs."""
    prehash([base, post])
    from deltamoe.ops.extract import extract_delta
    from deltamoe.errors import UsageError

    if dtype == DtypeChoice.auto:
        raise UsageError("--dtype for a delta must be float32, bfloat16 or float16")
    path = extract_delta(
        base, post, out, dtype=dtype.value, force=force, max_shard_bytes=parse_size(shard_size),
        progress=not quiet, command=["deltamoe", *sys.argv[1:]],
    )
    typer.echo(f"wrote {path}")
