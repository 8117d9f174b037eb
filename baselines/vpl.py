"""VPL (Poddar et al. 2024; paper Appendix B): a variational encoder maps a user's annotated pairs to a
latent z — a pair MLP on [e_chosen, e_rejected] (frozen-backbone embeddings), self-attention across
the pairs, a mean, then linear maps to μ and log σ² — and the reward is an MLP on [h(x), z]. Loss:
Bradley-Terry + β·KL(q(z) ‖ N(0, I)), β annealed from 0 (β = 0 for UF-P-2, 3e-6 for UF-P-4 as in VPL's
code). Unseen users: their few-shot pairs are encoded, no optimisation.

Training and evaluation use the same context: the user's other training pairs (the pair being
predicted is left out of its own context), and z = μ whenever a reward is scored.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

import pandas as pd
import torch
from torch import nn

from coplctl.core.config import AT_LEAST_1, NON_NEGATIVE, PROBABILITY
from coplctl.core.registry import register_method
from coplctl.models.encoders import ResponseEncoder, RewardHead, adapters_disabled, concat_batches
from coplctl.models.features import features
from coplctl.models.neural import BaselineConfig, NeuralMethod, baseline_encoder
from coplctl.models.train_config import distributed_state


@dataclass
class VPLConfig(BaselineConfig):
    """VPL: the baselines' settings plus the variational encoder's."""

    latent_dim: Annotated[int, AT_LEAST_1] = 32
    """Width of z (not given in the paper; small, as the groups are few)."""
    hidden: Annotated[int, AT_LEAST_1] = 128
    """Width of the pair MLP, the attention and the reward MLP (not given in the paper)."""
    heads: Annotated[int, AT_LEAST_1] = 4
    """Attention heads across a user's pairs (not given in the paper)."""
    context_pairs: Annotated[int, AT_LEAST_1] = 16
    """Most pairs a user's context holds (the user's first ones; the encoder's cost grows with it)."""
    beta: Annotated[float, NON_NEGATIVE] | None = None
    """KL weight; None = 0 for UF-P-2 and 3e-6 for UF-P-4 (VPL's code)."""
    kl_anneal: Annotated[float, PROBABILITY] = 0.5
    """Share of the training steps over which β ramps up linearly from 0 (VPL anneals; the share is ours)."""


class VPLNet(nn.Module):
    """Variational user encoder + reward MLP.

    Args:
        encoder: the response encoder.
        users: user rows of the latent table.
        feat_dim: width of the frozen-backbone features of context responses.
        hidden, latent_dim, heads: widths of the pair MLP / attention / reward MLP, of z, attention heads.
        context: training context (features, pair endpoints, pair ids per user row), or None.
        beta: KL weight reached after ``anneal_steps`` training steps.
    """

    def __init__(self, encoder: ResponseEncoder, users: int, feat_dim: int, *, hidden: int, latent_dim: int,
                 heads: int, context: tuple | None = None, beta: float = 0.0, anneal_steps: int = 1):
        super().__init__()
        self.encoder = encoder
        h, z = hidden, latent_dim
        self.pair_mlp = nn.Sequential(nn.Linear(2 * feat_dim, h), nn.GELU(), nn.Linear(h, h))
        self.attn = nn.MultiheadAttention(h, heads, batch_first=True)
        self.to_mu, self.to_logvar = nn.Linear(h, z), nn.Linear(h, z)
        self.reward = nn.Sequential(nn.Linear(self.encoder.out_dim + z, h), nn.GELU(), RewardHead(h, 1))
        self.register_buffer("latent", torch.zeros(users, z))  # μ of every known user
        self.context = context  # training only: (features, pair endpoints, pairs per user)
        self.beta, self.anneal_steps, self.step = beta, max(1, anneal_steps), 0

    def get_extra_state(self) -> dict:
        """The annealing step, saved with a training checkpoint (:mod:`coplctl.models.resume`)."""
        return {"step": self.step}

    def set_extra_state(self, state: dict) -> None:
        self.step = int(state["step"])

    def encode(self, feats: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(μ, log σ²) from context pair features (B, K, 2F) with a validity mask (B, K)."""
        x = self.pair_mlp(feats)
        x, _ = self.attn(x, x, x, key_padding_mask=~mask, need_weights=False)
        m = mask.unsqueeze(-1).to(x.dtype)
        pooled = (x * m).sum(1) / m.sum(1).clamp(min=1)
        return self.to_mu(pooled), self.to_logvar(pooled)

    def context_of(self, users: torch.Tensor, leave_out: torch.Tensor | None = None, context: tuple | None = None):
        feats, ends, per_user = context or self.context  # kept where built; results go to the batch's device
        idx = per_user[users.to(per_user.device)]  # (B, K) pair ids, -1 = padding
        mask = idx >= 0
        if leave_out is not None:  # a pair is not part of its own context ...
            mask = mask & (idx != leave_out.to(idx.device).unsqueeze(1))
            empty = ~mask.any(1)  # ... unless it is the user's only one
            mask[empty] = idx[empty] >= 0
        safe = idx.clamp(min=0)
        pair_feats = torch.cat([feats[ends[safe, 0]], feats[ends[safe, 1]]], dim=-1)
        dev = self.to_mu.weight.device
        return pair_feats.to(dev, self.to_mu.weight.dtype), mask.to(dev)

    def latent_of(self, users: torch.Tensor) -> torch.Tensor:
        """z = μ: from the training context while training, then from the stored table."""
        if self.context is None:
            return self.latent[users]
        return self.encode(*self.context_of(users))[0]

    @torch.no_grad()
    def finish_training(self) -> None:
        """Store every user's μ from its full training context, and let the context go."""
        self.eval()
        users = torch.arange(len(self.latent), device=self.latent.device)
        self.latent = torch.cat([self.latent_of(users[s:s + 512]) for s in range(0, len(users), 512)])
        self.context = None

    @torch.no_grad()
    def add_users(self, context: tuple, n: int) -> None:
        """Append the μ of ``n`` new users encoded from ``context`` (their few-shot pairs)."""
        self.eval()
        rows = torch.arange(n, device=self.latent.device)
        mu = self.encode(*self.context_of(rows, context=context))[0]
        self.latent = torch.cat([self.latent, mu.to(self.latent.dtype)])

    def score(self, users: torch.Tensor, batch: dict) -> torch.Tensor:
        h = self.encoder(batch)
        z = self.latent_of(users).to(h.dtype)
        return self.reward(torch.cat([h, z], dim=-1)).squeeze(-1)

    def forward(self, users, chosen: dict, rejected: dict, pair_ids: torch.Tensor):
        n = len(users)
        mu, logvar = self.encode(*self.context_of(users, pair_ids))
        z = mu + torch.randn_like(mu) * (0.5 * logvar).exp()
        h = self.encoder(concat_batches(chosen, rejected))
        r = self.reward(torch.cat([h, z.repeat(2, 1).to(h.dtype)], dim=-1)).squeeze(-1)
        kl = -0.5 * (1 + logvar - mu.pow(2) - logvar.exp()).sum(-1).mean()
        weight = self.beta * min(1.0, self.step / self.anneal_steps)
        self.step += 1
        return r[:n], r[n:], weight * kl


def _user_contexts(pairs: pd.DataFrame, user_index: dict, n_users: int, k: int) -> torch.Tensor:
    """(n_users, k) ids of each user's first k pairs (rows of ``pairs``), -1 padded."""
    out = torch.full((n_users, k), -1, dtype=torch.long)
    for user, rows in pairs.reset_index(drop=True).groupby("user_id", sort=False).indices.items():
        if user in user_index:
            rows = rows[:k]
            out[user_index[user], : len(rows)] = torch.as_tensor(rows)
    return out


@register_method("vpl", label="VPL", order=4)
class VPL(NeuralMethod):
    """VPL: variational user latent encoded from the user's annotated pairs; reward MLP on [h(x), z]."""

    Config = VPLConfig

    def _features(self, responses: pd.DataFrame) -> torch.Tensor:
        """Frozen-backbone embeddings of responses, for contexts (adapters off in lora mode)."""
        with adapters_disabled(self.backbone.model):
            return features(self.backbone, responses["prompt"], responses["text"])

    def prepare(self, data, *, seed, work_dir) -> dict[str, int]:
        super().prepare(data, seed=seed, work_dir=work_dir)
        self._train = data.split("train").reset_index(drop=True)
        self._feats = self._features(data.responses)
        pos = pd.Series(range(len(data.responses)), index=data.responses["response_id"])
        self._ends = torch.tensor(self._train[["chosen_id", "rejected_id"]].apply(lambda s: s.map(pos)).to_numpy())
        beta = self.config.beta
        self._beta = beta if beta is not None else (3e-6 if data.meta.get("variant") == "uf-p-4" else 0.0)
        return {"feat_dim": self._feats.shape[1]}

    def extra_columns(self, data) -> tuple[torch.Tensor, ...]:
        return (torch.arange(len(self._train)),)  # the pair ids, to leave each pair out of its own context

    def build_net(self, users: int, sizes: dict[str, int]) -> VPLNet:
        c = self.config
        widths = {"hidden": c.hidden, "latent_dim": c.latent_dim, "heads": c.heads}
        if self._train is None:  # loading a trained model: no training context
            return VPLNet(baseline_encoder(self), users, sizes["feat_dim"], **widths)
        per_user = _user_contexts(self._train, self.user_index, users, c.context_pairs)
        processes = distributed_state(c).num_processes  # each process takes its share of the steps
        steps = c.get("epochs") * -(-len(self._train) // (c.get("batch_size") * processes))
        return VPLNet(baseline_encoder(self), users, sizes["feat_dim"], **widths,
                      context=(self._feats, self._ends, per_user), beta=self._beta, anneal_steps=int(steps * c.kl_anneal))

    def fit(self, data, backbone=None, **kw) -> dict:
        metrics = super().fit(data, backbone, **kw)
        self.net.finish_training()
        self._train = self._feats = None
        return metrics

    def adapt(self, pairs: pd.DataFrame, responses: pd.DataFrame) -> dict:
        new = [u for u in dict.fromkeys(pairs["user_id"]) if u not in self.user_index]
        index = {u: i for i, u in enumerate(new)}
        shots = pairs[pairs["user_id"].isin(index)].reset_index(drop=True)
        feats = self._features(responses)
        pos = pd.Series(range(len(responses)), index=responses["response_id"])
        ends = torch.tensor(shots[["chosen_id", "rejected_id"]].apply(lambda s: s.map(pos)).to_numpy())
        per_user = _user_contexts(shots, index, len(new), self.config.context_pairs)
        self.net.add_users((feats, ends, per_user), len(new))
        self.user_ids = self.user_ids + new
        return {"users": len(new), "pairs": int(len(shots)), "method": "encoded few-shot pairs (z = μ)"}

    def load_extra(self, directory) -> None:
        self._train = self._feats = None
