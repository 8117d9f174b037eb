"""`coplctl methods`: list registered reward methods (reads sources, imports no model code)."""

from __future__ import annotations

import typer

from coplctl.cli.common import Json, examples, out, print_json

app = typer.Typer()  # top-level command: coplctl methods


@app.command("methods", epilog=examples("coplctl methods", "coplctl methods --json"))
def methods(as_json: Json = False) -> None:
    """List the registered reward methods with a one-line description each."""
    from rich.table import Table
    from rich.text import Text

    from coplctl.core.registry import METHODS

    rows = METHODS.describe()
    if as_json:
        print_json(dict(rows))
        return
    if not rows:
        out.print("no methods are registered")
        return
    table = Table("method", "description", title="Registered reward methods")
    for name, desc in rows:
        table.add_row(name, Text(desc))  # descriptions are plain text, not rich markup
    out.print(table)
