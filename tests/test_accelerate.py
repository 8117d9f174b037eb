"""Training honours accelerate's launcher: gradient accumulation and mixed precision (bf16, fp16 with a
gradient scaler), set in the config or by `accelerate launch` through its environment variables."""

from __future__ import annotations

import torch
from torch import nn

from coplctl.encoders import ResponseInputs
from coplctl.trainer import TrainConfig, train_pairs, trainable_state


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
