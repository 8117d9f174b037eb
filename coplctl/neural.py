"""Plumbing shared by every method built on a response encoder (CoPL and the six baselines).

A subclass provides ``build_net()`` (an ``nn.Module`` with ``forward(users, chosen, rejected) ->
(r⁺, r⁻, aux loss)`` and ``score(users, batch) -> r``), optionally ``prepare()`` (work before the
net exists, e.g. CoPL's GCF) and ``adapt()``. This class loads the backbone, builds the mode's
response inputs, maps user ids to rows, trains with the shared loop, scores, saves and loads.
"""

from __future__ import annotations

import json
from abc import abstractmethod
from collections.abc import Sequence
from pathlib import Path

import pandas as pd
import torch
from safetensors.torch import load_file, save_file

from coplctl.backbone import Backbone
from coplctl.encoders import ResponseEncoder, build_inputs
from coplctl.errors import CoplError
from coplctl.reward import RewardMethod
from coplctl.trainer import (TrainConfig, distributed_state, load_trainable_state, rewards, train_pairs,
                             trainable_state)


class NeuralMethod(RewardMethod):
    """A reward method trained with :func:`coplctl.trainer.train_pairs` on a response encoder."""

    Config = TrainConfig
    #: user ids known to the method, in row order: seen users first, then adapted ones
    user_ids: list[str]

    # -- hooks -------------------------------------------------------------------------------
    def prepare(self, data, *, seed: int, work_dir: Path | None) -> None:
        """Work needed before ``build_net`` (default: seen users are the rows)."""
        self.user_ids = data.user_ids("seen")

    @abstractmethod
    def build_net(self) -> torch.nn.Module:
        """The method's network, on ``self.backbone`` (called after ``prepare`` / ``load_extra``)."""

    def save_extra(self, directory: Path) -> None:
        """Files beyond weights and user ids (e.g. CoPL's GCF run)."""

    def load_extra(self, directory: Path) -> None:
        """Read what :meth:`save_extra` wrote, before the net is rebuilt."""

    # -- shared machinery ----------------------------------------------------------------------
    def load_backbone(self) -> Backbone:
        device = self.config.device
        if device == "auto":  # under `accelerate launch` every process uses its own device
            device = str(distributed_state(self.config).device)
        return Backbone(self.config.backbone, max_length=self.config.max_length, device=device)

    def encoder(self, extra_dim: int = 0) -> ResponseEncoder:
        c = self.config
        return ResponseEncoder(c.mode, self.backbone, trunk_width=c.trunk_width, trunk_layers=c.trunk_layers,
                               extra_dim=extra_dim)

    @property
    def user_index(self) -> dict[str, int]:
        if getattr(self, "_index_of", None) is None or len(self._index_of) != len(self.user_ids):
            self._index_of = {u: i for i, u in enumerate(self.user_ids)}
        return self._index_of

    def rows(self, user_ids: Sequence[str]) -> torch.Tensor:
        index = self.user_index
        unknown = [u for u in dict.fromkeys(user_ids) if u not in index]
        if unknown:
            raise CoplError(f"unknown user {unknown[0]!r} for {self.registry_name}: neither seen in training nor "
                            f"adapted (adapt new users first: coplctl adapt / evaluate)")
        return torch.tensor([index[u] for u in user_ids], dtype=torch.long)

    def pair_tensors(self, pairs: pd.DataFrame, responses: pd.DataFrame) -> tuple[torch.Tensor, ...]:
        pos = pd.Series(range(len(responses)), index=responses["response_id"])
        return (self.rows(pairs["user_id"].tolist()),
                torch.tensor(pairs["chosen_id"].map(pos).to_numpy()),
                torch.tensor(pairs["rejected_id"].map(pos).to_numpy()))

    def inputs(self, responses: pd.DataFrame, progress: bool = False):
        bar = None
        if progress:
            from coplctl.cli.common import err

            bar = lambda done, total: err.print(f"embedded {done:,}/{total:,} new response texts")  # noqa: E731
        return build_inputs(self.backbone, responses, self.config.mode, progress=bar)

    def fit(self, data, backbone=None, *, seed: int = 0, work_dir: Path | None = None, progress: bool = True) -> dict:
        state = distributed_state(self.config)
        torch.manual_seed(seed)
        self.backbone = backbone or self.load_backbone()
        with state.main_process_first():  # the main process trains shared work (GCF) and fills caches first
            self.prepare(data, seed=seed, work_dir=work_dir)
            inputs = self.inputs(data.responses, progress=progress and state.is_main_process)
        torch.manual_seed(seed)
        self.net = self.build_net()
        train = self.pair_tensors(data.split("train"), data.responses)
        valid = data.split("valid")
        valid = valid[valid["user_id"].isin(self.user_index)]
        metrics = train_pairs(self.net, inputs, train, self.pair_tensors(valid, data.responses), self.config,
                              seed=seed, progress=progress, label=self.registry_name)
        return metrics

    def score(self, user_ids: Sequence[str], responses: pd.DataFrame) -> torch.Tensor:
        rows = self.rows(list(user_ids))
        inputs = self.inputs(responses.reset_index(drop=True))
        return rewards(self.net, rows, inputs, torch.arange(len(rows)))

    def save_state(self, directory: Path) -> None:
        save_file({k: v.contiguous() for k, v in trainable_state(self.net).items()}, str(directory / "model.safetensors"))
        (directory / "users.json").write_text(json.dumps(self.user_ids))
        self.save_extra(directory)

    def load_state(self, directory: Path) -> None:
        self.user_ids = json.loads((directory / "users.json").read_text())
        self.load_extra(directory)
        self.backbone = self.load_backbone()
        torch.manual_seed(0)
        self.net = self.build_net()
        load_trainable_state(self.net, load_file(str(directory / "model.safetensors")))
        self.net.to(self.backbone.device)
