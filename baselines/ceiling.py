"""Ceiling (not in the paper): what a mixture user's own labels allow a method that knows every response's ratings.

On data whose users mix attributes with Dirichlet(α) weights (``preferences: mixture``, PersonalLLM), a
user prefers the response with the higher weighted rating. The ceiling knows every response's attribute
ratings (``responses.parquet`` holds them) and the prior, but not the user's weights: it infers them from
that user's own training labels (unseen users: their few-shot pairs) as the posterior mean under the
Dirichlet(α) prior, each label a constraint w·(r_chosen − r_rejected) > 0 kept with probability 1 − ε
(ε = ``noise``; a tie counts one half). The posterior is estimated with ``samples`` draws from the prior,
shared by every user. A response's reward is E[w | labels]·ratings.

The Oracle knows the weights themselves; the gap from the ceiling to the Oracle is what the labels do not
tell, and the gap from a learned method to the ceiling is what the method leaves on the table.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import numpy as np
import pandas as pd
import torch

from coplctl.core.config import AT_LEAST_1, FRACTION, POSITIVE
from coplctl.core.errors import CoplError
from coplctl.core.files import read_json, read_safetensors, read_user_ids
from coplctl.core.registry import register_method
from coplctl.data.dataset import WEIGHT_PREFIX, weight_columns
from coplctl.models.reward import RewardMethod


@dataclass
class CeilingConfig:
    """Ceiling: a Bayesian reference for mixture users."""

    alpha: Annotated[float, POSITIVE] | None = None
    """Dirichlet concentration of the prior; None: the dataset's (its protocol's ``alpha``, else 0.1)."""
    samples: Annotated[int, AT_LEAST_1] = 16_384
    """Prior draws the posterior is estimated from."""
    noise: Annotated[float, FRACTION] = 1e-3
    """Chance that a label goes against the user's weights (keeps the posterior defined when no draw fits)."""


def _attributes(data) -> list[str]:
    return [c.removeprefix(WEIGHT_PREFIX) for c in weight_columns(data.users)]


@register_method("ceiling", label="Ceiling", upper_bound=True)
class Ceiling(RewardMethod):
    """Ceiling: each mixture user's weights inferred from its own labels (posterior mean), known ratings."""

    Config = CeilingConfig

    @classmethod
    def cannot_run(cls, data) -> str | None:
        attrs = _attributes(data)
        if not attrs or data.users[weight_columns(data.users)].isna().any().any():
            return "needs mixture users (preferences: mixture), and the dataset's users have groups"
        missing = [a for a in attrs if a not in data.responses.columns]
        return f"needs the responses' ratings of {', '.join(missing)}, which the dataset lacks" if missing else None

    def fit(self, data, backbone=None, *, seed: int = 0, work_dir=None, progress: bool = True) -> dict:
        reason = self.cannot_run(data)
        if reason:
            raise CoplError(f"ceiling {reason}")
        self.attributes = _attributes(data)
        alpha = self.config.alpha or (data.meta.get("protocol") or {}).get("alpha") or 0.1
        rng = np.random.default_rng(seed)
        self.prior = rng.dirichlet([alpha] * len(self.attributes), size=self.config.samples)
        self.ratings = data.responses.set_index("response_id")[self.attributes].astype(np.float64)
        self.user_ids, self.weights = [], np.zeros((0, len(self.attributes)))
        seen = data.users.loc[data.users["role"] == "seen", "user_id"]
        train = data.split("train")
        report = self._add(train[train["user_id"].isin(set(seen))], list(seen))
        return {"users": report["users"], "labels": report["pairs"], "alpha": alpha, "samples": self.config.samples}

    def _add(self, pairs: pd.DataFrame, users: list[str]) -> dict:
        """Posterior-mean weights of ``users`` from their ``pairs`` (a user without pairs: the prior mean)."""
        d = self.ratings.loc[pairs["chosen_id"]].to_numpy() - self.ratings.loc[pairs["rejected_id"]].to_numpy()
        order = np.argsort(pairs["user_id"].to_numpy(), kind="stable")
        sorted_users = pairs["user_id"].to_numpy()[order]
        lo = np.searchsorted(sorted_users, users, side="left")
        hi = np.searchsorted(sorted_users, users, side="right")
        eps = self.config.noise
        log_ok, log_bad, log_tie = np.log1p(-eps), np.log(max(eps, 1e-300)), np.log(0.5)
        out = np.empty((len(users), len(self.attributes)))
        for i, (a, b) in enumerate(zip(lo, hi)):
            margins = self.prior @ d[order[a:b]].T  # (samples, labels)
            ll = np.where(margins > 0, log_ok, np.where(margins < 0, log_bad, log_tie)).sum(1)
            w = np.exp(ll - ll.max())
            out[i] = w @ self.prior / w.sum()
        self.user_ids = self.user_ids + list(users)
        self.weights = np.concatenate([self.weights, out])
        return {"users": len(users), "pairs": len(pairs)}

    def adapt(self, pairs: pd.DataFrame, responses: pd.DataFrame) -> dict:
        known = set(self.user_ids)
        new = [u for u in dict.fromkeys(pairs["user_id"]) if u not in known]
        unknown = sorted((set(pairs["chosen_id"]) | set(pairs["rejected_id"])) - set(self.ratings.index))
        if unknown:
            raise CoplError(f"ceiling knows the ratings of the dataset's responses only, not {unknown[0]!r}")
        report = self._add(pairs[pairs["user_id"].isin(set(new))], new)
        return {**report, "method": "posterior mean of the user's weights given its pairs"}

    def score(self, user_ids, responses: pd.DataFrame) -> torch.Tensor:
        index = {u: i for i, u in enumerate(self.user_ids)}
        missing = [u for u in user_ids if u not in index]
        if missing:
            raise CoplError(f"unknown user {missing[0]!r} for ceiling: neither seen in training nor adapted")
        ids = responses["response_id"]
        absent = ids[~ids.isin(self.ratings.index)]
        if len(absent):
            raise CoplError(f"ceiling knows the ratings of the dataset's responses only, not {absent.iloc[0]!r}")
        w = self.weights[[index[u] for u in user_ids]]
        return torch.from_numpy((w * self.ratings.loc[ids].to_numpy()).sum(1)).float()

    def save_state(self, directory: Path) -> None:
        from safetensors.torch import save_file

        save_file({"weights": torch.from_numpy(self.weights).contiguous(), "prior": torch.from_numpy(self.prior)},
                  str(directory / "ceiling.safetensors"))
        (directory / "users.json").write_text(json.dumps(self.user_ids))
        (directory / "ratings.json").write_text(json.dumps({"attributes": self.attributes,
                                                            "ids": self.ratings.index.tolist(),
                                                            "ratings": self.ratings.to_numpy().tolist()}))

    def load_state(self, directory: Path) -> None:
        tensors = read_safetensors(directory / "ceiling.safetensors")
        self.weights, self.prior = tensors["weights"].double().numpy(), tensors["prior"].double().numpy()
        self.user_ids = read_user_ids(directory / "users.json")
        info = read_json(directory / "ratings.json", what="ratings file")
        self.attributes = info["attributes"]
        self.ratings = pd.DataFrame(info["ratings"], index=info["ids"], columns=self.attributes)
