"""`coplctl plot ...`: the paper's figures as PNG files."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from coplctl.cli.common import Force, Json, MaybeOut, Seed, err, examples, print_json
from coplctl.cli.common import out as stdout

app = typer.Typer(name="plot", help="Draw the paper's figures (PNG).", no_args_is_help=True,
                  epilog=examples("coplctl plot embeddings runs/gcf --adapted runs/new_users",
                                  "coplctl plot experts runs/copl"))


@app.command("embeddings", epilog=examples(
    "coplctl plot embeddings runs/gcf",
    "coplctl plot embeddings runs/gcf --adapted runs/new_users --out figures/tsne.png",
    "coplctl plot embeddings runs/gcf --json | jq -r .path"))
def embeddings(
    run: Annotated[Path, typer.Argument(metavar="RUN", help="A trained run (coplctl graph train).", show_default=False)],
    adapted: Annotated[Optional[Path], typer.Option(
        "--adapted", help="Output of coplctl adapt: drawn with black edges (paper Figure 4).")] = None,
    out: MaybeOut = None,
    max_users: Annotated[int, typer.Option("--max-users", min=10, help="Seen users drawn (random sample).")] = 3000,
    seed: Seed = 0,
    force: Force = False,
    as_json: Json = False,
) -> None:
    """t-SNE of user embeddings coloured by preference group (paper Figures 1 and 4).

    The figure is written to the PNG file --out (default: RUN-NAME-embeddings.png in the current directory;
    never inside a run or dataset); --json prints its path and the users and groups drawn.
    """
    from coplctl.copl.figures import plot_embeddings

    path = _png(out or Path(f"{run.resolve().name}-embeddings.png"), force, {"the run": run, "the --adapted run": adapted})
    with err.status("running t-SNE ..."):
        info = plot_embeddings(run, path, adapted=adapted, max_users=max_users, seed=seed)
    err.print(f"wrote {info['path']} ({info['seen']} seen, {info['adapted']} adapted users)", highlight=False)
    if as_json:
        print_json(info)


@app.command("experts", epilog=examples("coplctl plot experts runs/copl",
                                        "coplctl plot experts runs/copl --layer 2 --layer 3 --out fig3.png",
                                        "coplctl plot experts runs/copl --json | jq .routing"))
def experts(
    run: Annotated[Path, typer.Argument(metavar="RUN", help="A CoPL run (coplctl train copl).", show_default=False)],
    layer: Annotated[Optional[list[int]], typer.Option(
        "--layer", help="Index of a MoLE layer to draw (repeatable; default: all).")] = None,
    out: MaybeOut = None,
    force: Force = False,
    as_json: Json = False,
) -> None:
    """Which expert each group's users route to, per MoLE layer (paper Figure 3), with each layer's
    group-expert mutual information; prints per-layer top share and MI, and flags collapsed layers.

    The figure is written to the PNG file --out (default: RUN-NAME-experts.png in the current directory; never
    inside a run or dataset); --json prints its path, the experts in use and the routing statistics per layer.
    """
    from coplctl.copl.figures import plot_experts

    info = plot_experts(run, _png(out or Path(f"{run.resolve().name}-experts.png"), force, {"the run": run}),
                        layers=layer)
    if as_json:
        print_json(info)
    else:
        _print(info, run)
    collapsed = [n for n, s in info["routing"].items() if s["collapsed"]]
    if collapsed:
        err.print(f"warning: {len(collapsed)} MoLE layer(s) route (nearly) all users to one expert: "
                  + ", ".join(collapsed), style="yellow", highlight=False, soft_wrap=True)
    err.print(f"wrote {info['path']} ({info['layers']} layers); experts in use per layer: "
              + "; ".join(f"{n}: {e}" for n, e in info["experts_used"].items()), highlight=False, soft_wrap=True)


def _png(out: Path, force: bool, inputs: dict) -> Path:
    """The figure's path under the output rule (:func:`coplctl.core.atomic.check_file_output`)."""
    from coplctl.core.atomic import check_file_output
    from coplctl.core.errors import CoplError

    path = check_file_output(out, force=force, inputs=inputs, option="--out")
    if path is None:
        raise CoplError("--out: a figure is a PNG file; give its path, not standard output")
    return path


def _print(info: dict, run: Path) -> None:
    """Each layer's routing as a table row on stdout."""
    from rich.table import Table

    from coplctl.copl.mole import COLLAPSE_SHARE

    t = Table(title=f"Top-1 routing of {run}'s users per MoLE layer",
              caption=f"MI: mutual information of group and expert (bits; % of H(group)); "
                      f"collapsed: one expert for >= {100 * COLLAPSE_SHARE:.0f}% of users")
    for col in ("layer", "top expert", "top share", "MI (bits)", "MI / H(group)", "collapsed"):
        t.add_column(col, justify="left" if col == "layer" else "right")
    for name, s in info["routing"].items():
        mi, nmi = s["mutual_information"], s["normalized_mi"]
        t.add_row(name, str(s["top_expert"]), f"{100 * s['top_share']:.1f}%", "-" if mi is None else f"{mi:.3f}",
                  "-" if nmi is None else f"{100 * nmi:.1f}%", "[red]yes[/red]" if s["collapsed"] else "no")
    stdout.print(t)
