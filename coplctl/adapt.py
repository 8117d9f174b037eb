"""Unseen-user adaptation (paper §4.3, Table 4).

Given a trained GCF and a new user u* with a few pairs D_u* over graph responses:

- ``weighted`` (CoPL, default): take the seen users reached from u*'s chosen responses by k hops over
  positive edges only (k even; k = 2: seen users who chose a response u* chose), score each with the
  GCF, γ_u = Σ_{(a≻b)∈D_u*} log σ(s_ua − s_ub), w = softmax(γ / κ) with κ = 0.07, e_u* = Σ w_u e_u.
- ``average``: the unweighted mean of the same neighbours (Table 4, "Naive Avg.").
- ``optimize``: a free embedding fitted by the GCF's BT loss on D_u*, everything else frozen
  (Table 4, "User Opt.").

Only the scores actually needed are computed (neighbours × the user's pairs), never a dense
users × responses matrix. A user with no k-hop neighbour falls back, explicitly, to the weighted
(or plain) mean over *all* seen users; the fallback is counted and reported per user.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pandas as pd
import torch
import torch.nn.functional as F

from coplctl.errors import CoplError
from coplctl.graph.run import GCFRun

METHODS = ("weighted", "average", "optimize")


@dataclass
class AdaptConfig:
    """Adaptation settings; defaults are the paper's (Appendix C.2)."""

    method: str = "weighted"
    """``weighted`` (CoPL), ``average`` (Naive Avg.) or ``optimize`` (User Opt.)."""
    hops: int = 2
    """k, an even number of hops over positive edges (paper: 2; Figure 2 also 4)."""
    temperature: float = 0.07
    """κ of the softmax over γ (paper: 0.07)."""
    steps: int = 100
    """Adam steps of ``optimize``."""
    lr: float = 0.05
    """Learning rate of ``optimize``."""
    l2: float = 1e-3
    """L2 penalty on the free embedding of ``optimize``."""

    def __post_init__(self):
        if self.method not in METHODS:
            raise CoplError(f"unknown adaptation method {self.method!r}; choose {', '.join(METHODS)}")
        if self.hops < 2 or self.hops % 2:
            raise CoplError("--hops must be an even number >= 2 (user -> response -> user ...)")
        if self.temperature <= 0:
            raise CoplError("--temperature must be positive")


@dataclass
class Adapted:
    """Adapted users: exported embeddings for reward models, raw ones for GCF scores, and a report."""

    user_ids: list[str]
    embeddings: torch.Tensor  # (n, d) in the exported space (what reward models read)
    raw: torch.Tensor  # (n, d) in the GCF's score space
    report: dict = field(default_factory=dict)


def _neighbours(run: GCFRun, users: torch.Tensor, chosen: torch.Tensor, n: int, hops: int) -> torch.Tensor:
    """Sparse (n × seen users) reachability by ``hops`` hops over positive edges, binary, coalesced."""
    g = run.graph
    ones = torch.ones(g.pos.shape[1])
    b = torch.sparse_coo_tensor(g.pos, ones, (g.num_users, g.num_responses)).coalesce()  # users × responses
    start = torch.sparse_coo_tensor(torch.stack([users, chosen]), torch.ones(len(users)), (n, g.num_responses)).coalesce()
    reach = torch.sparse.mm(start, b.t()).coalesce()  # 2 hops: n × users
    for _ in range(hops // 2 - 1):
        resp = torch.sparse.mm(reach, b).coalesce()
        resp = torch.sparse_coo_tensor(resp.indices(), torch.ones(resp._nnz()), resp.shape)
        reach = torch.sparse.mm(resp, b.t()).coalesce()
    return torch.sparse_coo_tensor(reach.indices(), torch.ones(reach._nnz()), reach.shape).coalesce()


def adapt_users(run: GCFRun, pairs: pd.DataFrame, cfg: AdaptConfig | None = None) -> Adapted:
    """Adapt every user of ``pairs`` (user_id, chosen_id, rejected_id).

    Pairs over responses the graph does not know are left out and counted per user; a user left
    with no pair gets the fallback.
    """
    cfg = cfg or AdaptConfig()
    g = run.graph
    user_ids = list(dict.fromkeys(pairs["user_id"]))
    uindex = {u: i for i, u in enumerate(user_ids)}
    c = pairs["chosen_id"].map(g.response_index)
    r = pairs["rejected_id"].map(g.response_index)
    inside = (c.notna() & r.notna()).to_numpy()  # pairs over responses the graph knows
    pu = torch.tensor(pairs["user_id"].map(uindex).to_numpy()[inside])
    pc = torch.tensor(c[inside].astype("int64").to_numpy())
    pr = torch.tensor(r[inside].astype("int64").to_numpy())
    outside = pairs.loc[~inside, "user_id"].value_counts()
    n = len(user_ids)
    E_u, E_r = run.user_emb, run.response_emb
    X = run.exported_user_emb
    per_user = {u: {"pairs_used": int((pu == i).sum()), "pairs_outside_graph": int(outside.get(u, 0))}
                for i, u in enumerate(user_ids)}

    if cfg.method == "optimize":
        raw = _optimize(E_u, E_r, pu, pc, pr, n, cfg)
        emb = run.export(raw)
        fallback = 0
    else:
        reach = _neighbours(run, pu, pc, n, cfg.hops)
        rows, cols = reach.indices()
        ptr = torch.searchsorted(rows, torch.arange(n + 1))
        raw, emb = torch.empty(n, E_u.shape[1]), torch.empty(n, X.shape[1])
        fallback = 0
        for i, uid in enumerate(user_ids):
            nb = cols[ptr[i]:ptr[i + 1]]
            used_fallback = len(nb) == 0
            if used_fallback:  # no k-hop neighbour: explicit fallback over all seen users
                nb = torch.arange(g.num_users)
                fallback += 1
            mine = pu == i
            if cfg.method == "weighted":
                delta = E_r[pc[mine]] - E_r[pr[mine]]  # (p, d)
                gamma = F.logsigmoid(E_u[nb] @ delta.T).sum(1)  # (neighbours,)
                w = torch.softmax(gamma / cfg.temperature, dim=0)
            else:
                w = torch.full((len(nb),), 1.0 / len(nb))
            raw[i], emb[i] = w @ E_u[nb], w @ X[nb]
            per_user[uid].update(neighbours=0 if used_fallback else int(len(nb)), fallback=used_fallback)
    report = {
        "method": cfg.method, "hops": cfg.hops, "temperature": cfg.temperature,
        "users": len(user_ids), "pairs": int(inside.sum()), "pairs_outside_graph": int((~inside).sum()),
        "fallback_users": fallback,
        "fallback": "weighted mean over all seen users" if cfg.method == "weighted" else
                    "mean over all seen users" if cfg.method == "average" else None,
        "per_user": per_user,
    }
    return Adapted(user_ids, emb, raw, report)


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
