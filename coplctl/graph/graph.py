"""The user–response preference graph (paper §4.1).

Users and responses are nodes. An annotation (u: a ≻ b) adds a positive edge u–a and a negative edge
u–b. Edges are sets (an annotation repeated on the same response adds nothing). Messages are weighted
by the symmetric degree normalisation of each sign, computed per edge, vectorised:

    α_ur = 1 / sqrt(|N⁺(u)| · |N⁺(r)|),   β_ur = 1 / sqrt(|N⁻(u)| · |N⁻(r)|)

Only responses that appear in a training pair are nodes: the graph knows nothing about the others.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import pandas as pd
import torch
from safetensors.torch import save_file
from torch_geometric.utils import coalesce, degree, spmm, to_torch_csr_tensor

from coplctl.atomic import atomic_path, atomic_write_text
from coplctl.errors import CoplError, DataError


@dataclass
class Adjacency:
    """Normalised sparse matrices; ``ur`` rows are users (messages into users), ``ru`` responses.

    ``transposes`` holds each matrix's transpose, so that backward passes multiply by an explicit
    CSR transpose: row-wise sums in a fixed order, hence the same numbers on every run.
    """

    pos_ur: torch.Tensor
    pos_ru: torch.Tensor
    neg_ur: torch.Tensor
    neg_ru: torch.Tensor
    transposes: dict = field(default_factory=dict)

    def propagate(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """``getattr(self, name) @ x``, differentiable with respect to ``x``."""
        return _SpMM.apply(getattr(self, name), self.transposes[name], x)


class _SpMM(torch.autograd.Function):
    """y = A x; dx = Aᵀ dy with the explicit transpose (a scatter-add backward is order-dependent)."""

    @staticmethod
    def forward(ctx, a, a_t, x):
        ctx.a_t = a_t
        return spmm(a, x)

    @staticmethod
    def backward(ctx, grad):
        return None, None, spmm(ctx.a_t, grad)


def sym_norm(edges: torch.Tensor, n_users: int, n_responses: int) -> torch.Tensor:
    """α for each edge (2, E) = 1/sqrt(deg_user · deg_response), degrees counted within these edges."""
    if edges.numel() == 0:
        return torch.zeros(0)
    du = degree(edges[0], n_users)
    dr = degree(edges[1], n_responses)
    return (du[edges[0]] * dr[edges[1]]).rsqrt()


def build_adjacency(pos: torch.Tensor, pos_w: torch.Tensor, neg: torch.Tensor, neg_w: torch.Tensor,
                    n_users: int, n_responses: int, *, device=None, dtype=torch.float32) -> Adjacency:
    """CSR matrices for the four message directions (sign × receiving side)."""

    def csr(idx, w, size):
        with warnings.catch_warnings():  # torch calls CSR "beta" on every construction: noise here
            warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")
            warnings.filterwarnings("ignore", message="Sparse invariant checks are implicitly disabled")
            return to_torch_csr_tensor(idx.to(device), w.to(device=device, dtype=dtype), size=size)

    pos_ur, pos_ru = csr(pos, pos_w, (n_users, n_responses)), csr(pos.flip(0), pos_w, (n_responses, n_users))
    neg_ur, neg_ru = csr(neg, neg_w, (n_users, n_responses)), csr(neg.flip(0), neg_w, (n_responses, n_users))
    return Adjacency(pos_ur, pos_ru, neg_ur, neg_ru,
                     {"pos_ur": pos_ru, "pos_ru": pos_ur, "neg_ur": neg_ru, "neg_ru": neg_ur})


@dataclass
class PreferenceGraph:
    """Bipartite graph of seen users and responses with positive and negative edge sets."""

    user_ids: list[str]
    response_ids: list[str]
    pos: torch.Tensor  # (2, E⁺) long: [user index, response index], deduplicated and sorted
    neg: torch.Tensor  # (2, E⁻)

    @classmethod
    def from_pairs(cls, pairs: pd.DataFrame, user_ids: list[str] | None = None) -> "PreferenceGraph":
        """Build from (user_id, chosen_id, rejected_id) rows; users default to those in the pairs."""
        if user_ids is None:
            user_ids = list(dict.fromkeys(pairs["user_id"]))
        users = {u: i for i, u in enumerate(user_ids)}
        responses = list(dict.fromkeys(pd.concat([pairs["chosen_id"], pairs["rejected_id"]])))
        rindex = {r: i for i, r in enumerate(responses)}
        u = torch.tensor(pairs["user_id"].map(users).to_numpy(), dtype=torch.long)
        if (u < 0).any():
            raise CoplError("pairs reference users outside the graph")
        c = torch.tensor(pairs["chosen_id"].map(rindex).to_numpy(), dtype=torch.long)
        r = torch.tensor(pairs["rejected_id"].map(rindex).to_numpy(), dtype=torch.long)
        n = max(len(user_ids), len(responses))
        pos = coalesce(torch.stack([u, c]), num_nodes=n)
        neg = coalesce(torch.stack([u, r]), num_nodes=n)
        return cls(list(user_ids), responses, pos, neg)

    @classmethod
    def from_dataset(cls, ds) -> "PreferenceGraph":
        """The graph of a dataset's training pairs (every seen user is a node)."""
        return cls.from_pairs(ds.split("train"), ds.user_ids("seen"))

    @property
    def num_users(self) -> int:
        return len(self.user_ids)

    @property
    def num_responses(self) -> int:
        return len(self.response_ids)

    @cached_property
    def user_index(self) -> dict[str, int]:
        return {u: i for i, u in enumerate(self.user_ids)}

    @cached_property
    def response_index(self) -> dict[str, int]:
        return {r: i for i, r in enumerate(self.response_ids)}

    @cached_property
    def weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(α for positive edges, β for negative edges)."""
        return (sym_norm(self.pos, self.num_users, self.num_responses),
                sym_norm(self.neg, self.num_users, self.num_responses))

    def edge_ids(self, users: torch.Tensor, responses: torch.Tensor, sign: str) -> torch.Tensor:
        """Column of each (user, response) edge in ``self.pos`` (sign ``pos``) or ``self.neg``."""
        edges = getattr(self, sign)
        keys = edges[0] * self.num_responses + edges[1]  # coalesced: sorted and unique
        return torch.searchsorted(keys, users * self.num_responses + responses)

    def adjacency(self, *, device=None, dtype=torch.float32, edge_dropout: float = 0.0,
                  generator: torch.Generator | None = None,
                  without: tuple[torch.Tensor, torch.Tensor] | None = None) -> Adjacency:
        """Normalised adjacency; with ``edge_dropout`` > 0, edges are dropped and survivors rescaled.

        ``without`` = (positive, negative) edge columns to leave out: the graph is then renormalised on
        the remaining edges (the degrees a node would have without them)."""
        (pos, neg), (pw, nw) = (self.pos, self.neg), self.weights
        if without is not None:
            keep_p = torch.ones(pos.shape[1], dtype=torch.bool)
            keep_n = torch.ones(neg.shape[1], dtype=torch.bool)
            keep_p[without[0]] = False
            keep_n[without[1]] = False
            pos, neg = pos[:, keep_p], neg[:, keep_n]
            pw = sym_norm(pos, self.num_users, self.num_responses)
            nw = sym_norm(neg, self.num_users, self.num_responses)
        if edge_dropout > 0:
            keep_p = torch.rand(pw.shape, generator=generator) >= edge_dropout
            keep_n = torch.rand(nw.shape, generator=generator) >= edge_dropout
            pos, pw = pos[:, keep_p], pw[keep_p] / (1 - edge_dropout)
            neg, nw = neg[:, keep_n], nw[keep_n] / (1 - edge_dropout)
        return build_adjacency(pos, pw, neg, nw, self.num_users, self.num_responses, device=device, dtype=dtype)

    def index_pairs(self, pairs: pd.DataFrame) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(user, chosen, rejected) node indices of pairs, and the mask of pairs fully inside the graph."""
        u = pairs["user_id"].map(self.user_index)
        c = pairs["chosen_id"].map(self.response_index)
        r = pairs["rejected_id"].map(self.response_index)
        ok = (u.notna() & c.notna() & r.notna()).to_numpy()
        as_t = lambda s: torch.tensor(s.fillna(-1).astype("int64").to_numpy())  # noqa: E731
        return as_t(u), as_t(c), as_t(r), torch.tensor(ok)

    def save(self, directory: Path) -> None:
        with atomic_path(directory / "graph.safetensors") as tmp:
            save_file({"pos": self.pos.contiguous(), "neg": self.neg.contiguous()}, str(tmp))
        atomic_write_text(directory / "graph.json", json.dumps({"users": self.user_ids, "responses": self.response_ids}))

    @classmethod
    def load(cls, directory: Path) -> "PreferenceGraph":
        """Read what :meth:`save` wrote; any damage is one DataError naming the file and the problem."""
        from coplctl import files

        tfile, jfile = directory / "graph.safetensors", directory / "graph.json"
        t, ids = files.read_safetensors(tfile, "graph file"), files.read_json(jfile, what="graph file")
        users, responses = files.field(ids, "users", list, jfile), files.field(ids, "responses", list, jfile)
        if not all(isinstance(x, str) for x in users + responses):
            raise DataError(jfile, "users and responses must be lists of ids (text)")
        for key, ids in (("users", users), ("responses", responses)):
            if len(set(ids)) < len(ids):
                raise DataError(jfile, f"{key} lists an id twice")
        for key in ("pos", "neg"):
            e = t.get(key)
            if e is None or e.dim() != 2 or e.shape[0] != 2 or e.dtype != torch.long:
                raise DataError(tfile, f"tensor {key!r} must be a 2 x edges int64 tensor")
            if e.numel() and (e.min() < 0 or e[0].max() >= len(users) or e[1].max() >= len(responses)):
                raise DataError(tfile, f"tensor {key!r} names nodes beyond the {len(users)} users and "
                                       f"{len(responses)} responses of {jfile.name}")
        return cls(users, responses, t["pos"], t["neg"])

    def stats(self) -> dict:
        return {"users": self.num_users, "responses": self.num_responses,
                "positive_edges": int(self.pos.shape[1]), "negative_edges": int(self.neg.shape[1])}
