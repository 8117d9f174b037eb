"""`POST /users` under concurrent clients: requests, errors, p50/p99 latency and users learned per second.

Trains a small frozen-mode CoPL run on simulated data (MiniLM; or takes --run, which is copied first: the
overlay is written beside the run), serves it with uvicorn in a thread with its users' overlay, and lets
--clients threads each post --per-client new users (--pairs pairs each, response ids of the run) and then
score each new user once. Prints the figures of both routes, and checks that a server restarted on the
same overlay scores the new users the same.

    python benchmarks/perf/serve_users.py [--clients 8] [--per-client 10] [--pairs 4] [--run DIR]
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--per-client", type=int, default=10)
    ap.add_argument("--pairs", type=int, default=4)
    ap.add_argument("--run", type=Path, default=None)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="coplctl-users-"))
    os.environ.setdefault("COPLCTL_CACHE", str(tmp / "cache"))

    import httpx

    import coplctl
    from coplctl.core.registry import METHODS
    from coplctl.data.protocol import ProtocolConfig
    from coplctl.data.simulate import SimConfig, simulate
    from coplctl.models.reward import make_config
    from coplctl.serving.overlay import Overlay
    from coplctl.serving.server import in_background, make_app

    if args.run is None:
        ds = simulate(SimConfig(protocol=ProtocolConfig(variant="uf-p-2", annotations="all", users=100,
                                                        unseen_users=0, survey_pairs=300), seed=0))
        cls = METHODS.get("copl")
        method = cls(make_config(cls.Config, {"mode": "frozen", "epochs": 1}))
        method.fit(ds, work_dir=tmp / "work", progress=False)
        run = method.save(tmp / "run")
    else:
        run = Path(shutil.copytree(args.run, tmp / "run"))
    rm = coplctl.load(run)
    pairs_of = rm.method.responses.groupby("prompt")["response_id"].apply(list)
    pairs_of = [r[:2] for r in pairs_of if len(r) >= 2]
    rng = np.random.default_rng(0)
    overlay = Overlay(run / "served-users")
    timings: dict[str, list[float]] = {"users": [], "reward": []}
    errors = {"users": 0, "reward": 0}

    def client(c: int, url: str) -> dict[str, float]:
        got = {}
        with httpx.Client(base_url=url, timeout=300) as h:
            for k in range(args.per_client):
                user = f"client{c}-user{k}"
                picks = rng.choice(len(pairs_of), args.pairs, replace=False)
                body = {"pairs": [{"user": user, "chosen": pairs_of[i][0], "rejected": pairs_of[i][1]} for i in picks]}
                t = time.perf_counter()
                r = h.post("/users", json=body)
                timings["users"].append(time.perf_counter() - t)
                errors["users"] += r.status_code != 200
                t = time.perf_counter()
                r = h.post("/reward", json={"items": [{"user": user, "prompt": "Hi?", "response": "Hello there!"}]})
                timings["reward"].append(time.perf_counter() - t)
                errors["reward"] += r.status_code != 200
                if r.status_code == 200:
                    got[user] = r.json()["rewards"][0]
        return got

    with overlay.open(rm), in_background(make_app(rm, overlay=overlay)) as url:
        start = time.perf_counter()
        with ThreadPoolExecutor(args.clients) as pool:
            scored = {}
            for part in pool.map(lambda c: client(c, url), range(args.clients)):
                scored.update(part)
        wall = time.perf_counter() - start
    print(f"{args.clients} clients x {args.per_client} new users ({args.pairs} pairs each), {rm.name}, "
          f"{wall:.1f} s, {len(scored) / wall:.1f} users learned and scored per second")
    print(f"{'route':>8} {'requests':>8} {'errors':>6} {'p50 ms':>8} {'p99 ms':>8}")
    for route, ts in timings.items():
        ms = 1000 * np.asarray(ts)
        print(f"{route:>8} {len(ts):>8} {errors[route]:>6} {np.median(ms):>8.1f} {np.percentile(ms, 99):>8.1f}")
    again = coplctl.load(run)
    with Overlay(run / "served-users").open(again) as added:
        users = sorted(scored)
        after = again.reward(users, "Hi?", "Hello there!")
    same = np.allclose(after, [scored[u] for u in users], atol=1e-6)
    print(f"restart: {added} users replayed from the overlay; rewards {'equal within 1e-6' if same else 'DIFFER'} "
          f"(max |diff| {np.abs(after - np.array([scored[u] for u in users])).max():.2e})")
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
