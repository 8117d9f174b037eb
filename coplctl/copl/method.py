"""CoPL as a registered reward method (paper §4): GCF user embeddings → MoLE reward model → BT loss;
unseen users get a GCF-adapted embedding that goes through the same gates.

Table 3 ablations are config switches: ``user_embeddings="learned"`` (w/o GNN embedding: a learnable
embedding per user feeds the gates) and ``mole=False`` (w/o MoLE: the user embedding is projected to
one extra token, with plain LoRA of rank ``lora_rank`` in ``lora`` mode).
"""

from __future__ import annotations

import contextlib
import dataclasses
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

import pandas as pd
import torch
from torch import nn

from coplctl.copl import ADAPTATIONS
from coplctl.copl import report as tables
from coplctl.copl.experiments import CoPLExperiments
from coplctl.copl.mole import MoLELinear, Routing, gate_routing, inject_mole, load_balance_loss, mole_routing
from coplctl.copl.placement import EMBEDDINGS, place
from coplctl.core.config import AT_LEAST_1, NON_NEGATIVE, POSITIVE, OneOf, Range
from coplctl.core.errors import CoplError
from coplctl.core.registry import register_method
from coplctl.models.encoders import RewardHead, add_lora, concat_batches, default_targets, lora_alpha
from coplctl.models.neural import FixedUser, NeuralMethod
from coplctl.models.train_config import TrainConfig


@dataclass
class CoPLConfig(TrainConfig):
    """CoPL hyperparameters; defaults are the paper's (Appendix C.2) unless noted."""

    gcf_preset: Annotated[str, OneOf("auto", "cpu", "paper", "official")] = "auto"
    """GCF preset (cpu, paper, official; auto = paper on a GPU, else cpu), see ``coplctl graph train``."""
    gcf_overrides: dict = field(default_factory=dict)
    """GCF fields to override, e.g. {"dim": 64, "epochs": 200}."""
    gcf_run: str | None = None
    """Use this trained GCF run (coplctl graph train) instead of training one."""
    user_embeddings: Annotated[str, OneOf("gcf", "learned")] = "gcf"
    """``gcf`` (CoPL) or ``learned`` (Table 3, w/o GNN embedding)."""
    learned_dim: Annotated[int, AT_LEAST_1] = 32
    """Width of learnable user embeddings when ``user_embeddings="learned"``."""
    mole: bool = True
    """Mixture of LoRA experts; False = Table 3's w/o MoLE (user embedding as one extra token)."""
    experts: Annotated[int, AT_LEAST_1] = 8
    """M, LoRA experts per adapted layer (paper: 8)."""
    rank: Annotated[int, AT_LEAST_1] = 8
    """Rank n of every expert and of the shared expert (paper: 8)."""
    alpha: Annotated[float, POSITIVE] | None = None
    """LoRA alpha; None = 2 · rank (the paper does not give it)."""
    shared_expert: bool = True
    """Keep the shared expert A_s B_s (paper: yes)."""
    gate_hidden: Annotated[int, AT_LEAST_1] = 256
    """Hidden width of each gate MLP (paper: 256)."""
    gate_temperature: Annotated[float, POSITIVE] = 1.0
    """τ of the gate softmax (paper: 1)."""
    top_k: Annotated[int, AT_LEAST_1] = 1
    """Experts used per user and layer (paper: 1)."""
    gate_noise: Annotated[float, NON_NEGATIVE] = 0.0
    """Std of Gaussian noise on gate logits while training (drawn once per user row)."""
    load_balance: Annotated[float, NON_NEGATIVE] = 0.01
    """Weight of a Switch-style load-balancing loss (Fedus et al. 2022: 0.01). The paper has none and its
    limitations note unused experts; without it a trunk layer of the frozen-mode reward model routes
    every user to one expert (quick spec: 100% on trunk.2; with it both layers split the groups, normalised
    MI 0.98, and seen accuracy +1.1 points). 0 = the paper."""
    target_modules: list[str] | None = None
    """Layers that get experts: peft's defaults in lora mode (q_proj, v_proj for Gemma), the trunk's in frozen mode."""
    lora_rank: Annotated[int, AT_LEAST_1] = 64
    """LoRA rank of the w/o-MoLE ablation (Table 3: 64 and 16); its alpha is 2 · rank."""
    token_dim: Annotated[int, AT_LEAST_1] = 64
    """w/o MoLE in frozen mode: width of the projected user vector concatenated to the features."""
    adaptation: Annotated[str, OneOf(*ADAPTATIONS)] = "weighted"
    """Unseen users: ``weighted`` (CoPL), ``average`` or ``optimize`` (Table 4)."""
    hops: Annotated[int, Range(min=2)] = 2
    """k of the k-hop adaptation (paper: 2)."""
    temperature: Annotated[float, POSITIVE] = 0.07
    """κ of the adaptation weights (paper: 0.07)."""
    place_k: Annotated[int, NON_NEGATIVE] = 8
    """Beyond the paper, which adapts from graph responses only: a new user's pair on a response outside
    the GCF graph (a new text, or a response no training pair used) is used by placing that response by
    its frozen-backbone features centred per prompt (:mod:`coplctl.copl.placement`): its GCF embedding comes
    from ``place_embedding``, and as a chosen response it reaches the seen users who chose any of its
    ``place_k`` nearest graph responses. 0 = the paper (such pairs are dropped and counted as
    ``pairs_outside_graph``; ``coplctl adapt --in-graph-only`` does the same for one adaptation)."""
    place_embedding: Annotated[str, OneOf(*EMBEDDINGS)] = "ridge"
    """GCF embedding of a placed response: ``ridge`` (a linear map from centred backbone features to
    centred GCF embeddings, fitted on the graph's responses) or ``neighbours`` (the softmax-weighted mean
    of its ``place_k`` nearest graph responses'). Simulated UF-P-2, pairs held out of the graph, two
    seeds: ridge 73.6 / 75.3% unseen accuracy, neighbours 70.4 / 67.0%, pairs dropped 68.3 / 68.2%, the
    same users' graph pairs 76.0 / 77.8% (k = 8; k from 2 to 32 within 0.3 points; :mod:`coplctl.copl.placement`)."""
    adapt_steps: Annotated[int, NON_NEGATIVE] = 50
    """Gradient steps for unseen users when ``user_embeddings="learned"`` (as the baselines, Appendix C.2)."""
    user_lr: Annotated[float, POSITIVE] | None = None
    """``user_embeddings="learned"``: learning rate of the user table, apart from ``lr``; None = 1e-2 in
    ``lora`` mode, ``lr`` in ``frozen`` mode (as the baselines' ``user_lr``, whose docstring gives the
    reason: at the shared lora rate the rows barely leave their init, which would handicap this ablation
    and inflate the GNN's share in Table 3)."""
    adapt_lr: Annotated[float, POSITIVE] = 1e-2
    """Adam learning rate of those steps (as the baselines' ``adapt_lr``, whose docstring gives the reason)."""

    def __post_init__(self):
        super().__post_init__()  # types, ranges and choices of every field
        if self.hops % 2:
            raise CoplError(f"CoPL option hops: {self.hops} must be even (user -> response -> user ...)")
        if self.top_k > self.experts:
            raise CoplError(f"CoPL option top_k: {self.top_k} is more than the {self.experts} experts")
        if self.gcf_run is None and self.user_embeddings == "gcf":  # check the GCF's options now, not after hours
            from coplctl.graph.config import preset_config

            preset_config(self.gcf_preset, **self.gcf_overrides)


class CoPLNet(nn.Module):
    """User table → gates of MoLE layers inside the response encoder → linear head (paper Eq. 6-8).

    Args:
        user_table: (users, d) user embeddings: GCF embeddings (kept as a buffer) or learnable rows
            (an ``nn.Parameter``, Table 3's w/o GNN embedding).
        encoder: the response encoder.
        layers: its MoLE layers (:func:`coplctl.copl.mole.inject_mole`) whose gates read the user embedding;
            None = w/o MoLE, where ``user_proj`` maps the embedding to the one extra token the encoder reads.
        gate_noise: std of noise on gate logits while training.  load_balance: weight of the balancing loss.
    """

    def __init__(self, user_table: torch.Tensor, encoder: nn.Module, *, layers: list | None = None,
                 user_proj: nn.Module | None = None, gate_noise: float = 0.0, load_balance: float = 0.0):
        super().__init__()
        if isinstance(user_table, nn.Parameter):
            self.user_table = user_table
        else:
            self.register_buffer("user_table", user_table)
        self.mole, self.noise, self.balance = layers is not None, gate_noise, load_balance
        self.encoder = encoder
        if layers is not None:
            self.layers = layers
        else:
            self.user_proj = user_proj
        self.head = RewardHead(encoder.out_dim, 1)

    def hidden(self, e: torch.Tensor, batch: dict, rows: torch.Tensor) -> tuple[torch.Tensor, list]:
        """Encoder output for a batch whose sequence i belongs to the user embedding ``e[rows[i]]``."""
        if not self.mole:
            return self.encoder(batch, extra=self.user_proj(e).index_select(0, rows)), []
        routing = Routing(e, rows, noise=self.noise if self.training else 0.0)
        with mole_routing(self.layers, routing):
            return self.encoder(batch), routing.records

    def score(self, users: torch.Tensor, batch: dict) -> torch.Tensor:
        h, _ = self.hidden(self.user_table.index_select(0, users), batch, torch.arange(len(users), device=users.device))
        return self.head(h).squeeze(-1)

    def forward(self, users, chosen: dict, rejected: dict):
        n = len(users)
        rows = torch.arange(n, device=users.device).repeat(2)  # chosen and rejected share their user's gate
        h, records = self.hidden(self.user_table.index_select(0, users), concat_batches(chosen, rejected), rows)
        r = self.head(h).squeeze(-1)
        aux = self.balance * load_balance_loss(records) if self.balance and records else r.new_zeros(())
        return r[:n], r[n:], aux


@register_method("copl", label="CoPL", order=6)
class CoPL(NeuralMethod):
    """CoPL: graph collaborative filtering user embeddings gating a mixture of LoRA experts (EMNLP 2025)."""

    Config = CoPLConfig
    Experiments = CoPLExperiments

    def prepare(self, data, *, seed: int, work_dir: Path | None) -> dict[str, int]:
        c = self.config
        if c.user_embeddings == "learned":
            self.user_ids, self.gcf_dir, self._gcf_table = data.user_ids("seen"), None, None
            return {"user_dim": c.learned_dim, "seen_users": len(self.user_ids)}
        from coplctl.graph.run import GCFRun

        self._gcf = None, None  # (re)trained below: read it afresh
        self.gcf_dir = GCFRun(c.gcf_run).path if c.gcf_run else self._train_gcf(data, seed, work_dir)
        run = self.gcf
        self.user_ids = list(run.graph.user_ids)
        self._gcf_table = run.exported_user_emb.clone()
        return {"user_dim": self._gcf_table.shape[1], "seen_users": len(self.user_ids)}

    @property
    def gcf(self):
        """The :class:`coplctl.graph.run.GCFRun` of ``gcf_dir``, read once (again only if ``gcf_dir`` changes):
        every adaptation of this model reads it."""
        from coplctl.graph.run import GCFRun

        if self.gcf_dir is None:
            raise CoplError("this CoPL run places new users with its GCF, but it has no gcf/ directory "
                            "(copy the GCF run it was trained with into RUN/gcf, or retrain)")
        where, run = getattr(self, "_gcf", (None, None))
        if where != Path(self.gcf_dir):
            where, run = Path(self.gcf_dir), GCFRun(self.gcf_dir)
            self._gcf = where, run
        return run

    def _train_gcf(self, data, seed: int, work_dir: Path | None) -> Path:
        """Train the GCF in ``work_dir/gcf`` — or reuse / resume the one there if it was made from the
        same training pairs, GCF settings and seed (a fingerprint guards against stale work)."""
        import hashlib
        import json

        from coplctl.graph.config import preset_config
        from coplctl.graph.train import train_gcf
        from coplctl.models.backbone import cache_root

        cfg = preset_config(self.config.gcf_preset, **self.config.gcf_overrides)
        pairs = data.split("train")[["user_id", "chosen_id", "rejected_id"]]
        digest = hashlib.sha256(pd.util.hash_pandas_object(pairs, index=False).to_numpy().tobytes())
        digest.update(json.dumps({"gcf": dataclasses.asdict(cfg), "seed": seed}, sort_keys=True).encode())
        fingerprint = digest.hexdigest()
        root = Path(work_dir) if work_dir else cache_root() / "work" / fingerprint[:16]
        gcf_dir, stamp = root / "gcf", root / "gcf.fingerprint"
        if stamp.exists() and stamp.read_text() != fingerprint:
            shutil.rmtree(gcf_dir, ignore_errors=True)  # made from other data or settings: start over
        root.mkdir(parents=True, exist_ok=True)
        stamp.write_text(fingerprint)
        if not (gcf_dir / "metrics.json").exists():
            train_gcf(data, gcf_dir, cfg, seed=seed, progress=getattr(self, "progress", True))
        return gcf_dir

    def build_net(self, users: int, sizes: dict[str, int]) -> CoPLNet:
        """The net for ``users`` rows of width ``sizes["user_dim"]``: the GCF table just prepared, or
        zeros a saved run's weights then fill."""
        c, dim = self.config, sizes["user_dim"]
        if c.user_embeddings == "learned":
            table = nn.Parameter(0.1 * torch.randn(users, dim))
        else:
            table, self._gcf_table = getattr(self, "_gcf_table", None), None
            table = table if table is not None else torch.zeros(users, dim)
        frozen = c.mode == "frozen"
        if c.mole:
            encoder = self.encoder()
            targets = c.target_modules or ([f"trunk.{2 * i}" for i in range(c.trunk_layers)] if frozen
                                           else default_targets(encoder.lm))
            layers = inject_mole(encoder, targets, dim, num_experts=c.experts, rank=c.rank,
                                 alpha=lora_alpha(c.alpha, c.rank), gate_hidden=c.gate_hidden,
                                 temperature=c.gate_temperature, top_k=c.top_k, shared=c.shared_expert,
                                 train_base=frozen)
            return CoPLNet(table, encoder, layers=layers, gate_noise=c.gate_noise, load_balance=c.load_balance)
        token = c.token_dim if frozen else self.backbone.hidden_size
        encoder = self.encoder(extra_dim=token if frozen else 0)
        user_proj = nn.Linear(dim, token)
        if not frozen:
            add_lora(encoder, c.lora_rank, lora_alpha(None, c.lora_rank), c.target_modules)
        return CoPLNet(table, encoder, user_proj=user_proj, gate_noise=c.gate_noise, load_balance=c.load_balance)

    @property
    def seen_users(self) -> int:
        """Users the model was trained on: the first rows; adapted users come after them."""
        return self.net_sizes["seen_users"]

    def fit(self, data, backbone=None, **kwargs) -> dict:
        """Train (see :meth:`NeuralMethod.fit`); with MoLE the metrics also get ``routing``: per layer, the
        seen users' top-1 expert shares and the mutual information of expert and group
        (:func:`coplctl.copl.mole.routing_stats`), with a warning when a layer sends (nearly) everybody to one expert."""
        metrics = super().fit(data, backbone, **kwargs)
        if self.config.mole:
            metrics["routing"] = self.routing_report(data)
        return metrics

    def routing_report(self, data, *, warn: bool | None = None) -> dict:
        """:func:`coplctl.copl.mole.gate_routing` of the seen users' table, grouped by the dataset's groups."""
        from coplctl.models.train_config import distributed_state

        group_of = dict(zip(data.users["user_id"], data.users["group"]))
        groups = [group_of.get(u) for u in self.user_ids]
        if warn is None:
            warn = distributed_state(self.config).is_main_process
        return gate_routing(self.net.layers, self.net.user_table.detach(), groups, warn=warn)

    def adapt(self, pairs: pd.DataFrame, responses: pd.DataFrame) -> dict:
        """Unseen users: GCF adaptation (weighted k-hop by default), or few-shot fitting of learned rows.

        GCF adaptation also uses pairs on responses of ``responses`` outside the graph, placed at their
        ``place_k`` nearest graph responses (beyond the paper; 0 = graph responses only). The report counts
        pairs in the graph, placed and left out; ``adapted_per_user`` keeps those counts per user."""
        c = self.config
        new = list(dict.fromkeys(pairs["user_id"]))
        if c.user_embeddings == "gcf":
            from coplctl.copl.adapt import AdaptConfig, adapt_users

            run = self.gcf
            placement = (place(self.backbone, run, pairs, responses, c.place_k, c.place_embedding)
                         if c.place_k else None)
            adapted = adapt_users(run, pairs, AdaptConfig(method=c.adaptation, hops=c.hops,
                                                          temperature=c.temperature), placement=placement)
            self._add_rows(new, adapted.embeddings.to(self.net.user_table))
            self.adapted_per_user = adapted.report["per_user"]
            return {k: v for k, v in adapted.report.items() if k != "per_user"}
        # w/o GNN embedding: a new learnable row per user, fitted on its few-shot pairs, the model frozen
        table = self.net.user_table
        return self.adapt_rows(pairs, responses, self.net, "user_table", table.detach().mean(0))

    def lr_groups(self) -> dict[str, float]:
        """w/o GNN embedding: the learnable user table at ``user_lr`` (GCF tables are not trained here)."""
        return {"user_table": self.user_rate()} if self.config.user_embeddings == "learned" else {}

    def fixed_user(self, user: str | None = None, group: str | None = None) -> FixedUser:
        """``user``'s reward: every MoLE layer with the experts its gate picks for the user's embedding."""
        if group is not None or user is None:
            raise CoplError("CoPL's reward is per user (the user's GCF embedding gates the experts): export "
                            "--user U, e.g. one of the group's users")
        if not self.net.mole:
            raise CoplError("CoPL w/o MoLE reads the user as an extra input token, which no standard transformers "
                            "model has a place for: serve the run instead (coplctl serve)")
        e = self.net.user_table.index_select(0, self.rows([user]).to(self.net.user_table.device))
        routing = Routing(e, torch.zeros(1, dtype=torch.long, device=e.device))
        experts = {}
        with torch.no_grad():
            for layer in self.net.layers:
                _, chosen, weights = layer.route(e)
                experts[layer.name] = {"experts": chosen[0].tolist(), "weights": weights[0].float().tolist()}

        def apply(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
            return m(x, routing=routing) if isinstance(m, MoLELinear) else m(x)

        return FixedUser(f"user {user}", apply, self.net.head, {"experts": experts})

    @classmethod
    def adapter_targets(cls, config) -> list[str] | None:
        return config.target_modules

    @classmethod
    def adapter_parameters(cls, config, d_in: int, d_out: int) -> int:
        """MoLE: M experts and the shared one of rank n, the gate on users of width u (the GCF's on a GPU, or
        ``learned_dim``) with hidden g: (M + 1)·n·(d_in + d_out) + u·g + g + g·M + M; else plain LoRA."""
        from coplctl.graph.config import preset_config

        if not config.mole:
            return config.lora_rank * (d_in + d_out)
        u = config.learned_dim if config.user_embeddings == "learned" else preset_config(
            "paper" if config.gcf_preset == "auto" else config.gcf_preset, **config.gcf_overrides).dim
        g, m = config.gate_hidden, config.experts
        return (m + int(config.shared_expert)) * config.rank * (d_in + d_out) + u * g + g + g * m + m

    def experiments(self, ctx) -> dict:
        """Tables 4-6 and Figure 2, as the spec's ``experiments.copl`` asks (:mod:`coplctl.copl.experiments`)."""
        from coplctl.copl.experiments import run_experiments

        return run_experiments(self, ctx) if self.config.user_embeddings == "gcf" else {}

    @classmethod
    def check_extra(cls, extra: dict, file: Path) -> None:
        tables.check_extra(extra, file)

    @classmethod
    def report(cls, results: list[dict]):
        """Tables 4-6, Figure 2 and links to each run's figures (:mod:`coplctl.copl.report`)."""
        return tables.report(cls.registry_name, results)

    @classmethod
    def compared_metrics(cls, result: dict) -> dict[str, float]:
        return tables.compared_metrics(result)

    @contextlib.contextmanager
    def variant(self, **changes) -> Iterator["CoPL"]:
        """This trained model with other settings (``adaptation``, ``hops``, ``temperature``): a config
        made with ``dataclasses.replace``, and only the seen users, whom new users can then be adapted
        against. On exit the model has its own config and users back."""
        config, users, table = self.config, self.user_ids, self.net.user_table
        self.config = dataclasses.replace(config, **changes)
        self.forget_users(self.seen_users)
        try:
            yield self
        finally:
            self.config = config
            self.net.user_table, self.user_ids = table, users  # the very tensor it had, of its kind

    def forget_users(self, keep: int) -> None:
        """Drop every user row after the first ``keep`` (undo adaptations, e.g. to try another variant)."""
        self._set_table(self.net.user_table[:keep].detach().clone(), self.user_ids[:keep])

    def _add_rows(self, ids: list[str], emb: torch.Tensor) -> None:
        """Known users get their row replaced, new users a new row."""
        table = self.net.user_table.detach().clone()
        emb = emb.to(table)
        rows = torch.from_numpy(pd.Index(self.user_ids).get_indexer(pd.Index(ids, dtype=object)).astype("int64"))
        known = rows >= 0
        table[rows[known]] = emb[known]
        fresh = torch.nonzero(~known).flatten()
        self._set_table(torch.cat([table, emb[fresh]]), self.user_ids + [ids[i] for i in fresh.tolist()])

    def _set_table(self, table: torch.Tensor, user_ids: list[str]) -> None:
        """The net's user table becomes ``table`` (rows of ``user_ids``), of the same kind as before: a
        learnable ``nn.Parameter`` (w/o GNN embedding) or a buffer (GCF embeddings)."""
        old = self.net.user_table
        if isinstance(old, nn.Parameter):
            table = nn.Parameter(table, requires_grad=old.requires_grad)
        self.net.user_table = table
        self.user_ids = user_ids

    def save_extra(self, directory: Path) -> None:
        if self.gcf_dir is not None and Path(self.gcf_dir).resolve() != (directory / "gcf").resolve():
            shutil.copytree(self.gcf_dir, directory / "gcf", ignore=shutil.ignore_patterns("checkpoint.*"))

    def load_extra(self, directory: Path) -> None:
        self.gcf_dir = directory / "gcf" if (directory / "gcf").exists() else None
