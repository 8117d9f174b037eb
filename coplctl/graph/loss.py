"""The GCF's pair loss and accuracy, over pairs in chunks: a million users' training pairs never become
(pairs x d) tensors.

Loss (paper Eq. 5 with the L2 penalty of :class:`coplctl.graph.config.GCFConfig`): for pairs (u, c ≻ r),

    mean over pairs of  −log σ(⟨e_u, e_c⟩ − ⟨e_u, e_r⟩)  +  λ (‖e_u‖² + ‖e_c‖² + ‖e_r‖²)

The penalty is summed per node, weighted by how often the node enters a pair. The gradient is formed in
the same pass over the pairs as the loss and added into the node rows (``index_add_``, in pair order: the
same numbers on every run); the backward pass only scales it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

CHUNK = 1 << 18
"""Pairs scored at once."""


class _PairLoss(torch.autograd.Function):
    """Forward computes the loss, the share of pairs ranked right and, in the same pass over the pairs, the
    gradient (each chunk's rows are gathered once); backward only scales it."""

    @staticmethod
    def forward(ctx, e_u, e_r, u, c, r, l2: float):
        n = max(len(u), 1)
        total = torch.zeros((), dtype=torch.float64, device=e_u.device)
        right = torch.zeros((), dtype=torch.int64, device=e_u.device)
        ge_u, ge_r = torch.zeros_like(_wide(e_u)), torch.zeros_like(_wide(e_r))
        for i in range(0, len(u), CHUNK):
            s = slice(i, i + CHUNK)
            eu, ec, er = _wide(e_u[u[s]]), _wide(e_r[c[s]]), _wide(e_r[r[s]])
            s_c, s_r = (eu * ec).sum(-1), (eu * er).sum(-1)
            right += (s_c > s_r).sum()
            margin = s_c - s_r
            total += F.softplus(-margin).sum(dtype=torch.float64)
            w = (torch.sigmoid(-margin) / -n).unsqueeze(-1)  # d loss / d margin
            ge_u.index_add_(0, u[s], ec.sub_(er).mul_(w))
            eu.mul_(w)
            ge_r.index_add_(0, c[s], eu)
            ge_r.index_add_(0, r[s], eu.neg_())
        if l2:
            cu, cr = _counts(e_u, e_r, u, c, r)
            total += l2 * ((cu * _wide(e_u).pow(2).sum(-1)).sum(dtype=torch.float64)
                           + (cr * _wide(e_r).pow(2).sum(-1)).sum(dtype=torch.float64))
            ge_u += (2 * l2 / n * cu).unsqueeze(-1) * _wide(e_u)
            ge_r += (2 * l2 / n * cr).unsqueeze(-1) * _wide(e_r)
        ctx.save_for_backward(ge_u.to(e_u.dtype), ge_r.to(e_r.dtype))  # released by the backward pass
        accuracy = (right.double() / len(u)) if len(u) else torch.tensor(float("nan"), dtype=torch.float64)
        ctx.mark_non_differentiable(accuracy)
        return (total / n).to(_wide(e_u).dtype), accuracy

    @staticmethod
    def backward(ctx, grad, _):
        ge_u, ge_r = ctx.saved_tensors
        if not torch.equal(grad, torch.ones_like(grad)):
            ge_u, ge_r = ge_u * grad, ge_r * grad
        return ge_u, ge_r, None, None, None, None


def _wide(t: torch.Tensor) -> torch.Tensor:
    """``t`` in at least float32 (scores of bf16 embeddings are summed in fp32)."""
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


def _margin(e_u, e_r, u, c, r) -> torch.Tensor:
    return (_wide(e_u[u]) * (_wide(e_r[c]) - _wide(e_r[r]))).sum(-1)


def _counts(e_u, e_r, u, c, r) -> tuple[torch.Tensor, torch.Tensor]:
    """How often each user and each response enters a pair."""
    dtype = _wide(e_u[:0]).dtype
    cu = torch.bincount(u, minlength=len(e_u)).to(dtype)
    cr = (torch.bincount(c, minlength=len(e_r)) + torch.bincount(r, minlength=len(e_r))).to(dtype)
    return cu, cr


def pair_loss(e_u: torch.Tensor, e_r: torch.Tensor, u: torch.Tensor, c: torch.Tensor, r: torch.Tensor,
              l2: float = 0.0) -> tuple[torch.Tensor, float]:
    """The mean Bradley-Terry loss of pairs (u, c ≻ r) plus ``l2`` times the mean squared norm of their
    three embeddings (see the module docstring), and the share of the pairs whose chosen response scores
    strictly higher (what :func:`pair_accuracy` gives, from the same pass)."""
    loss, accuracy = _PairLoss.apply(e_u, e_r, u, c, r, float(l2))
    return loss, float(accuracy)


@torch.no_grad()
def pair_accuracy(e_u: torch.Tensor, e_r: torch.Tensor, u: torch.Tensor, c: torch.Tensor, r: torch.Tensor) -> float:
    """Share of pairs whose chosen response scores strictly higher, ⟨e_u, e_c⟩ > ⟨e_u, e_r⟩ (NaN: no pair)."""
    if len(u) == 0:
        return float("nan")
    right = 0
    for i in range(0, len(u), CHUNK):
        s = slice(i, i + CHUNK)
        eu = e_u[u[s]]
        right += int(((eu * e_r[c[s]]).sum(-1) > (eu * e_r[r[s]]).sum(-1)).sum())
    return right / len(u)
