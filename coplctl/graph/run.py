"""A trained GCF run on disk, loaded for adaptation, plotting and the reward model."""

from __future__ import annotations

import json
from functools import cached_property
from pathlib import Path

import pandas as pd
import torch
from safetensors.torch import load_file

from coplctl.errors import CoplError
from coplctl.graph.graph import PreferenceGraph

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
        self.config = json.loads((d / "config.json").read_text())
        self.metrics = json.loads((d / "metrics.json").read_text())
        self.graph = PreferenceGraph.load(d)
        emb = load_file(str(d / "embeddings.safetensors"))
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
        return pd.read_parquet(self.path / "responses.parquet")

    @cached_property
    def users(self) -> pd.DataFrame:
        """Users of the training dataset (user_id, group, role)."""
        return pd.read_parquet(self.path / "users.parquet")

