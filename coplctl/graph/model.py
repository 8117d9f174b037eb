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

from coplctl.graph.graph import Adjacency, Messages, csr_mm, spmm

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


CHUNK = 1 << 16
"""Rows computed at once in a layer's dense part: bounds its transient memory on any graph size."""


class _LayerFn(torch.autograd.Function):
    """A CoPL layer whose backward pass keeps nothing but the layer's input and output embeddings: the
    aggregated messages are recomputed, and the dense part runs in chunks of rows, so no (nodes x 5d)
    concatenation or per-term product is ever stored. Memory per layer is one (nodes x d) output, which
    is what lets full-graph training run on a million users (paper §4.1 as written; same numbers as the
    straightforward autograd graph up to float rounding).

    Each side computes z = e A + p P + (e*p) B + n N + (e*n) C + b, y = LeakyReLU(z), with the (d x d) blocks
    of the side's weight (``paper``: [A P B N C] in a Linear(5d, d); ``official``: [A B C] in one shared
    Linear(3d, d), and P = I, N = -I)."""

    @staticmethod
    def forward(ctx, e_u, e_r, w_u, b_u, w_r, b_r, layer, adj):
        with torch.no_grad():  # messages are computed chunk by chunk of receiving rows, never as a whole
            y_u = _side_forward(layer, w_u, b_u, e_u, e_r, adj.pos_ur, adj.neg_ur)
            y_r = _side_forward(layer, w_r, b_r, e_r, e_u, adj.pos_ru, adj.neg_ru)
        ctx.layer, ctx.adj, ctx.shared = layer, adj, w_u is w_r
        ctx.save_for_backward(e_u, e_r, w_u, b_u, w_r, b_r)  # not the outputs: their signs are recomputed
        return y_u, y_r

    @staticmethod
    def backward(ctx, g_yu, g_yr):
        e_u, e_r, w_u, b_u, w_r, b_r = ctx.saved_tensors
        layer, adj = ctx.layer, ctx.adj
        with torch.no_grad():  # the messages are recomputed per chunk, never stored
            # the (larger) response side first: its message gradients are freed before the user side's exist
            ge_r, gp, gn, gw_r, gb_r = _side_backward(layer, w_r, b_r, e_r, e_u, adj.pos_ru, adj.neg_ru, g_yr)
            # p_r = A e_u: d e_u += Aᵀ d p_r (the explicit transpose: sums in a fixed order)
            from_r = _add_t(_add_t(torch.zeros_like(e_u), adj.pos_ru, gp), adj.neg_ru, gn)
            del gp, gn
            ge_u, gp, gn, gw_u, gb_u = _side_backward(layer, w_u, b_u, e_u, e_r, adj.pos_ur, adj.neg_ur, g_yu)
            ge_u += from_r
            _add_t(_add_t(ge_r, adj.pos_ur, gp), adj.neg_ur, gn)
        if ctx.shared:  # official: one Linear for both sides
            return ge_u, ge_r, gw_u + gw_r, gb_u + gb_r, None, None, None, None
        return ge_u, ge_r, gw_u, gb_u, gw_r, gb_r, None, None


def _rows(messages: Messages, start: int, stop: int) -> torch.Tensor:
    """Rows ``start:stop`` of the message set's CSR matrix (views of its index and value arrays)."""
    import warnings

    m = messages.matrix
    crow = m.crow_indices()[start:stop + 1]
    lo, hi = int(crow[0]), int(crow[-1])
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse invariant checks are implicitly disabled")
        return torch.sparse_csr_tensor(crow - lo, m.col_indices()[lo:hi], m.values()[lo:hi], (stop - start, m.shape[1]))


def _messages(pos: Messages, neg: Messages, other: Tensor, start: int, stop: int) -> tuple[Tensor, Tensor]:
    """(Σα e, Σβ e) over the senders ``other`` into receiving rows ``start:stop``."""
    return csr_mm(_rows(pos, start, stop), other), csr_mm(_rows(neg, start, stop), other)


def _add_t(out: Tensor, messages: Messages, g: Tensor) -> Tensor:
    """``out += Aᵀ g`` in place, for the message set's matrix A (its explicit transpose)."""
    return torch.addmm(out, messages.transpose, g, out=out)


def _signed(adj: Adjacency, e_u: Tensor, e_r: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(Σα e_r, Σβ e_r) into users and (Σα e_u, Σβ e_u) into responses, by the CSR products themselves."""
    return (*_messages(adj.pos_ur, adj.neg_ur, e_r, 0, len(e_u)), *_messages(adj.pos_ru, adj.neg_ru, e_u, 0, len(e_r)))


def _blocks(layer, w: Tensor) -> tuple:
    """(A, P, B, N, C) of a side's weight (see :class:`_LayerFn`); P, N are None for the identities."""
    d = w.shape[0]
    parts = [w[:, i * d:(i + 1) * d] for i in range(w.shape[1] // d)]
    return tuple(parts) if layer.variant == "paper" else (parts[0], None, parts[1], None, parts[2])


def _pre(blocks, b, e, p, n, out: Tensor, tmp: Tensor) -> Tensor:
    """z = e A + p P + (e*p) B + n N + (e*n) C + b, written into ``out`` (``tmp``: scratch of the same shape)."""
    a, pw, bh, nw, ch = blocks
    torch.addmm(b, e, a.t(), out=out)
    out.addmm_(p, pw.t()) if pw is not None else out.add_(p)
    out.addmm_(torch.mul(e, p, out=tmp), bh.t())
    out.addmm_(n, nw.t()) if nw is not None else out.sub_(n)
    return out.addmm_(torch.mul(e, n, out=tmp), ch.t())


def _side_forward(layer, w, b, e, other, pos: Messages, neg: Messages) -> Tensor:
    blocks, out = _blocks(layer, w), torch.empty_like(e)
    slope, tmp = layer.act.negative_slope, torch.empty_like(e[:CHUNK])
    for i in range(0, len(e), CHUNK):
        s = slice(i, min(i + CHUNK, len(e)))
        p, n = _messages(pos, neg, other, s.start, s.stop)
        torch.nn.functional.leaky_relu_(_pre(blocks, b, e[s], p, n, out[s], tmp[: len(p)]), slope)
    return out


def _side_backward(layer, w, b, e, other, pos: Messages, neg: Messages, gy):
    """Gradients of one side's dense part: (de, dp, dn, dW, db); the messages and the pre-activation are
    recomputed per chunk (so a layer's output need not be kept: the last one is freed after the loss).
    Chunk temporaries are reused: a fresh large tensor per chunk costs more in page faults than its
    arithmetic."""
    blocks = a, pw, bh, nw, ch = _blocks(layer, w)
    slope = layer.act.negative_slope
    ge, gp, gn = torch.empty_like(e), torch.empty_like(e), torch.empty_like(e)
    ga, gpw, gbh, gnw, gch = (torch.zeros_like(m) if m is not None else None for m in (a, pw, bh, nw, ch))
    gb = torch.zeros(w.shape[0], dtype=w.dtype, device=w.device)
    scratch = torch.empty((4, min(CHUNK, len(e)), e.shape[1]), dtype=e.dtype, device=e.device)
    for i in range(0, len(e), CHUNK):
        s = slice(i, min(i + CHUNK, len(e)))
        es = e[s]
        ps, ns = _messages(pos, neg, other, s.start, s.stop)
        gz, prod, g_bh, g_ch = scratch[:, : len(es)]
        positive = _pre(blocks, b, es, ps, ns, g_bh, prod) > 0
        torch.where(positive, gy[s], torch.mul(gy[s], slope, out=prod), out=gz)
        gb += gz.sum(0)
        ga.addmm_(gz.t(), es)
        gbh.addmm_(gz.t(), torch.mul(es, ps, out=prod))
        gch.addmm_(gz.t(), torch.mul(es, ns, out=prod))
        torch.mm(gz, bh, out=g_bh)
        torch.mm(gz, ch, out=g_ch)
        torch.mm(gz, a, out=ge[s]).addcmul_(ps, g_bh).addcmul_(ns, g_ch)
        if pw is not None:
            gpw.addmm_(gz.t(), ps)
            gnw.addmm_(gz.t(), ns)
            torch.mm(gz, pw, out=gp[s]).addcmul_(es, g_bh)
            torch.mm(gz, nw, out=gn[s]).addcmul_(es, g_ch)
        else:
            torch.mul(es, g_bh, out=gp[s]).add_(gz)
            torch.mul(es, g_ch, out=gn[s]).sub_(gz)
    parts = [ga, gpw, gbh, gnw, gch] if pw is not None else [ga, gbh, gch]
    return ge, gp, gn, torch.cat(parts, dim=1), gb


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

    def forward(self, e_u: Tensor, e_r: Tensor, adj: Adjacency) -> tuple[Tensor, Tensor]:
        lin_u, lin_r = (self.user, self.response) if self.variant == "paper" else (self.shared, self.shared)
        return _LayerFn.apply(e_u, e_r, lin_u.weight, lin_u.bias, lin_r.weight, lin_r.bias, self, adj)


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
