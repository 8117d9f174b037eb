"""Plumbing shared by every method built on a response encoder (CoPL and the six baselines).

A subclass provides ``build_net(users, sizes)`` (an ``nn.Module`` with ``forward(users, chosen, rejected)
-> (r⁺, r⁻, aux loss)`` and ``score(users, batch) -> r``, built from those explicit sizes), optionally
``prepare()`` (work before the net exists, e.g. CoPL's GCF; it returns the sizes the data decides) and
``adapt()``. This class loads the backbone, builds the mode's response inputs, maps user ids to rows,
trains with the shared loop, scores, saves (the sizes go to ``method.json``) and loads.
"""

from __future__ import annotations

import dataclasses
import json
from abc import abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import numpy as np
import pandas as pd
import torch
from safetensors.torch import save_file
from torch import nn

from coplctl.core.atomic import atomic_path
from coplctl.core.config import AT_LEAST_1, NON_NEGATIVE, POSITIVE
from coplctl.core.errors import CoplError, DataError
from coplctl.core.files import field, read_json, read_parquet, read_safetensors, read_user_ids
from coplctl.data.dataset import TEXT_FORMAT, check_text_format
from coplctl.models.backbone import Backbone
from coplctl.models.encoders import ResponseEncoder, RewardHead, add_lora, build_inputs, concat_batches, lora_alpha
from coplctl.models.reward import METHOD_FILE, RewardMethod, bt_loss
from coplctl.models.train_config import TrainConfig, autocast, distributed_state, fp32_trainable
from coplctl.models.trainer import load_trainable_state, optimize_rows, rewards, train_pairs, trainable_state

#: Default rate of per-user parameters in lora mode (see BaselineConfig.user_lr).
USER_LR_LORA = 1e-2


@dataclass(frozen=True)
class FixedUser:
    """One user's (or group's) reward of a lora-mode run as plain layers, for an export into a standard
    model (:mod:`coplctl.serving.hf_export`): the reward is ``head(pool(lm(text)))`` where every adapted
    linear layer ``m`` of the backbone maps its input ``x`` to ``layer(m, x)`` (affine in ``x``)."""

    label: str
    """Whose reward: ``user u3``, ``group g1``, ``every user``."""
    layer: Callable[[nn.Module, torch.Tensor], torch.Tensor]
    head: nn.Linear
    details: dict = dataclasses.field(default_factory=dict)
    """What else fixes the reward (CoPL: each layer's experts and weights for the user), for the export's record."""


class NeuralMethod(RewardMethod):
    """A reward method trained with :func:`coplctl.models.trainer.train_pairs` on a response encoder."""

    Config = TrainConfig
    #: False for methods whose reward ignores the user (Uniform): any user id is accepted
    personalized: bool = True

    # -- hooks -------------------------------------------------------------------------------
    def prepare(self, data, *, seed: int, work_dir: Path | None) -> dict[str, int]:
        """Work needed before the net exists (default: seen users are the rows). Returns the sizes the
        net is built from besides the config and the number of users, e.g. ``{"user_dim": 32}``."""
        self.user_ids = data.user_ids("seen")
        return {}

    @abstractmethod
    def build_net(self, users: int, sizes: dict[str, int]) -> torch.nn.Module:
        """The method's network for ``users`` user rows and :meth:`prepare`'s ``sizes``, on
        ``self.backbone``; the same after :meth:`load_extra` (sizes then come from ``method.json``)."""

    def sizes(self) -> dict[str, int]:
        """``{"users": rows, **sizes}``: written to ``method.json``, read back to rebuild the net."""
        return {"users": len(self.user_ids), **self.net_sizes}

    def user_rate(self) -> float:
        """The learning rate of per-user parameters: the config's ``user_lr``, else 1e-2 in ``lora`` mode and
        the shared ``lr`` in ``frozen`` mode (see :class:`BaselineConfig`)."""
        c = self.config
        if c.user_lr is not None:
            return c.user_lr
        return USER_LR_LORA if c.mode == "lora" else c.get("lr")

    def lr_groups(self) -> dict[str, float]:
        """{parameter name prefix: learning rate} of parameters that need a rate of their own, e.g. per-user
        rows, which get gradient only when their user's few pairs are in the batch (default: none)."""
        return {}

    def extra_columns(self, data) -> tuple[torch.Tensor, ...]:
        """Per-training-pair tensors passed to the net's forward after the three batches (default none)."""
        return ()

    def save_extra(self, directory: Path) -> None:
        """Files beyond weights and user ids (e.g. CoPL's GCF run)."""

    def load_extra(self, directory: Path) -> None:
        """Read what :meth:`save_extra` wrote, before the net is rebuilt."""

    # -- shared machinery ----------------------------------------------------------------------
    def load_backbone(self) -> Backbone:
        device = self.config.device
        if device == "auto":  # under `accelerate launch` every process uses its own device
            device = str(distributed_state(self.config).device)
        backbone = Backbone(self.config.backbone, max_length=self.config.max_length, dtype=self.config.dtype,
                            device=device, precision=self.config.feature_precision)
        backbone.text_format = self.config.text_format or TEXT_FORMAT  # runs from before formats: the default
        return backbone

    def encoder(self, extra_dim: int = 0) -> ResponseEncoder:
        c = self.config
        return ResponseEncoder(c.mode, self.backbone, trunk_width=c.trunk_width, trunk_layers=c.trunk_layers,
                               extra_dim=extra_dim)

    @property
    def user_ids(self) -> list[str]:
        """User ids known to the method, in row order: seen users first, then adapted ones."""
        return self._user_ids

    @user_ids.setter
    def user_ids(self, ids) -> None:
        self._user_ids = list(ids)
        self._rows_of = pd.Index(self._user_ids)
        self._index_of = None  # built on first use

    @property
    def user_index(self) -> dict[str, int]:
        if self._index_of is None:
            self._index_of = dict(zip(self._user_ids, range(len(self._user_ids))))
        return self._index_of

    def rows(self, user_ids: Sequence[str]) -> torch.Tensor:
        if not self.personalized:
            return torch.zeros(len(user_ids), dtype=torch.long)
        rows = self._rows_of.get_indexer(pd.Index(user_ids, dtype=object)) if len(user_ids) else np.empty(0, np.int64)
        if (rows < 0).any():
            unknown = user_ids[int(np.flatnonzero(rows < 0)[0])]
            raise CoplError(f"unknown user {unknown!r} for {self.registry_name}: neither seen in training nor "
                            f"adapted (coplctl adapt --model RUN --user-file FILE --out NEW_RUN adds new users)")
        return torch.from_numpy(rows.astype(np.int64))

    def pair_tensors(self, pairs: pd.DataFrame, responses: pd.DataFrame) -> tuple[torch.Tensor, ...]:
        pos = pd.Series(range(len(responses)), index=responses["response_id"])
        return (self.rows(pairs["user_id"].tolist()),
                torch.tensor(pairs["chosen_id"].map(pos).to_numpy(dtype="int64")),
                torch.tensor(pairs["rejected_id"].map(pos).to_numpy(dtype="int64")))

    def inputs(self, responses: pd.DataFrame, progress: bool = False):
        from coplctl.core.progress import Counted

        bar = Counted("embedding new response texts") if progress else None
        try:
            return build_inputs(self.backbone, responses, self.config.mode, progress=bar)
        finally:
            if bar is not None:
                bar.close()

    def fit(self, data, backbone=None, *, seed: int = 0, work_dir: Path | None = None, progress: bool = True,
            report_to: str = "none") -> dict:
        """Train (see :meth:`RewardMethod.fit`). With a ``work_dir`` the training state is checkpointed there
        and an interrupted fit of the same data, config and seed resumes; ``report_to``: an experiment
        tracker (:mod:`coplctl.models.tracking`) logging under ``work_dir/logs``."""
        from coplctl.models.tracking import check_tracker

        check_tracker(report_to)  # before any work
        if report_to != "none" and work_dir is None:
            raise CoplError(f"report_to {report_to}: the tracker's files need a work_dir")
        state = distributed_state(self.config)
        torch.manual_seed(seed)
        fmt = check_text_format(self.config.text_format or data.text_format, f"{self.registry_name} text_format")
        self.backbone = backbone or self.load_backbone()
        self.backbone.text_format = fmt  # a shared backbone reads this method's data as it says
        self.progress = progress
        self.responses = data.responses[["response_id", "prompt", "text"]]
        from coplctl.models.features import shared_by_processes

        with shared_by_processes():  # every process embeds its share of the responses' missing features
            inputs = self.inputs(data.responses, progress=progress and state.is_main_process)
        with state.main_process_first():  # the main process trains shared work (GCF) first
            self.net_sizes = dict(self.prepare(data, seed=seed, work_dir=work_dir))
        torch.manual_seed(seed)
        self.net = fp32_trainable(self.build_net(len(self.user_ids), self.net_sizes))
        train = self.pair_tensors(data.split("train"), data.responses) + self.extra_columns(data)
        valid = data.split("valid")
        valid = valid[valid["user_id"].isin(self.user_index)]
        metrics = train_pairs(self.net, inputs, train, self.pair_tensors(valid, data.responses), self.config,
                              seed=seed, progress=progress, label=self.registry_name, lr_groups=self.lr_groups(),
                              work_dir=work_dir, report_to=report_to)
        if inputs.truncated is not None:  # texts cut to the length limit, prompts from their start
            metrics = {**metrics, "truncated": {"max_length": self.backbone.max_length, **inputs.truncated}}
        return metrics

    def score(self, user_ids: Sequence[str], responses: pd.DataFrame) -> torch.Tensor:
        rows = self.rows(list(user_ids))
        inputs = self.inputs(responses.reset_index(drop=True))
        return rewards(self.net, rows, inputs, torch.arange(len(rows)))

    def saved_config(self) -> dict:
        """The config as ``method.json`` records it: with the text format the backbone read (the dataset's,
        where the config left it to the data), so a loaded run formats texts as it was trained."""
        config = super().saved_config()
        if config.get("text_format") is None and getattr(self, "backbone", None) is not None:
            config["text_format"] = self.backbone.text_format
        return config

    @classmethod
    def adapter_targets(cls, config) -> list[str] | None:
        """``lora`` mode: the backbone's linear layers that get adapters (None: peft's defaults for the model)."""
        return getattr(config, "lora_targets", None)

    @classmethod
    def adapter_parameters(cls, config, d_in: int, d_out: int) -> int:
        """``lora`` mode: trained parameters of the adapter on one ``d_in → d_out`` linear layer (plain LoRA)."""
        return config.lora_rank * (d_in + d_out)

    def fixed_user(self, user: str | None = None, group: str | None = None) -> FixedUser:
        """One user's (``user``) or one group's (``group``) reward as plain layers (see :class:`FixedUser`), for
        an export into a standard model. Default: impossible, with the reason (a per-user input vector)."""
        raise CoplError(f"{self.registry_name}'s reward reads each user's own vector (a user token or latent) besides "
                        f"the response, which no standard transformers model has a place for; serve the run instead "
                        f"(coplctl serve, also OpenRLHF's --remote_rm_url) or export --format peft")

    def adapt_rows(self, pairs: pd.DataFrame, responses: pd.DataFrame, owner: nn.Module, attr: str,
                   init: torch.Tensor) -> dict:
        """Give new users a row of the table ``owner.<attr>`` fitted to their pairs, all else frozen.

        The table grows by one row per new user (initialised to ``init``); only those rows get
        gradient, for the config's ``adapt_steps`` Adam steps (Appendix C.2: 50) of the BT loss on the
        few-shot pairs, at ``adapt_lr``.
        """
        c = self.config
        steps, lr = c.adapt_steps, c.adapt_lr
        new = [u for u in dict.fromkeys(pairs["user_id"]) if u not in self.user_index]
        old = getattr(owner, attr)
        table = nn.Parameter(torch.cat([old.detach(), init.to(old).expand(len(new), -1)]))
        setattr(owner, attr, table)
        self.user_ids = self.user_ids + new
        rows, chosen, rejected = self.pair_tensors(pairs, responses)
        mask = torch.zeros(len(table), 1, dtype=table.dtype, device=table.device)
        mask[len(old):] = 1
        handle = table.register_hook(lambda g: g * mask)  # seen users' rows stay exactly as trained
        inputs, dev = self.inputs(responses), table.device
        self.net.eval()

        def loss(idx):
            with autocast(self.net):
                r_c = self.net.score(rows[idx].to(dev), inputs.batch(chosen[idx], dev))
                r_r = self.net.score(rows[idx].to(dev), inputs.batch(rejected[idx], dev))
            return bt_loss(r_c.float(), r_r.float())

        try:
            optimize_rows([table], loss, len(rows), steps=steps, lr=lr, frozen=self.net)
        finally:
            handle.remove()
            table.requires_grad_(old.requires_grad)
        return {"users": len(new), "pairs": int(len(pairs)), "method": f"{steps} Adam steps on each new user's row"}

    def save_state(self, directory: Path) -> None:
        with atomic_path(directory / "model.safetensors") as tmp:  # also gives the file the usual permissions
            save_file({k: v.contiguous() for k, v in trainable_state(self.net).items()}, str(tmp))
        (directory / "users.json").write_text(json.dumps(self.user_ids))
        # the responses it was trained on: user files given to `coplctl adapt` name them by id or text
        self.responses.to_parquet(directory / "responses.parquet", index=False)
        self.save_extra(directory)

    def load_state(self, directory: Path) -> None:
        weights_file = directory / "model.safetensors"
        saved = read_safetensors(weights_file)
        self.user_ids = read_user_ids(directory / "users.json")
        self.responses = read_parquet(directory / "responses.parquet", ("response_id", "prompt", "text"),
                                      "responses table")
        self.net_sizes = self._read_sizes(directory / METHOD_FILE)
        self.load_extra(directory)
        self.backbone = self.load_backbone()
        torch.manual_seed(0)
        self.net = fp32_trainable(self.build_net(len(self.user_ids), self.net_sizes))
        try:
            load_trainable_state(self.net, saved)
        except CoplError as e:
            raise DataError(weights_file, f"{e} (written by another method or other settings?)") from None

    def _read_sizes(self, path: Path) -> dict[str, int]:
        """The net's sizes from ``method.json``; their ``users`` must be the run's users.json."""
        sizes = field(read_json(path, what="method file"), "sizes", dict, path)
        if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in sizes.values()):
            raise DataError(path, "key 'sizes' must map names to whole numbers")
        if sizes.get("users") != len(self.user_ids):
            raise DataError(path, f"sizes.users is {sizes.get('users')}, but users.json lists {len(self.user_ids)} users")
        return {k: v for k, v in sizes.items() if k != "users"}


@dataclass
class BaselineConfig(TrainConfig):
    """Settings shared by the baselines (paper Appendix C.2). The paper searches the learning rate over
    1e-4, 5e-5, 1e-5 and 5e-6 for each baseline (set it with ``--lr``; default: the mode's)."""

    lora_rank: Annotated[int, AT_LEAST_1] = 64
    """LoRA rank in ``lora`` mode (paper: 64 for every baseline)."""
    lora_alpha: Annotated[float, POSITIVE] | None = None
    """LoRA alpha; None = 2 · rank (the paper does not give it)."""
    lora_targets: list[str] | None = None
    """LoRA target modules; None = peft's defaults for the backbone (q_proj, v_proj for Gemma)."""
    token_dim: Annotated[int, AT_LEAST_1] = 64
    """Width of a per-user vector concatenated to the features in ``frozen`` mode (in ``lora`` mode a
    user token has the backbone's hidden size)."""
    adapt_steps: Annotated[int, NON_NEGATIVE] = 50
    """Gradient steps fitting an unseen user's own parameters (paper: 50)."""
    user_lr: Annotated[float, POSITIVE] | None = None
    """Learning rate of per-user parameters (I2E rows, I2E-proxy mixing logits; PAL sets its own), apart
    from ``lr``; None = 1e-2 in ``lora`` mode, ``lr`` in ``frozen`` mode. A user's row gets gradient only
    in the steps where one of its few pairs is in the batch: with ~8 pairs a user and one lora-mode epoch
    (the paper's setting) that is ~8 Adam steps, so at the shared 5e-5 a row moves at most ~4e-4 from its
    0.02-scale init and stays where it started; 1e-2 lets it move ~0.08. In frozen mode (8 epochs at
    1e-3) a row already takes ~64 steps of 1e-3 (~3× its init scale); a higher rate there measured worse
    on the quick spec (I2E common pairs −10 points at 1e-2). Methods without per-user parameters ignore it."""
    adapt_lr: Annotated[float, POSITIVE] = 1e-2
    """Adam learning rate of those steps (the paper gives the 50 steps, not the rate). 1e-2 is lora mode's
    ``user_lr``, and in frozen mode it makes the unseen rows move as far as the seen rows did: those train
    at the shared ``lr`` but for 8 epochs in which Adam's moments move every row at every step (I2E-proxy's
    seen logits spread with std 0.33 at lr 3e-3 on sim-uf-p-4-avg), while 50 steps at 3e-3 can move a row
    at most 0.15 and leave an unseen user near the uniform mix (unseen 62.76 vs Uniform's 63.52; 69.16 at
    1e-2; I2E 69.94 -> 72.88, PAL 63.88 -> 66.26; paper scale, seed 0)."""


class PairScorer(nn.Module):
    """A net whose training forward scores a pair's two responses in one batch with ``score``."""

    def forward(self, users, chosen: dict, rejected: dict):
        n = len(users)
        r = self.score(users.repeat(2), concat_batches(chosen, rejected))
        return r[:n], r[n:], r.new_zeros(())


def baseline_encoder(method: NeuralMethod, extra_dim: int = 0) -> ResponseEncoder:
    """The mode's response encoder of a baseline: in ``lora`` mode with plain LoRA of the config's rank."""
    c = method.config
    encoder = method.encoder(extra_dim=extra_dim)
    if c.mode == "lora":
        add_lora(encoder, c.lora_rank, lora_alpha(c.lora_alpha, c.lora_rank), c.lora_targets)
    return encoder


def token_dim(method: NeuralMethod) -> int:
    """Width of a per-user vector the encoder reads: ``token_dim`` (frozen) or the backbone's hidden size."""
    return method.config.token_dim if method.config.mode == "frozen" else method.backbone.hidden_size


class UserVectorNet(PairScorer):
    """A response encoder that reads an optional per-user vector, and a linear head on its output:
    Uniform (no vector), I2E and I2E-proxy (a user token).

    Args:
        encoder: the response encoder (its ``extra_dim`` is the vector's width in frozen mode).
        user_vector: a module mapping user rows to vectors, or None.
    """

    def __init__(self, encoder: ResponseEncoder, user_vector: nn.Module | None = None):
        super().__init__()
        self.encoder, self.user_vector = encoder, user_vector
        self.head = RewardHead(encoder.out_dim, 1)

    def score(self, users: torch.Tensor, batch: dict) -> torch.Tensor:
        extra = self.user_vector(users) if self.user_vector is not None else None
        return self.head(self.encoder(batch, extra)).squeeze(-1)
