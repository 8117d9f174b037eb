"""Pieces shared by every command module: consoles, examples in help, shared options."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from coplctl.core.progress import stderr_console

#: Tables and results go to stdout; logs, progress and errors to stderr.
out = Console()
err = stderr_console()


def examples(*lines: str) -> str:
    """A help epilog listing example command lines."""
    body = "\n\n".join(f"  $ {line}" for line in lines)
    return f"[bold]Examples[/bold]\n\n{body}"


# Options and arguments that several commands take, spelled and explained once. A command gives its own
# default in its signature (``seed: Seed = 0``), and a computed one in its docstring.
_DATA = typer.Option("--data", "-d", show_default=False, help="Dataset directory (coplctl data simulate / build-ufp).")
Data = Annotated[Path, _DATA]
MaybeData = Annotated[Optional[Path], _DATA]
DataDir = Annotated[Path, typer.Argument(metavar="DIR", help="Dataset directory (responses/users/pairs .parquet + meta.json).",
                                         show_default=False)]
_OUT = typer.Option("--out", "-o", help="Where to write the output (see the description above).")
Out = Annotated[Path, _OUT]
MaybeOut = Annotated[Optional[Path], _OUT]
Backbone = Annotated[Optional[str], typer.Option(
    "--backbone", "-b", show_default=False,
    help="minilm, gemma-3-270m, gemma-2b-it, gemma-7b-it, or a hub id / local path. Default: minilm; "
         "benchmark: the spec's.")]
Mode = Annotated[Optional[str], typer.Option(  # checked with the config, as a spec's mode is
    "--mode", metavar="<frozen|lora>", show_default=False,
    help="frozen: cached features + small trunk (CPU); lora: adapters in the LM (the paper's). Default: frozen; "
         "benchmark: the spec's.")]
Epochs = Annotated[Optional[int], typer.Option("--epochs", min=1, help="Maximum training epochs.")]
Lr = Annotated[Optional[float], typer.Option("--lr", help="Learning rate.")]
Sets = Annotated[Optional[list[str]], typer.Option(
    "--set", help="Any config field, key=value (repeatable), e.g. --set epochs=4 --set l2=0.")]
Seed = Annotated[int, typer.Option("--seed", min=0, max=2**32 - 1,
                                    help="Random seed; the same seed gives the same numbers.")]
Force = Annotated[bool, typer.Option("--force", help="Replace the output if it already exists.")]
Json = Annotated[bool, typer.Option(
    "--json", help="Print the result as one JSON document on stdout instead of tables (logs stay on stderr).")]
ReportTo = Annotated[str, typer.Option(
    "--report-to", metavar="<none|tensorboard|wandb>",
    help="Experiment tracker for the training loss, learning rate and validation accuracy (needs the tracker's "
         "package: pip install 'coplctl\\[tensorboard]'). TensorBoard event files end up in the run's logs/ folder.")]
RewardRun = Annotated[Path, typer.Argument(metavar="RUN", help="A run from coplctl train.", show_default=False)]


def print_json(result) -> None:
    """A command's result as one JSON document on stdout (``--json``): non-finite numbers become null, so that
    strict parsers (jq) read it; anything else JSON lacks (paths) is written as its string."""
    typer.echo(json.dumps(_finite(result), indent=2, default=str))


def _finite(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def parse_sets(sets: list[str]) -> dict:
    """``key=value`` options; values are read as YAML (numbers, true/false, lists, mappings)."""
    import yaml

    from coplctl.core.errors import CoplError
    from coplctl.core.files import load_yaml, yaml_numbers

    result = {}
    for item in sets:
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise CoplError(f"--set expects key=value, got {item!r}")
        if not value.strip():
            raise CoplError(f"--set {key.strip()}: empty value (write {key.strip()}=null for none)")
        try:
            result[key.strip().replace("-", "_")] = yaml_numbers(load_yaml(value))
        except (yaml.YAMLError, RecursionError) as e:
            raise CoplError(f"--set {key.strip()}: invalid value ({' '.join(str(e).split())[:160]})") from None
    return result
