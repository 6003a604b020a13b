"""The ``deltamoe`` command line: each command parses, validates and calls one library function.

Only :func:`deltamoe.cli.common.reports_errors` turns exceptions into exit codes: 1 for a problem with
the input, the output or a resource such as free disk (one ``error:`` line that says what to fix, never
a traceback), 130 for Ctrl-C and 143 for SIGTERM. The commands live in :mod:`~deltamoe.cli.weights`
and :mod:`~deltamoe.cli.runs`; this module builds the command tree from them, in the order of ``--help``.
"""

from __future__ import annotations

import signal
from typing import Annotated, Any

import typer

from deltamoe import __version__
from deltamoe.cli import runs, weights
from deltamoe.cli.common import Terminated, parse_size

__all__ = ["app", "main", "parse_size"]

app = typer.Typer(
    name="deltamoe",
    help="Add languages to an LLM: upcycle to MoE, train the new experts, graft the post-training delta.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

delta_app = typer.Typer(help="The post-training delta P - B as a reusable artifact.", no_args_is_help=True)
toy_app = typer.Typer(help="The toy multilingual world: corpora, tokenizer, small base and instruct models.",
                      no_args_is_help=True)
data_app = typer.Typer(help="Training data: pre-tokenised packs for large corpora.", no_args_is_help=True)

app.command()(weights.upcycle)
app.command()(weights.expand)
app.command()(weights.archs)
app.command()(weights.graft)
app.command()(weights.merge)
app.command("inspect")(weights.inspect_)
app.add_typer(delta_app, name="delta")
delta_app.command("extract")(weights.delta_extract)
app.add_typer(toy_app, name="toy")
toy_app.command("build")(runs.toy_build)
toy_app.command("measure")(runs.toy_measure)
toy_app.command("ship")(runs.toy_ship)
toy_app.command("export-lm-eval")(runs.toy_export_lm_eval)
app.command("eval")(runs.eval_)
app.command("run")(runs.run_)
app.command("study")(runs.study_)
app.command()(runs.demo)
app.add_typer(data_app, name="data")
data_app.command("pack")(runs.data_pack)
app.command("train")(runs.train_)


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
