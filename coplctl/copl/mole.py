"""Mixture of LoRA experts with a user gate (paper §4.2, Eq. 6-7).

Each adapted linear layer W0 becomes

    W x = W0 x + s·B_s A_s x + s·Σ_{i∈top-k} w_i B_i A_i x,        s = alpha / rank,

with one shared expert (A_s, B_s) and M experts of rank n. A gate per layer, a two-layer MLP
(hidden 256, ReLU) on the user embedding e_u, gives logits z; p = softmax(z / τ); the top-k experts
are used with weight w_i = p_i (the probability itself: the authors' code applies it twice, p²).
The gate runs once per *user row* and is shared by every sequence of that user in the batch (a pair's
chosen and rejected responses), optional training noise included. Selected experts are computed
batched: their factors are gathered per sample and applied with batched matrix products.

The user embedding reaches the layers explicitly, as a forward argument injected for the duration of
one call (the pattern peft uses for per-sample adapters), never as state set on modules.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

#: A layer whose most used expert gets at least this share of the users counts as *collapsed*: its
#: gate routes (nearly) everybody to one expert, so the user embeddings no longer choose anything.
COLLAPSE_SHARE = 0.95


@dataclass
class Routing:
    """What one forward call passes to every MoLE layer.

    ``users`` holds one embedding per distinct user row; ``rows`` maps each sequence of the batch to
    its row (a pair's two sequences share a row). Layers append their gate outputs to ``records``.
    """

    users: torch.Tensor  # (U, d_user)
    rows: torch.Tensor  # (B,) long
    noise: float = 0.0
    records: list = field(default_factory=list)  # (layer name, probs (U, M), chosen experts (U, k))


class ExpertGate:
    """The gate and the experts of a MoLE layer: ``expert_a`` (M, n, d_in), ``expert_b`` (M, d_out, n),
    ``gate`` (the MLP on the user embedding), ``scale``, ``temperature``, ``top_k`` and ``name``, set by
    the module that mixes this in (:class:`MoLELinear` here, :class:`coplctl.copl.peft_mole.PeftExperts` in an
    exported peft adapter), so both compute the same rewards."""

    @property
    def num_experts(self) -> int:
        return self.expert_a.shape[0]

    def route(self, users: torch.Tensor, noise: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(probabilities (U, M), chosen experts (U, k), their weights (U, k)) for each user row."""
        logits = self.gate(users.to(self.gate[0].weight.dtype))
        if noise and self.training:
            logits = logits + noise * torch.randn_like(logits)
        probs = torch.softmax(logits / self.temperature, dim=-1)
        weights, experts = probs.topk(self.top_k, dim=-1)
        return probs, experts, weights

    def mix(self, h: torch.Tensor, routing: Routing) -> torch.Tensor:
        """scale · Σ_{i∈top-k} w_i B_i A_i h for each sequence of ``h``, with its user's experts."""
        probs, experts, weights = self.route(routing.users, routing.noise)
        routing.records.append((self.name, probs, experts))
        e = experts[routing.rows]  # (B, k): a pair's two sequences get their user's experts
        w = weights.index_select(0, routing.rows).to(h.dtype)  # (B, k); index_select: reproducible backward
        shape = h.shape
        h3 = h.reshape(shape[0], -1, shape[-1])  # (B, T, d_in); 2-D inputs become T = 1
        # Gather each sample's experts as a one-hot product rather than by indexing: the gradient then
        # reduces with matrix products, which sum in a fixed order (indexing's scatter-add does not).
        pick = F.one_hot(e, self.num_experts).to(h.dtype)  # (B, k, M)
        a = torch.einsum("bkm,mrd->bkrd", pick, self.expert_a.to(h.dtype))  # (B, k, r, d_in)
        b = torch.einsum("bkm,mor->bkor", pick, self.expert_b.to(h.dtype))  # (B, k, d_out, r)
        low = torch.einsum("btd,bkrd->bktr", h3, a)
        mixed = torch.einsum("bktr,bkor,bk->bto", low, b, w)
        return self.scale * mixed.reshape(*shape[:-1], -1)


def make_gate(user_dim: int, hidden: int, experts: int, device=None) -> nn.Sequential:
    """The gate MLP of one layer: user embedding → hidden (ReLU) → one logit per expert."""
    return nn.Sequential(nn.Linear(user_dim, hidden), nn.ReLU(), nn.Linear(hidden, experts)).to(device)


class MoLELinear(ExpertGate, nn.Module):
    """A linear layer with a shared LoRA expert and a user-gated mixture of LoRA experts.

    Args:
        base: the wrapped ``nn.Linear`` (frozen unless ``train_base``).
        user_dim: width of the user embedding the gate reads.
        num_experts: M (paper: 8).  rank: n (paper: 8).  alpha: LoRA alpha (paper: 2 · rank).
        gate_hidden: gate MLP width (paper: 256).  temperature: τ (paper: 1).  top_k: experts used (paper: 1).
        shared: keep the shared expert (paper: yes).  dropout: on the adapter input.
        name: label used in routing records.
    """

    def __init__(self, base: nn.Linear, user_dim: int, *, num_experts: int = 8, rank: int = 8, alpha: float = 16,
                 gate_hidden: int = 256, temperature: float = 1.0, top_k: int = 1, shared: bool = True,
                 dropout: float = 0.0, train_base: bool = False, name: str = ""):
        super().__init__()
        self.base, self.name = base, name
        base.requires_grad_(train_base)
        d_in, d_out = base.in_features, base.out_features
        self.scale, self.temperature, self.top_k = alpha / rank, temperature, top_k
        self.dropout = nn.Dropout(dropout)
        dev = base.weight.device
        self.expert_a = nn.Parameter(torch.empty(num_experts, rank, d_in, device=dev))
        self.expert_b = nn.Parameter(torch.zeros(num_experts, d_out, rank, device=dev))
        for a in self.expert_a:
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        if shared:
            self.shared_a = nn.Linear(d_in, rank, bias=False, device=dev)
            self.shared_b = nn.Linear(rank, d_out, bias=False, device=dev)
            nn.init.zeros_(self.shared_b.weight)
        else:
            self.shared_a = self.shared_b = None
        self.gate = make_gate(user_dim, gate_hidden, num_experts, dev)

    def forward(self, x: torch.Tensor, routing: Routing | None = None) -> torch.Tensor:
        if routing is None:
            raise RuntimeError(f"MoLE layer {self.name} called without a user: use mole_routing(...)")
        out = self.base(x)
        h = self.dropout(x)
        if self.shared_a is not None:
            out = out + self.scale * self.shared_b(self.shared_a(h))
        return out + self.mix(h, routing)


def inject_mole(model: nn.Module, targets: list[str], user_dim: int, **kwargs) -> list[MoLELinear]:
    """Replace every ``nn.Linear`` whose name ends with one of ``targets`` by a :class:`MoLELinear`."""
    layers = []
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and any(name == t or name.endswith("." + t) for t in targets):
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            layer = MoLELinear(module, user_dim, name=name, **kwargs)
            setattr(parent, child, layer)
            layers.append(layer)
    if not layers:
        raise ValueError(f"no linear layer matches the MoLE targets {targets}")
    return layers


@contextlib.contextmanager
def mole_routing(layers: list[MoLELinear], routing: Routing):
    """Pass ``routing`` as a forward argument to each layer for the calls made inside the block."""

    def hook(module, args, kwargs):
        return args, {**kwargs, "routing": routing}

    handles = [layer.register_forward_pre_hook(hook, with_kwargs=True) for layer in layers]
    try:
        yield routing
    finally:
        for h in handles:
            h.remove()


def load_balance_loss(records: list) -> torch.Tensor:
    """Switch-style balance term averaged over layers: M · Σ_i f_i · P_i (1 when perfectly balanced)."""
    terms = []
    for _, probs, experts in records:
        m = probs.shape[-1]
        f = F.one_hot(experts[:, 0], m).float().mean(0)
        terms.append(m * (f * probs.float().mean(0)).sum())
    return torch.stack(terms).mean()


def top1_allocation(layers: Sequence[MoLELinear], users: torch.Tensor) -> dict[str, list[int]]:
    """Top-1 expert of each user (row of ``users``) at each layer: the gate's argmax, no noise, no grad."""
    alloc = {}
    with torch.no_grad():
        for layer in layers:
            logits = layer.gate(users.to(device=layer.gate[0].weight.device, dtype=layer.gate[0].weight.dtype))
            alloc[layer.name] = logits.argmax(-1).tolist()  # softmax and its temperature keep the argmax
    return alloc


def _known(g) -> bool:
    """False for None, NaN and pandas' NA (whose comparisons are NA, not a bool)."""
    if g is None:
        return False
    try:
        return not bool(g != g)
    except TypeError:
        return False


def _entropy_bits(counts) -> float:
    n = sum(counts)
    return -sum(c / n * math.log2(c / n) for c in counts if c)


def routing_stats(allocation: Mapping[str, Sequence[int]], groups: Sequence | None = None, *,
                  num_experts: int | None = None) -> dict[str, dict]:
    """How each layer's top-1 routing spreads users over experts and how much it follows their groups.

    Args:
        allocation: layer name → expert of each user (as from :func:`top1_allocation` or
            ``coplctl.copl.figures.expert_allocation(...)["layers"]``).
        groups: each user's preference group, same order; None / NaN where unknown (or no groups at all).
        num_experts: M (default: largest expert index + 1).

    Returns, per layer: ``share`` (fraction of all users per expert, M floats), ``top_expert`` and
    ``top_share`` (the most used expert and its share), ``collapsed`` (``top_share >= COLLAPSE_SHARE``),
    ``users``, ``grouped_users`` (users with a known group), ``mutual_information`` (plug-in estimate of
    I(group; expert) in bits over the users with a known group; None without any), and
    ``normalized_mi`` (MI / H(group), 0..1: 1 when the expert tells the group; None unless two groups
    or more). The plug-in estimate is biased upwards by about (G-1)(M-1) / (2 N ln 2) bits.
    """
    stats = {}
    for name, experts in allocation.items():
        experts = [int(e) for e in (experts.tolist() if hasattr(experts, "tolist") else experts)]
        n = len(experts)
        m = num_experts if num_experts is not None else (max(experts) + 1 if experts else 0)
        counts = [0] * m
        for e in experts:
            counts[e] += 1
        share = [c / n if n else 0.0 for c in counts]
        top = max(range(m), key=lambda i: counts[i]) if m else 0
        known = [(g, e) for g, e in zip(groups, experts) if _known(g)] if groups is not None else []
        mi = nmi = None
        if known:
            joint, by_group, by_expert = {}, {}, {}
            for g, e in known:
                joint[g, e] = joint.get((g, e), 0) + 1
                by_group[g] = by_group.get(g, 0) + 1
                by_expert[e] = by_expert.get(e, 0) + 1
            k = len(known)
            mi = max(0.0, sum(c / k * math.log2(c * k / (by_group[g] * by_expert[e])) for (g, e), c in joint.items()))
            h = _entropy_bits(by_group.values())
            if len(by_group) > 1:
                nmi = min(1.0, mi / h)
        stats[name] = {"share": share, "top_expert": top, "top_share": share[top] if m else 0.0,
                       "collapsed": bool(m and share[top] >= COLLAPSE_SHARE), "users": n, "grouped_users": len(known),
                       "mutual_information": mi, "normalized_mi": nmi}
    return stats


def warn_collapsed(stats: Mapping[str, dict]) -> list[str]:
    """One ``UserWarning`` naming every collapsed layer (see :data:`COLLAPSE_SHARE`); returns their names."""
    bad = [name for name, s in stats.items() if s["collapsed"]]
    if bad:
        parts = [f"MoLE layer {name} routes {100 * stats[name]['top_share']:.0f}% of users to expert "
                 f"{stats[name]['top_expert']}" for name in bad]
        warnings.warn(f"{'; '.join(parts)}: the gate ignores the user embeddings (collapse: one expert for "
                      f">= {100 * COLLAPSE_SHARE:.0f}% of users)", UserWarning, stacklevel=2)
    return bad


def gate_routing(layers: Sequence[MoLELinear], users: torch.Tensor, groups: Sequence | None = None, *,
                 warn: bool = True) -> dict[str, dict]:
    """:func:`routing_stats` of the layers' top-1 routing of ``users``, warning when a layer collapsed."""
    stats = routing_stats(top1_allocation(layers, users), groups,
                          num_experts=layers[0].num_experts if layers else None)
    if warn:
        warn_collapsed(stats)
    return stats
