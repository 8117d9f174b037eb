"""Reward-model training resumes after an interruption with the very numbers of an uninterrupted run, and
reports to an experiment tracker."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import coplctl.models.trainer
from coplctl.core.errors import CoplError
from coplctl.models.encoders import ResponseInputs
from coplctl.models.resume import STATE_FILE
from coplctl.models.train_config import TrainConfig
from coplctl.models.trainer import train_pairs, trainable_state


class Stop(Exception):
    pass


class Noisy(nn.Module):
    """A pair scorer that draws from torch's global random stream (dropout) and counts its training calls."""

    def __init__(self, stop_at: int | None = None):
        super().__init__()
        torch.manual_seed(0)
        self.head = nn.Sequential(nn.Linear(6, 16), nn.GELU(), nn.Dropout(0.2), nn.Linear(16, 1))
        self.calls, self.stop_at = 0, stop_at

    def score(self, users, batch):
        return self.head(batch["features"]).squeeze(-1)

    def forward(self, users, chosen, rejected):
        self.calls += 1
        if self.calls == self.stop_at:
            raise Stop
        return self.score(users, chosen), self.score(users, rejected), torch.zeros(())


def fit(work=None, *, stop_at=None, seed=0, data_seed=1, **cfg):
    g = torch.Generator().manual_seed(data_seed)
    feats = torch.randn(40, 6, generator=g)
    a, b = torch.randint(0, 40, (128,), generator=g), torch.randint(0, 40, (128,), generator=g)
    good = feats[:, 0] > 0
    chosen, rejected = torch.where(good[a] >= good[b], a, b), torch.where(good[a] >= good[b], b, a)
    users = torch.zeros(128, dtype=torch.long)
    net = Noisy(stop_at)
    conf = TrainConfig(**{"epochs": 3, "lr": 1e-2, "batch_size": 16, "warmup_ratio": 0.1, **cfg})
    metrics = train_pairs(net, ResponseInputs("frozen", features=feats), (users, chosen, rejected),
                          (users[:48], chosen[:48], rejected[:48]), conf, progress=False, seed=seed, work_dir=work)
    return trainable_state(net), metrics, torch.rand(3)  # what the run left in the global random stream


def same_run(a, b):
    (wa, ma, ra), (wb, mb, rb) = a, b
    strip = lambda m: {k: v for k, v in m.items() if k != "resumed_from"}  # noqa: E731
    return all(torch.equal(wa[k], wb[k]) for k in wa) and strip(ma) == strip(mb) and torch.equal(ra, rb)


@pytest.mark.parametrize("options, stop_at, resumed", [
    ({}, 20, {"epoch": 2, "batch": 0, "steps": 16}),  # 8 batches an epoch: stopped in epoch 3, resumed after 2
    ({"checkpoint_every": 3, "grad_accum": 2}, 15, {"epoch": 1, "batch": 4, "steps": 6}),  # within epoch 2
    ({"mixed_precision": "fp16", "checkpoint_every": 5}, 12, {"epoch": 1, "batch": 2, "steps": 10}),  # a scaler
])
def test_an_interrupted_run_resumes_to_the_same_weights_and_metrics(tmp_path, options, stop_at, resumed):
    whole = fit(**options)
    assert whole[1]["resumed_from"] is None
    with pytest.raises(Stop):
        fit(tmp_path, stop_at=stop_at, **options)
    assert (tmp_path / STATE_FILE).exists()
    again = fit(tmp_path, **options)
    assert again[1]["resumed_from"] == resumed
    assert same_run(whole, again)
    # a finished run's checkpoint resumes after its last epoch: nothing left to train, the same result
    done = fit(tmp_path, **options)
    assert done[1]["resumed_from"]["epoch"] == 3 and same_run(whole, done)


def test_a_checkpoint_of_other_work_is_not_resumed(tmp_path):
    for other in ({"seed": 1}, {"data_seed": 2}, {"epochs": 4}):
        with pytest.raises(Stop):
            fit(tmp_path, stop_at=20)
        run = fit(tmp_path, **other)  # its own run from the start, over the other's checkpoint
        assert run[1]["resumed_from"] is None and same_run(run, fit(**other))
    with pytest.raises(Stop):
        fit(tmp_path, stop_at=20)
    assert fit(tmp_path, checkpoint_every=2)[1]["resumed_from"]["epoch"] == 2  # how often to save changes no number


def test_a_damaged_checkpoint_is_one_clear_error(tmp_path):
    (tmp_path / STATE_FILE).write_bytes(b"not a checkpoint")
    with pytest.raises(CoplError, match="delete it"):
        fit(tmp_path)


def test_ctrl_c_says_how_to_resume(tmp_path, monkeypatch):
    real = coplctl.models.trainer.row_accuracy
    calls = []

    def interrupted(*args, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kw)

    monkeypatch.setattr(coplctl.models.trainer, "row_accuracy", interrupted)
    with pytest.raises(CoplError, match="run the same command again to resume"):
        fit(tmp_path)
    monkeypatch.undo()
    assert fit(tmp_path)[1]["resumed_from"]["epoch"] == 1


def _events(folder):
    """{tag: [(step, value)]} of every TensorBoard event file under ``folder``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    found = {}
    for path in sorted(folder.rglob("events.out.tfevents.*")):
        acc = EventAccumulator(str(path))
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            found.setdefault(tag, []).extend((e.step, e.value) for e in acc.Scalars(tag))
    return found


def test_tensorboard_gets_the_loss_learning_rate_and_accuracy(tmp_path):
    pytest.importorskip("tensorboard", reason="the tensorboard extra is not installed (pip install 'coplctl[tensorboard]')")
    g = torch.Generator().manual_seed(1)
    feats = torch.randn(40, 6, generator=g)
    rows = torch.randint(0, 40, (64,), generator=g), torch.randint(0, 40, (64,), generator=g)
    users = torch.zeros(64, dtype=torch.long)
    metrics = train_pairs(Noisy(), ResponseInputs("frozen", features=feats), (users, *rows), (users, *rows),
                          TrainConfig(epochs=2, lr=1e-2, batch_size=16), progress=False, work_dir=tmp_path,
                          report_to="tensorboard")
    events = _events(tmp_path / "logs")
    assert [v for _, v in events["train/epoch_loss"]] == pytest.approx([h["loss"] for h in metrics["history"]], rel=1e-6)
    assert [v for _, v in events["valid/accuracy"]] == pytest.approx([h["valid_accuracy"] for h in metrics["history"]])
    assert [s for s, _ in events["train/loss"]] == list(range(1, metrics["steps"] + 1))
    assert [s for s, _ in events["valid/accuracy"]] == [4, 8] and len(events["lr"]) == metrics["steps"]


def test_a_missing_tracker_package_is_named_before_training(tmp_path, monkeypatch):
    import coplctl.models.tracking

    monkeypatch.setitem(coplctl.models.tracking.TRACKERS, "wandb", ("no_such_package_here",))
    with pytest.raises(CoplError, match=r"pip install 'coplctl\[wandb\]'"):
        train_pairs(Noisy(stop_at=1), None, (), (), TrainConfig(), work_dir=tmp_path, report_to="wandb")
    with pytest.raises(CoplError, match="unknown tracker"):
        coplctl.models.tracking.check_tracker("mlflow")
    with pytest.raises(CoplError, match="needs mode lora"):
        TrainConfig(gradient_checkpointing=True)


def test_coplctl_train_killed_then_run_again_resumes(micro_dir, tmp_path):
    """A real SIGKILL of `coplctl train` once its first checkpoint is on disk; the same command run again
    resumes, reports it, moves the TensorBoard logs into the run and deletes the work directory. Its
    model and metrics are those of an uninterrupted run."""
    from coplctl.core.registry import METHODS
    from coplctl.data import load
    from coplctl.models.reward import make_config

    has_tb = any(__import__("importlib").util.find_spec(p) for p in ("tensorboard", "tensorboardX"))
    run, work = tmp_path / "run", tmp_path / ".run.work"
    settings = {"epochs": 6, "batch_size": 8, "checkpoint_every": 4}
    cmd = [sys.executable, "-m", "coplctl", "train", "uniform", "--data", str(micro_dir), "--out", str(run),
           "--epochs", "6", "--batch-size", "8", "--set", "checkpoint_every=4", "--json",
           *(["--report-to", "tensorboard"] if has_tb else [])]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not (work / STATE_FILE).exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "the run ended before it could be killed"
    assert not (run / "method.json").exists()

    res = subprocess.run(cmd, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "resuming after epoch" in res.stderr
    metrics = json.loads(res.stdout)["metrics"]
    assert metrics["resumed_from"] is not None and metrics["resumed_from"]["steps"] > 0
    assert not work.exists() and (not has_tb or any((run / "logs").rglob("events.out.tfevents.*")))

    cls = METHODS.get("uniform")
    whole = cls(make_config(cls.Config, settings))
    expected = whole.fit(load(micro_dir), seed=0, progress=False)
    saved = load_file(str(run / "model.safetensors"))
    assert all(torch.equal(v, saved[k]) for k, v in trainable_state(whole.net).items())
    assert {k: v for k, v in expected.items() if k != "resumed_from"} == \
        {k: v for k, v in metrics.items() if k != "resumed_from"}
