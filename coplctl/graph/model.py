"""CoPL graph collaborative filtering (paper §4.1, Eq. 2-5, Appendix A).

Paper variant, per layer ℓ and for users (responses are symmetric with their own Ŵ):

    m⁺_u = Σ_{r∈N⁺(u)} α_ur (W1 e_r + W2 (e_r ⊙ e_u))
    m⁻_u = Σ_{r∈N⁻(u)} β_ur (W3 e_r + W4 (e_r ⊙ e_u))
    e_u ← LeakyReLU(W_self e_u + m⁺_u + m⁻_u)

Score s_ur = ⟨e_u⁽ᴸ⁾, e_r⁽ᴸ⁾⟩. Because W2 is linear and e_u does not depend on r,
Σ α W2(e_r ⊙ e_u) = W2(e_u ⊙ Σ α e_r): each sign and side needs one sparse aggregation
(``torch_geometric.utils.spmm``) and no per-edge matrix product. The five matrices of a side are
stored as one ``Linear(5d, d)`` over [e, Σα e_r, e ⊙ Σα e_r, Σβ e_r, e ⊙ Σβ e_r] (the bias is W_self's).

Official-code variant (``variant="official"``): one W_pos, W_neg, W_self per layer shared by users and
responses; the raw aggregate is added untransformed, only the Hadamard term is transformed, and the
negative message is subtracted:  e ← LeakyReLU(W_self e + (p + W_pos(e ⊙ p)) − (n + W_neg(e ⊙ n))).

``variant="lightgcn"`` is another GNN the paper's limitations invite (§7): signed LightGCN
propagation without weights or non-linearity, e ← Σα e_r − Σβ e_r, and the mean of all layers'
embeddings as the output (He et al. 2020).
"""

from __future__ import annotations

import torch
from torch import nn
from coplctl.graph.graph import Adjacency

VARIANTS = ("paper", "official", "lightgcn")


class CoPLLayer(nn.Module):
    """One message-passing layer of CoPL's GCF.

    Args:
        dim: embedding width d.
        variant: ``paper`` (separate weights per sign and side), ``official`` (the authors' code) or
            ``lightgcn`` (no weights: signed aggregation only).
        negative_slope: LeakyReLU slope ψ (not given in the paper; 0.2 as in NGCF).
    """

    def __init__(self, dim: int, variant: str = "paper", negative_slope: float = 0.2, signed_init: bool = False):
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}")
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
        elif variant == "official":
            self.shared = nn.Linear(3 * dim, dim)

    def _side(self, lin: nn.Linear, e: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
        if self.variant == "paper":
            return self.act(lin(torch.cat([e, pos, e * pos, neg, e * neg], dim=-1)))
        return self.act(lin(torch.cat([e, e * pos, e * neg], dim=-1)) + pos - neg)

    def forward(self, e_u: torch.Tensor, e_r: torch.Tensor, adj: Adjacency) -> tuple[torch.Tensor, torch.Tensor]:
        u_pos, u_neg = adj.propagate("pos_ur", e_r), adj.propagate("neg_ur", e_r)
        r_pos, r_neg = adj.propagate("pos_ru", e_u), adj.propagate("neg_ru", e_u)
        if self.variant == "lightgcn":
            return u_pos - u_neg, r_pos - r_neg
        lin_u, lin_r = (self.user, self.response) if self.variant == "paper" else (self.shared, self.shared)
        return self._side(lin_u, e_u, u_pos, u_neg), self._side(lin_r, e_r, r_pos, r_neg)


class GCF(nn.Module):
    """Initial user/response embeddings and L CoPL layers; scores are inner products of layer-L outputs.

    Args:
        num_users, num_responses: node counts of the graph.
        dim: embedding width d (paper: 512).
        layers: L (paper: 4).
        variant: ``paper`` or ``official``.
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
        self.layers = nn.ModuleList(CoPLLayer(dim, variant, negative_slope, signed_init) for _ in range(layers))

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
