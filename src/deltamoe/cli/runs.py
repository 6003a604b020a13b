"""The commands that build, train, run and evaluate: toy, data pack, train, eval, run, study, demo."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from deltamoe.cli.common import (
    Force,
    Quiet,
    ToySizeChoice,
    reports_errors,
)


@reports_errors
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


@reports_errors
def toy_measure(
    toy_dir: Annotated[Path, typer.Argument(help="A directory written by 'deltamoe toy build'.")],
    quiet: Quiet = False,
) -> None:
    """Measure the toy regime (tokens per parameter, loss curve, B and P scores, size of P - B) into toy.json."""
    from deltamoe.toy.regime import measure, format_regime

    typer.echo(format_regime(measure(toy_dir, progress=not quiet)))


@reports_errors
def toy_ship(
    toy_dir: Annotated[Path, typer.Argument(help="A trained build ('deltamoe toy build --train'), measured.")],
) -> None:
    """Copy a trained build's models, tokenizer and manifest into the package (deltamoe/_data/toy/)."""
    from deltamoe.toy.shipped import ship

    typer.echo(f"shipped set written to {ship(toy_dir)}")


@reports_errors
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


@reports_errors
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


@reports_errors
def run_(
    recipe: Annotated[Path, typer.Argument(help="Recipe YAML (see recipes/ and the README's recipe reference).")],
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Validate and print the plan: stages, cache hits, disk use.")] = False,
    quiet: Quiet = False,
) -> None:
    """Run a recipe: every stage in order (cached), then report.md, results.json and plots."""
    from deltamoe.pipeline.run import run_recipe

    run_recipe(recipe, dry_run=dry_run, progress=not quiet, log=typer.echo)


@reports_errors
def study_(
    study: Annotated[Path, typer.Argument(help="Study YAML: a recipe, seeds and variants (docs/study.md).")],
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Validate every run and count the stages to run.")] = False,
    quiet: Quiet = False,
) -> None:
    """Run a recipe over several seeds and variants (one shared cache); report means, intervals, paired differences."""
    from deltamoe.study import run_study

    run_study(study, dry_run=dry_run, progress=not quiet, log=typer.echo)


@reports_errors
def demo(
    workdir: Annotated[Path, typer.Option(help="Where the demo writes its models and report.")] = Path("deltamoe-demo"),
) -> None:
    """Build the toy world, run DeltaMoE and every baseline on it, print the result table (no downloads)."""
    from deltamoe.demo import run_demo

    run_demo(workdir, log=typer.echo)


@reports_errors
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


@reports_errors
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
