"""The RewardMethod interface through the reference method: fit, adapt, score, save, load."""

from __future__ import annotations

import pytest
import torch
from reference_method import ResponseBT

from coplctl.core.errors import CoplError
from coplctl.data import load
from coplctl.models.reward import bt_loss, load_method, pair_accuracy


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


def test_exact_ties_are_wrong_counted_and_noted_in_table_1(tiny_dir):
    from coplctl.bench.tables import build_report, to_markdown
    from coplctl.data import load
    from coplctl.models.evaluate import evaluate

    ds = load(tiny_dir)
    method = ResponseBT(steps=1, lr=0.0)  # every response keeps score 0: every pair is a tie
    method.fit(ds)
    seen = evaluate(method, ds)["metrics"]["seen"]
    assert seen["accuracy"] == 0.0 and seen["ties"] == seen["pairs"] > 0
    result = {"spec": "s", "name": "uniform", "seed": 0, "metrics": {"seen": seen}}
    table = next(t for t in build_report([result])[0] if t.key == "table1-seen")
    assert table.notes == [f"Uniform on s: {seen['pairs']} tied pairs per seed (scored as wrong)"]
    assert "_Note: Uniform on s:" in to_markdown(table)


def test_reward_heads_output_fp32_under_bf16_autocast():
    from coplctl.models.encoders import RewardHead

    torch.manual_seed(0)
    head = RewardHead(64, 1)
    x = torch.randn(512, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = head(x.bfloat16())
        plain = torch.nn.Linear(64, 1)(x)  # autocast's own linear: bf16
    assert out.dtype == torch.float32 and plain.dtype == torch.bfloat16
    torch.testing.assert_close(out, torch.nn.functional.linear(x.bfloat16().float(), head.weight, head.bias))
