"""`coplctl benchmark / report / compare`: head-to-head runs from specs, paper tables, CI regressions."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from coplctl.cli.common import (Backbone, Force, Json, MaybeOut, Mode, Out, Sets, err, examples, out, parse_sets,
                                print_json)

app = typer.Typer()  # top-level commands: coplctl benchmark, report, compare


def _csv(value: Optional[str], option: str, cast=str, what: str = "names") -> Optional[list]:
    """A comma-separated option's items; an empty list or an item ``cast`` rejects is one CoplError."""
    from coplctl.core.errors import CoplError

    if value is None:
        return None
    items = [v.strip() for v in value.split(",") if v.strip()]
    if not items:
        raise CoplError(f"{option} expects comma-separated {what}, got {value!r}")
    try:
        return [cast(v) for v in items]
    except ValueError:
        raise CoplError(f"{option} expects comma-separated {what}, got {value!r}") from None


@app.command("benchmark", epilog=examples(
    "coplctl benchmark quick",
    "coplctl benchmark sim-uf-p-4-avg --seeds 0",
    "coplctl benchmark uf-p-4-avg --backbone gemma-7b-it --set batch_size=16",
    "accelerate launch --multi_gpu --num_processes 4 -m coplctl benchmark uf-p-4-avg --backbone gemma-7b-it",
    "coplctl benchmark uf-p-4-avg --backbone gemma-7b-it --dry-run",
    "coplctl benchmark --list",
    "coplctl benchmark quick --json | jq '.tables[0]'"))
def benchmark(
    spec: Annotated[Optional[str], typer.Argument(
        help="A spec name (benchmarks/NAME.yaml) or a path to a spec file.", show_default=False)] = None,
    backbone: Backbone = None,
    mode: Mode = None,
    methods: Annotated[Optional[str], typer.Option(
        "--methods", help="Comma-separated methods or ablation names to run (default: all of the spec's).")] = None,
    seeds: Annotated[Optional[str], typer.Option("--seeds", help="Comma-separated seeds (default: the spec's).")] = None,
    sets: Sets = None,
    out_dir: Out = Path("results"),
    list_specs: Annotated[bool, typer.Option("--list", help="List the available specs and exit.")] = False,
    force: Force = False,
    dry_run: Annotated[bool, typer.Option(
        "--dry-run", help="Print the plan (jobs, data, backbone, memory per process) and exit without training.")] = False,
    no_download: Annotated[bool, typer.Option(
        "--no-download", help="Never download or build a real spec's missing dataset: stop and say how to.")] = False,
    as_json: Json = False,
) -> None:
    """Run every method of a benchmark spec over its seeds, store results, print the tables.

    Results go under --out; --backbone, --mode and --set override the spec for every method (that has the field).
    Finished (method, seed) results are skipped, so an interrupted benchmark resumes where it stopped;
    --force redoes them. A real spec's missing dataset is built on first use from the hub datasets (the hub
    extra; its cache is reused), unless --no-download. --dry-run prints what would run instead. --json prints
    the results directory, the result files done and skipped, and the tables as data (as coplctl report
    --json); with --dry-run, the plan.
    """
    from coplctl.bench.spec import list_specs as all_specs
    from coplctl.bench.spec import load_spec

    if list_specs:
        specs = [load_spec(str(f)) for f in all_specs()]
        if as_json:
            print_json({s.name: s.description for s in specs})
            return
        width = max(len(s.name) for s in specs)
        for s in specs:
            out.print(f"{s.name:<{width}}  {s.description}", highlight=False, soft_wrap=True)
        return
    if spec is None:
        raise typer.BadParameter("name a benchmark spec (see coplctl benchmark --list)", param_hint="SPEC")
    from coplctl.bench.runner import run_benchmark
    from coplctl.core.atomic import refuse_inside_known

    refuse_inside_known(out_dir, itself=True)  # results never go into a run, a dataset or an export
    s = load_spec(spec)
    chosen = {"names": _csv(methods, "--methods"), "seeds": _csv(seeds, "--seeds", int, "whole numbers (e.g. 0,1,2)"),
              "backbone": backbone, "mode": mode, "sets": parse_sets(sets or []), "download": not no_download}
    if dry_run:
        from coplctl.bench.plan import plan
        from coplctl.cli.plan import print_plan

        from accelerate import PartialState

        p = plan(s, out_dir, force=force, **chosen)
        if PartialState().is_main_process:  # under accelerate launch: one plan, not one per process
            print_json(p) if as_json else print_plan(p)
        return
    summary = run_benchmark(s, out_dir, force=force, log=lambda m: err.print(m, highlight=False), **chosen)
    if summary["skipped"]:
        err.print(f"skipped {len(summary['skipped'])} finished run(s); --force redoes them")
    report = _report(out_dir / s.name, "md", None, as_json)
    if as_json:
        print_json({"results": str(out_dir / s.name), **summary, "tables": report["tables"]})
    err.print(f"results in {out_dir / s.name}. Next: coplctl report {out_dir} --out report/", highlight=False)


@app.command("report", epilog=examples("coplctl report results", "coplctl report results --format latex",
                                       "coplctl report results --out report/",
                                       "coplctl report results --json | jq '.tables[].title'"))
def report(
    results: Annotated[Path, typer.Argument(metavar="RESULTS", help="A results directory (or one result file).",
                                            show_default=False)],
    fmt: Annotated[str, typer.Option("--format", help="md, csv or latex (printed to stdout).")] = "md",
    out_path: MaybeOut = None,
    force: Annotated[bool, typer.Option("--force", help="Replace the files of an earlier report in --out.")] = False,
    as_json: Json = False,
) -> None:
    """Render the paper's tables (and the methods' figures) from stored results only.

    The tables are printed in --format; --out also writes every format, the figures (CoPL's Figure 2) and
    figure links into that directory. --json prints the tables as data instead (each cell's mean, std and per-seed values, in
    points) with the files --out wrote.
    """
    report = _report(results, fmt, out_path, as_json, force)
    if as_json:
        print_json({"results": str(results), **report})


@app.command("compare", epilog=examples("coplctl compare benchmarks/baselines/quick results/quick",
                                        "coplctl compare old/ new/ --tolerance 0.5",
                                        "coplctl compare old/ new/ --json | jq '.regressions'"))
def compare(
    baseline: Annotated[Path, typer.Argument(help="Baseline results.", show_default=False)],
    current: Annotated[Path, typer.Argument(help="Current results.", show_default=False)],
    tolerance: Annotated[float, typer.Option(
        "--tolerance", help="Allowed drop in accuracy points (or the baseline seeds' spread if larger).")] = 1.0,
    as_json: Json = False,
) -> None:
    """Exit non-zero when any metric dropped by more than the tolerance: the CI regression check.

    --json prints every metric compared, the regressed or missing ones, and whether the check failed (the exit
    code is the same).
    """
    from coplctl.bench.compare import compare as run_compare

    rows, failed = run_compare(str(baseline), str(current), tolerance)
    bad = [r for r in rows if r["status"] in ("regressed", "missing")]
    if as_json:
        print_json({"baseline": str(baseline), "current": str(current), "tolerance": tolerance, "failed": failed,
                    "rows": rows, "regressions": bad})
    else:
        _print_comparison(rows, f"{current} vs {baseline} (tolerance {tolerance} points)")
    if failed:
        err.print(f"{len(bad)} metric(s) regressed or went missing", style="red")
        raise typer.Exit(1)


def _print_comparison(rows: list[dict], title: str) -> None:
    """The compared metrics as a table on stdout, regressions in red."""
    from rich.table import Table

    t = Table(title=title)
    for col in ("benchmark", "method", "metric", "baseline", "current", "delta", "status"):
        t.add_column(col, justify="left" if col in ("benchmark", "method", "metric", "status") else "right")
    num = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
    for r in rows:
        style = {"regressed": "red", "missing": "red", "new": "cyan"}.get(r["status"])
        t.add_row(r["spec"], r["name"], r["metric"], num(r["baseline"]), num(r["current"]),
                  "-" if r["delta"] is None else f"{r['delta']:+.2f}", r["status"], style=style)
    out.print(t)


def _report(results: Path, fmt: str, out_dir: Optional[Path], as_json: bool = False, force: bool = False) -> dict:
    """Print the tables of the results in ``fmt`` (unless ``as_json``) and write the report to ``out_dir``;
    returns {"tables": the tables as data, "files": the files written}."""
    from coplctl.bench.results import load_results
    from coplctl.bench.tables import build_report, to_csv, to_latex, to_markdown
    from coplctl.core.atomic import atomic_write_text
    from coplctl.core.errors import CoplError

    render = {"md": to_markdown, "csv": to_csv, "latex": to_latex}
    if fmt not in render:
        raise CoplError(f"unknown format {fmt!r}; choose md, csv or latex")
    found = load_results(results)
    if not found:
        raise CoplError(f"no results under {results} (run coplctl benchmark first)")
    tables, own = build_report(found)
    if out_dir is not None:
        _check_report_out(out_dir, found, [f.name for f in own.figures], force)
    if not as_json:
        typer.echo("\n".join(render[fmt](t) for t in tables))
    report = {"tables": [_table_data(t) for t in tables], "files": []}
    if out_dir is None:
        return report
    for name, fn in render.items():
        report["files"].append(out_dir / f"tables.{'tex' if name == 'latex' else name}")
        atomic_write_text(report["files"][-1], "\n".join(fn(t) for t in tables))
    lines = []
    for figure in own.figures:
        figure.draw(out_dir / figure.name)
        report["files"].append(out_dir / figure.name)
        lines.append(f"![{figure.title}]({figure.name})")
    lines += own.links
    if lines:
        report["files"].append(out_dir / "figures.md")
        atomic_write_text(report["files"][-1], "\n".join(lines) + "\n")
    err.print(f"wrote {', '.join(str(f) for f in report['files'])}", highlight=False, soft_wrap=True)
    return report


def _table_data(t) -> dict:
    """A table as JSON-able data: each cell's mean, std and per-seed values (points) and whether it is the best."""
    cell = lambda c: None if c is None else {"mean": c.mean, "std": c.std, "values": c.values,  # noqa: E731
                                             "best": c.bold}
    return {"key": t.key, "title": t.title, "columns": t.columns, "notes": t.notes,
            "rows": [{"row": label, "cells": dict(zip(t.columns, map(cell, cells)))} for label, cells in t.rows]}


def _check_report_out(out_dir: Path, found: list[dict], figures: list[str], force: bool) -> None:
    """``report --out`` is a directory that can be made, and none of the report's files is a results file."""
    from coplctl.core.atomic import check_file_output, refuse_inside_known
    from coplctl.core.errors import CoplError

    refuse_inside_known(out_dir, itself=True)
    if out_dir.exists() and not out_dir.is_dir():
        raise CoplError(f"--out {out_dir} is a file; name a directory for the report")
    inputs = {Path(r["_file"]).resolve() for r in found}
    for name in ("tables.md", "tables.csv", "tables.tex", "figures.md", *figures):
        if (out_dir / name).resolve() in inputs:
            raise CoplError(f"--out {out_dir} would replace the results file {out_dir / name}; choose another --out")
        check_file_output(out_dir / name, force=force, option="--out")  # an earlier report: --force
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CoplError(f"cannot create --out {out_dir} ({e.strerror or e}); choose another directory") from None
