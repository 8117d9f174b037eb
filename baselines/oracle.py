"""Oracle (paper Appendix B): the true groups are known; one Uniform model per group is trained on the
pairs of that group's users, and every user (seen or unseen) is scored by its group's model.

Users with mixed preferences (``preferences: mixture``: no group, ``weight_<attribute>`` columns) get
the same oracle knowledge in their form: one model per attribute, and a user's reward is the user's true
weights times the attribute models' rewards, trained end to end on the users' pairs (not in the paper).

The group models share nothing trainable: in ``lora`` mode each has its own LoRA adapter (peft, one
adapter name per group) and head on the shared frozen backbone; in ``frozen`` mode its own trunk and head.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
from torch import nn

from coplctl.core.errors import CoplError, DataError
from coplctl.core.files import field, read_json
from coplctl.core.registry import register_method
from coplctl.data.dataset import WEIGHT_PREFIX, weight_columns
from coplctl.models.encoders import ResponseEncoder, RewardHead, default_targets, lora_alpha
from coplctl.models.neural import BaselineConfig, FixedUser, NeuralMethod, PairScorer


@dataclass
class OracleConfig(BaselineConfig):
    """Oracle: the baselines' settings (LoRA rank 64 in lora mode) for every group's model."""


class OracleNet(PairScorer):
    """One encoder adapter (or trunk) and head per group; rows are routed by their user's group.

    Args:
        groups: number of groups.
        group_of_row: (users,) group index of each user row.
        encoders: ``frozen`` mode: one encoder per group. ``lora`` mode: one encoder whose backbone holds
            one LoRA adapter per group, named ``group0``, ``group1`` ... (:func:`group_adapters`).
    """

    #: a batch without some group's users leaves that group's adapter (or trunk) and head without gradient:
    #: DDP must look for unused parameters (:func:`coplctl.models.train_config.make_accelerator`)
    unused_parameters = True

    def __init__(self, groups: int, group_of_row: torch.Tensor, encoders: list[ResponseEncoder],
                 weight_of_row: torch.Tensor | None = None):
        super().__init__()
        self.register_buffer("group_of_row", group_of_row)
        self.register_buffer("weight_of_row", weight_of_row)  # (users, groups) for mixture users, else None
        self.mode = encoders[0].mode
        if self.mode == "frozen":
            self.encoders = nn.ModuleList(encoders)
        else:
            (self.encoder,) = encoders
        self.heads = nn.ModuleList(RewardHead(encoders[0].out_dim, 1) for _ in range(groups))

    def _activate(self, k: int) -> None:
        from peft.tuners.tuners_utils import BaseTunerLayer

        for m in self.encoder.lm.modules():
            if isinstance(m, BaseTunerLayer):
                m.set_adapter(f"group{k}")
        for name, p in self.encoder.lm.named_parameters():  # set_adapter freezes the others: undo that
            if "lora_" in name:
                p.requires_grad_(True)

    def _group_reward(self, k: int, batch: dict) -> torch.Tensor:
        if self.mode == "frozen":
            h = self.encoders[k](batch)
        else:
            self._activate(k)
            h = self.encoder(batch)
        return self.heads[k](h).squeeze(-1).float()

    def score(self, users: torch.Tensor, batch: dict) -> torch.Tensor:
        if self.weight_of_row is not None:  # mixture users: their true weights over the attribute models
            w = self.weight_of_row[users].float()
            return sum(w[:, k] * self._group_reward(k, batch) for k in range(len(self.heads)))
        groups = self.group_of_row[users]
        out = torch.empty(len(users), device=users.device)
        for k in groups.unique().tolist():
            idx = (groups == k).nonzero().flatten()
            sub = {name: v[idx] for name, v in batch.items()}
            out = out.index_put((idx,), self._group_reward(k, sub).to(out.dtype))
        return out


def group_adapters(encoder: ResponseEncoder, groups: int, rank: int, alpha: float, targets: list[str] | None) -> None:
    """One LoRA adapter per group (``group0`` ...) inside a ``lora``-mode encoder's backbone (peft)."""
    from peft import LoraConfig, inject_adapter_in_model

    targets = targets or default_targets(encoder.lm)
    with warnings.catch_warnings():  # several adapters in one model is the point here
        warnings.filterwarnings("ignore", message="Already found a `peft_config`")
        for k in range(groups):
            inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets),
                                    encoder.lm, adapter_name=f"group{k}")


def _mixture_weights(users) -> list[str]:
    """The weight columns of mixture users (no groups, every weight known), or []: the oracle scores them
    by their true weights over one model per attribute."""
    columns = weight_columns(users)
    return columns if columns and users["group"].isna().all() and users[columns].notna().all().all() else []


@register_method("oracle", label="Oracle", order=0, upper_bound=True)
class Oracle(NeuralMethod):
    """Oracle: one Uniform model per true preference group; each user is scored by its group's model (mixture
    users: by their true weights over one model per attribute)."""

    Config = OracleConfig

    @classmethod
    def cannot_run(cls, data) -> str | None:
        """Without every user's group (and without mixture users' true weights instead), there is no oracle."""
        if data.users["group"].isna().any() and not _mixture_weights(data.users):
            return "needs every user's preference group, and the dataset does not give them all"
        return None

    def prepare(self, data, *, seed: int, work_dir: Path | None) -> dict[str, int]:
        users = data.users
        columns = _mixture_weights(users)
        if columns:
            self.groups = [c.removeprefix(WEIGHT_PREFIX) for c in columns]
            self.weight_of = {u: [float(x) for x in row] for u, row in zip(users["user_id"], users[columns].to_numpy())}
            self.group_of = {}
            self.user_ids = data.user_ids("seen")
            return {"groups": len(self.groups)}
        self.weight_of = None
        if users["group"].isna().any():
            missing = users.loc[users["group"].isna(), "user_id"].iloc[0]
            raise CoplError(f"oracle needs every user's preference group, and {missing!r} has none in "
                            f"{data.path or 'the dataset'} (users.parquet column group)")
        self.group_of = dict(zip(users["user_id"], users["group"]))  # seen and unseen: the oracle knows all
        self.groups = sorted(set(self.group_of.values()))
        self.user_ids = data.user_ids("seen")
        return {"groups": len(self.groups)}

    @property
    def group_index(self) -> dict[str, int]:
        return {g: i for i, g in enumerate(self.groups)}

    def build_net(self, users: int, sizes: dict[str, int]) -> OracleNet:
        c, n = self.config, sizes["groups"]
        weights = None
        if self.weight_of is not None:
            weights = torch.tensor([self.weight_of[u] for u in self.user_ids])
            group_of_row = weights.argmax(1)
        else:
            group_of_row = torch.tensor([self.group_index[self.group_of[u]] for u in self.user_ids])
        if c.mode == "frozen":
            return OracleNet(n, group_of_row, [self.encoder() for _ in range(n)], weights)
        encoder = self.encoder()
        group_adapters(encoder, n, c.lora_rank, lora_alpha(c.lora_alpha, c.lora_rank), c.lora_targets)
        return OracleNet(n, group_of_row, [encoder], weights)

    def adapt(self, pairs: pd.DataFrame, responses: pd.DataFrame) -> dict:
        new = [u for u in dict.fromkeys(pairs["user_id"]) if u not in self.user_index]
        known = self.group_of if self.weight_of is None else self.weight_of
        unknown = [u for u in new if u not in known]
        if unknown:
            raise CoplError(f"oracle does not know the {'group' if self.weight_of is None else 'weights'} of user "
                            f"{unknown[0]!r}")
        if self.weight_of is not None:
            w = torch.tensor([self.weight_of[u] for u in new]).to(self.net.weight_of_row)
            self.net.weight_of_row = torch.cat([self.net.weight_of_row, w])
            rows = w.argmax(1)
        else:
            rows = torch.tensor([self.group_index[self.group_of[u]] for u in new], dtype=torch.long)
        self.net.group_of_row = torch.cat([self.net.group_of_row, rows.to(self.net.group_of_row.device)])
        self.user_ids = self.user_ids + new
        return {"users": len(new), "pairs": 0, "method": "each user is scored by its true group's model"}

    def fixed_user(self, user: str | None = None, group: str | None = None) -> FixedUser:
        """The model of ``group``, or of ``user``'s group (mixture users have no single model: refused)."""
        if self.weight_of is not None:
            raise CoplError("this oracle scores each user by a weighted sum of its attribute models, which is no "
                            "single model: serve the run instead (coplctl serve)")
        if (user is None) == (group is None):
            raise CoplError(f"oracle: name a user (--user) or a group (--group, one of {', '.join(self.groups)})")
        if user is not None:
            if user not in self.group_of:
                raise CoplError(f"oracle does not know user {user!r} (and so not its group)")
            group = self.group_of[user]
        if group not in self.group_index:
            raise CoplError(f"oracle has no group {group!r}; its groups are {', '.join(self.groups)}")
        k = self.group_index[group]
        if self.config.mode == "lora":
            self.net._activate(k)
        return FixedUser(f"group {group}" + (f" (user {user})" if user is not None else ""), lambda m, x: m(x),
                         self.net.heads[k])

    def save_extra(self, directory: Path) -> None:
        (directory / "groups.json").write_text(json.dumps({"groups": self.groups, "group_of": self.group_of,
                                                           "weight_of": self.weight_of}))

    def load_extra(self, directory: Path) -> None:
        path = directory / "groups.json"
        info = read_json(path, what="group file")
        self.groups, self.group_of = field(info, "groups", list, path), field(info, "group_of", dict, path)
        self.weight_of = info.get("weight_of")
        if self.weight_of is not None and not (isinstance(self.weight_of, dict) and all(
                isinstance(v, list) and len(v) == len(self.groups) and all(isinstance(x, (int, float)) for x in v)
                for v in self.weight_of.values())):
            raise DataError(path, f"weight_of must map users to {len(self.groups)} numbers each")
        if not all(isinstance(g, str) for g in self.groups) or not all(isinstance(v, str) and v in self.groups for v in self.group_of.values()):
            raise DataError(path, "groups must be a list of names and group_of must map users to them")
