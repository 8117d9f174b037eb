"""The dry run's lora-mode memory estimate (:mod:`coplctl.models.memory`) against measured peaks.

Weights and trained parameters are exact counts (tests/test_export.py checks them against trained runs);
what needs measuring is the activation term. Each setting trains one epoch of a small simulated dataset in
its own process (``fit``, the benchmark's code path) with every text cut to ``--tokens`` (the simulated
texts are longer, so every text sits at the limit, as the estimate assumes), and reports the process's peak
RSS. The difference between two batch sizes isolates the activations: measured peak(B2) − peak(B1) against
the estimate's activations(B2) − activations(B1); likewise gradient checkpointing on against off.

    python benchmarks/perf/memory_estimate.py [--backbone gemma-3-270m] [--tokens 128] [--batches 2,8]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = """
import json, resource, sys
from coplctl.core.registry import METHODS
from coplctl.data import load
method, options, data = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
m = METHODS.get(method)(**options)
m.fit(load(data), seed=0, progress=False)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
"""
EXTRA = {"copl": {"gcf_overrides": {"epochs": 20}}, "uniform": {}}


def main() -> None:
    from coplctl.core.registry import METHODS
    from coplctl.data.protocol import ProtocolConfig
    from coplctl.data.simulate import SimConfig, simulate
    from coplctl.models.memory import estimate

    ap = argparse.ArgumentParser()
    ap.add_argument("--backbone", default="gemma-3-270m")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--batches", default="2,8")
    args = ap.parse_args()
    small, large = (int(b) for b in args.batches.split(","))
    gib = 2 ** 30
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        simulate(SimConfig(protocol=ProtocolConfig("uf-p-2", "all", users=8, unseen_users=0, survey_pairs=40))).save(data)
        print(f"{'method':<8} {'batch':>5} {'ckpt':>5} {'peak RSS':>9} {'estimate':>9} {'activations est.':>16}")
        peaks, est = {}, {}
        for method in ("uniform", "copl"):
            cls = METHODS.get(method)
            for batch, ckpt in ((small, False), (large, False), (large, True)):
                options = {"mode": "lora", "backbone": args.backbone, "max_length": args.tokens, "batch_size": batch,
                           "epochs": 1, "gradient_checkpointing": ckpt, "dtype": "float32", **EXTRA[method]}
                res = subprocess.run([sys.executable, "-c", CHILD, method, json.dumps(options), str(data)],
                                     capture_output=True, text=True, check=True)
                peak = int(res.stdout.strip().splitlines()[-1])
                e = estimate(cls, cls.Config(**options), dtype_bytes=4, fused_attention=False)
                peaks[method, batch, ckpt], est[method, batch, ckpt] = peak, e
                print(f"{method:<8} {batch:>5} {'on' if ckpt else 'off':>5} {peak / gib:>8.2f}G {e['total'] / gib:>8.2f}G "
                      f"{e['activations'] / gib:>15.3f}G", flush=True)
        print()
        for method in ("uniform", "copl"):
            for label, a, b in ((f"batch {small} -> {large}", (method, small, False), (method, large, False)),
                                (f"checkpointing at batch {large}", (method, large, True), (method, large, False))):
                measured = (peaks[b] - peaks[a]) / gib
                estimated = (est[b]["activations"] - est[a]["activations"]) / gib
                print(f"{method:<8} {label:<28} measured +{measured:.3f}G, estimated +{estimated:.3f}G "
                      f"(ratio {measured / estimated:.2f})")


if __name__ == "__main__":
    main()
