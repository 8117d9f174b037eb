"""Do user embeddings carry the users' preference groups? Two measures, used by `graph train`, the
benchmark's Table 5 and ``benchmarks/perf/gcf_quality.py``.

- :func:`group_probe`: 5-fold cross-validated accuracy of a logistic regression that predicts each
  user's group from its embedding (chance = the largest group's share). Validation accuracy on pairs
  can be high while the embeddings say little about the group (the response embeddings can carry
  most of a pair's outcome); the probe measures what the reward model's gates can route on.
- :func:`weight_probe`: for users with mixed preferences (no groups), the cross-validated R² of their
  attribute weights predicted from the embedding.
- :func:`spectral_split`: a learning-free reference. The signed co-annotation matrix
  C[u, v] = Σ over pairs both annotated (+1 same choice, −1 opposite) is split by the leading
  eigenvectors of its degree-normalised form (k-means on them for more than two groups); the
  accuracy of the best matching of clusters to groups says how much group signal the graph holds.
"""

from __future__ import annotations

import itertools

import numpy as np
import pandas as pd

MIN_PER_GROUP = 5  # fewer users in some group: no probe (a 5-fold split cannot be stratified)


def _labels(groups) -> np.ndarray | None:
    g = pd.Series(groups, dtype=object)
    known = g.notna().to_numpy()
    if known.sum() == 0:
        return None
    counts = g[known].value_counts()
    if len(counts) < 2 or counts.min() < MIN_PER_GROUP:
        return None
    return known


def group_probe(embeddings, groups, *, folds: int = 5, seed: int = 0) -> float | None:
    """Mean held-out accuracy of predicting ``groups`` from ``embeddings`` (rows aligned); users with a
    null group are left out. None when there are fewer than two groups of at least 5 users."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    known = _labels(groups)
    if known is None:
        return None
    x = np.asarray(embeddings, dtype=np.float64)[known]
    y = np.asarray(pd.Series(groups, dtype=object)[known].astype(str))
    folds = min(folds, int(pd.Series(y).value_counts().min()))
    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    cv = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    return float(cross_val_score(clf, x, y, cv=cv).mean())


def weight_probe(embeddings, weights, *, folds: int = 5, seed: int = 0) -> float | None:
    """For users with mixed preferences instead of groups: 5-fold cross-validated R² of a ridge regression
    that predicts each user's attribute weights from its embedding (0: no better than the mean weights;
    1: recovered exactly). None when fewer than 10 users have weights."""
    from sklearn.linear_model import RidgeCV
    from sklearn.model_selection import KFold, cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    w = np.asarray(weights, dtype=np.float64)
    known = np.isfinite(w).all(axis=1)
    if known.sum() < 10:
        return None
    model = make_pipeline(StandardScaler(), RidgeCV(alphas=np.logspace(-3, 3, 7)))
    cv = KFold(n_splits=folds, shuffle=True, random_state=seed)
    x = np.asarray(embeddings, dtype=np.float64)[known]
    return float(cross_val_score(model, x, w[known], cv=cv, scoring="r2").mean())


def coannotation_matrix(pairs: pd.DataFrame, user_ids: list[str]):
    """Signed user × user co-annotation counts (scipy sparse) from ``pairs`` (user_id, chosen_id, rejected_id)."""
    import scipy.sparse as sp

    index = {u: i for i, u in enumerate(user_ids)}
    p = pairs[pairs["user_id"].isin(index)]
    lo = np.minimum(p["chosen_id"].to_numpy(), p["rejected_id"].to_numpy())
    key, codes = np.unique(np.stack([lo, np.maximum(p["chosen_id"].to_numpy(), p["rejected_id"].to_numpy())], 1)
                           .astype(str), axis=0, return_inverse=True)
    sign = np.where(p["chosen_id"].to_numpy() == lo, 1.0, -1.0)
    a = sp.csr_matrix((sign, (p["user_id"].map(index).to_numpy(), codes.ravel())), shape=(len(user_ids), len(key)))
    c = (a @ a.T).tocsr()
    c.setdiag(0)
    c.eliminate_zeros()
    return c


def spectral_split(pairs: pd.DataFrame, user_ids: list[str], groups, *, seed: int = 0) -> float | None:
    """Accuracy of the signed spectral clustering of the co-annotation matrix against ``groups``."""
    import scipy.sparse as sp
    from scipy.sparse.linalg import eigsh
    from sklearn.cluster import KMeans

    known = _labels(groups)
    if known is None:
        return None
    y = pd.Series(groups, dtype=object)
    names = sorted(y[known].astype(str).unique())
    c = coannotation_matrix(pairs, user_ids)
    deg = np.asarray(abs(c).sum(1)).ravel() + 1.0  # signed Laplacian's degrees; +1 keeps isolated users finite
    d = sp.diags(1 / np.sqrt(deg))
    k = len(names) - 1 if len(names) > 2 else 1
    rng = np.random.default_rng(seed)
    _, vecs = eigsh(d @ c @ d, k=max(k, 1), which="LA", v0=rng.standard_normal(c.shape[0]))
    if len(names) == 2:
        cluster = (vecs[:, -1] > 0).astype(int)
    else:
        cluster = KMeans(len(names), n_init=10, random_state=seed).fit_predict(vecs)
    truth = y[known].astype(str).map({g: i for i, g in enumerate(names)}).to_numpy()
    cluster = cluster[known]
    best = 0.0
    for perm in itertools.permutations(range(len(names))):  # at most 4 groups: 24 matchings
        best = max(best, float((np.asarray(perm)[cluster] == truth).mean()))
    return best
