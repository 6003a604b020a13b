"""The ``deltamoe`` command line: each command parses, validates and calls one library function.

Only this module turns exceptions into exit codes: 1 for a problem with the input, the output or a
resource such as free disk (one ``error:`` line that says what to fix, never a traceback), 130 for
Ctrl-C and 143 for SIGTERM.
"""

from __future__ import annotations

import functools
import re
import signal
import sys
from collections.abc import Callable
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from deltamoe import __version__
from deltamoe.choices import METHODS, NEW_ROWS, OUTPUT_DTYPES, RESCALES, ROUTER_INITS

app = typer.Typer(
    name="deltamoe",
    help="Add languages to an LLM: upcycle to MoE, train the new experts, graft the post-training delta.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

F = TypeVar("F", bound=Callable[..., Any])

# Options every writing command shares, declared once
Force = Annotated[bool, typer.Option("--force", help="Replace the output if it exists (or holds something else).")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress output.")]
ShardSize = Annotated[str, typer.Option(help="Maximum shard size, e.g. 5GB.")]


def _reports_errors(fn: F) -> F:
    """Print library errors as one clear line and exit non-zero, without a traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from deltamoe.errors import DeltaMoEError

        try:
            return fn(*args, **kwargs)
        except DeltaMoEError as e:
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(1) from None
        except OSError as e:  # a system error outside any output directory (reading an input...)
            where = f"{e.filename}: " if e.filename else ""
            typer.echo(f"error: {where}{e.strerror or e}", err=True)
            raise typer.Exit(1) from None
        except Terminated:
            typer.echo("interrupted; no output was written", err=True)
            raise typer.Exit(143) from None
        except KeyboardInterrupt:
            typer.echo("interrupted; no output was written", err=True)
            raise typer.Exit(130) from None

    return wrapper  # type: ignore[return-value]


class Terminated(KeyboardInterrupt):
    """SIGTERM: unwinds like Ctrl-C (through the atomic-output cleanup) but exits 143."""


def parse_size(text: str) -> int:
    """'5GB', '500MB', '2GiB' or a plain byte count (positive)."""
    from deltamoe.errors import UsageError

    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?)B?\s*", text, re.IGNORECASE)
    if not m:
        raise UsageError(f"--shard-size: cannot parse size {text!r}; use e.g. 5GB, 500MB or 1000000")
    base = 1024 if m[3] else 1000
    power = " KMGT".index(m[2].upper() or " ")
    n = int(float(m[1]) * base**power)
    if n <= 0:
        raise UsageError(f"--shard-size must be positive, got {text!r}; use e.g. 5GB or 500MB")
    return n


def _choice(name: str, values: tuple[str, ...]) -> Any:
    """A command-line choice type built from a library constant."""
    return Enum(name, {v: v for v in values}, type=str)


RouterInitChoice = _choice("RouterInitChoice", ROUTER_INITS)
DtypeChoice = _choice("DtypeChoice", OUTPUT_DTYPES)


@app.command()
@_reports_errors
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


@app.command()
@_reports_errors
def expand(
    dense: Annotated[str, typer.Argument(help="Dense checkpoint: local directory or Hugging Face Hub id.")],
    out: Annotated[Path, typer.Argument(help="Output directory for the expanded dense checkpoint.")],
    blocks: Annotated[int | None, typer.Option("--blocks", "-n", help="New decoder blocks to add (N >= 1).")] = None,
    match_experts: Annotated[
        int | None,
        typer.Option(help="Instead of --blocks: as many new parameters as the new experts of an E-expert upcycle."),
    ] = None,
    shard_size: ShardSize = "5GB",
    force: Force = False,
    quiet: Quiet = False,
) -> None:
    """Block expansion (LLaMA-Pro): add N identity decoder blocks; the model computes what it computed."""
    from deltamoe.errors import UsageError
    from deltamoe.ops.expand import blocks_matching, expand_blocks

    if (blocks is None) == (match_experts is None):
        raise UsageError("give exactly one of --blocks N or --match-experts E")
    n = blocks if blocks is not None else blocks_matching(dense, int(match_experts))  # type: ignore[arg-type]
    path = expand_blocks(dense, out, blocks=n, force=force, max_shard_bytes=parse_size(shard_size),
                         progress=not quiet, command=["deltamoe", *sys.argv[1:]])
    typer.echo(f"wrote {path} ({n} new blocks)")


@app.command()
@_reports_errors
def archs() -> None:
    """List the supported dense families and the MoE architecture each becomes."""
    from deltamoe.arch import families

    for spec in families():
        typer.echo(f"{', '.join(spec.dense_model_types):16} -> {spec.moe_architecture:22} {spec.description}")


NewRowsChoice = _choice("NewRowsChoice", NEW_ROWS)
MergeMethodChoice = _choice("MergeMethodChoice", METHODS)
RescaleChoice = _choice("RescaleChoice", RESCALES)


_NEW_ROWS_HELP = "Vocabulary rows P has and B lacks: P's values (post), the mean of the other rows, or error."


@app.command()
@_reports_errors
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
    new_rows: Annotated[NewRowsChoice, typer.Option(help=_NEW_ROWS_HELP)] = NewRowsChoice.post,
    check_base: Annotated[
        bool, typer.Option(help="Refuse a B whose sha256 differs from the dense model M was upcycled from.")
    ] = True,
    dtype: Annotated[DtypeChoice, typer.Option(help="Output dtype ('auto' keeps M's).")] = DtypeChoice.auto,
    shard_size: ShardSize = "5GB",
    force: Force = False,
    quiet: Quiet = False,
) -> None:
    """Graft the post-training delta P - B onto an upcycled MoE: M + expand(P - B), or M + expand(sum of w_i delta_i)."""
    from deltamoe.ops.graft import graft as run

    path = run(
        moe, out, base=base, post=post, delta=delta, experts=experts, scale=scale, new_rows=new_rows.value,
        dtype=dtype.value, check_base=check_base, force=force, max_shard_bytes=parse_size(shard_size),
        progress=not quiet, command=["deltamoe", *sys.argv[1:]],
    )
    typer.echo(f"wrote {path}")


@app.command()
@_reports_errors
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
    new_rows: Annotated[NewRowsChoice, typer.Option(help=_NEW_ROWS_HELP)] = NewRowsChoice.post,
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
    from deltamoe.ops.merge import merge as run

    path = run(
        model, out, method=method.value, base=base, delta=delta, post=post, density=density, lambda_=lambda_, seed=seed,
        normalize=normalize, rescale=rescale.value, new_rows=new_rows.value, tokenizer_from=tokenizer_from,
        dtype=dtype.value, force=force, max_shard_bytes=parse_size(shard_size), progress=not quiet,
        command=["deltamoe", *sys.argv[1:]],
    )
    typer.echo(f"wrote {path}")


@app.command("inspect")
@_reports_errors
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


delta_app = typer.Typer(help="The post-training delta P - B as a reusable artifact.", no_args_is_help=True)
app.add_typer(delta_app, name="delta")


@delta_app.command("extract")
@_reports_errors
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
    from deltamoe.ops.extract import extract_delta
    from deltamoe.errors import UsageError

    if dtype == DtypeChoice.auto:
        raise UsageError("--dtype for a delta must be float32, bfloat16 or float16")
    path = extract_delta(
        base, post, out, dtype=dtype.value, force=force, max_shard_bytes=parse_size(shard_size),
        progress=not quiet, command=["deltamoe", *sys.argv[1:]],
    )
    typer.echo(f"wrote {path}")


toy_app = typer.Typer(help="The toy multilingual world: corpora, tokenizer, small base and instruct models.",
                      no_args_is_help=True)
app.add_typer(toy_app, name="toy")


def _toy_sizes() -> type[Enum]:
    from deltamoe.toy.config import SIZES

    return _choice("ToySizeChoice", tuple(SIZES))  # type: ignore[no-any-return]


ToySizeChoice = _toy_sizes()


@toy_app.command("build")
@_reports_errors
def toy_build(
    out: Annotated[Path, typer.Argument(help="Output directory (a build with the same seed and size there is reused).")],
    size: Annotated[ToySizeChoice, typer.Option(  # type: ignore[valid-type]
        help="small: the demo's measuring stick (shipped; ~45 min to train on 2 cores); micro: seconds, for checks.")
    ] = "small",  # type: ignore[assignment]
    seed: Annotated[int, typer.Option(help="Seed for the world, the corpora and training.")] = 0,
    train: Annotated[bool, typer.Option("--train", help="Train the models here even where the package ships them "
                                                          "(reproduces the shipped set byte for byte on the same software).")] = False,
    threads: Annotated[
        int | None, typer.Option(help="Architectures trained at once, one process and one torch thread each (default: min(2, cores)).")
    ] = None,
    force: Force = False,
    quiet: Quiet = False,
) -> None:
    """The toy world: corpora and evaluation sets, the tokenizer, and the base and post-trained models
    (copied from the shipped set, or trained with --train)."""
    from deltamoe.toy import build

    path = build(out, getattr(size, "value", size), seed, force=force, progress=not quiet, threads=threads,
                 command=["deltamoe", *sys.argv[1:]], train=train)
    typer.echo(f"toy world in {path} (models: {path / 'base'}, {path / 'instruct'})")


@toy_app.command("measure")
@_reports_errors
def toy_measure(
    toy_dir: Annotated[Path, typer.Argument(help="A directory written by 'deltamoe toy build'.")],
    quiet: Quiet = False,
) -> None:
    """Measure the toy regime (tokens per parameter, loss curve, B and P scores, size of P - B) into toy.json."""
    from deltamoe.toy.regime import measure, format_regime

    typer.echo(format_regime(measure(toy_dir, progress=not quiet)))


@toy_app.command("ship")
@_reports_errors
def toy_ship(
    toy_dir: Annotated[Path, typer.Argument(help="A trained build ('deltamoe toy build --train'), measured.")],
) -> None:
    """Copy a trained build's models, tokenizer and manifest into the package (deltamoe/_data/toy/)."""
    from deltamoe.toy.shipped import ship

    typer.echo(f"shipped set written to {ship(toy_dir)}")


@toy_app.command("export-lm-eval")
@_reports_errors
def toy_export_lm_eval(
    toy_dir: Annotated[Path, typer.Argument(help="A directory written by 'deltamoe toy build'.")],
    out: Annotated[Path, typer.Argument(help="Output directory for the lm-eval task YAMLs and their data.")],
    force: Force = False,
) -> None:
    """Export the toy evaluation sets as lm-eval tasks (use with lm_eval --include_path OUT --apply_chat_template)."""
    from deltamoe.evaluate import export_lm_eval

    info = export_lm_eval(toy_dir, out, force=force)
    typer.echo(f"wrote {len(info['tasks'])} tasks and {len(info['groups'])} groups to {info['out']}")
    typer.echo(f"run: lm_eval --model hf --model_args pretrained=MODEL --include_path {info['out']} "
               "--tasks deltamoe_toy_qa --apply_chat_template")


@app.command("eval")
@_reports_errors
def eval_(
    model: Annotated[Path, typer.Argument(help="Checkpoint directory to evaluate.")],
    suite: Annotated[str, typer.Option(help="Evaluation suite (available: toy).")] = "toy",
    data: Annotated[
        Path | None, typer.Option(help="Toy world directory (default: found from the model's location or provenance).")
    ] = None,
    out: Annotated[Path | None, typer.Option(help="Where results.json goes (default: MODEL/eval/SUITE).")] = None,
    lang: Annotated[list[str] | None, typer.Option("--lang", help="Only these languages (repeatable).")] = None,
    qa: Annotated[bool, typer.Option("--qa/--no-qa", help="Chat QA (needs a chat template).")] = True,
    batch_size: Annotated[int, typer.Option(help="Prompts/texts per forward pass.")] = 16,
    max_items: Annotated[int | None, typer.Option(help="At most this many items per task and language.")] = None,
    quiet: Quiet = False,
) -> None:
    """Per language: chat QA accuracy, perplexity and (MoE) tokens per expert; writes results.json and prints a table."""
    from deltamoe.evaluate import evaluate, format_table

    results = evaluate(model, suite, data=data, out=out, languages=lang or None, qa=qa, batch_size=batch_size,
                       max_items=max_items, progress=not quiet)
    typer.echo(format_table(results))
    typer.echo(f"wrote {Path(results['out']) / 'results.json'}")


@app.command("run")
@_reports_errors
def run_(
    recipe: Annotated[Path, typer.Argument(help="Recipe YAML (see recipes/ and the README's recipe reference).")],
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Validate and print the plan: stages, cache hits, disk use.")] = False,
    quiet: Quiet = False,
) -> None:
    """Run a recipe: every stage in order (cached), then report.md, results.json and plots."""
    from deltamoe.pipeline.run import run_recipe

    run_recipe(recipe, dry_run=dry_run, progress=not quiet, log=typer.echo)


@app.command("study")
@_reports_errors
def study_(
    study: Annotated[Path, typer.Argument(help="Study YAML: a recipe, seeds and variants (docs/study.md).")],
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Validate every run and count the stages to run.")] = False,
    quiet: Quiet = False,
) -> None:
    """Run a recipe over several seeds and variants (one shared cache); report means, intervals, paired differences."""
    from deltamoe.study import run_study

    run_study(study, dry_run=dry_run, progress=not quiet, log=typer.echo)


@app.command()
@_reports_errors
def demo(
    workdir: Annotated[Path, typer.Option(help="Where the demo writes its models and report.")] = Path("deltamoe-demo"),
) -> None:
    """Build the toy world, run DeltaMoE and every baseline on it, print the result table (no downloads)."""
    from deltamoe.demo import run_demo

    run_demo(workdir, log=typer.echo)


data_app = typer.Typer(help="Training data: pre-tokenised packs for large corpora.", no_args_is_help=True)
app.add_typer(data_app, name="data")


@data_app.command("pack")
@_reports_errors
def data_pack(
    config: Annotated[Path, typer.Argument(help="Training config (YAML) whose data.sources to tokenise.")],
    out: Annotated[Path, typer.Argument(help="Output directory of the pack.")],
    workers: Annotated[int | None, typer.Option(help="Tokenising worker processes (default: CPU count).")] = None,
    tokenizer: Annotated[
        Path | None, typer.Option(help="Expected tokenizer (refused unless it is the model's).")
    ] = None,
    force: Force = False,
    quiet: Quiet = False,
) -> None:
    """Tokenise a training config's sources once into memory-mapped shards; point data.pack at OUT."""
    from deltamoe.train.pack import pack

    if workers is not None and workers < 1:
        raise typer.BadParameter("--workers must be at least 1")
    path = pack(config, out, workers=workers, tokenizer=tokenizer, force=force, progress=not quiet)
    typer.echo(f"wrote {path}")


@app.command("train")
@_reports_errors
def train_(
    config: Annotated[Path, typer.Argument(help="Training config (YAML): stage, model, output, data, train, losses...")],
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", help="Override a config field, repeatable: --set train.steps=100 --set losses.lpr=0.2."),
    ] = None,
    stop_after: Annotated[
        int | None, typer.Option(help="Stop after N steps, leaving a resumable checkpoint and no output.")
    ] = None,
    force: Force = False,
    quiet: Quiet = False,
) -> None:
    """Continue pre-training an upcycled MoE: stage post_pretrain (new experts + routers) or router_review
    (routers, language priors). Runs under torchrun / accelerate launch for multi-GPU."""
    import os

    from deltamoe.train.loop import train as run

    path = run(
        config,
        overrides=list(set_ or []),
        force=force,
        progress=False if quiet else None,
        stop_after=stop_after,
        command=["deltamoe", *sys.argv[1:]],
    )
    if os.environ.get("RANK", "0") == "0":
        if path is None:
            typer.echo(f"stopped after {stop_after} steps; run the same command again to resume")
        else:
            typer.echo(f"wrote {path}")


@app.callback(invoke_without_command=True)
def _root(
    version: Annotated[bool, typer.Option("--version", help="Print the version and exit.")] = False,
) -> None:
    if version:
        typer.echo(f"deltamoe {__version__}")
        raise typer.Exit()


def _terminate(signum: int, frame: Any) -> None:
    raise Terminated  # unwinds through the atomic-output cleanup


def main() -> None:
    signal.signal(signal.SIGTERM, _terminate)
    app()
