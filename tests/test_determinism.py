"""The same seed on the same machine gives the same numbers (multi-threaded CPU included)."""

from __future__ import annotations

import pytest
import torch
from conftest import small_protocol
from safetensors.torch import load_file

from coplctl.copl.method import CoPL
from coplctl.data.simulate import SimConfig, simulate
from coplctl.graph.config import preset_config
from coplctl.graph.train import train_gcf
from coplctl.models.reward import pair_scores


@pytest.fixture(scope="module")
def medium():
    # large enough that torch splits index and sparse work across threads
    return simulate(SimConfig(protocol=small_protocol(users=1000, unseen_users=4, survey_pairs=1500), seed=2))


def test_gcf_is_bitwise_reproducible(medium, tmp_path):
    cfg = preset_config("cpu", dim=16, epochs=25)
    for run in ("a", "b"):
        train_gcf(medium, tmp_path / run, cfg, seed=5, progress=False)
    a, b = (load_file(str(tmp_path / r / "embeddings.safetensors")) for r in ("a", "b"))
    assert torch.equal(a["users"], b["users"]) and torch.equal(a["responses"], b["responses"])


def test_copl_reward_model_is_reproducible(tiny_dir, tmp_path):
    from coplctl.data import load

    ds = load(tiny_dir)
    scores = []
    for run in ("a", "b"):  # whole-dataset batches: big enough for torch to split the work across threads
        method = CoPL(epochs=3, batch_size=1024, gcf_overrides={"dim": 16, "epochs": 25})
        method.fit(ds, seed=1, work_dir=tmp_path / run, progress=False)
        scores.append(pair_scores(method, ds.split("test")[lambda d: d["user_id"].isin(set(method.user_ids))],
                                  ds.responses))
    assert (scores[0][0] == scores[1][0]).all() and (scores[0][1] == scores[1][1]).all()


@pytest.mark.parametrize("options", [{"edge_dropout": 0.1}, {"sampler": "neighbor", "batch_size": 512},
                                     {"variant": "lightgcn", "edge_dropout": 0.1}])
def test_gcf_is_reproducible_whatever_else_draws_from_the_global_rng(medium, tmp_path, options):
    cfg = preset_config("cpu", dim=8, layers=2, epochs=4, **options)
    train_gcf(medium, tmp_path / "a", cfg, seed=5, progress=False)
    # other code drawing from torch's global random stream between epochs changes nothing
    train_gcf(medium, tmp_path / "b", cfg, seed=5, progress=False, on_epoch_end=lambda *args: torch.rand(17))
    a, b = (load_file(str(tmp_path / r / "embeddings.safetensors")) for r in ("a", "b"))
    assert torch.equal(a["users"], b["users"]) and torch.equal(a["responses"], b["responses"])
