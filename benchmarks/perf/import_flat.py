"""Time `coplctl data import` on a flat table of 1M judgements (JSONL, CSV and Parquet), end to end.

Target: under 60 s on 2 CPU cores for 1M rows, reading, checking, splitting and writing included. The
table has real data's shape: 100,000 users with 10 judgements each on 50,000 prompts of 4 responses,
texts of 40-120 words, two groups, 100 unseen users. Prints the median of --repeats runs per format of the
whole command (``python -m coplctl data import``, so start-up counts too).

    python benchmarks/perf/import_flat.py [--rows 1000000] [--repeats 3] [--formats jsonl,csv,parquet]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd


def table(rows: int, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    words = np.array([f"w{i}" for i in range(5000)])
    n_prompts = max(2, rows // 20)
    responses = [" ".join(rng.choice(words, rng.integers(40, 121))) for _ in range(n_prompts * 4)]
    prompts = [" ".join(rng.choice(words, 12)) + "?" for _ in range(n_prompts)]
    users = max(1, rows // 10)
    user = np.repeat(np.arange(users), 10)[:rows]
    prompt = rng.integers(0, n_prompts, rows)
    a, b = rng.integers(0, 4, rows), rng.integers(1, 4, rows)
    b = (a + b) % 4
    group = np.where(user % 2 == 0, "short", "long")
    chosen_a = (np.char.str_len(np.array(responses, dtype=str)[prompt * 4 + a]) <
                np.char.str_len(np.array(responses, dtype=str)[prompt * 4 + b])) == (group == "short")
    ra, rb = prompt * 4 + a, prompt * 4 + b
    resp = np.array(responses, dtype=object)
    return pd.DataFrame({"user": user.astype(str), "prompt": np.array(prompts, dtype=object)[prompt],
                         "chosen": np.where(chosen_a, resp[ra], resp[rb]),
                         "rejected": np.where(chosen_a, resp[rb], resp[ra]), "group": group})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--formats", default="jsonl,csv,parquet")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        df = table(args.rows)
        print(f"{'format':<8} {'rows':>10} {'file MB':>8} {'median s':>9} {'rows/s':>10}  runs")
        for fmt in args.formats.split(","):
            src = tmp / f"table.{fmt}"
            if fmt == "jsonl":
                df.to_json(src, orient="records", lines=True, force_ascii=False)
            elif fmt == "csv":
                df.to_csv(src, index=False)
            else:
                df.to_parquet(src)
            times = []
            for r in range(args.repeats):
                out = tmp / f"out-{fmt}-{r}"
                t0 = time.perf_counter()
                subprocess.run([sys.executable, "-m", "coplctl", "data", "import", str(src), "--out", str(out),
                                "--unseen-users", "100"], check=True, capture_output=True)
                times.append(time.perf_counter() - t0)
            med = statistics.median(times)
            print(f"{fmt:<8} {len(df):>10,} {src.stat().st_size / 1e6:>8.1f} {med:>9.2f} {len(df) / med:>10,.0f}  "
                  + " ".join(f"{t:.2f}" for t in times))


if __name__ == "__main__":
    main()
