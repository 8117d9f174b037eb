"""The RewardMethod interface through the reference method: fit, adapt, score, save, load."""

from __future__ import annotations

import pytest
import torch
from reference_method import ResponseBT

from coplctl.data import load
from coplctl.errors import CoplError
from coplctl.reward import bt_loss, load_method, pair_accuracy


def test_bt_loss_is_stable_and_correct():
    assert torch.isclose(bt_loss(torch.tensor([0.0]), torch.tensor([0.0])), torch.log(torch.tensor(2.0)))
    assert torch.isfinite(bt_loss(torch.tensor([-1e4]), torch.tensor([1e4])))


def test_fit_adapt_score_save_load(tiny_dir, tmp_path):
    ds = load(tiny_dir)
    method = ResponseBT(steps=100)
    report = method.fit(ds, seed=0)
    assert report["train_accuracy"] > 0.6
    assert method.adapt(ds.split("fewshot"), ds.responses)["users"] == 8
    test = ds.split("test")
    scores = method.score(test["user_id"].tolist(), ds.responses.set_index("response_id").loc[test["chosen_id"]].reset_index())
    assert scores.shape == (len(test),) and torch.isfinite(scores).all()

    saved = method.save(tmp_path / "run")
    again = load_method(saved)
    assert isinstance(again, ResponseBT) and again.config == method.config
    assert pair_accuracy(again, test, ds.responses) == pair_accuracy(method, test, ds.responses)
    assert torch.equal(again.score(["u"], ds.responses.head(1)), method.score(["u"], ds.responses.head(1)))


def test_bad_config_option_is_a_clear_error():
    with pytest.raises(CoplError, match="bad option for method response-bt"):
        ResponseBT(epochs=3)


def test_load_of_a_non_method_directory(tmp_path):
    with pytest.raises(CoplError, match="not a saved method"):
        load_method(tmp_path)
