"""CoPL's figures: t-SNE of user embeddings coloured by group (paper Figures 1 and 4) and the expert
each group's users route to per MoLE layer (Figure 3); Figure 2 is drawn from stored results by
:mod:`coplctl.copl.report`."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from coplctl.core.atomic import atomic_path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def savefig(fig, out: str | Path) -> None:
    """Write ``fig`` as a PNG at ``out`` (atomically) and release it."""
    with atomic_path(Path(out)) as tmp:
        fig.savefig(tmp, format="png")
    _pyplot().close(fig)


def _stratified(groups: np.ndarray, limit: int, rng: np.random.Generator) -> np.ndarray:
    """Indices of at most ``limit`` items drawn uniformly (each group keeps its share in expectation)."""
    if len(groups) <= limit:
        return np.arange(len(groups))
    keep = rng.permutation(len(groups))[:limit]
    return np.sort(keep)


def plot_embeddings(run_dir: str | Path, out: str | Path, *, adapted: str | Path | None = None,
                    adapted_embeddings: tuple[list[str], "object"] | None = None,
                    max_users: int = 3000, seed: int = 0, title: str | None = None) -> dict:
    """t-SNE of seen users' (and adapted unseen users') embeddings, coloured by group, as a PNG.

    Adapted users come from an ``adapt`` output directory or as (ids, embeddings); they are drawn with
    black edges, as in the paper's Figure 4. Returns what was drawn.
    """
    from sklearn.manifold import TSNE

    from coplctl.core.files import read_adapted
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
        ids, emb = read_adapted(Path(adapted) / "embeddings.safetensors")
        X.append(emb.numpy())
        groups.append(np.asarray([group_of.get(u, "(no group)") for u in ids]))
        is_new.append(np.ones(len(ids), dtype=bool))
    if adapted_embeddings is not None and len(adapted_embeddings[0]):
        ids, emb = adapted_embeddings
        X.append(np.asarray(emb, dtype=np.float32))
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
    savefig(fig, out)
    return {"seen": int((~is_new).sum()), "adapted": int(is_new.sum()), "groups": names, "path": str(out)}


def _natural(name: str) -> list:
    """Sort key reading digit runs as numbers: layers.2 before layers.10."""
    import re

    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def expert_allocation(run_dir: str | Path) -> dict:
    """Top-1 expert of every user at every MoLE layer, read from a CoPL run's saved gates.

    Needs no backbone: each gate is a two-layer MLP on the user table, and top-1 routing is the argmax
    of its logits. Returns {"users": [...], "groups": [...], "layers": {name: [expert per user]}}.
    """
    import torch

    from coplctl.core.errors import CoplError, DataError
    from coplctl.core.files import read_parquet, read_safetensors, read_user_ids

    run_dir = Path(run_dir)
    for name in ("model.safetensors", "users.json"):
        if not (run_dir / name).is_file():
            raise CoplError(f"{run_dir} is not a saved reward-model run: no {name} (train one with `coplctl train copl`)")
    weights = read_safetensors(run_dir / "model.safetensors")
    gates = sorted((k[: -len(".gate.0.weight")] for k in weights if k.endswith(".gate.0.weight")), key=_natural)
    if not gates or "user_table" not in weights:
        raise CoplError(f"{run_dir} has no MoLE gates (is it a CoPL run with mole enabled?)")
    users = read_user_ids(run_dir / "users.json")
    table = weights["user_table"]
    if table.dim() != 2 or len(table) != len(users):
        raise DataError(run_dir / "model.safetensors", "user_table does not have one row per user of users.json")
    groups_file = run_dir / "gcf" / "users.parquet"
    group_of = {}
    if groups_file.exists():
        g = read_parquet(groups_file, ("user_id", "group"), "users table")
        group_of = dict(zip(g["user_id"], g["group"].fillna("(no group)")))
    layers = {}
    for name in gates:
        h = torch.relu(table @ weights[f"{name}.gate.0.weight"].T + weights[f"{name}.gate.0.bias"])
        logits = h @ weights[f"{name}.gate.2.weight"].T + weights[f"{name}.gate.2.bias"]
        layers[name.removeprefix("encoder.")] = logits.argmax(-1).tolist()
    return {"users": users, "groups": [group_of.get(u, "(no group)") for u in users], "layers": layers,
            "experts": int(weights[f"{gates[0]}.gate.2.weight"].shape[0])}


def _routing_title(name: str, stats: dict) -> str:
    """A panel title: the layer, then its group-expert mutual information and a collapse mark."""
    label = name if len(name) < 40 else "…" + name[-38:]
    mi, nmi = stats["mutual_information"], stats["normalized_mi"]
    line = "MI n/a (no groups)" if mi is None else f"MI {mi:.2f} bits"
    if nmi is not None:
        line += f" ({100 * nmi:.0f}% of H)"
    if stats["collapsed"]:
        line += f" · COLLAPSED {100 * stats['top_share']:.0f}% → {stats['top_expert']}"
    return f"{label}\n{line}"


def plot_experts(run_dir: str | Path, out: str | Path, *, layers: list[int] | None = None) -> dict:
    """Users per expert and group at each MoLE layer (paper Figure 3), as a PNG grid of bar charts.

    Each panel's title gives the layer's mutual information between group and expert and marks a
    collapsed layer (:func:`coplctl.copl.mole.routing_stats`); so does the returned ``routing``.
    """
    from coplctl.copl.mole import routing_stats

    alloc = expert_allocation(run_dir)
    names = list(alloc["layers"])
    if layers:
        bad = [i for i in layers if not 0 <= i < len(names)]
        if bad:
            from coplctl.core.errors import CoplError

            raise CoplError(f"--layer {bad[0]} does not exist: {run_dir} has MoLE layers 0-{len(names) - 1}")
        names = [names[i] for i in layers]
    groups = np.asarray(alloc["groups"])
    group_names = sorted(set(groups))
    m = alloc["experts"]
    stats = routing_stats({n: alloc["layers"][n] for n in names},
                          [None if g == "(no group)" else g for g in alloc["groups"]], num_experts=m)
    plt = _pyplot()
    cols = min(4, len(names))
    rows = (len(names) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.6 * rows), dpi=120, squeeze=False)
    colours = plt.get_cmap("tab10")
    for ax, name in zip(axes.flat, names):
        chosen = np.asarray(alloc["layers"][name])
        bottom = np.zeros(m)
        for k, g in enumerate(group_names):
            counts = np.bincount(chosen[groups == g], minlength=m)
            ax.bar(np.arange(m), counts, bottom=bottom, color=colours(k % 10), label=g)
            bottom += counts
        ax.set_title(_routing_title(name, stats[name]), fontsize=7,
                     color="tab:red" if stats[name]["collapsed"] else "black")
        ax.set_xticks(range(m))
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=6)
    fig.supxlabel("expert")
    fig.supylabel("users")
    fig.tight_layout()
    savefig(fig, out)
    used = {n: sorted(set(alloc["layers"][n])) for n in names}
    return {"path": str(out), "layers": len(names), "experts_used": used, "routing": stats}
