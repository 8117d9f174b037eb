"""CoPL graph collaborative filtering (paper §4.1, Eq. 2-5, Appendix A).

Paper variant, per layer ℓ and for users (responses are symmetric with their own Ŵ):

    m⁺_u = Σ_{r∈N⁺(u)} α_ur (W1 e_r + W2 (e_r ⊙ e_u))
    m⁻_u = Σ_{r∈N⁻(u)} β_ur (W3 e_r + W4 (e_r ⊙ e_u))
    e_u ← LeakyReLU(W_self e_u + m⁺_u + m⁻_u)

Score s_ur = ⟨e_u⁽ᴸ⁾, e_r⁽ᴸ⁾⟩. Because W2 is linear and e_u does not depend on r,
Σ α W2(e_r ⊙ e_u) = W2(e_u ⊙ Σ α e_r): each sign and side needs one aggregation Σα e_r and no per-edge
matrix product. The five matrices of a side are stored as one ``Linear(5d, d)`` over
[e, Σα e_r, e ⊙ Σα e_r, Σβ e_r, e ⊙ Σβ e_r] (the bias is W_self's).

Official-code variant (``variant="official"``): one W_pos, W_neg, W_self per layer shared by users and
responses; the raw aggregate is added untransformed, only the Hadamard term is transformed, and the
negative message is subtracted:  e ← LeakyReLU(W_self e + (p + W_pos(e ⊙ p)) − (n + W_neg(e ⊙ n))).

``variant="lightgcn"`` is another GNN the paper's limitations invite (§7): signed LightGCN
propagation without weights or non-linearity, e ← Σα e_r − Σβ e_r, and the mean of all layers'
embeddings as the output (He et al. 2020).

The layers are PyG ``MessagePassing`` modules over each message set's ``EdgeIndex`` (coplctl.graph.graph):
``message`` is the per-edge α e_r, and ``propagate`` routes an EdgeIndex sorted by receiver to the fused
``message_and_aggregate``, one CSR product A e whose backward multiplies by the explicit Aᵀ, so that
training gives the same numbers on every run. The LightGCN layer is PyG's ``LGConv`` (without its own
normalisation: α and β are the graph's weights) with that same fused step. PyG would compile
``propagate`` from a template into a temporary Python file and import it; these layers keep PyG's
``propagate`` as it is written instead (nothing executable is loaded from files).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch_geometric import EdgeIndex
from torch_geometric.nn import LGConv, MessagePassing

from coplctl.graph.graph import Adjacency, Messages, spmm

VARIANTS = ("paper", "official", "lightgcn")


class _SignedPropagation:
    """Mixin for the ``MessagePassing`` layers: aggregation along the message sets of an Adjacency."""

    SUPPORTS_FUSED_EDGE_INDEX = True  # propagate() on an EdgeIndex sorted by receiver calls message_and_aggregate

    def _set_jittable_templates(self, raise_on_error: bool = False) -> None:
        pass  # no code generated into a temporary file: MessagePassing.propagate as PyG writes it

    def along(self, messages: Messages, x: Tensor) -> Tensor:
        """Σ_j w_ji x_j for every receiving node i: the weighted sum of its senders' rows of ``x``."""
        return self.propagate(messages.edge_index, x=x, edge_weight=messages.weight,
                              matrix=messages.matrix, transpose=messages.transpose)

    def signed(self, e_u: Tensor, e_r: Tensor, adj: Adjacency) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(Σα e_r, Σβ e_r) into users and (Σα e_u, Σβ e_u) into responses."""
        return (self.along(adj.pos_ur, e_r), self.along(adj.neg_ur, e_r),
                self.along(adj.pos_ru, e_u), self.along(adj.neg_ru, e_u))

    def message(self, x_j: Tensor, edge_weight: Tensor) -> Tensor:
        return edge_weight.view(-1, 1) * x_j

    def message_and_aggregate(self, edge_index: EdgeIndex, x: Tensor, matrix: Tensor, transpose: Tensor) -> Tensor:
        return spmm(matrix, transpose, x)


class CoPLLayer(_SignedPropagation, MessagePassing):
    """One message-passing layer of CoPL's GCF.

    Args:
        dim: embedding width d.
        variant: ``paper`` (separate weights per sign and side) or ``official`` (the authors' code);
            ``lightgcn`` layers are :class:`LightGCNLayer`.
        negative_slope: LeakyReLU slope ψ (not given in the paper; 0.2 as in NGCF).
    """

    def __init__(self, dim: int, variant: str = "paper", negative_slope: float = 0.2, signed_init: bool = False):
        super().__init__(aggr="sum")
        if variant not in VARIANTS[:2]:
            raise ValueError(f"variant must be one of {VARIANTS[:2]}")
        self.variant = variant
        self.act = nn.LeakyReLU(negative_slope)
        if variant == "paper":
            self.user = nn.Linear(5 * dim, dim)
            self.response = nn.Linear(5 * dim, dim)
            if signed_init:  # W1 = I, W3 = -I: start from signed propagation e_r(+) - e_r(-)
                with torch.no_grad():
                    for lin in (self.user, self.response):
                        lin.weight[:, dim:2 * dim] = torch.eye(dim)
                        lin.weight[:, 3 * dim:4 * dim] = -torch.eye(dim)
        else:
            self.shared = nn.Linear(3 * dim, dim)

    def _side(self, lin: nn.Linear, e: Tensor, pos: Tensor, neg: Tensor) -> Tensor:
        if self.variant == "paper":
            return self.act(lin(torch.cat([e, pos, e * pos, neg, e * neg], dim=-1)))
        return self.act(lin(torch.cat([e, e * pos, e * neg], dim=-1)) + pos - neg)

    def forward(self, e_u: Tensor, e_r: Tensor, adj: Adjacency) -> tuple[Tensor, Tensor]:
        u_pos, u_neg, r_pos, r_neg = self.signed(e_u, e_r, adj)
        lin_u, lin_r = (self.user, self.response) if self.variant == "paper" else (self.shared, self.shared)
        return self._side(lin_u, e_u, u_pos, u_neg), self._side(lin_r, e_r, r_pos, r_neg)


class LightGCNLayer(_SignedPropagation, LGConv):
    """Signed LightGCN propagation, e ← Σα e_r − Σβ e_r: PyG's ``LGConv`` along each sign's edges."""

    variant = "lightgcn"

    def __init__(self):
        super().__init__(normalize=False)

    def forward(self, e_u: Tensor, e_r: Tensor, adj: Adjacency) -> tuple[Tensor, Tensor]:
        u_pos, u_neg, r_pos, r_neg = self.signed(e_u, e_r, adj)
        return u_pos - u_neg, r_pos - r_neg


class GCF(nn.Module):
    """Initial user/response embeddings and L CoPL layers; scores are inner products of layer-L outputs.

    Args:
        num_users, num_responses: node counts of the graph.
        dim: embedding width d (paper: 512).
        layers: L (paper: 4).
        variant: ``paper``, ``official`` or ``lightgcn``.
        negative_slope: LeakyReLU slope.
        init_std: standard deviation of the initial embeddings.
    """

    def __init__(self, num_users: int, num_responses: int, dim: int = 512, layers: int = 4,
                 variant: str = "paper", negative_slope: float = 0.2, init_std: float = 0.1,
                 signed_init: bool = False):
        super().__init__()
        self.users = nn.Embedding(num_users, dim)
        self.responses = nn.Embedding(num_responses, dim)
        nn.init.normal_(self.users.weight, std=init_std)
        nn.init.normal_(self.responses.weight, std=init_std)
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}")
        self.layers = nn.ModuleList(LightGCNLayer() if variant == "lightgcn" else
                                    CoPLLayer(dim, variant, negative_slope, signed_init) for _ in range(layers))

    def forward(self, adj: Adjacency, users: torch.Tensor | None = None,
                responses: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer-L embeddings of all nodes, or of the given node subsets (a sampled subgraph)."""
        e_u = self.users.weight if users is None else self.users(users)
        e_r = self.responses.weight if responses is None else self.responses(responses)
        all_u, all_r = [e_u], [e_r]
        for layer in self.layers:
            e_u, e_r = layer(e_u, e_r, adj)
            all_u.append(e_u)
            all_r.append(e_r)
        if self.layers and self.layers[0].variant == "lightgcn":  # LightGCN: mean over layers
            return torch.stack(all_u).mean(0), torch.stack(all_r).mean(0)
        return e_u, e_r

    @staticmethod
    def score(e_u: torch.Tensor, e_r: torch.Tensor, users: torch.Tensor, responses: torch.Tensor) -> torch.Tensor:
        """s_ur = ⟨e_u, e_r⟩ for aligned index tensors."""
        # index_select, not e[idx]: its backward sums repeated rows in a fixed order (reproducible runs)
        return (e_u.index_select(0, users) * e_r.index_select(0, responses)).sum(-1)
