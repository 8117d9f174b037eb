"""The reference method used by tests: the smallest complete RewardMethod (and the README's example).

One Bradley-Terry score per response, shared by every user: a non-personalized floor that trains in
milliseconds, so interface tests do not need a language model.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
from safetensors.torch import load_file, save_file

from coplctl.core.registry import register_method
from coplctl.models.reward import RewardMethod, bt_loss, pair_accuracy


@dataclass
class ResponseBTConfig:
    steps: int = 200
    """Full-batch Adam steps."""
    lr: float = 0.1
    """Adam learning rate."""


@register_method("response-bt")
class ResponseBT(RewardMethod):
    """Reference method: one Bradley-Terry score per response, the same for every user."""

    Config = ResponseBTConfig

    def fit(self, data, backbone=None, *, seed: int = 0, work_dir=None, progress: bool = True) -> dict:
        torch.manual_seed(seed)
        self.ids = data.responses["response_id"].tolist()
        index = {r: i for i, r in enumerate(self.ids)}
        train = data.split("train")
        c = torch.tensor(train["chosen_id"].map(index).to_numpy())
        r = torch.tensor(train["rejected_id"].map(index).to_numpy())
        self.scores = torch.zeros(len(self.ids), requires_grad=True)
        opt = torch.optim.Adam([self.scores], lr=self.config.lr)
        for _ in range(self.config.steps):
            loss = bt_loss(self.scores[c], self.scores[r])
            opt.zero_grad()
            loss.backward()
            opt.step()
        return {"train_loss": loss.item(), "train_accuracy": pair_accuracy(self, train, data.responses)}

    def adapt(self, pairs: pd.DataFrame, responses: pd.DataFrame) -> dict:
        return {"users": int(pairs["user_id"].nunique()), "note": "not personalized: nothing to adapt"}

    def score(self, user_ids, responses: pd.DataFrame) -> torch.Tensor:
        index = {r: i for i, r in enumerate(self.ids)}
        pos = torch.tensor([index.get(r, -1) for r in responses["response_id"]])
        out = torch.zeros(len(pos))
        known = pos >= 0
        out[known] = self.scores.detach()[pos[known]]
        return out

    def save_state(self, directory: Path) -> None:
        save_file({"scores": self.scores.detach().contiguous()}, str(directory / "scores.safetensors"))
        (directory / "responses.json").write_text(json.dumps(self.ids))

    def load_state(self, directory: Path) -> None:
        self.scores = load_file(str(directory / "scores.safetensors"))["scores"]
        self.ids = json.loads((directory / "responses.json").read_text())
