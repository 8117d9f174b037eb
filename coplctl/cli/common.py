"""Pieces shared by every command module: consoles, examples in help, shared options."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from coplctl.progress import stderr_console

#: Tables and results go to stdout; logs, progress and errors to stderr.
out = Console()
err = stderr_console()


def examples(*lines: str) -> str:
    """A help epilog listing example command lines."""
    body = "\n\n".join(f"  $ {line}" for line in lines)
    return f"[bold]Examples[/bold]\n\n{body}"


Seed = Annotated[int, typer.Option("--seed", min=0, max=2**32 - 1,
                                    help="Random seed; the same seed gives the same numbers.")]
Force = Annotated[bool, typer.Option("--force", help="Replace the output if it already exists.")]
Json = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON instead of tables.")]
DataDir = Annotated[Path, typer.Argument(metavar="DIR", help="Dataset directory (responses/users/pairs .parquet + meta.json).",
                                         show_default=False)]


def parse_sets(sets: list[str]) -> dict:
    """``key=value`` options; values are read as YAML (numbers, true/false, lists, mappings)."""
    import yaml

    from coplctl.errors import CoplError

    result = {}
    for item in sets:
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise CoplError(f"--set expects key=value, got {item!r}")
        if not value.strip():
            raise CoplError(f"--set {key.strip()}: empty value (write {key.strip()}=null for none)")
        try:
            result[key.strip().replace("-", "_")] = yaml.safe_load(value)
        except (yaml.YAMLError, RecursionError) as e:
            raise CoplError(f"--set {key.strip()}: invalid value ({' '.join(str(e).split())[:160]})") from None
    return result
