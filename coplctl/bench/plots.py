"""Figures of the paper: t-SNE of user embeddings coloured by group (Figures 1 and 4)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from coplctl.atomic import atomic_path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _stratified(groups: np.ndarray, limit: int, rng: np.random.Generator) -> np.ndarray:
    """Indices of at most ``limit`` items drawn uniformly (each group keeps its share in expectation)."""
    if len(groups) <= limit:
        return np.arange(len(groups))
    keep = rng.permutation(len(groups))[:limit]
    return np.sort(keep)


def plot_embeddings(run_dir: str | Path, out: str | Path, *, adapted: str | Path | None = None,
                    max_users: int = 3000, seed: int = 0, title: str | None = None) -> dict:
    """t-SNE of seen users' (and adapted unseen users') embeddings, coloured by group, as a PNG.

    Adapted users are drawn with black edges, as in the paper's Figure 4. Returns what was drawn.
    """
    from safetensors import safe_open
    from sklearn.manifold import TSNE

    from coplctl.graph.run import GCFRun

    run = GCFRun(run_dir)
    group_of = dict(zip(run.users["user_id"], run.users["group"].fillna("(no group)")))
    rng = np.random.default_rng(seed)
    seen_ids = np.asarray(run.graph.user_ids)
    seen_groups = np.asarray([group_of.get(u, "(no group)") for u in seen_ids])
    pick = _stratified(seen_groups, max_users, rng)
    X = [run.exported_user_emb.numpy()[pick]]
    groups = [seen_groups[pick]]
    is_new = [np.zeros(len(pick), dtype=bool)]
    if adapted is not None:
        with safe_open(str(Path(adapted) / "embeddings.safetensors"), "pt") as f:
            ids = json.loads(f.metadata()["user_ids"])
            X.append(f.get_tensor("embeddings").numpy())
        groups.append(np.asarray([group_of.get(u, "(no group)") for u in ids]))
        is_new.append(np.ones(len(ids), dtype=bool))
    X, groups, is_new = np.concatenate(X), np.concatenate(groups), np.concatenate(is_new)
    xy = TSNE(n_components=2, init="pca", random_state=seed, perplexity=min(30, max(5, len(X) // 4))).fit_transform(X)

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 5.5), dpi=130)
    names = sorted(set(groups))
    colours = plt.get_cmap("tab10")
    for k, g in enumerate(names):
        m = (groups == g) & ~is_new
        ax.scatter(xy[m, 0], xy[m, 1], s=6, alpha=0.6, color=colours(k % 10), label=g, linewidths=0)
        m = (groups == g) & is_new
        if m.any():
            ax.scatter(xy[m, 0], xy[m, 1], s=28, color=colours(k % 10), edgecolors="black", linewidths=0.8)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title or f"User embeddings ({run.path.name}), t-SNE")
    ax.legend(markerscale=3, fontsize=8, loc="best")
    fig.tight_layout()
    out = Path(out)
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return {"seen": int((~is_new).sum()), "adapted": int(is_new.sum()), "groups": names, "path": str(out)}
