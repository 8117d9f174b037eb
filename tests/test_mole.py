"""Mixture of LoRA experts: batched computation, gate weights, shared routing, explicit passing."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from coplctl.copl.mole import (COLLAPSE_SHARE, MoLELinear, Routing, gate_routing, inject_mole, load_balance_loss,
                               mole_routing, routing_stats, top1_allocation)


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


def test_routing_stats_aligned_collapsed_random_and_ungrouped():
    groups = ["a", "b", "c", "d"] * 25
    aligned = {"l": [{"a": 0, "b": 3, "c": 5, "d": 7}[g] for g in groups]}
    s = routing_stats(aligned, groups, num_experts=8)["l"]
    assert s["normalized_mi"] == pytest.approx(1.0) and s["mutual_information"] == pytest.approx(2.0)
    assert s["share"] == pytest.approx([0.25, 0, 0, 0.25, 0, 0.25, 0, 0.25]) and not s["collapsed"]
    # one group split over two experts still tells the group from the expert: still 1
    split = {"l": [{"a": 0, "b": 3, "c": 5, "d": 7}[g] + (i % 2 if g == "a" else 0) for i, g in enumerate(groups)]}
    assert routing_stats(split, groups, num_experts=8)["l"]["normalized_mi"] == pytest.approx(1.0)

    one = routing_stats({"l": [2] * 100}, groups, num_experts=8)["l"]
    assert one["collapsed"] and one["top_expert"] == 2 and one["top_share"] == 1.0
    assert one["mutual_information"] == 0.0 and one["normalized_mi"] == 0.0
    near = [0] * 95 + [1] * 5  # the threshold is inclusive
    assert COLLAPSE_SHARE == 0.95 and routing_stats({"l": near}, groups)["l"]["collapsed"]
    assert not routing_stats({"l": [0] * 94 + [1] * 6}, groups)["l"]["collapsed"]

    gen = torch.Generator().manual_seed(0)
    many = [["a", "b", "c", "d"][i] for i in torch.randint(0, 4, (20000,), generator=gen)]
    rand = routing_stats({"l": torch.randint(0, 8, (20000,), generator=gen)}, many, num_experts=8)["l"]
    assert 0 <= rand["mutual_information"] < 0.01 and rand["normalized_mi"] < 0.01 and not rand["collapsed"]

    # users without a group are counted in the shares only; no group at all: no MI
    partial = routing_stats({"l": [0, 0, 1, 1, 1]}, ["a", "a", "b", None, float("nan")], num_experts=2)["l"]
    assert partial["share"] == [0.4, 0.6] and partial["grouped_users"] == 3
    assert partial["normalized_mi"] == pytest.approx(1)
    none = routing_stats({"l": [0, 1]}, None, num_experts=2)["l"]
    assert none["mutual_information"] is None and none["normalized_mi"] is None
    single = routing_stats({"l": [0, 1]}, ["a", "a"], num_experts=2)["l"]
    assert single["mutual_information"] == 0.0 and single["normalized_mi"] is None  # H(group) = 0


def _two_layer_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 1))
    return inject_mole(model, ["0", "2"], user_dim=3, num_experts=4, rank=2, gate_hidden=8)


def test_top1_allocation_matches_the_gate_and_ignores_noise_and_mode():
    layers = _two_layer_model()
    users = torch.randn(7, 3)
    for layer in layers:
        layer.train()
    alloc = top1_allocation(layers, users)
    assert list(alloc) == ["0", "2"]
    for layer in layers:
        _, experts, _ = layer.route(users)
        assert alloc[layer.name] == experts[:, 0].tolist()
    assert top1_allocation(layers, users) == alloc


def test_collapsed_gate_warns_naming_the_layer():
    layers = _two_layer_model()
    with torch.no_grad():  # the last gate linear ignores the user and always picks expert 3
        layers[1].gate[2].weight.zero_()
        layers[1].gate[2].bias.zero_()
        layers[1].gate[2].bias[3] = 100.0
    users = torch.randn(50, 3)
    groups = ["x", "y"] * 25
    with pytest.warns(UserWarning, match=r"MoLE layer 2 routes 100% of users to expert 3: the gate ignores"):
        stats = gate_routing(layers, users, groups)
    assert stats["2"]["collapsed"] and stats["2"]["share"] == [0, 0, 0, 1.0] and stats["2"]["mutual_information"] == 0
    assert not stats["0"]["collapsed"]
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        gate_routing(layers, users, groups, warn=False)
        gate_routing(layers[:1], users, groups)  # a healthy layer alone: no warning
