"""The personal signal of every simulated spec's dataset (:mod:`coplctl.data.signal`): how many of a seen
user's training labels go against the other users' majority on the same pair.

Simulates each spec's data section as a benchmark would (paper scale; seconds to a minute each) into a
temporary directory, and prints one row per spec.

    python benchmarks/perf/personal_signal.py [SPEC ...]
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path


def main() -> None:
    from coplctl.bench.data import prepare_data
    from coplctl.bench.spec import load_spec, search_dirs
    from coplctl.data.signal import seen_train_signal

    names = sys.argv[1:] or sorted({p.stem for d in search_dirs() for p in d.glob("*.yaml")
                                    if load_spec(p.stem).data.source == "simulated"})
    print(f"{'spec':<26} {'users':>7} {'personal share':>14} {'personal/user':>13} {'comparable/user':>15} "
          f"{'no majority':>11} {'s':>5}")
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            t = time.perf_counter()
            ds = prepare_data(load_spec(name), Path(tmp) / name)
            s = seen_train_signal(ds)
            print(f"{name:<26} {s['users']:>7,} {100 * s['share']:>13.1f}% {s['personal_per_user']:>13.2f} "
                  f"{s['labels_per_user']:>15.2f} {s['without_majority']:>11,} {time.perf_counter() - t:>5.0f}",
                  flush=True)


if __name__ == "__main__":
    main()
