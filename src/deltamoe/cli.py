"""The ``deltamoe`` command line: each command parses, validates and calls one library function.

Only this module turns exceptions into exit codes: 1 for a problem with the input (the message
says what to fix), 130 for an interruption.
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

app = typer.Typer(
    name="deltamoe",
    help="Add languages to an LLM: upcycle to MoE, train the new experts, graft the post-training delta.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

F = TypeVar("F", bound=Callable[..., Any])


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
        except KeyboardInterrupt:
            typer.echo("interrupted; no output was written", err=True)
            raise typer.Exit(130) from None

    return wrapper  # type: ignore[return-value]


def parse_size(text: str) -> int:
    """'5GB', '500MB', '2GiB' or a plain byte count."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?)B?\s*", text, re.IGNORECASE)
    if not m:
        raise typer.BadParameter(f"cannot parse size {text!r}; use e.g. 5GB, 500MB or 1000000")
    base = 1024 if m[3] else 1000
    power = " KMGT".index(m[2].upper() or " ")
    return int(float(m[1]) * base**power)


class RouterInitChoice(str, Enum):
    random = "random"
    zero = "zero"


class DtypeChoice(str, Enum):
    auto = "auto"
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"


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
    shard_size: Annotated[str, typer.Option(help="Maximum shard size, e.g. 5GB.")] = "5GB",
    force: Annotated[bool, typer.Option("--force", help="Replace OUT if it exists.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
) -> None:
    """Upcycle a dense model into a Mixture-of-Experts whose expert 0 is the original FFN."""
    from deltamoe.upcycle import parse_allocation
    from deltamoe.upcycle import upcycle as run

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
def archs() -> None:
    """List the supported dense families and the MoE architecture each becomes."""
    from deltamoe.arch import families

    for spec in families():
        typer.echo(f"{', '.join(spec.dense_model_types):16} -> {spec.moe_architecture:22} {spec.description}")


@app.callback(invoke_without_command=True)
def _root(
    version: Annotated[bool, typer.Option("--version", help="Print the version and exit.")] = False,
) -> None:
    if version:
        typer.echo(f"deltamoe {__version__}")
        raise typer.Exit()


def _terminate(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt  # unwinds through the atomic-output cleanup


def main() -> None:
    signal.signal(signal.SIGTERM, _terminate)
    app()
