"""`coplctl plot ...`: the paper's figures as PNG files."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from coplctl.cli.common import Seed, err, examples

app = typer.Typer(help="Draw the paper's figures (PNG).", no_args_is_help=True,
                  epilog=examples("coplctl plot embeddings runs/gcf --adapted runs/new_users",
                                  "coplctl plot experts runs/copl"))


@app.command("embeddings", epilog=examples(
    "coplctl plot embeddings runs/gcf",
    "coplctl plot embeddings runs/gcf --adapted runs/new_users --out figures/tsne.png"))
def embeddings(
    run: Annotated[Path, typer.Argument(metavar="RUN", help="A trained run (coplctl graph train).", show_default=False)],
    adapted: Annotated[Optional[Path], typer.Option(
        "--adapted", help="Output of coplctl adapt: drawn with black edges (paper Figure 4).")] = None,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", show_default="RUN/embeddings.png",
                                                help="PNG to write.")] = None,
    max_users: Annotated[int, typer.Option("--max-users", min=10, help="Seen users drawn (random sample).")] = 3000,
    seed: Seed = 0,
) -> None:
    """t-SNE of user embeddings coloured by preference group (paper Figures 1 and 4)."""
    from coplctl.bench.plots import plot_embeddings

    with err.status("running t-SNE ..."):
        info = plot_embeddings(run, out or run / "embeddings.png", adapted=adapted, max_users=max_users, seed=seed)
    err.print(f"wrote {info['path']} ({info['seen']} seen, {info['adapted']} adapted users)", highlight=False)


@app.command("experts", epilog=examples("coplctl plot experts runs/copl",
                                        "coplctl plot experts runs/copl --layer 2 --layer 3 --out fig3.png"))
def experts(
    run: Annotated[Path, typer.Argument(metavar="RUN", help="A CoPL run (coplctl train copl).", show_default=False)],
    layer: Annotated[Optional[list[int]], typer.Option(
        "--layer", help="Index of a MoLE layer to draw (repeatable; default: all).")] = None,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", show_default="RUN/experts.png",
                                                help="PNG to write.")] = None,
) -> None:
    """Which expert each group's users route to, per MoLE layer (paper Figure 3)."""
    from coplctl.bench.plots import plot_experts

    info = plot_experts(run, out or run / "experts.png", layers=layer)
    err.print(f"wrote {info['path']} ({info['layers']} layers); experts in use per layer: "
              + "; ".join(f"{n}: {e}" for n, e in info["experts_used"].items()), highlight=False, soft_wrap=True)
