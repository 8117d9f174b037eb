"""I2E-proxy (Li et al. 2024; paper Appendix B): the user token is a softmax-weighted mix of N = 10
learnable proxy embeddings, softmax(a_u)·C. Unseen users: only their mixing logits a_u are fitted."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

import pandas as pd
import torch
from torch import nn

from coplctl.core.config import AT_LEAST_1
from coplctl.core.registry import register_method
from coplctl.models.neural import BaselineConfig, NeuralMethod, UserVectorNet, baseline_encoder, token_dim


@dataclass
class I2EProxyConfig(BaselineConfig):
    """I2E-proxy: the baselines' settings plus the number of proxies."""

    proxies: Annotated[int, AT_LEAST_1] = 10
    """N, proxy embeddings shared by all users (paper: 10)."""


class ProxyTokens(nn.Module):
    """softmax(a_u) · C over N proxies C."""

    def __init__(self, n_users: int, n_proxies: int, dim: int):
        super().__init__()
        self.logits = nn.Parameter(0.01 * torch.randn(n_users, n_proxies))
        self.proxies = nn.Parameter(0.02 * torch.randn(n_proxies, dim))

    def forward(self, users: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.logits.index_select(0, users), dim=-1) @ self.proxies


@register_method("i2e-proxy", label="I2E-proxy", order=3)
class I2EProxy(NeuralMethod):
    """I2E-proxy: the user token is a softmax-weighted mix of N = 10 learnable proxies."""

    Config = I2EProxyConfig

    def prepare(self, data, *, seed, work_dir) -> dict[str, int]:
        super().prepare(data, seed=seed, work_dir=work_dir)
        return {"token_dim": token_dim(self)}

    def build_net(self, users: int, sizes: dict[str, int]) -> UserVectorNet:
        tokens = ProxyTokens(users, self.config.proxies, sizes["token_dim"])
        frozen = self.config.mode == "frozen"
        return UserVectorNet(baseline_encoder(self, extra_dim=sizes["token_dim"] if frozen else 0), tokens)

    def adapt(self, pairs: pd.DataFrame, responses: pd.DataFrame) -> dict:
        tokens = self.net.user_vector
        return self.adapt_rows(pairs, responses, tokens, "logits", torch.zeros(tokens.logits.shape[1]))

    def lr_groups(self) -> dict[str, float]:
        return {"user_vector.logits": self.user_rate()}  # each user's mixing logits (not the shared proxies)
