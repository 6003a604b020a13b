"""What every command shares: the error-to-exit-code wrapper, the options declared once, sizes and choices.

Only this module turns exceptions into exit codes: 1 for a problem with the input, the output or a
resource such as free disk (one ``error:`` line that says what to fix, never a traceback), 130 for
Ctrl-C and 143 for SIGTERM.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from enum import Enum
from typing import Annotated, Any, TypeVar

import typer

from deltamoe.choices import METHODS, NEW_ROWS, OUTPUT_DTYPES, RESCALES, ROUTER_INITS
from deltamoe.filehash import abandon

F = TypeVar("F", bound=Callable[..., Any])

# Options every writing command shares, declared once
Force = Annotated[bool, typer.Option("--force", help="Replace the output if it exists (or holds something else).")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress output.")]
ShardSize = Annotated[str, typer.Option(help="Maximum shard size, e.g. 5GB.")]


def reports_errors(fn: F) -> F:
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
        finally:
            abandon()  # inputs hashed ahead that the command did not take over (it failed first)

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


def choice(name: str, values: tuple[str, ...]) -> Any:
    """A command-line choice type built from a library constant."""
    return Enum(name, {v: v for v in values}, type=str)


RouterInitChoice = choice("RouterInitChoice", ROUTER_INITS)
DtypeChoice = choice("DtypeChoice", OUTPUT_DTYPES)
NewRowsChoice = choice("NewRowsChoice", NEW_ROWS)
MergeMethodChoice = choice("MergeMethodChoice", METHODS)
RescaleChoice = choice("RescaleChoice", RESCALES)
NEW_ROWS_HELP = "Vocabulary rows P has and B lacks: P's values (post), the mean of the other rows, or error."


def _toy_sizes() -> type[Enum]:
    from deltamoe.toy.config import SIZES

    return choice("ToySizeChoice", tuple(SIZES))  # type: ignore[no-any-return]


ToySizeChoice = _toy_sizes()
