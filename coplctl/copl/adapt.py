"""Unseen-user adaptation (paper §4.3, Table 4).

Given a trained GCF and a new user u* with a few pairs D_u* over graph responses:

- ``weighted`` (CoPL, default): take the seen users reached from u*'s chosen responses by k hops over
  positive edges only (k even; k = 2: seen users who chose a response u* chose), score each with the
  GCF, γ_u = Σ_{(a≻b)∈D_u*} log σ(s_ua − s_ub), w = softmax(γ / κ) with κ = 0.07, e_u* = Σ w_u e_u.
  For a run of the ``official`` variant γ is computed as the authors' code does
  (ml-postech/CoPL ``models/CoPL_gcf.py``, ``unseen_user_adaptation.py``): scores of the L2-normalised
  user embeddings (the exported ones) with the raw response embeddings, and the mean over the user's pairs
  instead of the sum (much softer weights).
- ``average``: the unweighted mean of the same neighbours (Table 4, "Naive Avg.").
- ``optimize``: a free embedding fitted by the GCF's BT loss on D_u*, everything else frozen
  (Table 4, "User Opt.").

Beyond the paper, a pair on a response outside the graph can still be used: given a
:class:`coplctl.copl.placement.Placement` (CoPL places such responses by their frozen-backbone features), a
placed response scores with the GCF embedding the placement gives it and, when chosen, reaches seen
users through the positive edges of its nearest graph responses. The report counts each
user's pairs ``pairs_in_graph``, ``pairs_placed`` and ``pairs_outside_graph`` (those left out).

Only the scores actually needed are computed (neighbours × the user's pairs), never a dense
users × responses matrix. A user with no k-hop neighbour falls back, explicitly, to the weighted
(or plain) mean over *all* seen users; the fallback is counted and reported per user.

Work is linear in the number of new users: pairs are sorted by user (CSR pointers), neighbours are
found with integer arrays (no sparse tensors), a block of users at a time, and the per-user softmax
runs on padded batches of users with similar neighbour counts, of bounded memory.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Annotated

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from coplctl.copl import ADAPTATIONS
from coplctl.copl.placement import Placement
from coplctl.core.config import AT_LEAST_1, NON_NEGATIVE, POSITIVE, OneOf, Range, check_fields
from coplctl.core.errors import CoplError
from coplctl.graph.run import GCFRun

USER_BLOCK = 512  # new users whose k-hop neighbourhoods are found together
CHUNK_ELEMENTS = 1 << 23  # floats of the padded (users × neighbours × (d + pairs)) batches
BITMAP_LIMIT = 1 << 26  # bytes of a (users × nodes) reachability bitmap; beyond, sort unique keys instead
BITMAP_SPARSITY = 16  # ... and only when at least one cell in this many is marked


@dataclass
class AdaptConfig:
    """Adaptation settings; defaults are the paper's (Appendix C.2). Checked when built: a wrong type, NaN
    or out-of-range value is one error naming the option, never all-NaN embeddings later."""

    method: Annotated[str, OneOf(*ADAPTATIONS)] = "weighted"
    """``weighted`` (CoPL), ``average`` (Naive Avg.) or ``optimize`` (User Opt.)."""
    hops: Annotated[int, Range(min=2)] = 2
    """k, an even number of hops over positive edges (paper: 2; Figure 2 also 4)."""
    temperature: Annotated[float, POSITIVE] = 0.07
    """κ of the softmax over γ (paper: 0.07)."""
    steps: Annotated[int, AT_LEAST_1] = 100
    """Adam steps of ``optimize``."""
    lr: Annotated[float, POSITIVE] = 0.05
    """Learning rate of ``optimize``."""
    l2: Annotated[float, NON_NEGATIVE] = 1e-3
    """L2 penalty on the free embedding of ``optimize``."""

    def __post_init__(self):
        check_fields(self, "adapt")  # types (no NaN or infinity), choices and ranges, naming the option
        if self.hops % 2:
            raise CoplError(f"adapt option hops: {self.hops} is odd; --hops must be an even number >= 2 "
                            "(user -> response -> user ...)")


@dataclass
class Adapted:
    """Adapted users: exported embeddings for reward models, raw ones for GCF scores, and a report."""

    user_ids: list[str]
    embeddings: torch.Tensor  # (n, d) in the exported space (what reward models read)
    raw: torch.Tensor  # (n, d) in the GCF's score space
    report: dict = field(default_factory=dict)


def _csr(rows: np.ndarray, cols: np.ndarray, n_rows: int, n_cols: int) -> tuple[np.ndarray, np.ndarray]:
    """(ptr, cols) of (row, col) pairs (unique, as graph edges are), columns ascending within each row."""
    ptr = np.zeros(n_rows + 1, dtype=np.int64)
    np.cumsum(np.bincount(rows, minlength=n_rows), out=ptr[1:])
    return ptr, np.sort(rows * n_cols + cols) % n_cols  # one sort of int64 keys: 6x faster than a lexsort


def _ranges(starts: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Concatenated ``arange(s, s + c)`` for every (s, c)."""
    total = int(counts.sum())
    offsets = np.arange(total, dtype=np.int64) - np.repeat(np.cumsum(counts) - counts, counts)
    return np.repeat(starts, counts) + offsets


def _hop(rows: np.ndarray, cols: np.ndarray, ptr: np.ndarray, idx: np.ndarray, width: int):
    """One hop: every (row, idx of col) for (row, col) given, deduplicated, sorted by row then column."""
    counts = ptr[cols + 1] - ptr[cols]
    new_rows, new = np.repeat(rows, counts), idx[_ranges(ptr[cols], counts)]
    if len(new) == 0:
        return new_rows, new
    base = int(new_rows.min())
    span = int(new_rows.max()) - base + 1
    if span * width <= min(BITMAP_LIMIT, BITMAP_SPARSITY * len(new)):  # dense: mark a bitmap, read it in order
        mark = np.zeros((span, width), dtype=bool)
        mark[new_rows - base, new] = True
        r, c = np.nonzero(mark)
        return r + base, c
    key = _unique(new_rows * width + new)
    return key // width, key % width


def _unique(keys: np.ndarray) -> np.ndarray:
    """Sorted distinct values (np.unique's hashing is many times slower on large int64 arrays)."""
    keys = np.sort(keys)
    keep = np.ones(len(keys), dtype=bool)
    np.not_equal(keys[1:], keys[:-1], out=keep[1:])
    return keys[keep]


class _Hops:
    """k-hop reachability over the positive edges, for blocks of new users (binary, sorted)."""

    def __init__(self, run: GCFRun, hops: int):
        g = run.graph
        u, r = (g.pos[0].numpy().astype(np.int64), g.pos[1].numpy().astype(np.int64))
        self.nu, self.nr, self.hops = g.num_users, g.num_responses, hops
        self.r_ptr, self.r_users = _csr(r, u, self.nr, self.nu)  # response -> users who chose it
        self.u_ptr, self.u_resp = _csr(u, r, self.nu, self.nr)  # user -> responses the user chose

    def __call__(self, users: np.ndarray, chosen: np.ndarray):
        """(new user, seen user) edges reached from (new user, chosen response) pairs."""
        if len(users) == 0:
            return users, users
        key = _unique(users * self.nr + chosen)
        rows, cols = _hop(key // self.nr, key % self.nr, self.r_ptr, self.r_users, self.nu)
        for _ in range(self.hops // 2 - 1):
            rows, resp = _hop(rows, cols, self.u_ptr, self.u_resp, self.nr)
            rows, cols = _hop(rows, resp, self.r_ptr, self.r_users, self.nu)
        return rows, cols


def adapt_users(run: GCFRun, pairs: pd.DataFrame, cfg: AdaptConfig | None = None, *,
                placement: Placement | None = None) -> Adapted:
    """Adapt every user of ``pairs`` (user_id, chosen_id, rejected_id).

    A pair over responses the graph knows is used as the paper does; one over a response of
    ``placement`` (beyond the paper) through its nearest graph responses. Other pairs are left out and
    counted per user; a user left with no pair gets the fallback.
    """
    cfg = cfg or AdaptConfig()
    g = run.graph
    codes, uniques = pd.factorize(pairs["user_id"], sort=False)  # users in order of first appearance
    user_ids = uniques.tolist()
    n, nr = len(user_ids), g.num_responses
    known = pd.Index(g.response_ids)
    c = known.get_indexer(pairs["chosen_id"])  # -1: a response the graph does not know
    r = known.get_indexer(pairs["rejected_id"])
    in_graph = (c >= 0) & (r >= 0)
    E_u, E_r = run.user_emb, run.response_emb
    if placement is not None and len(placement.ids):  # placed responses: nodes nr, nr + 1, ... after the graph's
        ids = pd.Index(placement.ids)
        ec, er = ids.get_indexer(pairs["chosen_id"]), ids.get_indexer(pairs["rejected_id"])
        c = np.where(c >= 0, c, np.where(ec >= 0, nr + ec, -1))
        r = np.where(r >= 0, r, np.where(er >= 0, nr + er, -1))
        E_r = torch.cat([E_r, placement.embedding(E_r)])
    inside = (c >= 0) & (r >= 0)
    pu, pc, pr = codes[inside].astype(np.int64), c[inside].astype(np.int64), r[inside].astype(np.int64)
    counts = {name: np.bincount(codes[mask], minlength=n).tolist() for name, mask in
              (("pairs_in_graph", in_graph), ("pairs_placed", inside & ~in_graph), ("pairs_outside_graph", ~inside))}
    per_user = {u: {"pairs_used": counts["pairs_in_graph"][i] + counts["pairs_placed"][i],
                    **{name: v[i] for name, v in counts.items()}} for i, u in enumerate(user_ids)}

    if cfg.method == "optimize":
        raw = _optimize(E_u, E_r, torch.from_numpy(pu), torch.from_numpy(pc), torch.from_numpy(pr), n, cfg)
        emb = run.export(raw)
        fallback = 0
    else:
        raw, emb, neighbours = _neighbour_means(run, E_r, pu, pc, pr, n, cfg, placement)
        fallback = int((neighbours == 0).sum())
        for u, k in zip(user_ids, neighbours.tolist()):
            per_user[u].update(neighbours=k, fallback=k == 0)
    report = {
        "method": cfg.method, "hops": cfg.hops, "temperature": cfg.temperature,
        "users": len(user_ids), "pairs": int(inside.sum()), "pairs_in_graph": int(in_graph.sum()),
        "pairs_placed": int((inside & ~in_graph).sum()), "pairs_outside_graph": int((~inside).sum()),
        "placement": None if placement is None else {"k": placement.k, "responses": len(placement.ids)},
        "fallback_users": fallback,
        "fallback": "weighted mean over all seen users" if cfg.method == "weighted" else
                    "mean over all seen users" if cfg.method == "average" else None,
        "per_user": per_user,
    }
    return Adapted(user_ids, emb, raw, report)


def _neighbour_means(run: GCFRun, E_r, pu, pc, pr, n: int, cfg: AdaptConfig, placement: Placement | None = None):
    """Weighted (or plain) means of each new user's k-hop neighbours: (raw, exported, neighbour counts).

    ``E_r`` holds the graph's response embeddings, then those of ``placement``'s responses, whose
    positive edges go through their nearest graph responses."""
    E_u, X = run.user_emb, run.exported_user_emb
    order = np.argsort(pu, kind="stable")  # pairs by user, each user's pairs in file order
    pu, pc, pr = pu[order], pc[order], pr[order]
    p_ptr = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(np.bincount(pu, minlength=n), out=p_ptr[1:])
    official = run.variant == "official"  # the authors' γ: normalised users, raw responses, mean over pairs
    S_u, S_r = (F.normalize(E_u, dim=-1), E_r) if official else (E_u, E_r)
    delta = S_r[torch.from_numpy(pc)] - S_r[torch.from_numpy(pr)]  # (pairs, d), by user
    raw, emb = E_u.new_zeros(n, E_u.shape[1]), X.new_zeros(n, X.shape[1])
    counts = np.zeros(n, dtype=np.int64)
    hops, seen, nr = _Hops(run, cfg.hops), run.graph.num_users, run.graph.num_responses
    width = E_u.shape[1] + X.shape[1] + int(np.diff(p_ptr).max(initial=0)) + 1  # floats per (user, neighbour)
    for lo in range(0, n, USER_BLOCK):
        hi = min(n, lo + USER_BLOCK)
        bu, bc = pu[p_ptr[lo]:p_ptr[hi]], pc[p_ptr[lo]:p_ptr[hi]]
        if placement is not None and (bc >= nr).any():  # a placed chosen response: edges via its nearest
            moved = bc >= nr
            near = placement.nearest.numpy()[bc[moved] - nr]
            bu = np.concatenate([bu[~moved], np.repeat(bu[moved], near.shape[1])])
            bc = np.concatenate([bc[~moved], near.ravel()])
        rows, cols = hops(bu, bc)
        per = np.bincount(rows - lo, minlength=hi - lo)
        counts[lo:hi] = per
        e_ptr = np.zeros(hi - lo + 1, dtype=np.int64)
        np.cumsum(per, out=e_ptr[1:])
        size = np.where(per == 0, seen, per)  # no neighbour: explicit fallback to every seen user
        by_size = np.argsort(size, kind="stable")  # chunks of users with similar counts pad little
        start = 0
        while start < len(by_size):
            tail = size[by_size[start:]]
            cost = np.arange(1, len(tail) + 1) * tail * width  # (users) × (largest count) × width
            stop = start + max(1, int(np.searchsorted(cost, CHUNK_ELEMENTS, side="right")))
            users = by_size[start:stop]
            nb, nb_count = _padded_neighbours(users, per, e_ptr, cols, seen)
            got_raw, got_emb = _weighted_means(nb, nb_count, lo + users, p_ptr, delta, E_u, X, cfg,
                                               scorer=S_u, mean=official)
            raw[lo + users], emb[lo + users] = got_raw, got_emb
            start = stop
    return raw, emb, counts


def _padded_neighbours(users, per, e_ptr, cols, seen: int):
    """(m, max count) neighbour indices of ``users`` (fallback users: every seen user), and the counts."""
    size = np.where(per[users] == 0, seen, per[users])
    nb = np.zeros((len(users), int(size.max())), dtype=np.int64)
    for j in np.flatnonzero(per[users] == 0):
        nb[j] = np.arange(seen)
    has = per[users] > 0
    k = per[users][has]
    slot = _ranges(np.zeros(len(k), dtype=np.int64), k)
    nb[np.repeat(np.flatnonzero(has), k), slot] = cols[_ranges(e_ptr[users][has], k)]
    return torch.from_numpy(nb), torch.from_numpy(size)


def _weighted_means(nb, nb_count, users, p_ptr, delta, E_u, X, cfg: AdaptConfig, *, scorer=None,
                    mean: bool = False):
    """softmax(γ/κ)-weighted (or plain) means over each user's neighbours, padded to a dense batch.

    γ scores the neighbours' rows of ``scorer`` (default ``E_u``) against ``delta``, summed over the
    user's pairs (``mean``: averaged)."""
    m, width = nb.shape
    valid = torch.arange(width)[None, :] < nb_count[:, None]  # (m, width)
    A = E_u[nb]  # (m, width, d); padding rows are user 0's and get weight 0
    S = A if scorer is None or scorer is E_u else scorer[nb]
    if cfg.method == "weighted":
        n_pairs = np.diff(p_ptr)[users]
        D = delta.new_zeros(m, int(n_pairs.max(initial=0)), delta.shape[1])
        slot = _ranges(np.zeros(m, dtype=np.int64), n_pairs)
        D[torch.from_numpy(np.repeat(np.arange(m), n_pairs)), torch.from_numpy(slot)] = \
            delta[torch.from_numpy(_ranges(p_ptr[users], n_pairs))]
        pair_ok = torch.arange(D.shape[1])[None, :] < torch.from_numpy(n_pairs)[:, None]  # (m, pairs)
        gamma = (F.logsigmoid(torch.bmm(S, D.transpose(1, 2))) * pair_ok[:, None, :]).sum(-1)  # (m, width)
        if mean:
            gamma = gamma / torch.from_numpy(n_pairs).clamp(min=1)[:, None].to(gamma.dtype)
        w = torch.softmax((gamma / cfg.temperature).masked_fill(~valid, -math.inf), dim=1)
    else:
        w = valid.to(E_u.dtype) / nb_count[:, None].to(E_u.dtype)
    return torch.bmm(w[:, None, :], A).squeeze(1), torch.bmm(w[:, None, :], X[nb]).squeeze(1)


def _optimize(E_u, E_r, pu, pc, pr, n, cfg: AdaptConfig) -> torch.Tensor:
    """User Opt.: free layer-L embeddings fitted to the few-shot pairs by the BT loss (GCF frozen)."""
    gen = torch.Generator().manual_seed(0)
    free = (E_u.mean(0, keepdim=True).repeat(n, 1) + 0.01 * torch.randn(n, E_u.shape[1], generator=gen))
    free.requires_grad_(True)
    opt = torch.optim.Adam([free], lr=cfg.lr)
    delta = E_r[pc] - E_r[pr]
    for _ in range(cfg.steps):
        loss = -F.logsigmoid((free.index_select(0, pu) * delta).sum(-1)).mean() + cfg.l2 * free.pow(2).sum(-1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return free.detach()


def graph_accuracy(run: GCFRun, adapted: Adapted, pairs: pd.DataFrame) -> tuple[float, int]:
    """GCF-level accuracy of adapted users on held-out pairs over graph responses (and how many were scored)."""
    g = run.graph
    idx = {u: i for i, u in enumerate(adapted.user_ids)}
    u = pairs["user_id"].map(idx)
    c = pairs["chosen_id"].map(g.response_index)
    r = pairs["rejected_id"].map(g.response_index)
    ok = (u.notna() & c.notna() & r.notna()).to_numpy()
    if not ok.any():
        return float("nan"), 0
    as_t = lambda s: torch.tensor(s[ok].astype("int64").to_numpy())  # noqa: E731
    e = adapted.raw[as_t(u)]
    s = (e * (run.response_emb[as_t(c)] - run.response_emb[as_t(r)])).sum(-1)
    return float((s > 0).float().mean()), int(ok.sum())
