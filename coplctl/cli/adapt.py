"""`coplctl adapt`: place new users from a few annotations (CoPL §4.3), in a graph run or a model run."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from coplctl.cli.common import Force, Json, MaybeData, Out, err, examples, out, print_json
from coplctl.copl import ADAPTATIONS

app = typer.Typer()  # top-level command: coplctl adapt

Method = Enum("Method", {m: m for m in ADAPTATIONS}, type=str)


@app.command("adapt", epilog=examples(
    "coplctl adapt --model runs/gcf --user-file new_users.jsonl --out runs/new_users",
    "coplctl adapt --model runs/copl --user-file new_users.jsonl --out runs/copl-plus   # then coplctl score",
    "coplctl adapt --model runs/copl --user-file new_users.jsonl --out runs/copl-graph --in-graph-only",
    "coplctl adapt --model runs/gcf --user-file new_users.jsonl --out runs/naive --method average",
    "coplctl adapt --model runs/gcf --user-file messy.jsonl --out runs/new --skip-invalid",
    "coplctl adapt --model runs/gcf --data data/sim-uf-p-4-avg --out runs/unseen",
    "coplctl adapt --model runs/gcf --data data/sim-uf-p-4-avg --out runs/unseen --json | jq .held_out_graph_accuracy"))
def adapt(
    model: Annotated[Path, typer.Option(
        "--model", "-m", show_default=False,
        help="A graph run (coplctl graph train) or a reward-model run (coplctl train).")],
    out_dir: Out,
    user_file: Annotated[Optional[Path], typer.Option(
        "--user-file", "-u", show_default=False,
        help='JSONL, one annotation per line: {"user": ..., "chosen": id or text, "rejected": id or text, '
             '"prompt": ...}; both responses answer one prompt, and users are new to the run. For a reward-model '
             'run a text it does not know, with "prompt", is a new response.')]
    = None,
    data: MaybeData = None,
    method: Annotated[Optional[Method], typer.Option(
        "--method", show_default="weighted",
        help="Graph runs: weighted (CoPL), average (naive k-hop mean) or optimize (fit a free embedding).")]
    = None,
    hops: Annotated[Optional[int], typer.Option(
        "--hops", show_default="2", help="Graph runs: k, an even number of hops (paper: 2).")] = None,
    temperature: Annotated[Optional[float], typer.Option(
        "--temperature", show_default="0.07", help="Graph runs: κ (paper: 0.07).")] = None,
    in_graph_only: Annotated[bool, typer.Option(
        "--in-graph-only",
        help="Reward-model runs: refuse new response texts, and have CoPL use only pairs over its graph's "
             "responses (no nearest-neighbour placement), as the paper does. Graph runs always do.")] = False,
    skip_invalid: Annotated[bool, typer.Option(
        "--skip-invalid", help="Skip bad lines and users without a usable pair, and report them.")] = False,
    force: Force = False,
    as_json: Json = False,
) -> None:
    """Place new users from a few annotations, in a graph run or a reward-model run.

    The annotations come from --user-file, or --data adapts a dataset's unseen users from their fewshot pairs
    (for a graph run, also reporting accuracy on their held-out valid pairs). A reward-model run scores any
    response with its backbone, so a user file may give responses it has never seen (by text, with "prompt");
    CoPL places each at its nearest graph responses (beyond the paper; --in-graph-only: not).
    A graph run gives the directory --out with embeddings.safetensors and summary.json; a reward-model run
    gives a new run --out that scores the new users too (coplctl score OUT --user ...). --json prints the
    summary written to OUT/summary.json.
    """
    from coplctl.copl.adapt import AdaptConfig
    from coplctl.core.atomic import check_output, refuse_overlap
    from coplctl.core.errors import CoplError
    from coplctl.serving.adapt_run import KIND, MARKER, adapt_graph_run, adapt_model_run

    if (user_file is None) == (data is None):
        raise CoplError("give exactly one of --user-file and --data")
    refuse_overlap(out_dir, {"the model run": model, "the user file": user_file, "the dataset": data})
    if not model.is_dir():  # worded as load_method words it for the other commands
        raise CoplError(f"--model {model} is not a run directory" + ("" if model.exists() else
                                                                     " (it does not exist)"))
    check_output(out_dir, force=force, marker=MARKER, kind=KIND)
    graph = not (model / "method.json").exists()
    if not graph and (method, hops, temperature) != (None, None, None):
        raise CoplError("--method, --hops and --temperature apply to graph runs; a model run adapts as its "
                        "method's config says (e.g. CoPL's adaptation, hops, temperature)")
    source = dict(user_file=user_file, data=data, skip_invalid=skip_invalid, force=force)
    if graph:
        options = {"method": method.value if method else None, "hops": hops, "temperature": temperature}
        cfg = AdaptConfig(**{k: v for k, v in options.items() if v is not None})
        summary = adapt_graph_run(model, out_dir, cfg, **source)
    else:
        summary = adapt_model_run(model, out_dir, in_graph_only=in_graph_only, **source)
    if as_json:
        print_json(summary)
    else:
        _print(summary, graph)
    _print_skipped(summary, user_file)
    err.print(f"wrote {out_dir}", highlight=False, soft_wrap=True)


def _print(summary: dict, graph: bool) -> None:
    """The summary's counts as a one-row table on stdout."""
    from rich.table import Table

    row = {"users": summary.get("users"), "pairs": summary.get("pairs")}
    if "pairs_placed" in summary:
        row["placed"] = summary["pairs_placed"]
    row["unusable"] = summary["pairs_unusable"] + summary.get("pairs_outside_graph", 0)
    row["skipped users"] = len(summary["skipped_users"])
    if graph:
        row["fallback"] = summary["fallback_users"]
        if "held_out_graph_accuracy" in summary:
            row["held-out acc"] = f"{100 * summary['held_out_graph_accuracy']:.2f}"
    t = Table(title=f"Adapted {summary['users']} users ({summary.get('method', '')})")
    for col in row:
        t.add_column(col, justify="right")
    t.add_row(*(str(v) for v in row.values()))
    out.print(t)


def _print_skipped(summary: dict, user_file: Optional[Path]) -> None:
    """The first skipped lines and users, on stderr."""
    for s in summary["skipped_lines"][:10]:
        err.print(f"skipped {user_file} line {s['line']}: {s['reason']}", highlight=False)
    if len(summary["skipped_lines"]) > 10:
        err.print(f"... and {len(summary['skipped_lines']) - 10} more skipped lines (see summary.json)")
    for s in summary["skipped_users"][:10]:
        err.print(f"skipped user {s['user']!r}: {s['reason']}", highlight=False)
    if len(summary["skipped_users"]) > 10:
        err.print(f"... and {len(summary['skipped_users']) - 10} more skipped users (see summary.json)")
