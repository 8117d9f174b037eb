"""`coplctl adapt`: place new users from a few annotations (CoPL §4.3), in a graph run or a model run."""

from __future__ import annotations

import json
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from coplctl.config import ADAPTATIONS
from coplctl.cli.common import Force, err, examples, out


Method = Enum("Method", {m: m for m in ADAPTATIONS}, type=str)


def register(app: typer.Typer) -> None:
    @app.command("adapt", epilog=examples(
        "coplctl adapt --model runs/gcf --user-file new_users.jsonl --out runs/new_users",
        "coplctl adapt --model runs/copl --user-file new_users.jsonl --out runs/copl-plus   # then coplctl score",
        "coplctl adapt --model runs/gcf --user-file new_users.jsonl --out runs/naive --method average",
        "coplctl adapt --model runs/gcf --user-file messy.jsonl --out runs/new --skip-invalid",
        "coplctl adapt --model runs/gcf --data data/sim-uf-p-4-avg --out runs/unseen"))
    def adapt(
        model: Annotated[Path, typer.Option(
            "--model", "-m", show_default=False,
            help="A graph run (coplctl graph train) or a reward-model run (coplctl train).")],
        out_dir: Annotated[Path, typer.Option("--out", "-o", help="Output directory.", show_default=False)],
        user_file: Annotated[Optional[Path], typer.Option(
            "--user-file", "-u", show_default=False,
            help='JSONL, one annotation per line: {"user": ..., "chosen": id or text, "rejected": id or text}; '
                 'both responses answer one prompt, and users are new to the run.')]
        = None,
        data: Annotated[Optional[Path], typer.Option(
            "--data", "-d", show_default=False,
            help="Instead of a user file: adapt a dataset's unseen users from their fewshot pairs (and, for a "
                 "graph run, report accuracy on their held-out valid pairs).")] = None,
        method: Annotated[Optional[Method], typer.Option(
            "--method", show_default="weighted",
            help="Graph runs: weighted (CoPL), average (naive k-hop mean) or optimize (fit a free embedding).")]
        = None,
        hops: Annotated[Optional[int], typer.Option(
            "--hops", show_default="2", help="Graph runs: k, an even number of hops (paper: 2).")] = None,
        temperature: Annotated[Optional[float], typer.Option(
            "--temperature", show_default="0.07", help="Graph runs: κ (paper: 0.07).")] = None,
        skip_invalid: Annotated[bool, typer.Option(
            "--skip-invalid", help="Skip bad lines and users without a usable pair, and report them.")] = False,
        force: Force = False,
    ) -> None:
        """Place new users from a few annotations, in a graph run or a reward-model run.

        A graph run gives embeddings.safetensors and summary.json; a reward-model run gives a new run
        that scores the new users too (coplctl score OUT --user ...).
        """
        from coplctl.atomic import check_output, refuse_overlap
        from coplctl.errors import CoplError

        if (user_file is None) == (data is None):
            raise CoplError("give exactly one of --user-file and --data")
        refuse_overlap(out_dir, {"the model run": model, "the user file": user_file, "the dataset": data})
        if not model.is_dir():  # worded as load_method words it for the other commands
            raise CoplError(f"--model {model} is not a run directory" + ("" if model.exists() else
                                                                         " (it does not exist)"))
        check_output(out_dir, force=force, marker="summary.json", kind="coplctl adapt output")
        if (model / "method.json").exists():
            if (method, hops, temperature) != (None, None, None):
                raise CoplError("--method, --hops and --temperature apply to graph runs; a model run adapts as its "
                                "method's config says (e.g. CoPL's adaptation, hops, temperature)")
            summary, lines = _adapt_model_run(model, out_dir, user_file, data, skip_invalid, force)
        else:
            summary, lines = _adapt_graph_run(model, out_dir, user_file, data, skip_invalid, force,
                                              method or Method.weighted, hops, temperature)
        from rich.table import Table

        t = Table(title=f"Adapted {summary['users']} users ({summary.get('method', '')})")
        for col in lines:
            t.add_column(col, justify="right")
        t.add_row(*(str(v) for v in lines.values()))
        out.print(t)
        for s in summary["skipped_lines"][:10]:
            err.print(f"skipped {user_file} line {s['line']}: {s['reason']}", highlight=False)
        if len(summary["skipped_lines"]) > 10:
            err.print(f"... and {len(summary['skipped_lines']) - 10} more skipped lines (see summary.json)")
        for s in summary["skipped_users"][:10]:
            err.print(f"skipped user {s['user']!r}: {s['reason']}", highlight=False)
        if len(summary["skipped_users"]) > 10:
            err.print(f"... and {len(summary['skipped_users']) - 10} more skipped users (see summary.json)")
        err.print(f"wrote {out_dir}", highlight=False, soft_wrap=True)


def _pairs(responses, user_file, data, skip_invalid, seen_users):
    """The pairs to adapt (a UserFile) and the dataset (--data) or None; never a user the run has already."""
    from coplctl.data.userfile import UserFile, read_user_file, seen_user_problem

    if data is not None:
        from coplctl.data import load
        from coplctl.errors import DataError

        ds = load(data)
        pairs = ds.split("fewshot")
        clash = list(dict.fromkeys(u for u in pairs["user_id"] if u in seen_users))
        if clash and not skip_invalid:
            raise DataError(data, f"{seen_user_problem(clash[0])}"
                                  + (f" (and {len(clash) - 1} more)" if len(clash) > 1 else ""))
        skipped = [{"user": u, "lines": [], "reason": seen_user_problem(u)} for u in clash]
        pairs = pairs[~pairs["user_id"].isin(clash)]
        if pairs.empty:
            raise DataError(data, "has no fewshot pair of a user new to the run")
        return UserFile(pairs, skipped_users=skipped), ds
    return read_user_file(user_file, responses, skip_invalid=skip_invalid, seen_users=seen_users), None


def _adapt_graph_run(model, out_dir, user_file, data, skip_invalid, force, method, hops, temperature):
    from safetensors.torch import save_file

    from coplctl.adapt import AdaptConfig, adapt_users, graph_accuracy
    from coplctl.atomic import atomic_dir, atomic_path
    from coplctl.graph.run import GCFRun

    options = {"hops": hops, "temperature": temperature}
    cfg = AdaptConfig(method=method.value, **{k: v for k, v in options.items() if v is not None})
    run = GCFRun(model)
    uf, ds = _pairs(run.responses, user_file, data, skip_invalid, set(run.graph.user_ids))
    adapted = adapt_users(run, uf.pairs, cfg)
    extra = {"user_file": str(user_file)} if ds is None else {"data": str(data)}
    if ds is not None:
        held = ds.split("valid")
        acc, n = graph_accuracy(run, adapted, held[held["user_id"].isin(set(uf.pairs["user_id"]))])
        extra.update(held_out_graph_accuracy=acc, held_out_pairs=n)
    summary = {**{k: v for k, v in adapted.report.items() if k != "per_user"}, "model": str(model), **extra,
               "pairs_unusable": len(uf.skipped_lines), "skipped_lines": uf.skipped_lines,
               "skipped_users": uf.skipped_users, "per_user": adapted.report["per_user"]}
    with atomic_dir(out_dir, overwrite=force, marker="summary.json", kind="coplctl adapt output") as tmp:
        with atomic_path(tmp / "embeddings.safetensors") as f:  # usual permissions (save_file alone: 0600)
            save_file({"embeddings": adapted.embeddings.contiguous()}, str(f),
                      metadata={"user_ids": json.dumps(adapted.user_ids), "method": cfg.method})
        (tmp / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    lines = {"users": len(adapted.user_ids), "pairs": adapted.report["pairs"],
             "unusable": len(uf.skipped_lines) + adapted.report["pairs_outside_graph"],
             "skipped users": len(uf.skipped_users), "fallback": adapted.report["fallback_users"]}
    if "held_out_graph_accuracy" in extra:
        lines["held-out acc"] = f"{100 * extra['held_out_graph_accuracy']:.2f}"
    return summary, lines


def _adapt_model_run(model, out_dir, user_file, data, skip_invalid, force):
    from coplctl.atomic import atomic_write_text
    from coplctl.reward import load_method

    method = load_method(model)
    responses = method.responses
    uf, ds = _pairs(responses, user_file, data, skip_invalid, set(getattr(method, "user_ids", ())))
    if ds is not None:
        responses = ds.responses
    report = method.adapt(uf.pairs, responses)
    method.save(out_dir, overwrite=force)
    summary = {**report, "model": str(model), "user_file": str(user_file) if user_file else None,
               "data": str(data) if data else None, "pairs_unusable": len(uf.skipped_lines),
               "skipped_lines": uf.skipped_lines, "skipped_users": uf.skipped_users}
    summary.setdefault("users", report.get("users"))
    atomic_write_text(out_dir / "summary.json", json.dumps(summary, indent=2, default=str) + "\n")
    lines = {"users": report.get("users"), "pairs": report.get("pairs"), "unusable": len(uf.skipped_lines),
             "skipped users": len(uf.skipped_users)}
    return summary, lines
