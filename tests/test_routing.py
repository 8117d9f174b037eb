"""CoPL records how its MoLE gates route the seen users (training.json) and the expert figure shows it."""

from __future__ import annotations

import json

import pytest


@pytest.fixture(scope="module")
def copl_run(micro_dir, tmp_path_factory):
    from coplctl.cli import main

    run = tmp_path_factory.mktemp("routing") / "run"
    assert main(["train", "copl", "--data", str(micro_dir), "--out", str(run), "--epochs", "1",
                 "--set", "gcf_overrides={dim: 8, epochs: 2}"]) == 0
    return run


def test_training_json_has_routing_per_mole_layer(copl_run, micro_dir):
    import pandas as pd

    routing = json.loads((copl_run / "training.json").read_text())["metrics"]["routing"]
    assert list(routing) == ["trunk.0", "trunk.2"]  # the frozen trunk's MoLE layers
    seen = int((pd.read_parquet(micro_dir / "users.parquet")["role"] == "seen").sum())
    for s in routing.values():
        assert len(s["share"]) == 8 and sum(s["share"]) == pytest.approx(1.0)
        assert s["top_share"] == max(s["share"]) and s["collapsed"] == (s["top_share"] >= 0.95)
        assert s["users"] == seen == s["grouped_users"]  # the simulated users all have a group
        assert s["mutual_information"] >= 0 and 0 <= s["normalized_mi"] <= 1


def test_experts_command_prints_top_share_and_mi(copl_run, tmp_path, capsys):
    from coplctl.cli import main
    from coplctl.copl.figures import plot_experts

    assert main(["plot", "experts", str(copl_run), "--out", str(tmp_path / "e.png")]) == 0
    printed = capsys.readouterr().out
    assert "top share" in printed and "MI (bits)" in printed and "trunk.0" in printed and "trunk.2" in printed
    info = plot_experts(copl_run, tmp_path / "f.png", layers=[1])
    assert list(info["routing"]) == ["trunk.2"]
    saved = json.loads((copl_run / "training.json").read_text())["metrics"]["routing"]["trunk.2"]
    assert info["routing"]["trunk.2"]["share"] == pytest.approx(saved["share"])  # saved gates route the same
    assert info["routing"]["trunk.2"]["mutual_information"] == pytest.approx(saved["mutual_information"])
