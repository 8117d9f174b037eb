"""GCF on two CPU processes (accelerate launch, gloo): neighbour-sampled minibatches split across the
processes with DDP reach what one process reaches, write the same run, and resume a checkpoint."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from coplctl.core.errors import CoplError
from coplctl.data import load

OPTIONS = ["--sampler", "neighbor", "--batch-size", "512", "--epochs", "8", "--dim", "16", "--layers", "2",
           "--set", "patience=0", "--json"]


def _launch(*args: str, processes: int = 2) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "coplctl", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def users_1500(tmp_path_factory):
    from coplctl.data.protocol import ProtocolConfig
    from coplctl.data.simulate import SimConfig, simulate

    path = tmp_path_factory.mktemp("parallel") / "data"
    simulate(SimConfig(ProtocolConfig("uf-p-2", "all", users=1500, unseen_users=10, survey_pairs=2000))).save(path)
    return path


def test_two_processes_reach_what_one_reaches(users_1500, tmp_path, capsys):
    from coplctl.cli import main

    assert main(["graph", "train", "--data", str(users_1500), "--out", str(tmp_path / "one"), *OPTIONS]) == 0
    one = json.loads(capsys.readouterr().out)["metrics"]
    res = _launch("graph", "train", "--data", str(users_1500), "--out", str(tmp_path / "two"), *OPTIONS)
    assert res.returncode == 0, res.stderr[-3000:]
    two = json.loads(res.stdout)["metrics"]  # one JSON document: the main process alone prints
    assert abs(two["valid_accuracy"] - one["valid_accuracy"]) <= 0.01 and two["valid_accuracy"] > 0.9
    assert abs(two["group_probe"] - one["group_probe"]) <= 0.02
    config = json.loads((tmp_path / "two" / "config.json").read_text())["gcf"]
    assert (config["sampler"], config["batch_size"]) == ("neighbor", 512)
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == sorted(p.name for p in (tmp_path / "one").iterdir())
    assert json.loads((tmp_path / "two" / "metrics.json").read_text()) == two


def test_a_checkpoint_resumes_on_two_processes_and_full_graph_steps_stay_on_one(users_1500, tmp_path):
    from coplctl.graph.config import preset_config
    from coplctl.graph.train import train_gcf

    cfg = preset_config("cpu", sampler="neighbor", batch_size=512, epochs=4, dim=16, layers=2, patience=0)

    def stop(epoch, metrics):
        if epoch == 2:
            raise KeyboardInterrupt

    with pytest.raises(CoplError, match="resume after epoch 2"):
        train_gcf(load(users_1500), tmp_path / "run", cfg, progress=False, on_epoch_end=stop)
    res = _launch("graph", "train", "--data", str(users_1500), "--out", str(tmp_path / "run"),
                  *[o if o != "8" else "4" for o in OPTIONS])
    assert res.returncode == 0, res.stderr[-3000:]
    assert "resuming the interrupted run" in res.stderr
    history = json.loads((tmp_path / "run" / "metrics.json").read_text())["history"]
    assert [h["epoch"] for h in history] == [1, 2, 3, 4]
    full = _launch("graph", "train", "--data", str(users_1500), "--out", str(tmp_path / "full"), "--sampler", "full")
    assert full.returncode != 0 and "use --sampler neighbor" in full.stderr
