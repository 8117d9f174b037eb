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
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from safetensors.torch import save_file
from torch_geometric import EdgeIndex
from torch_geometric.utils import coalesce, degree, dropout_edge, to_torch_csr_tensor

from coplctl.core.atomic import atomic_path, atomic_write_text
from coplctl.core.errors import CoplError, DataError


@dataclass(frozen=True, eq=False)
class Messages:
    """The messages of one sign into one side of the graph.

    ``matrix`` is A (receivers × senders) in CSR with the edge weights α or β, and ``transpose`` Aᵀ as its
    own CSR matrix: the forward pass multiplies by A and the backward pass by Aᵀ, row-wise sums in a
    fixed order, hence the same numbers on every run. ``edge_index`` is the same edges as PyG's
    :class:`~torch_geometric.EdgeIndex` (row 0 the sending nodes, row 1 the receiving ones, sorted by
    receiver; sparse size (senders, receivers)), what PyG's ``propagate`` reads; it is built when first
    asked for (CoPL's layers multiply by the matrices directly, and at a million users the index would
    add a gigabyte).
    """

    matrix: torch.Tensor
    transpose: torch.Tensor

    @cached_property
    def edge_index(self) -> EdgeIndex:
        counts = self.matrix.crow_indices().diff().long()
        receivers = torch.repeat_interleave(torch.arange(len(counts), device=counts.device), counts)
        return EdgeIndex(torch.stack([self.matrix.col_indices().long(), receivers]),
                         sparse_size=(self.matrix.shape[1], self.matrix.shape[0]), sort_order="col")

    @property
    def weight(self) -> torch.Tensor:
        """Each edge's weight, in ``edge_index``'s order."""
        return self.matrix.values()

    def to_dense(self) -> torch.Tensor:
        """A as a dense matrix (receivers × senders)."""
        return self.matrix.to_dense()


@dataclass
class Adjacency:
    """The four message sets of a graph: sign (``pos``/``neg``) × receiving side (``ur``: users receive
    from responses, ``ru``: responses from users)."""

    pos_ur: Messages
    pos_ru: Messages
    neg_ur: Messages
    neg_ru: Messages


def spmm(matrix: torch.Tensor, transpose: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``matrix @ x`` (a CSR matrix times a dense one), differentiable with respect to ``x``; the backward
    pass multiplies by ``transpose``, the explicit CSR matrixᵀ."""
    return _SpMM.apply(matrix, transpose, x)


def csr_mm(matrix: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``matrix @ x`` into a new tensor, written in place: the same numbers as PyG's ``spmm`` without its
    zero-filled and copied intermediate (a third of the time on tall matrices)."""
    out = torch.empty(matrix.shape[0], x.shape[1], dtype=x.dtype, device=x.device)
    return torch.addmm(out, matrix, x, beta=0, out=out)


class _SpMM(torch.autograd.Function):
    """y = A x; dx = Aᵀ dy with the explicit transpose (a scatter-add backward is order-dependent)."""

    @staticmethod
    def forward(ctx, a, a_t, x):
        ctx.a_t = a_t
        return csr_mm(a, x)

    @staticmethod
    def backward(ctx, grad):
        return None, None, csr_mm(ctx.a_t, grad)


def sym_norm(edges: torch.Tensor, n_users: int, n_responses: int) -> torch.Tensor:
    """α for each edge (2, E) = 1/sqrt(deg_user · deg_response), degrees counted within these edges."""
    if edges.numel() == 0:
        return torch.zeros(0)
    du = degree(edges[0], n_users)
    dr = degree(edges[1], n_responses)
    return (du[edges[0]] * dr[edges[1]]).rsqrt()


def _csr(idx: torch.Tensor, w: torch.Tensor, size: tuple[int, int], device, dtype) -> torch.Tensor:
    """The CSR matrix of ``size`` with the coalesced edges (rows first) and weights; 32-bit indices where
    they fit (half the index memory, the same products)."""
    idx, w = coalesce(idx.to(device), w.to(device=device, dtype=dtype), max(size))
    with warnings.catch_warnings():  # torch calls CSR "beta" on every construction: noise here
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")
        warnings.filterwarnings("ignore", message="Sparse invariant checks are implicitly disabled")
        m = to_torch_csr_tensor(idx, w, size=size, is_coalesced=True)
        if max(idx.shape[1], *size) < 2**31 - 1:
            m = torch.sparse_csr_tensor(m.crow_indices().int(), m.col_indices().int(), m.values(), size)
        return m


def message_pair(edges: torch.Tensor, w: torch.Tensor, n_users: int, n_responses: int, *, device=None,
                 dtype=torch.float32) -> tuple[Messages, Messages]:
    """Messages along edges (2, E) [user; response] with weights ``w``: (into users, into responses).
    Each one's matrix is the other's transpose."""
    ur = _csr(edges, w, (n_users, n_responses), device, dtype)
    ru = _csr(edges.flip(0), w, (n_responses, n_users), device, dtype)
    return Messages(ur, ru), Messages(ru, ur)


def build_adjacency(pos: torch.Tensor, pos_w: torch.Tensor, neg: torch.Tensor, neg_w: torch.Tensor,
                    n_users: int, n_responses: int, *, device=None, dtype=torch.float32) -> Adjacency:
    """The four message sets of positive and negative edges (2, E) [user; response]."""
    pos_ur, pos_ru = message_pair(pos, pos_w, n_users, n_responses, device=device, dtype=dtype)
    neg_ur, neg_ru = message_pair(neg, neg_w, n_users, n_responses, device=device, dtype=dtype)
    return Adjacency(pos_ur, pos_ru, neg_ur, neg_ru)


@contextmanager
def drawing_from(generator: torch.Generator | None):
    """Code inside draws from torch's global CPU random stream as if it drew from ``generator``: the global
    state is restored afterwards and ``generator`` advanced by what was drawn (PyG's ``dropout_edge`` has
    no generator argument). With None, the global stream is used as it is."""
    if generator is None:
        yield
        return
    with torch.random.fork_rng(devices=[]):
        torch.set_rng_state(generator.get_state())
        yield
        generator.set_state(torch.get_rng_state())


@dataclass
class PreferenceGraph:
    """Bipartite graph of seen users and responses with positive and negative edge sets."""

    user_ids: list[str]
    response_ids: list[str]
    pos: torch.Tensor  # (2, E⁺) long: [user index, response index], deduplicated and sorted
    neg: torch.Tensor  # (2, E⁻)

    @classmethod
    def from_pairs(cls, pairs: pd.DataFrame, user_ids: list[str] | None = None,
                   response_ids=None, *, with_index: bool = False):
        """Build from (user_id, chosen_id, rejected_id) rows; users default to those in the pairs (in order
        of appearance). Responses are those of the pairs, in the order of ``response_ids`` (a dataset's
        responses table: a run's responses are then a filter of it) or else of appearance.
        ``with_index``: also return the pairs' (user, chosen, rejected) node indices (:meth:`index_pairs`'s)."""
        from coplctl.data.dataset import positions

        if user_ids is None:
            user_ids = pd.unique(pairs["user_id"]).tolist()
        u = torch.from_numpy(positions(pairs["user_id"], user_ids))
        if (u < 0).any():
            raise CoplError("pairs reference users outside the graph")
        if response_ids is None:
            responses = pd.unique(pd.concat([pairs["chosen_id"], pairs["rejected_id"]], ignore_index=True)).tolist()
            c, r = (torch.from_numpy(positions(pairs[col], responses)) for col in ("chosen_id", "rejected_id"))
        else:
            both = positions(pd.concat([pairs["chosen_id"], pairs["rejected_id"]], ignore_index=True), response_ids)
            c, r = both[:len(pairs)], both[len(pairs):]  # one join: the responses table is hashed once
            if (c < 0).any() or (r < 0).any():
                raise CoplError("pairs reference responses outside the responses table")
            used = np.zeros(len(response_ids), dtype=bool)
            used[c], used[r] = True, True
            node = np.cumsum(used) - 1  # table row -> node index
            responses = pd.Series(response_ids)[used].tolist()
            c, r = torch.from_numpy(node[c]), torch.from_numpy(node[r])
        n = max(len(user_ids), len(responses))
        pos = coalesce(torch.stack([u, c]), num_nodes=n)
        neg = coalesce(torch.stack([u, r]), num_nodes=n)
        graph = cls(list(user_ids), responses, pos, neg)
        return (graph, (u, c, r)) if with_index else graph

    @classmethod
    def from_dataset(cls, ds) -> "PreferenceGraph":
        """The graph of a dataset's training pairs (every seen user is a node; responses in table order)."""
        return cls.from_pairs(ds.split("train"), ds.user_ids("seen"), ds.responses["response_id"])

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

    @property
    def weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(α for positive edges, β for negative edges), computed when asked (cheap; not kept alongside the
        adjacency that holds them)."""
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
            with drawing_from(generator):
                pos, keep_p = dropout_edge(pos, edge_dropout)
                neg, keep_n = dropout_edge(neg, edge_dropout)
            pw, nw = pw[keep_p] / (1 - edge_dropout), nw[keep_n] / (1 - edge_dropout)
        return build_adjacency(pos, pw, neg, nw, self.num_users, self.num_responses, device=device, dtype=dtype)

    def index_pairs(self, pairs: pd.DataFrame) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(user, chosen, rejected) node indices of pairs (-1 outside the graph), and the mask of pairs
        fully inside the graph."""
        u = torch.from_numpy(self.index(pairs["user_id"], "users"))
        both = torch.from_numpy(self.index(pd.concat([pairs["chosen_id"], pairs["rejected_id"]], ignore_index=True),
                                           "responses"))
        c, r = both[:len(pairs)], both[len(pairs):]
        return u, c, r, (u >= 0) & (c >= 0) & (r >= 0)

    def index(self, ids, side: str) -> "np.ndarray":
        """Node index of each of ``ids`` among the graph's ``users`` or ``responses`` (-1 where not a node)."""
        from coplctl.data.dataset import positions

        return positions(ids, self._user_table if side == "users" else self._response_table)

    @cached_property
    def _user_table(self):
        import pyarrow as pa

        return pa.array(self.user_ids, pa.large_string())

    @cached_property
    def _response_table(self):
        import pyarrow as pa

        return pa.array(self.response_ids, pa.large_string())

    def save(self, directory: Path) -> None:
        with atomic_path(directory / "graph.safetensors") as tmp:
            save_file({"pos": self.pos.contiguous(), "neg": self.neg.contiguous()}, str(tmp))
        atomic_write_text(directory / "graph.json", json.dumps({"users": self.user_ids, "responses": self.response_ids}))

    @classmethod
    def load(cls, directory: Path) -> "PreferenceGraph":
        """Read what :meth:`save` wrote; any damage is one DataError naming the file and the problem."""
        from coplctl.core import files

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
