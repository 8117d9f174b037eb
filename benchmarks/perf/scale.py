"""How every stage grows with the number of users: simulated UF-P-4-AVG-like data at 10k, 100k and 1M seen users.

Data: the simulator's UF-P-4-AVG protocol (one pair per prompt, 1-31 annotations per user, label noise of
the paper's twins), with the survey set grown with the users (25,993 pairs per 10,000 users) so that each
survey pair keeps its paper-scale number of annotators; 100 unseen users. Per size, each stage runs in its
own process, so that its peak resident memory (ru_maxrss) is its own:

- simulate: generate and save the dataset (seconds each);
- graph: load the pairs (texts stay on disk) and build the training graph (seconds each);
- gcf: train GCF with the ``cpu`` preset
  for --epochs epochs (the sampler the preset picks by size: ``auto``), and report s/epoch, s to the best
  epoch, valid accuracy and the group probe (logistic regression of the groups from user embeddings);
- adapt: 10,000 new users (--new-users) × 8 pairs over graph responses, read from a user file and adapted
  with the default weighted k-hop variant;
- features: frozen-feature extraction, texts per second of the default backbone and precision on 400 of
  the responses (per text, the same at every size), and the hours that all of a size's responses take.

Between consecutive sizes it prints each stage's cost ratio against the users' ratio (the growth exponent
log(cost ratio) / log(users ratio); 1 is linear). Targets on 2 cores / 24 GB: 1M users simulated < 3 min,
GCF < 60 s per epoch at < 12 GB, adaptation of 10k new users < 10 s, every stage's growth from 100k to
1M at most 1.2 × linear.

    python benchmarks/perf/scale.py [--sizes 10000,100000,1000000] [--epochs 3] [--work .bench-scale] [--reuse simulate]
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import subprocess
import sys
import time
from pathlib import Path

SURVEY_PER_10K = 25_993


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def stage_simulate(work: Path, n: int) -> dict:
    from coplctl.data.protocol import ProtocolConfig
    from coplctl.data.simulate import SimConfig, simulate

    cfg = SimConfig(ProtocolConfig("uf-p-4", "avg", users=n, unseen_users=100,
                                   survey_pairs=round(SURVEY_PER_10K * n / 10_000)), seed=0)
    t0 = time.perf_counter()
    ds = simulate(cfg)
    t1 = time.perf_counter()
    ds.save(work / "data", overwrite=True)
    counts = ds.counts()
    return {"simulate_s": t1 - t0, "save_s": time.perf_counter() - t1, "responses": counts.get("responses"),
            "pairs": counts.get("pairs"), "peak_mb": _peak_mb()}


def stage_graph(work: Path) -> dict:
    import torch

    from coplctl.data import load
    from coplctl.graph.train import TrainingData

    t0 = time.perf_counter()
    ds = load(work / "data", texts=False)
    t1 = time.perf_counter()
    TrainingData.build(ds, torch.device("cpu"), torch.float32)  # what train_gcf builds first
    return {"load_s": t1 - t0, "graph_build_s": time.perf_counter() - t1, "peak_mb": _peak_mb()}


def stage_gcf(work: Path, epochs: int) -> dict:
    from coplctl.data import load
    from coplctl.graph.config import preset_config
    from coplctl.graph.train import train_gcf

    m = train_gcf(load(work / "data", texts=False), work / "gcf", preset_config("cpu", epochs=epochs), force=True,
                  progress=False)
    config = json.loads((work / "gcf" / "config.json").read_text())["gcf"]
    return {"sampler": config["sampler"],
            "s_per_epoch": m["seconds_per_epoch"], "s_to_best": m["seconds_to_best"], "epochs": m["epochs_run"],
            "valid_accuracy": m["valid_accuracy"], "group_probe": m.get("group_probe"), "peak_mb": _peak_mb()}


def stage_adapt(work: Path, new_users: int) -> dict:
    sys.path.insert(0, str(Path(__file__).parent))
    from adapt import write_user_file

    from coplctl.copl.adapt import AdaptConfig, adapt_users
    from coplctl.data.userfile import read_user_file
    from coplctl.graph.run import GCFRun

    run = GCFRun(work / "gcf")
    path = work / f"users-{new_users}.jsonl"
    write_user_file(path, run.responses, new_users)
    t0 = time.perf_counter()
    uf = read_user_file(path, run.responses)
    t1 = time.perf_counter()
    adapted = adapt_users(run, uf.pairs, AdaptConfig())
    t2 = time.perf_counter()
    return {"read_s": t1 - t0, "adapt_s": t2 - t1, "new_users": len(adapted.user_ids), "peak_mb": _peak_mb()}


def stage_features(work: Path, texts: int) -> dict:
    from coplctl.data import load
    from coplctl.models.backbone import Backbone

    r = load(work / "data").responses.head(texts)
    b = Backbone("minilm")
    b.embed(r["prompt"][:32], r["text"][:32])  # warm up
    t0 = time.perf_counter()
    b.embed(r["prompt"], r["text"])
    return {"texts_per_s": len(r) / (time.perf_counter() - t0), "key": b.key, "peak_mb": _peak_mb()}


def _child(stage: str, work: Path, a) -> dict:
    cmd = [sys.executable, __file__, "--stage", stage, "--work", str(work), "--epochs", str(a.epochs),
           "--new-users", str(a.new_users)]
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if res.returncode:
        raise SystemExit(f"stage {stage} in {work} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def _growth(rows: dict[int, dict], key: str) -> str:
    sizes = sorted(n for n in rows if rows[n].get(key))
    parts = []
    for a, b in zip(sizes, sizes[1:]):
        ratio, users = rows[b][key] / rows[a][key], b / a
        parts.append(f"{a:,}->{b:,}: x{ratio:.2f} (exponent {math.log(ratio) / math.log(users):.2f}, "
                     f"{ratio / users:.2f} x linear)")
    return "; ".join(parts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="10000,100000,1000000")
    ap.add_argument("--work", default=".bench-scale")
    ap.add_argument("--epochs", type=int, default=3, help="GCF epochs per size (s/epoch is their mean)")
    ap.add_argument("--new-users", type=int, default=10_000)
    ap.add_argument("--texts", type=int, default=400)
    ap.add_argument("--reuse", default="", help="comma-separated stages whose earlier figures (in --work) are kept")
    ap.add_argument("--stage", help=argparse.SUPPRESS)
    a = ap.parse_args()
    work = Path(a.work)
    if a.stage:
        work.mkdir(parents=True, exist_ok=True)
        stage = {"simulate": lambda: stage_simulate(work, int(work.name)), "graph": lambda: stage_graph(work),
                 "gcf": lambda: stage_gcf(work, a.epochs),
                 "adapt": lambda: stage_adapt(work, a.new_users), "features": lambda: stage_features(work, a.texts)}
        print(json.dumps(stage[a.stage]()))
        return
    rows: dict[int, dict] = {}
    for n in (int(s) for s in a.sizes.split(",")):
        w = work / str(n)
        row = {}
        for stage in ("simulate", "graph", "gcf", "adapt"):
            done = w / f"{stage}.json"  # --reuse: a stage measured before (e.g. simulate) is read back
            if a.reuse and stage in a.reuse.split(",") and done.exists():
                row[stage] = json.loads(done.read_text())
            else:
                row[stage] = _child(stage, w, a)
                done.write_text(json.dumps(row[stage]))
            print(f"{n:>9,} users  {stage:<8} {json.dumps(row[stage])}", flush=True)
        rows[n] = row
    first = min(rows)
    feats = _child("features", work / str(first), a)
    print(f"\nfeatures: {feats['texts_per_s']:.1f} texts/s ({feats['key']})")
    print(f"\n{'users':>9} {'simulate s':>10} {'save s':>7} {'load s':>7} {'build s':>8} {'sampler':>8} "
          f"{'s/epoch':>8} {'s to best':>9} {'probe':>6} {'adapt 10k s':>11} {'peak GB sim/gcf/adapt':>22} "
          f"{'embed all h':>11}")
    for n, r in rows.items():
        s, b, g, d = r["simulate"], r["graph"], r["gcf"], r["adapt"]
        peaks = "/".join(f"{r[k]['peak_mb'] / 1024:.1f}" for k in ("simulate", "gcf", "adapt"))
        hours = s["responses"] / feats["texts_per_s"] / 3600
        print(f"{n:>9,} {s['simulate_s']:>10.1f} {s['save_s']:>7.1f} {b['load_s']:>7.1f} {b['graph_build_s']:>8.1f} "
              f"{g['sampler']:>8} {g['s_per_epoch']:>8.1f} {g['s_to_best']:>9.1f} {g['group_probe']:>6.3f} "
              f"{d['read_s'] + d['adapt_s']:>11.2f} {peaks:>22} {hours:>11.1f}")
    flat = {n: {"simulate_s": r["simulate"]["simulate_s"], "graph_build_s": r["graph"]["graph_build_s"],
                "s_per_epoch": r["gcf"]["s_per_epoch"], "adapt_s": r["adapt"]["read_s"] + r["adapt"]["adapt_s"],
                "gcf_peak_mb": r["gcf"]["peak_mb"], "simulate_peak_mb": r["simulate"]["peak_mb"]} for n, r in rows.items()}
    print("\ngrowth (cost ratio between sizes against the users' ratio):")
    for key in ("simulate_s", "graph_build_s", "s_per_epoch", "adapt_s", "simulate_peak_mb", "gcf_peak_mb"):
        print(f"  {key:<17} {_growth(flat, key)}")
    print(json.dumps({"features": feats, "sizes": rows}))


if __name__ == "__main__":
    main()
