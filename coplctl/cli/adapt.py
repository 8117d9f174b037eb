"""`coplctl adapt`: place new users from a few annotations, without optimisation (CoPL §4.3)."""

from __future__ import annotations

import json
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from coplctl.cli.common import Force, err, examples, out


class Method(str, Enum):
    weighted = "weighted"
    average = "average"
    optimize = "optimize"


def register(app: typer.Typer) -> None:
    @app.command("adapt", epilog=examples(
        "coplctl adapt --model runs/gcf --user-file new_users.jsonl --out runs/new_users",
        "coplctl adapt --model runs/gcf --user-file new_users.jsonl --out runs/naive --method average",
        "coplctl adapt --model runs/gcf --user-file messy.jsonl --out runs/new --skip-invalid",
        "coplctl adapt --model runs/gcf --data data/sim-uf-p-4-avg --out runs/unseen"))
    def adapt(
        model: Annotated[Path, typer.Option("--model", "-m", help="A trained run (coplctl graph train).",
                                            show_default=False)],
        out_dir: Annotated[Path, typer.Option("--out", "-o", help="Output directory.", show_default=False)],
        user_file: Annotated[Optional[Path], typer.Option(
            "--user-file", "-u", show_default=False,
            help='JSONL, one annotation per line: {"user": ..., "chosen": id or text, "rejected": id or text}.')]
        = None,
        data: Annotated[Optional[Path], typer.Option(
            "--data", "-d", show_default=False,
            help="Instead of a user file: adapt a dataset's unseen users from their fewshot pairs, and report "
                 "graph-level accuracy on their held-out (valid) pairs.")] = None,
        method: Annotated[Method, typer.Option(
            "--method", help="weighted (CoPL), average (naive k-hop mean) or optimize (fit a free embedding).")]
        = Method.weighted,
        hops: Annotated[int, typer.Option("--hops", help="k, an even number of hops (paper: 2).")] = 2,
        temperature: Annotated[float, typer.Option("--temperature", help="κ of the weights (paper: 0.07).")] = 0.07,
        skip_invalid: Annotated[bool, typer.Option(
            "--skip-invalid", help="Skip bad lines and users without a usable pair, and report them.")] = False,
        force: Force = False,
    ) -> None:
        """Adapt unseen users from a user file (or a dataset); writes embeddings.safetensors and summary.json."""
        from rich.table import Table

        from coplctl.adapt import AdaptConfig, adapt_users
        from coplctl.atomic import atomic_dir
        from coplctl.data.userfile import read_user_file
        from coplctl.errors import CoplError
        from coplctl.graph.run import GCFRun

        cfg = AdaptConfig(method=method.value, hops=hops, temperature=temperature)
        if out_dir.exists() and not force:
            raise CoplError(f"{out_dir} already exists; choose another --out or pass --force to replace it")
        if (user_file is None) == (data is None):
            raise CoplError("give exactly one of --user-file and --data")
        run = GCFRun(model)
        extra = {}
        if data is not None:
            from coplctl.adapt import graph_accuracy
            from coplctl.data import load
            from coplctl.data.userfile import UserFile

            ds = load(data)
            uf = UserFile(ds.split("fewshot"))
            adapted = adapt_users(run, uf.pairs, cfg)
            held = ds.split("valid")
            acc, n = graph_accuracy(run, adapted, held[held["user_id"].isin(set(uf.pairs["user_id"]))])
            extra = {"data": str(data), "held_out_graph_accuracy": acc, "held_out_pairs": n}
        else:
            uf = read_user_file(user_file, run.responses, skip_invalid=skip_invalid)
            adapted = adapt_users(run, uf.pairs, cfg)
            extra = {"user_file": str(user_file)}
        summary = {**{k: v for k, v in adapted.report.items() if k != "per_user"}, "model": str(model), **extra,
                   "pairs_unusable": len(uf.skipped_lines), "skipped_lines": uf.skipped_lines,
                   "skipped_users": uf.skipped_users, "per_user": adapted.report["per_user"]}
        from safetensors.torch import save_file

        with atomic_dir(out_dir, overwrite=force) as tmp:
            save_file({"embeddings": adapted.embeddings.contiguous()}, str(tmp / "embeddings.safetensors"),
                      metadata={"user_ids": json.dumps(adapted.user_ids), "method": cfg.method})
            (tmp / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        t = Table(title=f"Adapted {len(adapted.user_ids)} users ({cfg.method}, {cfg.hops}-hop)")
        cols = {"users": len(adapted.user_ids), "pairs": adapted.report["pairs"],
                "unusable": len(uf.skipped_lines) + adapted.report["pairs_outside_graph"],
                "skipped users": len(uf.skipped_users), "fallback": adapted.report["fallback_users"]}
        if "held_out_graph_accuracy" in extra:
            cols["held-out acc"] = f"{100 * extra['held_out_graph_accuracy']:.2f}"
        for col in cols:
            t.add_column(col, justify="right")
        t.add_row(*(str(v) for v in cols.values()))
        out.print(t)
        for s in uf.skipped_lines[:10]:
            err.print(f"skipped {user_file} line {s['line']}: {s['reason']}", highlight=False)
        if len(uf.skipped_lines) > 10:
            err.print(f"... and {len(uf.skipped_lines) - 10} more skipped lines (see summary.json)")
        err.print(f"wrote {out_dir}/embeddings.safetensors and summary.json", highlight=False, soft_wrap=True)
