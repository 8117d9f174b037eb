"""Adapting many new users from a user file: read_user_file + adapt_users, users per second and peak memory.

Builds (or reuses, --run) a graph run on simulated UF-P-4-AVG at paper scale (10,000 seen users), writes
a user file of N new users × 8 pairs over graph responses (both responses of a pair answer the same
prompt), then times reading the file and adapting its users: the median of --repeats runs for
N <= 20,000, one run above. Peak memory is the process's maximum resident set (ru_maxrss).

Target (2 CPU cores): 100,000 users × 8 pairs read and adapted in < 60 s; time linear in N.

    python benchmarks/perf/adapt.py [N] [--run DIR] [--work DIR] [--method weighted|average|optimize] [--hops 2]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

PAIRS_PER_USER = 8


def _graph_run(work: Path, epochs: int) -> Path:
    """The run in ``work``, built first in another process (so that training's memory is not counted here)."""
    run = work / "gcf"
    if not (run / "embeddings.safetensors").exists():
        subprocess.run([sys.executable, __file__, "--build", "--work", str(work), "--epochs", str(epochs)], check=True)
    return run


def build(work: Path, epochs: int) -> None:
    from coplctl.data import load
    from coplctl.data.protocol import ProtocolConfig
    from coplctl.data.simulate import SimConfig, simulate
    from coplctl.graph.config import preset_config
    from coplctl.graph.train import train_gcf

    data = work / "sim-uf-p-4-avg"
    if not data.exists():
        simulate(SimConfig(protocol=ProtocolConfig("uf-p-4", "avg"), seed=0)).save(data)
    # the graph's structure sets the cost of adapting; a short training is enough for timing
    train_gcf(load(data), work / "gcf", preset_config("cpu", epochs=epochs), force=True, progress=False)


def write_user_file(path: Path, responses, n_users: int, seed: int = 0) -> None:
    """n_users × 8 distinct pairs, each over two responses to one prompt (random, seeded), user by user."""
    import numpy as np

    rng = np.random.default_rng(seed)
    groups = [g for g in responses.groupby("prompt", sort=True)["response_id"].apply(list) if len(g) >= 2]
    if len(groups) < PAIRS_PER_USER:
        raise SystemExit(f"the graph has {len(groups)} prompts with two responses; need {PAIRS_PER_USER}")
    sizes = np.array([len(g) for g in groups])
    base = rng.integers(len(groups), size=n_users)
    prompts = (base[:, None] + np.arange(PAIRS_PER_USER) * (len(groups) // PAIRS_PER_USER)) % len(groups)
    a = (rng.random(prompts.shape) * sizes[prompts]).astype(int)
    b = (a + 1 + (rng.random(prompts.shape) * (sizes[prompts] - 1)).astype(int)) % sizes[prompts]
    with open(path, "w", encoding="utf-8") as fh:
        for u in range(n_users):
            user = json.dumps(f"bench-{u:07d}")
            for k in range(PAIRS_PER_USER):
                g = groups[prompts[u, k]]
                fh.write(f'{{"user": {user}, "chosen": {json.dumps(g[a[u, k]])}, '
                         f'"rejected": {json.dumps(g[b[u, k]])}}}\n')


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("users", nargs="?", type=int, default=100_000, help="New users N (default 100000).")
    ap.add_argument("--run", help="A graph run to adapt in (default: build one in --work).")
    ap.add_argument("--work", default=".bench-adapt", help="Scratch directory for data, run and user files.")
    ap.add_argument("--epochs", type=int, default=20, help="GCF epochs when building the run.")
    ap.add_argument("--method", default="weighted", choices=("weighted", "average", "optimize"))
    ap.add_argument("--hops", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3, help="Timed runs for N <= 20,000 (median).")
    ap.add_argument("--build", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.build:
        build(Path(a.work), a.epochs)
        return

    from coplctl.copl.adapt import AdaptConfig, adapt_users
    from coplctl.data.userfile import read_user_file
    from coplctl.graph.run import GCFRun

    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    run = GCFRun(a.run or _graph_run(work, a.epochs))
    responses = run.responses
    tag = hashlib.sha1(str(run.path.resolve()).encode()).hexdigest()[:8]  # user files name this run's responses
    user_file = work / f"users-{a.users}x{PAIRS_PER_USER}-{tag}.jsonl"
    if not user_file.exists():
        write_user_file(user_file, responses, a.users)
    cfg = AdaptConfig(method=a.method, hops=a.hops)
    repeats = a.repeats if a.users <= 20_000 else 1
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    reads, adapts = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        uf = read_user_file(user_file, responses)
        t1 = time.perf_counter()
        adapted = adapt_users(run, uf.pairs, cfg)
        t2 = time.perf_counter()
        reads.append(t1 - t0)
        adapts.append(t2 - t1)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    read_s, adapt_s = statistics.median(reads), statistics.median(adapts)
    total = read_s + adapt_s
    n = len(adapted.user_ids)
    g = run.graph
    print(f"graph: {g.num_users:,} seen users, {g.num_responses:,} responses; {a.method}, {a.hops} hops; "
          f"{n:,} users x {PAIRS_PER_USER} pairs ({adapted.report['pairs']:,} pairs, "
          f"{adapted.report['fallback_users']:,} fallback users)")
    how = f"median of {repeats}" if repeats > 1 else "one run"
    print(f"read_user_file {read_s:7.2f} s ({n / read_s:,.0f} users/s)   adapt_users {adapt_s:7.2f} s "
          f"({n / adapt_s:,.0f} users/s)   total {total:7.2f} s ({n / total:,.0f} users/s), {how}")
    print(f"peak RSS {peak:,.0f} MB (before reading: {rss_before:,.0f} MB)")
    print(json.dumps({"users": n, "method": a.method, "hops": a.hops, "read_s": read_s, "adapt_s": adapt_s,
                      "total_s": total, "users_per_s": n / total, "peak_rss_mb": peak, "repeats": repeats}))


if __name__ == "__main__":
    main()
