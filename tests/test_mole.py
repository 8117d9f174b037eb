"""Mixture of LoRA experts: batched computation, gate weights, shared routing, explicit passing."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from coplctl.mole import MoLELinear, Routing, inject_mole, load_balance_loss, mole_routing


def _layer(top_k=1, shared=True, seed=0):
    torch.manual_seed(seed)
    layer = MoLELinear(nn.Linear(6, 5), user_dim=3, num_experts=4, rank=2, alpha=4, gate_hidden=8, top_k=top_k,
                       temperature=0.7, shared=shared)
    with torch.no_grad():  # LoRA "B" factors start at zero; give them values so experts matter
        layer.expert_b.normal_()
        if shared:
            layer.shared_b.weight.normal_()
    return layer


def _naive(layer: MoLELinear, x, users, rows):
    """Per-sample loop, written from the paper's equation."""
    out = []
    for i in range(x.shape[0]):
        xi = x[i]
        y = layer.base(xi)
        if layer.shared_a is not None:
            y = y + layer.scale * (xi @ layer.shared_a.weight.T @ layer.shared_b.weight.T)
        p = torch.softmax(layer.gate(users[rows[i]]) / layer.temperature, -1)
        w, idx = p.topk(layer.top_k)
        for wk, k in zip(w, idx):
            y = y + layer.scale * wk * (xi @ layer.expert_a[k].T @ layer.expert_b[k].T)
        out.append(y)
    return torch.stack(out)


@pytest.mark.parametrize("top_k, shared", [(1, True), (2, True), (1, False)])
def test_batched_output_equals_per_sample_reference(top_k, shared):
    layer = _layer(top_k, shared).double()
    users = torch.randn(3, 3, dtype=torch.double)
    rows = torch.tensor([0, 1, 2, 0, 1, 2])
    x = torch.randn(6, 4, 6, dtype=torch.double)  # (batch, tokens, features)
    got = layer(x, Routing(users, rows))
    torch.testing.assert_close(got, _naive(layer, x, users, rows))
    flat = torch.randn(6, 6, dtype=torch.double)  # 2-D inputs (frozen-mode trunks) work the same
    torch.testing.assert_close(layer(flat, Routing(users, rows)), _naive(layer, flat, users, rows))


def test_selected_expert_weight_is_p_not_p_squared():
    layer = _layer(shared=False).double()
    users = torch.randn(1, 3, dtype=torch.double)
    x = torch.randn(1, 6, dtype=torch.double)
    routing = Routing(users, torch.tensor([0]))
    delta = layer(x, routing) - layer.base(x)
    _, probs, experts = routing.records[0]
    k = experts[0, 0]
    p = probs[0, k]
    assert 0 < p < 1
    unit = layer.scale * (x @ layer.expert_a[k].T @ layer.expert_b[k].T)
    torch.testing.assert_close(delta, p * unit)


def test_gate_runs_once_per_user_row_and_pairs_share_it_even_with_noise():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 1))
    layers = inject_mole(model, ["0", "2"], user_dim=3, num_experts=4, rank=2, gate_hidden=8)
    model.train()
    users = torch.randn(5, 3)
    rows = torch.arange(5).repeat(2)  # five pairs: chosen copies then rejected copies
    x = torch.randn(10, 6)
    routing = Routing(users, rows, noise=3.0)
    with mole_routing(layers, routing):
        model(x)
    assert len(routing.records) == 2
    for _, probs, experts in routing.records:
        assert probs.shape == (5, 4)  # one gate evaluation (and one noise draw) per user row
        per_sequence = experts[rows]
        assert torch.equal(per_sequence[:5], per_sequence[5:])


def test_routing_is_passed_per_call_not_left_on_modules():
    model = nn.Sequential(nn.Linear(6, 6))
    layers = inject_mole(model, ["0"], user_dim=3)
    with mole_routing(layers, Routing(torch.randn(2, 3), torch.tensor([0, 1]))):
        model(torch.randn(2, 6))
    assert not any(layer._forward_pre_hooks for layer in layers)
    assert not any(isinstance(v, Routing) for layer in layers for v in vars(layer).values())
    with pytest.raises(RuntimeError, match="without a user"):
        model(torch.randn(2, 6))


def test_load_balance_loss_is_one_when_balanced():
    m = 4
    probs = torch.full((8, m), 1 / m)
    experts = torch.arange(8).remainder(m).unsqueeze(1)
    assert float(load_balance_loss([("l", probs, experts)])) == pytest.approx(1.0)
    collapsed = torch.zeros(8, 1, dtype=torch.long)
    skew = torch.tensor([[0.97, 0.01, 0.01, 0.01]]).repeat(8, 1)
    assert float(load_balance_loss([("l", skew, collapsed)])) > 3.5
