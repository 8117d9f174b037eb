"""Throughput and latency of `coplctl serve` over loopback: rewards/s and p50/p99 per request.

Trains a small frozen-mode I2E run on simulated data (MiniLM; or takes --run), serves it with uvicorn in
a thread, and sends --requests sequential requests at batch 1 and at batch 64 from a real HTTP client.
Every request holds new texts (the worst case: each one is embedded). Prints, per batch size, the median
and 99th-percentile latency and rewards per second.

    python benchmarks/perf/serve.py [--requests 200] [--run DIR]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--run", type=Path, default=None)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="coplctl-serve-"))
    os.environ.setdefault("COPLCTL_CACHE", str(tmp / "cache"))

    import httpx

    import coplctl
    from coplctl.core.registry import METHODS
    from coplctl.data.protocol import ProtocolConfig
    from coplctl.data.simulate import SimConfig, simulate
    from coplctl.models.reward import make_config
    from coplctl.serving.server import in_background, make_app

    run = args.run
    if run is None:
        ds = simulate(SimConfig(protocol=ProtocolConfig(variant="uf-p-2", annotations="all", users=100,
                                                        unseen_users=0, survey_pairs=300), seed=0))
        cls = METHODS.get("i2e")
        method = cls(make_config(cls.Config, {"mode": "frozen", "epochs": 1}))
        method.fit(ds, work_dir=tmp / "work", progress=False)
        run = method.save(tmp / "run")
    rm = coplctl.load(run)
    user = rm.users[0]
    print(f"{'batch':>5} {'requests':>8} {'p50 ms':>8} {'p99 ms':>8} {'rewards/s':>10}")
    with in_background(make_app(rm)) as url, httpx.Client(base_url=url, timeout=120) as client:
        for batch in (1, 64):
            times = []
            for k in range(args.requests):
                items = [{"user": user, "prompt": "What should I cook tonight?", "response": f"b{batch} r{k} idea {i}"}
                         for i in range(batch)]
                t = time.perf_counter()
                got = client.post("/reward", json={"items": items})
                times.append(time.perf_counter() - t)
                got.raise_for_status()
            ms = 1000 * np.asarray(times)
            print(f"{batch:>5} {args.requests:>8} {np.median(ms):>8.1f} {np.percentile(ms, 99):>8.1f} "
                  f"{batch * len(ms) / ms.sum() * 1000:>10.1f}")


if __name__ == "__main__":
    main()
