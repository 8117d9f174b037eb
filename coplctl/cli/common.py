"""Pieces shared by every command module: consoles, examples in help, shared options."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

#: Tables and results go to stdout; logs, progress and errors to stderr.
out = Console()
err = Console(stderr=True)


def examples(*lines: str) -> str:
    """A help epilog listing example command lines."""
    body = "\n\n".join(f"  $ {line}" for line in lines)
    return f"[bold]Examples[/bold]\n\n{body}"


Seed = Annotated[int, typer.Option("--seed", help="Random seed; the same seed gives the same numbers.")]
Force = Annotated[bool, typer.Option("--force", help="Replace the output if it already exists.")]
Json = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON instead of tables.")]
DataDir = Annotated[Path, typer.Argument(metavar="DIR", help="Dataset directory (responses/users/pairs .parquet + meta.json).",
                                         show_default=False)]
