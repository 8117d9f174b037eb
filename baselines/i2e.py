"""I2E (Li et al. 2024, P-RLHF; paper Appendix B): a learnable embedding per user, plus a generic-user
embedding added to every user's, read by the reward model as one extra input token right after BOS
(``lora`` mode) or concatenated to the response features (``frozen`` mode). Unseen users: a new
embedding fitted on their few-shot pairs (50 steps) with the model frozen."""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd
import torch
from torch import nn

from coplctl.core.registry import register_method
from coplctl.models.neural import BaselineConfig, NeuralMethod, UserVectorNet, baseline_encoder, token_dim


@dataclass
class I2EConfig(BaselineConfig):
    """I2E: the baselines' settings; unseen users get ``adapt_steps`` (paper: 50) gradient steps."""

    init_std: float = 0.02
    """Standard deviation of the initial user embeddings."""


class UserTokens(nn.Module):
    """e_u + e_generic for each user row."""

    def __init__(self, n_users: int, dim: int, std: float):
        super().__init__()
        self.table = nn.Parameter(std * torch.randn(n_users, dim))
        self.generic = nn.Parameter(torch.zeros(dim))

    def forward(self, users: torch.Tensor) -> torch.Tensor:
        return self.table.index_select(0, users) + self.generic


@register_method("i2e", label="I2E", order=2)
class I2E(NeuralMethod):
    """I2E: a learnable embedding per user inserted as one extra input token (P-RLHF)."""

    Config = I2EConfig

    def prepare(self, data, *, seed, work_dir) -> dict[str, int]:
        super().prepare(data, seed=seed, work_dir=work_dir)
        return {"token_dim": token_dim(self)}

    def build_net(self, users: int, sizes: dict[str, int]) -> UserVectorNet:
        tokens = UserTokens(users, sizes["token_dim"], self.config.init_std)
        frozen = self.config.mode == "frozen"
        return UserVectorNet(baseline_encoder(self, extra_dim=sizes["token_dim"] if frozen else 0), tokens)

    def adapt(self, pairs: pd.DataFrame, responses: pd.DataFrame) -> dict:
        tokens = self.net.user_vector
        return self.adapt_rows(pairs, responses, tokens, "table", tokens.table.detach().mean(0))

    def lr_groups(self) -> dict[str, float]:
        return {"user_vector.table": self.user_rate()}  # each user's own embedding (not the generic one)
