"""Uniform (paper Appendix B): one Bradley-Terry reward model on every user's pairs — the common
preference, the same reward for every user."""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

from coplctl.core.registry import register_method
from coplctl.core.errors import CoplError
from coplctl.models.neural import BaselineConfig, FixedUser, NeuralMethod, UserVectorNet, baseline_encoder


@dataclass
class UniformConfig(BaselineConfig):
    """Uniform: the baselines' settings (LoRA rank 64 in lora mode); no user state."""


@register_method("uniform", label="Uniform", order=1)
class Uniform(NeuralMethod):
    """Uniform: one Bradley-Terry reward model trained on all users' pairs (common preference)."""

    Config = UniformConfig
    personalized = False

    def build_net(self, users: int, sizes: dict[str, int]) -> UserVectorNet:
        return UserVectorNet(baseline_encoder(self))

    def adapt(self, pairs: pd.DataFrame, responses: pd.DataFrame) -> dict:
        new = [u for u in dict.fromkeys(pairs["user_id"]) if u not in self.user_index]
        self.user_ids = self.user_ids + new
        return {"users": len(new), "pairs": 0, "method": "none: the reward does not depend on the user"}

    def fixed_user(self, user: str | None = None, group: str | None = None) -> FixedUser:
        """The one reward every user gets (``user`` is not needed; ``group`` is refused: there is no group model)."""
        if group is not None:
            raise CoplError("uniform gives every user and group the same reward: export it without --group")
        return FixedUser("every user", lambda m, x: m(x), self.net.head)
