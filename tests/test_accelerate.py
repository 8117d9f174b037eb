"""Training honours accelerate's launcher: gradient accumulation and mixed precision (bf16, fp16 with a
gradient scaler), set in the config or by `accelerate launch` through its environment variables."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import warnings

import pytest
import torch
from torch import nn

from coplctl.models.encoders import ResponseEncoder, ResponseInputs
from coplctl.models.train_config import TrainConfig
from coplctl.models.trainer import train_pairs, trainable_state


class Pairwise(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.head = nn.Sequential(nn.Linear(6, 16), nn.GELU(), nn.Linear(16, 1))

    def score(self, users, batch):
        return self.head(batch["features"]).squeeze(-1)

    def forward(self, users, chosen, rejected):
        return self.score(users, chosen), self.score(users, rejected), torch.zeros(())


def fit(monkeypatch=None, **cfg):
    g = torch.Generator().manual_seed(1)
    feats = torch.randn(40, 6, generator=g)
    inputs = ResponseInputs("frozen", features=feats)
    a, b = torch.randint(0, 40, (128,), generator=g), torch.randint(0, 40, (128,), generator=g)
    good = feats[:, 0] > 0  # a learnable preference
    chosen, rejected = torch.where(good[a] >= good[b], a, b), torch.where(good[a] >= good[b], b, a)
    users = torch.zeros(128, dtype=torch.long)
    net = Pairwise()
    conf = TrainConfig(**{"epochs": 2, "lr": 1e-2, "warmup_ratio": 0.0, **cfg})
    metrics = train_pairs(net, inputs, (users, chosen, rejected), (users[:32], chosen[:32], rejected[:32]), conf,
                          progress=False)
    return trainable_state(net), metrics


def same(a, b, atol=1e-6):
    return all(torch.allclose(a[k], b[k], atol=atol) for k in a)


def test_accumulating_four_batches_of_8_is_one_batch_of_32(monkeypatch):
    big, m_big = fit(batch_size=32)
    small, m_small = fit(batch_size=8, grad_accum=4)
    assert same(big, small) and m_big["steps"] == m_small["steps"] == 8 and m_small["grad_accum"] == 4
    plain, _ = fit(batch_size=8)
    assert not same(plain, small)  # without accumulation, 4x as many steps: another model
    monkeypatch.setenv("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "4")  # accelerate launch --gradient_accumulation_steps 4
    launched, m_launched = fit(batch_size=8)
    assert same(launched, small) and m_launched["grad_accum"] == 4


def test_the_launchers_mixed_precision_is_used(monkeypatch):
    plain, m_plain = fit(batch_size=32)
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")  # accelerate launch --mixed_precision bf16
    bf16, m_bf16 = fit(batch_size=32)
    assert m_plain["mixed_precision"] == "auto" and m_bf16["mixed_precision"] == "bf16"
    assert [h["loss"] for h in m_bf16["history"]] != [h["loss"] for h in m_plain["history"]]
    assert same(plain, bf16, atol=0.05)  # the same training, at bf16's precision
    no, m_no = fit(batch_size=32, mixed_precision="no")  # an explicit setting wins over the launcher
    assert m_no["mixed_precision"] == "no" and same(no, plain)


def test_fp16_trains_with_a_gradient_scaler():
    plain, m_plain = fit(batch_size=32)
    state, metrics = fit(batch_size=32, mixed_precision="fp16")
    assert metrics["mixed_precision"] == "fp16" and all(torch.isfinite(v).all() for v in state.values())
    assert [h["loss"] for h in metrics["history"]] != [h["loss"] for h in m_plain["history"]]
    assert same(plain, state, atol=0.02)  # the scaler's unscaled steps: the same training at fp16's precision


@pytest.fixture(scope="module")
def tiny_gemma(micro_dir, tmp_path_factory):
    from tiny_models import build_tiny_gemma

    from coplctl.data import load

    ds = load(micro_dir)
    return build_tiny_gemma(tmp_path_factory.mktemp("gemma") / "tiny",
                            [f"{p} {t}" for p, t in zip(ds.responses.prompt, ds.responses.text)])


@pytest.mark.parametrize("name, options", [
    ("copl", {"gcf_overrides": {"dim": 8, "epochs": 20}, "gate_noise": 0.5}),  # MoLE routing, noisy gates
    ("i2e", {}),  # a user token fed as input embeddings
])
def test_gradient_checkpointing_trains_the_same_numbers(name, options, micro_dir, tiny_gemma, capfd):
    from coplctl.cli.common import parse_sets
    from coplctl.core.registry import METHODS
    from coplctl.data import load
    from coplctl.models.encoders import checkpointing_enabled
    from coplctl.models.reward import make_config

    cls, ds = METHODS.get(name), load(micro_dir)
    runs = []
    for sets in ([], ["gradient_checkpointing=true"]):  # what `coplctl train ... --set` passes
        settings = {"mode": "lora", "backbone": str(tiny_gemma), "epochs": 2, "batch_size": 8, "max_length": 96,
                    **options, **parse_sets(sets)}
        method = cls(make_config(cls.Config, settings))
        with warnings.catch_warnings():
            warnings.simplefilter("error", FutureWarning)  # no deprecated transformers name
            metrics = method.fit(ds, seed=0, progress=False)
        lms = [m.lm for m in method.net.modules() if isinstance(m, ResponseEncoder)]
        assert lms and all(checkpointing_enabled(lm) == bool(sets) for lm in lms)
        runs.append(metrics)
    plain, checkpointed = ([h["loss"] for h in m["history"]] for m in runs)
    assert torch.allclose(torch.tensor(plain), torch.tensor(checkpointed))
    assert runs[0]["valid_accuracy"] == runs[1]["valid_accuracy"]
    assert "use_cache" not in capfd.readouterr().err  # transformers' notice: the cache is off, never read


def test_gradient_checkpointing_is_refused_in_frozen_mode(micro_dir, tmp_path, capsys):
    from coplctl.cli import main

    argv = ["train", "uniform", "--data", str(micro_dir), "--out", str(tmp_path / "run")]
    assert main([*argv, "--set", "gradient_checkpointing=true"]) == 1
    assert "gradient_checkpointing needs mode lora" in capsys.readouterr().err
    assert main([*argv, "--report-to", "mlflow"]) == 1
    assert "unknown tracker 'mlflow'" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


#: torch's C++ warnings ("[rank0]:[W1202 05:53:43 reducer.cpp:1529] Warning: ...") and Python warnings
#: raised in torch's or transformers' code ("/torch/...py:12: UserWarning: ..."); not the launcher's notice
#: that its default port is taken (tests running side by side)
WARNING = re.compile(r"^(\[rank\d+\]:)?\[W\d{4} |/(torch|transformers)/\S+:\d+: \w*Warning: ", re.M)


def test_two_processes_leak_no_ddp_warning(micro_dir, tmp_path):
    """DDP looks for unused parameters only for a net that says it may leave some (Oracle's per-group models;
    not MoLE, which gathers its experts by a one-hot product); asking for it otherwise makes torch warn on
    every process. CoPL's two-process run is checked in tests/test_copl.py."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "-m", "coplctl", "train", "uniform", "--data", str(micro_dir), "--out", str(tmp_path / "run"), "--epochs", "2",
           "--batch-size", "4", "--set", "grad_accum=2"]
    res = subprocess.run(cmd, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    assert not WARNING.findall(res.stderr), res.stderr[-3000:]
    # the README's accumulation (--set grad_accum=K) reaches a real 2-process launch: each process takes every
    # other batch of 4 pairs and steps once per 2 of them
    from coplctl.data import load

    metrics = json.loads((tmp_path / "run" / "training.json").read_text())["metrics"]
    batches = -(-len(load(micro_dir).split("train")) // 4)
    per_process = -(-batches // 2)
    assert (metrics["processes"], metrics["grad_accum"]) == (2, 2)
    assert metrics["steps"] == 2 * -(-per_process // 2) and per_process > 2


def test_ddp_looks_for_unused_parameters_only_when_a_net_asks(monkeypatch):
    import coplctl.models.trainer

    real, asked = coplctl.models.trainer.make_accelerator, []

    def spy(cfg, **kw):
        acc = real(cfg, **kw)
        asked.append(acc.ddp_handler.find_unused_parameters)
        return acc

    monkeypatch.setattr(coplctl.models.trainer, "make_accelerator", spy)
    fit(batch_size=32)
    monkeypatch.setattr(Pairwise, "unused_parameters", True, raising=False)  # e.g. experts routed by indexing
    fit(batch_size=32)
    assert asked == [False, True]
