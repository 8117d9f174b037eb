"""Reward calls in a loop, as an RL trainer makes them: does a call stay as fast at call 400 as at call 1?

Trains a small frozen-mode I2E run on simulated data (MiniLM; or takes --run), then makes --calls calls of
--batch new texts each through the Python API (``coplctl.load(run).reward``) and through the method's own
``score`` (which persists every new text to the feature cache). Prints the median milliseconds per call
over the first and the last 50 calls, and the feature-cache shards each path wrote.

    python benchmarks/perf/score_calls.py [--calls 400] [--batch 8] [--run DIR]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=400)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--run", type=Path, default=None)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="coplctl-score-calls-"))
    os.environ.setdefault("COPLCTL_CACHE", str(tmp / "cache"))  # a private cache: shards counted from zero

    import coplctl
    from coplctl.core.registry import METHODS
    from coplctl.data.protocol import ProtocolConfig
    from coplctl.data.simulate import SimConfig, simulate
    from coplctl.models.evaluate import score_frame
    from coplctl.models.reward import load_method, make_config

    run = args.run
    if run is None:
        ds = simulate(SimConfig(protocol=ProtocolConfig(variant="uf-p-2", annotations="all", users=100,
                                                        unseen_users=0, survey_pairs=300), seed=0))
        cls = METHODS.get("i2e")
        method = cls(make_config(cls.Config, {"mode": "frozen", "epochs": 1}))
        method.fit(ds, work_dir=tmp / "work", progress=False)
        run = method.save(tmp / "run")
    shards = lambda: len(list(Path(os.environ["COPLCTL_CACHE"]).rglob("shard-*")))  # noqa: E731

    rm = coplctl.load(run)
    user = rm.users[0]
    plain = load_method(run)

    def api(k: int) -> None:
        rm.reward(user, "What should I cook tonight?", [f"call {k}: idea {i}" for i in range(args.batch)])

    def own(k: int) -> None:
        rows = [{"prompt": "What should I cook tonight?", "response": f"own {k}: idea {i}"} for i in range(args.batch)]
        plain.score([user] * args.batch, score_frame(rows))

    print(f"{'path':<22} {'first 50 ms':>12} {'last 50 ms':>11} {'shards written':>15}")
    for label, call in (("coplctl.load().reward", api), ("method.score", own)):
        before, times = shards(), []
        for k in range(args.calls):
            t = time.perf_counter()
            call(k)
            times.append(1000 * (time.perf_counter() - t))
        print(f"{label:<22} {statistics.median(times[:50]):>12.1f} {statistics.median(times[-50:]):>11.1f} "
              f"{shards() - before:>15}")


if __name__ == "__main__":
    main()
