"""Do the GCF presets recover the users' preference groups? Side by side on one simulated UF-P twin.

For each configuration: validation accuracy on held-out pairs of seen users (Table 5), the group probe
(5-fold logistic-regression accuracy of the group from the exported user embeddings), best epoch,
seconds to the best epoch and seconds per epoch (median); then, as a learning-free reference, the signed
spectral split of the users' co-annotation matrix.

Targets (issue: CoPL must personalize): the default (cpu) preset's probe at least the official
preset's and within 3 points of the spectral split; its valid accuracy not below the old default's
(PyTorch init); at least 20x faster to its best epoch than the official preset on 2 cores.

    python benchmarks/perf/gcf_quality.py                                   # sim UF-P-2-ALL, paper scale
    python benchmarks/perf/gcf_quality.py --variant uf-p-4 --annotations avg
    python benchmarks/perf/gcf_quality.py --configs cpu,cpu-torch-init      # skip the slow presets
    python benchmarks/perf/gcf_quality.py --users 2000 --survey-pairs 5200  # a small twin (same degrees)

The paper and official presets take one full-graph propagation per batch of 1,024 pairs at d=512:
hours at paper scale on 2 cores. ``--max-epochs`` caps them (the table says so); their seconds to the
best epoch are then a lower bound.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

CONFIGS = {
    "cpu": ("cpu", {}),
    "cpu-torch-init": ("cpu", {"signed_init": False}),  # the CPU preset before signed init
    "paper": ("paper", {}),
    "official": ("official", {}),
    "official-d64": ("official", {"dim": 64}),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variant", default="uf-p-2", choices=["uf-p-2", "uf-p-4"])
    ap.add_argument("--annotations", default="all", choices=["all", "avg"])
    ap.add_argument("--users", type=int, default=10_000)
    ap.add_argument("--survey-pairs", type=int, default=25_993)
    ap.add_argument("--configs", default="cpu,cpu-torch-init,official-d64,official",
                    help=f"comma-separated, from {', '.join(CONFIGS)}")
    ap.add_argument("--max-epochs", type=int, default=0, help="cap the paper/official presets' epochs (0 = none)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", default="/tmp/coplctl-gcf-quality")
    args = ap.parse_args()

    from coplctl.data import load
    from coplctl.data.protocol import ProtocolConfig
    from coplctl.data.simulate import SimConfig, simulate
    from coplctl.graph.probe import spectral_split
    from coplctl.graph.config import preset_config
    from coplctl.graph.train import train_gcf

    work = Path(args.work)
    data = work / f"sim-{args.variant}-{args.annotations}-{args.users}"
    if not (data / "meta.json").exists():
        proto = ProtocolConfig(args.variant, args.annotations, users=args.users, unseen_users=0,
                               survey_pairs=args.survey_pairs)
        simulate(SimConfig(protocol=proto, seed=args.seed)).save(data)
    ds = load(data)
    seen = ds.users[ds.users["role"] == "seen"]
    rows = []
    for name in args.configs.split(","):
        if name not in CONFIGS:
            sys.exit(f"unknown configuration {name!r}; choose from {', '.join(CONFIGS)}")
        preset, over = CONFIGS[name]
        capped = bool(args.max_epochs and preset != "cpu")
        if capped:
            over = {**over, "epochs": args.max_epochs}
        m = train_gcf(ds, work / "runs" / name, preset_config(preset, **over), seed=args.seed, force=True,
                      progress=False)
        h = m["history"]
        per_epoch = statistics.median(b["seconds"] - a["seconds"] for a, b in zip(h, h[1:])) if len(h) > 1 else h[0]["seconds"]
        rows.append((name + (f" (capped at {args.max_epochs} epochs)" if capped else ""), m["valid_accuracy"],
                     m["group_probe"], m["best_epoch"], m["seconds_to_best"], per_epoch))
        print(f"done: {rows[-1]}", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    spectral = spectral_split(ds.split("train"), list(seen["user_id"]), seen["group"].to_numpy(), seed=args.seed)
    spectral_s = time.perf_counter() - t0

    print(f"\nGCF group recovery on simulated {args.variant.upper()}-{args.annotations.upper()}, "
          f"{args.users:,} seen users, seed {args.seed}\n")
    print("| configuration | valid acc | group probe | best epoch | s to best | s/epoch |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, valid, probe, best, to_best, per_epoch in rows:
        print(f"| {name} | {100 * valid:.2f} | {100 * probe:.2f} | {best} | {to_best:.0f} | {per_epoch:.2f} |")
    print(f"| signed spectral split (no learning) | - | {100 * spectral:.2f} | - | {spectral_s:.0f} | - |")
    by_name = {r[0]: r for r in rows}
    if "cpu" in by_name:
        for name, row in by_name.items():
            if name.startswith("official"):
                ratio = row[4] / max(by_name["cpu"][4], 1e-9)
                print(f"\ncpu vs {name}: probe {100 * (by_name['cpu'][2] - row[2]):+.2f} points, "
                      f"{ratio:.1f}x faster to its best epoch")
        print(f"cpu vs spectral split: probe {100 * (by_name['cpu'][2] - spectral):+.2f} points")


if __name__ == "__main__":
    main()
