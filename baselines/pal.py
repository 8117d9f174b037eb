"""PAL (Chen et al. 2024; paper Appendix B), the PAL-A variant with the logistic loss: an ideal-point
model. A response's representation h is mapped by f (a residual two-layer MLP); a user's ideal point
is f(softmax(w_u)·P), a mix of N = 10 learnable prototypes P in the representation space; the reward
is −s·‖f(h) − a_u‖ with a learnable scale s > 0, trained with −log σ(r⁺ − r⁻). Unseen users: only
their mixing weights w_u are fitted (50 steps)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

import pandas as pd
import torch
from torch import nn

from coplctl.core.config import AT_LEAST_1, POSITIVE
from coplctl.core.registry import register_method
from coplctl.models.encoders import ResponseEncoder
from coplctl.models.neural import BaselineConfig, NeuralMethod, PairScorer, baseline_encoder


@dataclass
class PALConfig(BaselineConfig):
    """PAL-A (logistic): the baselines' settings plus the ideal-point model's sizes."""

    prototypes: Annotated[int, AT_LEAST_1] = 10
    """N, prototypes shared by all users (paper: 10)."""
    ideal_dim: Annotated[int, AT_LEAST_1] = 64
    """Width of the space f maps into (not given in the paper)."""
    user_lr: Annotated[float, POSITIVE] = 5e-3
    """Learning rate of the users' mixing weights and of the prototypes: PAL's own code trains these
    user-side parameters at 5e-3 (apart from the reward model's rate). Unseen users' weights are fitted at
    ``adapt_lr`` (1e-2, as the other baselines: 63.88 -> 66.26 unseen on sim-uf-p-4-avg against 5e-3)."""
    scale_lr: Annotated[float, POSITIVE] = 0.1
    """Learning rate of the reward scale s (log-parametrised): 0.1 in PAL's own code."""


class ResidualMap(nn.Module):
    """f(x) = W x + MLP(W x): a linear projection with a residual two-layer MLP."""

    def __init__(self, d_in: int, d_out: int):
        super().__init__()
        self.proj = nn.Linear(d_in, d_out)
        self.mlp = nn.Sequential(nn.Linear(d_out, d_out), nn.GELU(), nn.Linear(d_out, d_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.proj(x)
        return y + self.mlp(y)


class PALNet(PairScorer):
    """Ideal points of ``users`` users mixed from ``prototypes`` prototypes, mapped with the responses into
    an ``ideal_dim``-wide space by f; ``encoder`` gives the response representations."""

    def __init__(self, encoder: ResponseEncoder, users: int, prototypes: int, ideal_dim: int):
        super().__init__()
        self.encoder = encoder
        d = encoder.out_dim
        self.f = ResidualMap(d, ideal_dim)
        self.prototypes = nn.Parameter(0.1 * torch.randn(prototypes, d))
        self.weights = nn.Parameter(0.01 * torch.randn(users, prototypes))
        self.log_scale = nn.Parameter(torch.zeros(()))

    def score(self, users: torch.Tensor, batch: dict) -> torch.Tensor:
        h = self.f(self.encoder(batch)).float()  # the reward in fp32, also under autocast (no bf16 ties)
        ideal = self.f(torch.softmax(self.weights.index_select(0, users), dim=-1) @ self.prototypes).float()
        dist = ((h - ideal).pow(2).sum(-1) + 1e-8).sqrt()
        return -self.log_scale.exp() * dist


@register_method("pal", label="PAL", order=5)
class PAL(NeuralMethod):
    """PAL-A: ideal-point reward, −s·‖f(h) − f(softmax(w_u)·P)‖ over N = 10 prototypes (logistic loss)."""

    Config = PALConfig

    def build_net(self, users: int, sizes: dict[str, int]) -> PALNet:
        return PALNet(baseline_encoder(self), users, self.config.prototypes, self.config.ideal_dim)

    def adapt(self, pairs: pd.DataFrame, responses: pd.DataFrame) -> dict:
        return self.adapt_rows(pairs, responses, self.net, "weights", torch.zeros(self.config.prototypes))

    def lr_groups(self) -> dict[str, float]:
        c = self.config
        return {"weights": c.user_lr, "prototypes": c.user_lr, "log_scale": c.scale_lr}
