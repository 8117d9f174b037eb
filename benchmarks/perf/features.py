"""Frozen-feature extraction speed on this machine: texts per second by precision and length limit, how far
bf16 features are from fp32's, and one process against two (`coplctl data embed` under accelerate launch).

Texts: the responses of a simulated UF-P-2 dataset ("short": about 170 tokens formatted), and the same
responses behind a three-turn dialogue history as their prompt ("long": about 560 tokens, like multi-turn
preference data). Settings compared, each on the same texts, median of --repeats passes:

- ``fp32 @512``: what frozen features ran before (fp32, the 512 positions of all-MiniLM-L6-v2);
- ``fp32 @own``: the model's own limit (its max_seq_length, 256), fp32;
- ``bf16 @own``: the default on CPUs with native bf16 (autocast; fp32 weights).

    python benchmarks/perf/features.py [--texts 600] [--repeats 3] [--processes]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _texts(n: int):
    from coplctl.data.protocol import ProtocolConfig
    from coplctl.data.simulate import SimConfig, simulate

    ds = simulate(SimConfig(ProtocolConfig("uf-p-2", "all", users=200, unseen_users=2, survey_pairs=n)))
    r = ds.responses.drop_duplicates("text").head(n)
    prompts, texts = r["prompt"].tolist(), r["text"].tolist()
    history = [f"{prompts[i]}\n\nAssistant: {texts[i - 1]}\n\nHuman: {prompts[i - 2]}\n\nAssistant: {texts[i - 3]}"
               f"\n\nHuman: {prompts[i]}" for i in range(len(prompts))]
    return ds, {"short": (prompts, texts), "long": (history, texts)}


def _rate(backbone, prompts, responses, repeats: int):
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out, cuts = backbone.embed(prompts, responses)
        times.append(time.perf_counter() - t0)
    return len(prompts) / statistics.median(times), out, cuts


def speeds(n: int, repeats: int) -> None:
    import torch

    from coplctl.models.backbone import Backbone, cpu_has_bf16
    from coplctl.models.tokens import cut_counts

    _, sets = _texts(n)
    print(f"torch threads {torch.get_num_threads()}, native bf16 {cpu_has_bf16()}, {n} texts per set")
    settings = {"fp32 @512": dict(max_length=512, precision="float32"), "fp32 @own": dict(precision="float32"),
                "bf16 @own": dict(precision="bfloat16")}
    for name, (prompts, responses) in sets.items():
        rows, ref = {}, None
        for label, kw in settings.items():
            b = Backbone("minilm", **kw)
            b.embed(prompts[:32], responses[:32])  # warm up
            rate, out, cuts = _rate(b, prompts, responses, repeats)
            if label == "fp32 @own":
                ref = out
            rows[label] = (rate, out, cut_counts(cuts), b.max_length)
        base = rows["fp32 @512"][0]
        lengths = [len(t) for t in Backbone("minilm", max_length=100_000).encode(prompts, responses)[0]]
        print(f"\n{name} texts: median {statistics.median(lengths):.0f} tokens, max {max(lengths)}")
        print(f"{'setting':<11} {'limit':>5} {'texts/s':>8} {'x fp32@512':>10} {'cos to fp32@own (min)':>22}  cut")
        for label, (rate, out, cuts, limit) in rows.items():
            cos = torch.nn.functional.cosine_similarity(out, ref).min().item() if label != "fp32 @512" else float("nan")
            print(f"{label:<11} {limit:>5} {rate:>8.1f} {rate / base:>10.2f} {cos:>22.6f}  {cuts}")


def processes(n: int) -> None:
    """`coplctl data embed` on one process (all threads) and on two (accelerate launch, one thread each)."""
    from coplctl.data.protocol import ProtocolConfig
    from coplctl.data.simulate import SimConfig, simulate

    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        simulate(SimConfig(ProtocolConfig("uf-p-2", "all", users=200, unseen_users=2, survey_pairs=n))).save(data)
        cores = os.cpu_count() or 1
        for procs in (1, 2):
            args = ["-m", "coplctl", "data", "embed", str(data), "--json"]
            env = {**os.environ, "COPLCTL_CACHE": str(Path(tmp) / f"cache{procs}")}
            if procs > 1:
                args = ["-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(procs),
                        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", *args]
                env["OMP_NUM_THREADS"] = str(max(1, cores // procs))
            res = subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, check=True)
            done = json.loads(res.stdout)
            print(f"{procs} process(es): {done['embedded']} texts in {done['seconds']} s "
                  f"({done['texts_per_second']} texts/s), {done['truncated']}")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--texts", type=int, default=600)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--processes", action="store_true", help="also time `coplctl data embed` on 1 and 2 processes")
    a = ap.parse_args()
    speeds(a.texts, a.repeats)
    if a.processes:
        processes(a.texts)
