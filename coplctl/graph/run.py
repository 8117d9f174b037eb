"""A trained GCF run on disk, loaded for adaptation, plotting and the reward model."""

from __future__ import annotations

from functools import cached_property
from pathlib import Path

import pandas as pd
import torch

from coplctl.core.errors import CoplError, DataError
from coplctl.core.files import field, read_json, read_parquet, read_safetensors
from coplctl.graph.graph import PreferenceGraph
from coplctl.graph.model import VARIANTS

REQUIRED = ("config.json", "metrics.json", "graph.json", "graph.safetensors", "embeddings.safetensors",
            "responses.parquet")


class GCFRun:
    """Files written by ``train_gcf``: config, graph, layer-L embeddings, graph responses, metrics."""

    def __init__(self, directory: str | Path):
        d = Path(directory)
        if (d / "gcf" / "metrics.json").exists():  # a reward-model run keeps its GCF in gcf/
            d = d / "gcf"
        missing = [f for f in REQUIRED if not (d / f).exists()]
        if missing:
            hint = " (training was interrupted: rerun `coplctl graph train` to resume)" if (d / "checkpoint.safetensors").exists() else ""
            raise CoplError(f"{directory} is not a trained GCF run: missing {', '.join(missing)}{hint}")
        self.path = d
        self.config = read_json(d / "config.json", what="GCF run config")
        self.metrics = read_json(d / "metrics.json", what="GCF run metrics")
        gcf = field(self.config, "gcf", dict, d / "config.json")
        if gcf.get("variant") not in VARIANTS:
            raise DataError(d / "config.json", f"gcf.variant must be one of {', '.join(VARIANTS)}")
        self.graph = PreferenceGraph.load(d)
        emb = read_safetensors(d / "embeddings.safetensors", "embeddings file")
        for key, n in (("users", self.graph.num_users), ("responses", self.graph.num_responses)):
            t = emb.get(key)
            if t is None or t.dim() != 2 or t.shape[0] != n or not t.is_floating_point():
                raise DataError(d / "embeddings.safetensors", f"tensor {key!r} must be a float matrix with one row "
                                                              f"per graph node ({n})")
        if emb["users"].shape[1] != emb["responses"].shape[1]:
            raise DataError(d / "embeddings.safetensors", "user and response embeddings differ in width")
        self.user_emb: torch.Tensor = emb["users"]  # raw layer-L embeddings: the GCF's scores use these
        self.response_emb: torch.Tensor = emb["responses"]

    @property
    def variant(self) -> str:
        return self.config["gcf"]["variant"]

    @property
    def exported_user_emb(self) -> torch.Tensor:
        """User embeddings handed to reward models: L2-normalised (as the authors' code does), so that the
        MoLE gates read a user's direction, whose scale varies with d, L and training length."""
        return self.export(self.user_emb)

    def export(self, emb: torch.Tensor) -> torch.Tensor:
        """Raw layer-L user embeddings as this run hands them to reward models (see exported_user_emb)."""
        # runs written before exports were normalised for every variant say nothing: keep what they did
        default = "l2" if self.variant == "official" else "raw"
        return torch.nn.functional.normalize(emb, dim=-1) if self.config.get("export", default) == "l2" else emb

    @cached_property
    def responses(self) -> pd.DataFrame:
        """The graph's responses (response_id, prompt, text), in node order."""
        df = read_parquet(self.path / "responses.parquet", ("response_id", "prompt", "text"), "responses table")
        if list(df["response_id"]) != self.graph.response_ids:
            raise DataError(self.path / "responses.parquet", "does not list the graph's responses in node order")
        return df

    @cached_property
    def users(self) -> pd.DataFrame:
        """Users of the training dataset (user_id, group, role)."""
        return read_parquet(self.path / "users.parquet", ("user_id",), "users table")

