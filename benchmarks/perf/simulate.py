"""Time the simulated UF-P generator at paper scale (10,000 seen + 100 unseen users, 25,993 survey pairs).

Target: under 60 s on 2 CPU cores, writing included. Prints the median of --repeats runs per setting.

    python benchmarks/perf/simulate.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from coplctl.data.protocol import ProtocolConfig
from coplctl.data.simulate import SimConfig, simulate


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    print(f"{'setting':<14} {'generate s':>10} {'write s':>8} {'total s':>8} {'responses':>10} {'pairs':>9}")
    for variant in ("uf-p-2", "uf-p-4"):
        for annotations in ("all", "avg"):
            gen, write = [], []
            for r in range(args.repeats):
                t0 = time.perf_counter()
                ds = simulate(SimConfig(protocol=ProtocolConfig(variant=variant, annotations=annotations), seed=r))
                t1 = time.perf_counter()
                with tempfile.TemporaryDirectory() as tmp:
                    ds.save(Path(tmp) / "d")
                t2 = time.perf_counter()
                gen.append(t1 - t0)
                write.append(t2 - t1)
            g, w = statistics.median(gen), statistics.median(write)
            print(f"{variant + '-' + annotations:<14} {g:>10.2f} {w:>8.2f} {g + w:>8.2f} "
                  f"{len(ds.responses):>10,} {len(ds.pairs):>9,}")


if __name__ == "__main__":
    main()
