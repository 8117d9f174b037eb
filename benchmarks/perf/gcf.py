"""GCF speed, memory and accuracy at paper scale (simulated UF-P-4-AVG: 10,000 seen + 100 unseen users).

For the CPU preset and for d=512 (same schedule, learning rate scaled by sqrt(32/d)), prints seconds per epoch (median), time to the best
validation accuracy, that accuracy, and peak memory; then, on the CPU-preset run, the time and extra
peak memory of adapting the 100 unseen users, and graph-level accuracy on their held-out survey
pairs for each adaptation method, next to a non-personalized Bradley-Terry baseline.

Targets (2 CPU cores): CPU preset best accuracy in < 5 min and within 1 point of d=512; adapting
100 users in < 2 s with < 500 MB extra memory.

    python benchmarks/perf/gcf.py [--data DIR] [--dims 32,512] [--work DIR]

Each training runs in its own process so that peak memory is its own. d=512 takes about 1.5 hours
on 2 cores (about 18 s per full-graph step).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path


def _rss_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def worker_train(data: str, out: str, overrides: dict) -> dict:
    from coplctl.data import load
    from coplctl.graph.config import preset_config
    from coplctl.graph.train import train_gcf

    m = train_gcf(load(data), out, preset_config("cpu", **overrides), force=True, progress=False)
    times = [b["seconds"] - a["seconds"] for a, b in zip(m["history"], m["history"][1:])]
    return {"config": overrides, "s_per_epoch_median": statistics.median(times), "epochs": m["epochs_run"],
            "best_epoch": m["best_epoch"], "seconds_to_best": m["seconds_to_best"],
            "valid_accuracy": m["valid_accuracy"], "train_accuracy": m["train_accuracy"],
            "peak_rss_mb": _rss_mb("VmHWM")}


def worker_adapt(data: str, run_dir: str) -> dict:
    import torch

    from coplctl.copl.adapt import AdaptConfig, adapt_users, graph_accuracy
    from coplctl.data import load
    from coplctl.graph.run import GCFRun

    ds = load(data)
    fewshot, valid = ds.split("fewshot"), ds.split("valid")
    valid = valid[valid["user_id"].isin(set(fewshot["user_id"]))]
    run = GCFRun(run_dir)
    adapt_users(run, fewshot.head(16))  # warm-up: lazy imports and first-call allocations
    out = {}
    for method in ("weighted", "average", "optimize"):
        Path("/proc/self/clear_refs").write_text("5")  # reset the peak-RSS counter (Linux)
        before = _rss_mb("VmRSS")
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            adapted = adapt_users(run, fewshot, AdaptConfig(method=method))
            times.append(time.perf_counter() - t0)
        acc, n = graph_accuracy(run, adapted, valid)
        out[method] = {"seconds_median": statistics.median(times), "extra_peak_mb": _rss_mb("VmHWM") - before,
                       "unseen_valid_accuracy": acc, "pairs": n, "users": len(adapted.user_ids),
                       "fallback_users": adapted.report["fallback_users"]}
    # Non-personalized floor: one Bradley-Terry score per response, fitted on every training pair.
    g = run.graph
    u, c, r, _ = g.index_pairs(ds.split("train"))
    s = torch.zeros(g.num_responses, requires_grad=True)
    opt = torch.optim.Adam([s], lr=0.05)
    for _ in range(300):
        loss = -torch.nn.functional.logsigmoid(s[c] - s[r]).mean() + 1e-3 * s.pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    for name, pairs in (("seen", ds.split("valid")[lambda d: ~d["user_id"].isin(set(fewshot["user_id"]))]),
                        ("unseen", valid)):
        vu, vc, vr, ok = g.index_pairs(pairs.assign(user_id=g.user_ids[0]))
        out[f"global_bt_{name}_valid_accuracy"] = float((s[vc[ok]] > s[vr[ok]]).float().mean())
    return out


def _spawn(*args: str) -> dict:
    res = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True)
    if res.returncode:
        sys.exit(res.stderr)
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", help="Dataset directory (default: simulate UF-P-4-AVG at paper scale into --work).")
    ap.add_argument("--dims", default="32,512", help="Comma-separated embedding widths to train.")
    ap.add_argument("--work", default=".bench-gcf", help="Scratch directory for data and runs.")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--args", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        args = json.loads(a.args)
        print(json.dumps(worker_train(**args) if a.worker == "train" else worker_adapt(**args)))
        return

    work = Path(a.work)
    data = a.data
    if data is None:
        data = str(work / "sim-uf-p-4-avg")
        if not Path(data).exists():
            from coplctl.data.protocol import ProtocolConfig
            from coplctl.data.simulate import SimConfig, simulate

            simulate(SimConfig(protocol=ProtocolConfig("uf-p-4", "avg"), seed=0)).save(data)
    results = {}
    for d in (int(x) for x in a.dims.split(",")):
        out = str(work / f"gcf-d{d}")
        # Adam's steps are per coordinate: keep the step-to-weight ratio of the preset as d grows
        overrides = {"dim": d, "lr": round(0.02 * (32 / d) ** 0.5, 6)}
        results[d] = _spawn("--worker", "train", "--args", json.dumps({"data": data, "out": out, "overrides": overrides}))
        r = results[d]
        print(f"d={d:<4} s/epoch {r['s_per_epoch_median']:6.2f}  epochs {r['epochs']:3d}  best epoch {r['best_epoch']:3d}  "
              f"time to best {r['seconds_to_best']:7.1f} s  valid acc {100 * r['valid_accuracy']:.2f}  "
              f"train acc {100 * r['train_accuracy']:.2f}  peak RSS {r['peak_rss_mb']:.0f} MB", flush=True)
    if len(results) > 1:
        dims = sorted(results)
        gap = 100 * (results[dims[-1]]["valid_accuracy"] - results[dims[0]]["valid_accuracy"])
        print(f"valid accuracy, d={dims[-1]} minus d={dims[0]}: {gap:+.2f} points")
    first = min(results)
    ad = _spawn("--worker", "adapt", "--args", json.dumps({"data": data, "run_dir": str(work / f"gcf-d{first}")}))
    for method in ("weighted", "average", "optimize"):
        r = ad[method]
        print(f"adapt {method:<8} {r['users']} users: {r['seconds_median']:.3f} s (median of 5), extra peak "
              f"{max(0.0, r['extra_peak_mb']):.0f} MB, unseen held-out accuracy {100 * r['unseen_valid_accuracy']:.2f} "
              f"({r['pairs']} pairs, {r['fallback_users']} fallback users)")
    print(f"non-personalized BT floor: seen valid {100 * ad['global_bt_seen_valid_accuracy']:.2f}, "
          f"unseen held-out {100 * ad['global_bt_unseen_valid_accuracy']:.2f}")
    print(json.dumps({"train": results, "adapt": ad}))


if __name__ == "__main__":
    main()
