"""`coplctl graph ...`: CoPL's user representation learning (graph collaborative filtering)."""

from __future__ import annotations

from enum import Enum
from typing import Annotated, Optional

import typer

from coplctl.cli.common import (Data, Epochs, Force, Json, Lr, Out, Seed, Sets, err, examples, out, parse_sets,
                                print_json)

app = typer.Typer(name="graph", help="Learn user embeddings on the user–response preference graph (CoPL §4.1).",
                  no_args_is_help=True,
                  epilog=examples("coplctl graph train --data data/sim-uf-p-4-avg --out runs/gcf",
                                  "coplctl graph train --data data/uf-p-4-avg --out runs/gcf-paper --preset paper"))


class Preset(str, Enum):
    auto = "auto"
    cpu = "cpu"
    paper = "paper"
    official = "official"


@app.command("train", epilog=examples(
    "coplctl graph train --data data/sim-uf-p-4-avg --out runs/gcf",
    "coplctl graph train --data data/sim-uf-p-4-avg --out runs/gcf512 --dim 512 --epochs 100",
    "coplctl graph train --data data/sim-uf-p-4-avg --out runs/lightgcn --set variant=lightgcn",
    "coplctl graph train --data data/uf-p-4-avg --out runs/gcf-paper --preset paper --device cuda",
    "coplctl graph train --data data/sim-uf-p-4-avg --out runs/gcf --json | jq .metrics.valid_accuracy"))
def train(
    data: Data,
    out_dir: Out,
    preset: Annotated[Preset, typer.Option(
        "--preset", help="cpu: small d, full-graph steps (default without a GPU); paper: d=512, lr 1e-4, "
                         "batches of 1024 (default with a GPU); official: the authors' code.")] = Preset.auto,
    dim: Annotated[Optional[int], typer.Option("--dim", min=1, help="Embedding width d (paper: 512).")] = None,
    layers: Annotated[Optional[int], typer.Option("--layers", min=1, help="Layers L (paper: 4).")] = None,
    epochs: Epochs = None,
    lr: Lr = None,
    batch_size: Annotated[Optional[int], typer.Option(
        "--batch-size", min=0, help="Pairs per step; 0 = all pairs (one full-graph step per epoch).")] = None,
    sampler: Annotated[Optional[str], typer.Option(
        "--sampler", help="auto (full while the graph fits in memory, else neighbor), full, or neighbor (sampled subgraphs per batch).")] = None,
    sets: Sets = None,
    device: Annotated[str, typer.Option("--device", help="auto, cpu, cuda, cuda:1 ...")] = "auto",
    seed: Seed = 0,
    force: Force = False,
    as_json: Json = False,
) -> None:
    """Train CoPL's GCF; print train / valid accuracy (the paper's Table 5) and, when users have groups,
    the group probe: 5-fold logistic-regression accuracy of the group from the user embeddings.

    The run directory is --out; an interrupted run resumes when the same command is run again. --json prints
    the run directory, its configuration and metrics.json (with the per-epoch history).
    """
    from dataclasses import asdict

    from coplctl.core.atomic import refuse_overlap
    from coplctl.data import load
    from coplctl.graph.config import preset_config
    from coplctl.graph.train import train_gcf

    options = dict(dim=dim, layers=layers, epochs=epochs, lr=lr, batch_size=batch_size, sampler=sampler)
    cfg = preset_config(preset.value, **{**parse_sets(sets or []), **{k: v for k, v in options.items() if v is not None}})
    refuse_overlap(out_dir, {"the dataset": data})
    if (out_dir / "checkpoint.safetensors").exists() and not force:
        err.print(f"resuming the interrupted run in {out_dir}")
    # texts stay on disk; under `accelerate launch`, every process trains (coplctl.graph.parallel)
    m = train_gcf(load(data, texts=False), out_dir, cfg, seed=seed, device=device, force=force, distributed=True)
    if not _main_process():
        return
    if as_json:
        print_json({"run": str(out_dir), "config": asdict(cfg), "metrics": m})
    else:
        _print(m, f"GCF on {data} (d={cfg.dim}, L={cfg.layers}, {cfg.variant})")
    err.print(f"wrote {out_dir}. Next: coplctl adapt --model {out_dir} --user-file FILE --out OUT", highlight=False,
              soft_wrap=True)


def _main_process() -> bool:
    """False on the other processes of a launched multi-process run (they print nothing)."""
    import os

    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0"))) == 0


def _print(m: dict, title: str) -> None:
    """The metrics as a one-row table on stdout."""
    from rich.table import Table

    t = Table(title=title)
    for col in ("train acc", "valid acc", "group probe", "best epoch", "epochs", "s/epoch", "s to best"):
        t.add_column(col, justify="right")
    probe = "-" if m.get("group_probe") is None else f"{100 * m['group_probe']:.2f}"
    if m.get("weight_probe") is not None:
        probe = f"weights R² {m['weight_probe']:.2f}"
    t.add_row(f"{100 * m['train_accuracy']:.2f}", f"{100 * m['valid_accuracy']:.2f}", probe, str(m["best_epoch"]),
              str(m["epochs_run"]), f"{m['seconds_per_epoch']:.2f}", f"{m['seconds_to_best']:.0f}")
    out.print(t)
