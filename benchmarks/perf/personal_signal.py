"""The personal signal of every simulated spec's dataset (:mod:`coplctl.data.signal`): how many of a seen
user's training labels go against the other users' majority on the same pair; and whether those labels can
tell the users' true communities apart at all (the group, or for mixture users the dominant attribute),
which only a simulator knows:

- spectral split: accuracy of the learning-free signed spectral clustering of all co-annotations
  (:func:`coplctl.graph.probe.spectral_split`) against the communities (chance: the largest one's share);
- spectrum probe: the communities read off the top 8 eigenvectors of the co-annotations with each
  pair's consensus removed, by a logistic regression that is shown the answers (:func:`spectrum_probe`),
  as the GCF's group probe reads its embeddings.

Simulates each spec's data section as a benchmark would (paper scale; seconds to a minute each) into a
temporary directory, and prints one row per spec.

    python benchmarks/perf/personal_signal.py [SPEC ...]
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def communities(ds) -> np.ndarray:
    """Each seen user's true community: its group, or for mixture users the attribute it weighs most."""
    from coplctl.data.dataset import weight_columns

    seen = ds.users[ds.users["role"] == "seen"]
    weights = weight_columns(seen)
    return seen[weights].to_numpy().argmax(1).astype(str) if weights else seen["group"].astype(str).to_numpy()


def spectrum_probe(ds, community: np.ndarray, k: int = 8) -> float:
    """Held-out accuracy of a logistic regression reading ``community`` off the top ``k`` eigenvectors of
    S·Sᵀ, S the seen users × pairs matrix of votes (±1) minus each pair's mean vote (the consensus removed):
    what the labels' co-annotation structure holds, even for a reader who is shown the answers (the GCF's
    group probe reads its embeddings the same way)."""
    import scipy.sparse as sp
    from scipy.sparse.linalg import eigsh

    import pandas as pd

    from coplctl.data.signal import votes
    from coplctl.graph.probe import group_probe

    seen = ds.users.loc[ds.users["role"] == "seen", "user_id"]
    index = {u: i for i, u in enumerate(seen)}
    p = ds.pairs[(ds.pairs["split"] == "train") & ds.pairs["user_id"].isin(index)]
    pair, vote = votes(p)
    key, vote = pd.factorize(pair)[0], vote.astype(float)
    centred = vote - (np.bincount(key, weights=vote) / np.bincount(key))[key]
    s = sp.csr_matrix((centred, (p["user_id"].map(index).to_numpy(), key)), shape=(len(index), key.max() + 1))
    _, vectors = eigsh(s @ s.T, k=k, which="LA", v0=np.random.default_rng(0).standard_normal(len(index)))
    return group_probe(vectors, community)


def main() -> None:
    from coplctl.bench.data import prepare_data
    from coplctl.bench.spec import load_spec, search_dirs
    from coplctl.data.signal import seen_train_signal
    from coplctl.graph.probe import spectral_split

    names = sys.argv[1:] or sorted({p.stem for d in search_dirs() for p in d.glob("*.yaml")
                                    if load_spec(p.stem).data.source == "simulated"})
    print(f"{'spec':<26} {'users':>7} {'personal share':>14} {'personal/user':>13} {'comparable/user':>15} "
          f"{'no majority':>11} {'spectral split':>14} {'spectrum probe':>14} {'chance':>6} {'s':>5}")
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            t = time.perf_counter()
            ds = prepare_data(load_spec(name), Path(tmp) / name)
            s = seen_train_signal(ds)
            truth = communities(ds)
            probe = spectrum_probe(ds, truth)
            seen = ds.users.loc[ds.users["role"] == "seen", "user_id"]
            split = spectral_split(ds.split("train"), list(seen), list(truth))
            chance = np.unique(truth, return_counts=True)[1].max() / len(truth)
            print(f"{name:<26} {s['users']:>7,} {100 * s['share']:>13.1f}% {s['personal_per_user']:>13.2f} "
                  f"{s['labels_per_user']:>15.2f} {s['without_majority']:>11,} {100 * split:>13.1f}% "
                  f"{100 * probe:>13.1f}% {100 * chance:>5.1f}% "
                  f"{time.perf_counter() - t:>5.0f}", flush=True)


if __name__ == "__main__":
    main()
