"""Neighbour-sampled subgraphs, for graphs too large for full-graph steps.

GraphSAGE-style layer-wise sampling on the bipartite graph: starting from a minibatch's users and
responses, each hop samples up to ``fanout`` incident edges (both signs together, uniformly without
replacement) of every node not yet expanded. A sampled edge carries its global normalisation
weight times deg/k (Horvitz-Thompson), so each aggregated message is an unbiased estimate of the
full-graph one, and equals it exactly when the fanout covers the degree. Running the L layers on the
union of sampled edges gives the targets exactly the sampled computation tree.

Uses plain torch index operations (no pyg-lib / torch-sparse needed).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from coplctl.graph.graph import Adjacency, Messages, PreferenceGraph, message_pair


@dataclass
class Subgraph:
    users: torch.Tensor  # global user indices of the subgraph's user nodes
    responses: torch.Tensor  # global response indices
    adj: Adjacency  # local adjacency (rows receive messages)
    user_local: torch.Tensor  # global user index -> local index (-1 outside)
    response_local: torch.Tensor


class NeighborSampler:
    """Sample L-hop subgraphs around minibatch nodes; see the module docstring.

    Args:
        graph: the preference graph.
        fanouts: edges sampled per node at each hop (one entry per GCF layer).
    """

    def __init__(self, graph: PreferenceGraph, fanouts: Sequence[int]):
        self.n_users, self.n_responses = graph.num_users, graph.num_responses
        u = self.n_users
        (pos, neg), (pw, nw) = (graph.pos, graph.neg), graph.weights
        user = torch.cat([pos[0], neg[0]])
        resp = torch.cat([pos[1], neg[1]]) + u
        sign = torch.cat([torch.ones(pos.shape[1], dtype=torch.bool), torch.zeros(neg.shape[1], dtype=torch.bool)])
        w = torch.cat([pw, nw])
        # Directed edges into every node: row receives from col. Homogeneous ids: responses after users.
        row, col = torch.cat([user, resp]), torch.cat([resp, user])
        order = torch.argsort(row, stable=True)
        self.row, self.col = row[order], col[order]
        self.sign, self.w = sign.repeat(2)[order], w.repeat(2)[order]
        counts = torch.bincount(row, minlength=u + self.n_responses)
        self.rowptr = torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)])
        self.fanouts = list(fanouts)

    def _sample_edges(self, nodes: torch.Tensor, k: int, generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Edge ids of up to k uniformly chosen incident edges per node, and each edge's deg/k factor."""
        start, deg = self.rowptr[nodes], self.rowptr[nodes + 1] - self.rowptr[nodes]
        owner = torch.repeat_interleave(torch.arange(len(nodes)), deg)
        first = torch.repeat_interleave(deg.cumsum(0) - deg, deg)
        eid = start[owner] + torch.arange(int(deg.sum())) - first
        keys = owner.double() + torch.rand(len(eid), generator=generator, dtype=torch.double)
        order = torch.argsort(keys)
        rank = torch.arange(len(eid)) - first  # rank within the owner after sorting by (owner, key)
        keep = order[rank < k]
        taken = deg.clamp(max=k)
        return eid[keep], (deg.double() / taken.clamp(min=1).double())[owner[keep]]

    def sample(self, users: torch.Tensor, responses: torch.Tensor, *, generator: torch.Generator | None = None,
               device=None, dtype=torch.float32) -> Subgraph:
        n_u, total = self.n_users, self.n_users + self.n_responses
        nodes = torch.unique(torch.cat([users, responses + n_u]))
        in_graph = torch.zeros(total, dtype=torch.bool)
        in_graph[nodes] = True
        frontier, eids, scale = nodes, [], []
        for k in self.fanouts:
            e, s = self._sample_edges(frontier, k, generator)
            eids.append(e)
            scale.append(s)
            nbrs = torch.unique(self.col[e])
            frontier = nbrs[~in_graph[nbrs]]
            in_graph[frontier] = True
        eid, factor = torch.cat(eids), torch.cat(scale)
        nodes = torch.nonzero(in_graph).flatten()
        local = torch.full((total,), -1, dtype=torch.long)
        is_user = nodes < n_u
        g_users, g_resp = nodes[is_user], nodes[~is_user] - n_u
        local[g_users] = torch.arange(len(g_users))
        local[g_resp + n_u] = torch.arange(len(g_resp))
        row, col, sign, w = self.row[eid], self.col[eid], self.sign[eid], (self.w[eid].double() * factor).float()
        into_user = row < n_u
        # Build each direction separately: messages into users (rows users) and into responses.
        parts = {}
        for name, mask_side in (("ur", into_user), ("ru", ~into_user)):
            for sgn, mask_sign in (("pos", sign), ("neg", ~sign)):
                m = mask_side & mask_sign
                parts[f"{sgn}_{name}"] = (torch.stack([local[row[m]], local[col[m]]]), w[m])
        nu, nr = len(g_users), len(g_resp)
        adj = _directed(parts, nu, nr, device, dtype)
        return Subgraph(g_users, g_resp, adj, local[:n_u], local[n_u:])


def _directed(parts: dict, nu: int, nr: int, device, dtype) -> Adjacency:
    """Adjacency whose two directions come from different (sampled) edge sets."""

    def into(name: str, side: int) -> Messages:  # side 0: messages into users, 1: into responses
        edges, w = parts[name]
        return message_pair(edges.flip(0) if side else edges, w, nu, nr, device=device, dtype=dtype)[side]

    return Adjacency(into("pos_ur", 0), into("pos_ru", 1), into("neg_ur", 0), into("neg_ru", 1))
