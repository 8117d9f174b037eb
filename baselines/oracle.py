"""Oracle (paper Appendix B): the true groups are known; one Uniform model per group is trained on the
pairs of that group's users, and every user (seen or unseen) is scored by its group's model.

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

from coplctl.encoders import default_targets
from coplctl.errors import CoplError, DataError
from coplctl.files import field, read_json
from coplctl.neural import BaselineConfig, NeuralMethod, PairScorer, lora_alpha
from coplctl.registry import register_method


@dataclass
class OracleConfig(BaselineConfig):
    """Oracle: the baselines' settings (LoRA rank 64 in lora mode) for every group's model."""


class OracleNet(PairScorer):
    """One encoder adapter (or trunk) and head per group; rows are routed by their user's group."""

    def __init__(self, method: "Oracle"):
        super().__init__()
        c = method.config
        n_groups = len(method.groups)
        self.register_buffer("group_of_row", torch.tensor([method.group_index[method.group_of[u]]
                                                           for u in method.user_ids]))
        if c.mode == "frozen":
            self.encoders = nn.ModuleList(method.encoder() for _ in range(n_groups))
        else:
            from peft import LoraConfig, inject_adapter_in_model

            self.encoder = method.encoder()
            targets = c.lora_targets or default_targets(self.encoder.lm)
            with warnings.catch_warnings():  # several adapters in one model is the point here
                warnings.filterwarnings("ignore", message="Already found a `peft_config`")
                for k in range(n_groups):
                    inject_adapter_in_model(LoraConfig(r=c.lora_rank, lora_alpha=lora_alpha(c),
                                                       target_modules=targets),
                                            self.encoder.lm, adapter_name=f"group{k}")
        width = self.encoders[0].out_dim if c.mode == "frozen" else self.encoder.out_dim
        self.heads = nn.ModuleList(nn.Linear(width, 1) for _ in range(n_groups))
        self.mode = c.mode

    def _activate(self, k: int) -> None:
        from peft.tuners.tuners_utils import BaseTunerLayer

        for m in self.encoder.lm.modules():
            if isinstance(m, BaseTunerLayer):
                m.set_adapter(f"group{k}")
        for name, p in self.encoder.lm.named_parameters():  # set_adapter freezes the others: undo that
            if "lora_" in name:
                p.requires_grad_(True)

    def score(self, users: torch.Tensor, batch: dict) -> torch.Tensor:
        groups = self.group_of_row[users]
        out = torch.empty(len(users), device=users.device)
        for k in groups.unique().tolist():
            idx = (groups == k).nonzero().flatten()
            sub = {name: v[idx] for name, v in batch.items()}
            if self.mode == "frozen":
                h = self.encoders[k](sub)
            else:
                self._activate(k)
                h = self.encoder(sub)
            out = out.index_put((idx,), self.heads[k](h).squeeze(-1).to(out.dtype))
        return out


@register_method("oracle")
class Oracle(NeuralMethod):
    """Oracle: one Uniform model per true preference group; each user is scored by its group's model."""

    Config = OracleConfig

    def prepare(self, data, *, seed: int, work_dir: Path | None) -> None:
        users = data.users
        if users["group"].isna().any():
            missing = users.loc[users["group"].isna(), "user_id"].iloc[0]
            raise CoplError(f"oracle needs every user's preference group, and {missing!r} has none in "
                            f"{data.path or 'the dataset'} (users.parquet column group)")
        self.group_of = dict(zip(users["user_id"], users["group"]))  # seen and unseen: the oracle knows all
        self.groups = sorted(set(self.group_of.values()))
        self.user_ids = data.user_ids("seen")

    @property
    def group_index(self) -> dict[str, int]:
        return {g: i for i, g in enumerate(self.groups)}

    def build_net(self) -> OracleNet:
        return OracleNet(self)

    def adapt(self, pairs: pd.DataFrame, responses: pd.DataFrame) -> dict:
        new = [u for u in dict.fromkeys(pairs["user_id"]) if u not in self.user_index]
        unknown = [u for u in new if u not in self.group_of]
        if unknown:
            raise CoplError(f"oracle does not know the group of user {unknown[0]!r}")
        rows = torch.tensor([self.group_index[self.group_of[u]] for u in new], dtype=torch.long)
        self.net.group_of_row = torch.cat([self.net.group_of_row, rows.to(self.net.group_of_row.device)])
        self.user_ids = self.user_ids + new
        return {"users": len(new), "pairs": 0, "method": "each user is scored by its true group's model"}

    def save_extra(self, directory: Path) -> None:
        (directory / "groups.json").write_text(json.dumps({"groups": self.groups, "group_of": self.group_of}))

    def load_extra(self, directory: Path) -> None:
        path = directory / "groups.json"
        info = read_json(path, what="group file")
        self.groups, self.group_of = field(info, "groups", list, path), field(info, "group_of", dict, path)
        if not all(isinstance(g, str) for g in self.groups) or not all(isinstance(v, str) and v in self.groups for v in self.group_of.values()):
            raise DataError(path, "groups must be a list of names and group_of must map users to them")
