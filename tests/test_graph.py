"""CoPL's graph collaborative filtering: normalisation, propagation, sampling, training, resume."""

from __future__ import annotations

import math

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from coplctl.core.errors import CoplError
from coplctl.data import load
from coplctl.graph.config import preset_config
from coplctl.graph.graph import PreferenceGraph
from coplctl.graph.model import GCF
from coplctl.graph.sampling import NeighborSampler
from coplctl.graph.train import train_gcf

PAIRS = pd.DataFrame({
    "user_id":     ["u0", "u0", "u1", "u2", "u2"],
    "chosen_id":   ["a",  "a",  "a",  "c",  "d"],
    "rejected_id": ["b",  "c",  "b",  "a",  "b"],
})


def test_edges_are_sets_and_normalisation_is_symmetric():
    g = PreferenceGraph.from_pairs(PAIRS)
    assert g.user_ids == ["u0", "u1", "u2"] and g.response_ids == ["a", "c", "d", "b"]
    pos = {(g.user_ids[u], g.response_ids[r]) for u, r in g.pos.T.tolist()}
    assert pos == {("u0", "a"), ("u1", "a"), ("u2", "c"), ("u2", "d")}  # u0 chose a twice: one edge
    alpha = {(g.user_ids[u], g.response_ids[r]): w for (u, r), w in zip(g.pos.T.tolist(), g.weights[0].tolist())}
    beta = {(g.user_ids[u], g.response_ids[r]): w for (u, r), w in zip(g.neg.T.tolist(), g.weights[1].tolist())}
    # |N+(u0)| = 1, |N+(a)| = 2; |N+(u2)| = 2, |N+(c)| = 1
    assert alpha[("u0", "a")] == pytest.approx(1 / math.sqrt(1 * 2))
    assert alpha[("u2", "c")] == pytest.approx(1 / math.sqrt(2 * 1))
    # |N-(u0)| = 2 (b, c), |N-(b)| = 3 (u0, u1, u2), |N-(c)| = 1
    assert beta[("u0", "b")] == pytest.approx(1 / math.sqrt(2 * 3))
    assert beta[("u0", "c")] == pytest.approx(1 / math.sqrt(2 * 1))
    assert beta[("u2", "a")] == pytest.approx(1 / math.sqrt(2 * 1))


def _dense_reference(model: GCF, g: PreferenceGraph, variant: str):
    """CoPL propagation written edge by edge, literally as in the paper (no shortcut, no sparse ops)."""
    e_u, e_r = model.users.weight.double(), model.responses.weight.double()
    (pos, neg), (pw, nw) = (g.pos, g.neg), g.weights
    d = e_u.shape[1]
    for layer in model.layers:
        act = layer.act

        def blocks(lin, k):
            w = lin.weight.double()
            return [w[:, i * d:(i + 1) * d] for i in range(k)], lin.bias.double()

        new_u, new_r = [], []
        for side, (own, other, rows) in enumerate(((e_u, e_r, 0), (e_r, e_u, 1))):
            out = []
            for i in range(own.shape[0]):
                x = own[i]
                if variant == "paper":
                    (ws, w1, w2, w3, w4), b = blocks(layer.user if side == 0 else layer.response, 5)
                    m = torch.zeros(d, dtype=torch.double)
                    for edges, weights, wa, wb in ((pos, pw, w1, w2), (neg, nw, w3, w4)):
                        for (uu, rr), a in zip(edges.T.tolist(), weights.tolist()):
                            me, nb = (uu, rr) if side == 0 else (rr, uu)
                            if me == i:
                                m += a * (wa @ other[nb] + wb @ (other[nb] * x))
                    out.append(act(ws @ x + b + m))
                else:
                    (ws, wpos, wneg_block), b = blocks(layer.shared, 3)
                    wneg = -wneg_block  # the layer learns −W_neg directly; the subtraction is the same
                    m = torch.zeros(d, dtype=torch.double)
                    for edges, weights, wt, sign in ((pos, pw, wpos, 1.0), (neg, nw, wneg, -1.0)):
                        for (uu, rr), a in zip(edges.T.tolist(), weights.tolist()):
                            me, nb = (uu, rr) if side == 0 else (rr, uu)
                            if me == i:
                                m += sign * a * (other[nb] + wt @ (other[nb] * x))
                    out.append(act(ws @ x + b + m))
            (new_u if side == 0 else new_r).extend(out)
        e_u, e_r = torch.stack(new_u), torch.stack(new_r)
    return e_u, e_r


@pytest.mark.parametrize("variant", ["paper", "official"])
def test_propagation_matches_dense_reference(variant):
    g = PreferenceGraph.from_pairs(PAIRS)
    torch.manual_seed(0)
    model = GCF(g.num_users, g.num_responses, dim=4, layers=2, variant=variant, init_std=0.5).double()
    e_u, e_r = model(g.adjacency(dtype=torch.double))
    ref_u, ref_r = _dense_reference(model, g, variant)
    torch.testing.assert_close(e_u, ref_u)
    torch.testing.assert_close(e_r, ref_r)


def test_hadamard_shortcut_is_exact():
    torch.manual_seed(1)
    d, n = 8, 5
    w2 = torch.randn(d, d, dtype=torch.double)
    e_u = torch.randn(d, dtype=torch.double)
    e_r = torch.randn(n, d, dtype=torch.double)
    alpha = torch.rand(n, dtype=torch.double)
    per_edge = sum(alpha[i] * (w2 @ (e_r[i] * e_u)) for i in range(n))
    shortcut = w2 @ (e_u * (alpha[:, None] * e_r).sum(0))
    torch.testing.assert_close(per_edge, shortcut)


def test_sampled_subgraph_equals_full_graph_when_fanout_covers_degrees(tiny_dir):
    ds = load(tiny_dir)
    g = PreferenceGraph.from_dataset(ds)
    torch.manual_seed(0)
    model = GCF(g.num_users, g.num_responses, dim=8, layers=3).double()
    full_u, full_r = model(g.adjacency(dtype=torch.double))
    users, responses = torch.tensor([0, 5, 17]), torch.tensor([3, 40])
    sub = NeighborSampler(g, [10_000] * 3).sample(users, responses, generator=torch.Generator().manual_seed(0),
                                                 dtype=torch.double)
    e_u, e_r = model(sub.adj, sub.users, sub.responses)
    torch.testing.assert_close(e_u[sub.user_local[users]], full_u[users])
    torch.testing.assert_close(e_r[sub.response_local[responses]], full_r[responses])
    small = NeighborSampler(g, [2, 2, 2]).sample(users, responses, generator=torch.Generator().manual_seed(0))
    assert len(small.users) < len(sub.users) or len(small.responses) < len(sub.responses)


def _cfg(**kw):
    return preset_config("cpu", dim=8, layers=2, epochs=6, patience=0, **kw)


def test_training_writes_a_run_and_refuses_to_overwrite(tiny_dir, tmp_path):
    ds = load(tiny_dir)
    m = train_gcf(ds, tmp_path / "run", _cfg(), progress=False)
    assert m["epochs_run"] == 6 and len(m["history"]) == 6 and m["valid_pairs_scored"] > 0
    emb = load_file(str(tmp_path / "run" / "embeddings.safetensors"))
    assert emb["users"].shape == (120, 8) and not (tmp_path / "run" / "checkpoint.safetensors").exists()
    with pytest.raises(CoplError, match="already holds a trained model"):
        train_gcf(ds, tmp_path / "run", _cfg(), progress=False)


def test_neighbour_sampled_training_runs(tiny_dir, tmp_path):
    m = train_gcf(load(tiny_dir), tmp_path / "run", _cfg(sampler="neighbor", batch_size=256, fanouts=(3, 3)),
                  progress=False)
    assert all(math.isfinite(h["loss"]) for h in m["history"])


def test_resume_after_interruption_gives_the_same_model(tiny_dir, tmp_path):
    ds = load(tiny_dir)
    cfg = _cfg(batch_size=300)  # minibatches: shuffling state must survive the interruption too
    straight = train_gcf(ds, tmp_path / "a", cfg, seed=3, progress=False)

    _interrupt(ds, tmp_path / "b", cfg, at=3)
    assert (tmp_path / "b" / "checkpoint.safetensors").exists() and not (tmp_path / "b" / "metrics.json").exists()
    with pytest.raises(CoplError, match="different configuration"):
        train_gcf(ds, tmp_path / "b", _cfg(batch_size=301), seed=3, progress=False)
    resumed = train_gcf(ds, tmp_path / "b", cfg, seed=3, progress=False)
    assert resumed["history"] == [{**h, "seconds": resumed["history"][i]["seconds"]}
                                  for i, h in enumerate(straight["history"])]
    _same_embeddings(tmp_path / "a", tmp_path / "b")


def _interrupt(ds, out, cfg, *, at: int) -> None:
    """Train ``cfg`` into ``out`` and stop it (as Ctrl-C would) at the end of epoch ``at``."""
    def interrupt(epoch, metrics):
        if epoch == at:
            raise KeyboardInterrupt

    with pytest.raises(CoplError, match=f"resume after epoch {at}"):
        train_gcf(ds, out, cfg, seed=3, progress=False, on_epoch_end=interrupt)


def _same_embeddings(a, b) -> None:
    a, b = (load_file(str(d / "embeddings.safetensors")) for d in (a, b))
    assert torch.equal(a["users"], b["users"]) and torch.equal(a["responses"], b["responses"])


@pytest.mark.parametrize("batch_size", [0, 300])
def test_resume_on_the_full_graph_and_in_minibatches_gives_the_same_model(tiny_dir, tmp_path, batch_size):
    """Full graph, one step per epoch: a step's forward pass also evaluates the previous model, and a run
    interrupted at an epoch's end resumes to the same weights and history."""
    ds = load(tiny_dir)
    cfg = _cfg(batch_size=batch_size)
    straight = train_gcf(ds, tmp_path / "a", cfg, seed=3, progress=False)

    _interrupt(ds, tmp_path / "b", cfg, at=4)
    resumed = train_gcf(ds, tmp_path / "b", cfg, seed=3, progress=False)
    assert [{k: v for k, v in h.items() if k != "seconds"} for h in resumed["history"]] == \
           [{k: v for k, v in h.items() if k != "seconds"} for h in straight["history"]]
    _same_embeddings(tmp_path / "a", tmp_path / "b")


def test_a_full_graph_step_evaluates_the_previous_model_as_a_separate_pass_would(tiny_dir, tmp_path):
    from coplctl.graph.train import TrainingData, _fit, _start

    cfg = _cfg()
    data = TrainingData.build(load(tiny_dir), torch.device("cpu"), torch.float32)
    run = _start(data, cfg, 0, tmp_path / "checkpoint.safetensors")
    seen = []  # the model is the epoch's own when its metrics are recorded
    _fit(run, data, cfg, saved_epoch=None, progress=False,
         on_epoch_end=lambda epoch, m: seen.append(((m["train_accuracy"], m["valid_accuracy"]), data.accuracy(run.model))))
    assert len(seen) == 6 and all(recorded == separate for recorded, separate in seen)


def test_graph_train_command(tiny_dir, tmp_path, capsys):
    from coplctl.cli import main

    argv = ["graph", "train", "--data", str(tiny_dir), "--out", str(tmp_path / "run"), "--dim", "8",
            "--layers", "2", "--epochs", "3"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "valid acc" in out and "train acc" in out
    assert main(argv) == 1
    assert "already holds a trained model" in capsys.readouterr().err


def test_gcf_learns_group_preferences_a_global_model_cannot(tmp_path):
    """On controversial pairs a non-personalized ranking is a coin flip; GCF knows each user's group."""
    from conftest import small_protocol

    from coplctl.data.simulate import SimConfig, simulate

    ds = simulate(SimConfig(protocol=small_protocol(users=1000, unseen_users=4, survey_pairs=1500), seed=1))
    m = train_gcf(ds, tmp_path / "run", preset_config("cpu", dim=16, epochs=150, patience=20), progress=False)
    assert m["valid_accuracy"] > 0.85
    assert m["group_probe"] > 0.9  # the user embeddings carry the groups (what the MoLE gates route on)
    from coplctl.graph.probe import group_probe
    from coplctl.graph.run import GCFRun

    run = GCFRun(tmp_path / "run")
    groups = ds.users.set_index("user_id")["group"].reindex(run.graph.user_ids).to_numpy()
    shuffled = pd.Series(groups).sample(frac=1.0, random_state=0).to_numpy()
    assert 0.35 < group_probe(run.exported_user_emb.numpy(), shuffled) < 0.65  # random labels: chance
    g = PreferenceGraph.from_dataset(ds)
    u, c, r, _ = g.index_pairs(ds.split("train"))
    s = torch.zeros(g.num_responses, requires_grad=True)  # one global score per response
    opt = torch.optim.Adam([s], lr=0.05)
    for _ in range(200):
        loss = -torch.nn.functional.logsigmoid(s[c] - s[r]).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    valid = ds.split("valid")
    vu, vc, vr, ok = g.index_pairs(valid[valid["controversial"]])
    assert float((s[vc[ok]] > s[vr[ok]]).float().mean()) < 0.6


def test_interrupt_in_the_middle_of_an_epoch_resumes_from_the_last_boundary(tiny_dir, tmp_path, monkeypatch):
    import coplctl.graph.train as gt

    ds = load(tiny_dir)
    cfg = _cfg(batch_size=210)  # 840 training pairs: 4 steps per epoch
    straight = train_gcf(ds, tmp_path / "a", cfg, seed=3, progress=False)
    monkeypatch.setattr(gt, "CHECKPOINT_SECONDS", 0)  # checkpoint at every epoch boundary
    calls, real = [], gt.pair_loss

    def ctrl_c_in_epoch_four(*args):
        calls.append(1)
        if len(calls) == 14:  # epoch 4, second step: half-updated weights must not be saved
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(gt, "pair_loss", ctrl_c_in_epoch_four)
    with pytest.raises(CoplError, match="resume after epoch 3"):
        train_gcf(ds, tmp_path / "b", cfg, seed=3, progress=False)
    monkeypatch.setattr(gt, "pair_loss", real)
    resumed = train_gcf(ds, tmp_path / "b", cfg, seed=3, progress=False)
    assert [h["loss"] for h in resumed["history"]] == [h["loss"] for h in straight["history"]]
    a = load_file(str(tmp_path / "a" / "embeddings.safetensors"))
    b = load_file(str(tmp_path / "b" / "embeddings.safetensors"))
    assert torch.equal(a["users"], b["users"])


def test_lightgcn_variant_is_signed_propagation_averaged_over_layers():
    g = PreferenceGraph.from_pairs(PAIRS)
    torch.manual_seed(0)
    model = GCF(g.num_users, g.num_responses, dim=4, layers=2, variant="lightgcn").double()
    assert not [p for n, p in model.named_parameters() if not n.startswith(("users", "responses"))]
    adj = g.adjacency(dtype=torch.double)
    dense = {k: getattr(adj, k).to_dense() for k in ("pos_ur", "neg_ur", "pos_ru", "neg_ru")}
    e_u, e_r = model.users.weight, model.responses.weight
    layers_u, layers_r = [e_u], [e_r]
    for _ in range(2):
        e_u, e_r = dense["pos_ur"] @ e_r - dense["neg_ur"] @ e_r, dense["pos_ru"] @ e_u - dense["neg_ru"] @ e_u
        layers_u.append(e_u)
        layers_r.append(e_r)
    out_u, out_r = model(adj)
    torch.testing.assert_close(out_u, torch.stack(layers_u).mean(0))
    torch.testing.assert_close(out_r, torch.stack(layers_r).mean(0))


def test_adjacency_without_edges_is_renormalised():
    g = PreferenceGraph.from_pairs(PAIRS)
    u = torch.tensor([g.user_index["u0"]])
    a, b = torch.tensor([g.response_index["a"]]), torch.tensor([g.response_index["b"]])
    adj = g.adjacency(without=(g.edge_ids(u, a, "pos"), g.edge_ids(u, b, "neg")))
    pos = adj.pos_ur.to_dense()
    assert pos[g.user_index["u0"]].abs().sum() == 0  # u0's positive edge to a is gone
    assert pos[g.user_index["u1"], g.response_index["a"]] == pytest.approx(1.0)  # |N+(u1)| = |N+(a)| = 1 now
    neg = adj.neg_ur.to_dense()
    assert neg[g.user_index["u0"], g.response_index["b"]] == 0
    assert neg[g.user_index["u0"], g.response_index["c"]] == pytest.approx(1 / math.sqrt(1 * 1))


def test_holdout_training_runs_and_is_reproducible(tiny_dir, tmp_path):
    ds = load(tiny_dir)
    cfg = preset_config("cpu", dim=8, layers=2, epochs=4, holdout=0.5)
    a = train_gcf(ds, tmp_path / "a", cfg, progress=False)
    b = train_gcf(ds, tmp_path / "b", cfg, progress=False)
    assert len(a["history"]) == 4
    assert [h["loss"] for h in a["history"]] == [h["loss"] for h in b["history"]]  # the held pairs: seeded


class _Boom:
    def __reduce__(self):  # unpickling this would create the marker file
        import os
        return (os.system, (f"touch {os.environ['COPLCTL_PWNED']}",))


@pytest.mark.parametrize("name", ["checkpoint.pt", "checkpoint.safetensors"])
def test_a_crafted_pickle_checkpoint_is_never_executed(tiny_dir, tmp_path, monkeypatch, name):
    marker = tmp_path / "pwned"
    monkeypatch.setenv("COPLCTL_PWNED", str(marker))
    run = tmp_path / "run"
    run.mkdir()
    torch.save({"config": {}, "evil": _Boom()}, run / name)  # a pickle, as torch.save writes
    cfg = _cfg()
    if name == "checkpoint.pt":  # an old-style checkpoint is ignored (with a warning) and training starts over
        with pytest.warns(UserWarning, match="is ignored: a pickle .* is never loaded; training starts"):
            m = train_gcf(load(tiny_dir), run, cfg, progress=False)
        assert m["epochs_run"] == 6 and (run / name).exists()  # left where it was, never read
    else:  # a pickle under the new name is not a safetensors file: one clear error
        with pytest.raises(CoplError, match="not a readable checkpoint"):
            train_gcf(load(tiny_dir), run, cfg, progress=False)
    assert not marker.exists()


def test_checkpoint_round_trip_keeps_containers_and_tensors(tmp_path):
    from coplctl.core.checkpoint import load_checkpoint, save_checkpoint

    obj = {"state": {0: {"step": torch.tensor(3.0), "m": torch.arange(4)}}, "groups": [{"betas": (0.9, 0.99)}],
           "gen": torch.Generator().manual_seed(1).get_state(), "$tensor": "not a tag", "x": None, "f": 1.5}
    save_checkpoint(tmp_path / "c.safetensors", obj)
    back = load_checkpoint(tmp_path / "c.safetensors")
    assert back["groups"] == [{"betas": (0.9, 0.99)}] and back["$tensor"] == "not a tag" and back["f"] == 1.5
    assert torch.equal(back["state"][0]["m"], torch.arange(4)) and back["state"][0]["step"].item() == 3.0
    assert torch.equal(back["gen"], obj["gen"])
    (tmp_path / "c.safetensors").write_bytes(b"\x10\x00")  # truncated
    with pytest.raises(CoplError, match="not a readable checkpoint"):
        load_checkpoint(tmp_path / "c.safetensors")


def test_a_checkpoint_temporary_left_by_a_killed_run_is_swept_at_the_end(tiny_dir, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    dead = run / ".checkpoint.safetensors.tmp-99999999-abc123"  # no process has this pid
    dead.write_bytes(b"half a checkpoint")
    train_gcf(load(tiny_dir), run, _cfg(), progress=False)
    assert not dead.exists() and not [p for p in run.iterdir() if ".tmp-" in p.name]


@pytest.mark.parametrize("variant", ["paper", "official", "lightgcn"])
def test_layers_are_pyg_message_passing_fused_into_the_csr_product(variant):
    """PyG's propagate() on a layer's EdgeIndex routes to the fused CSR product and gives what PyG's
    per-edge path gives; CoPL's memory-lean layers multiply by the same CSR matrices directly."""
    from torch_geometric.nn import LGConv, MessagePassing

    from coplctl.graph.model import _signed

    g = PreferenceGraph.from_pairs(PAIRS)
    torch.manual_seed(0)
    model = GCF(g.num_users, g.num_responses, dim=4, layers=2, variant=variant, init_std=0.5).double()
    assert all(isinstance(layer, LGConv if variant == "lightgcn" else MessagePassing) for layer in model.layers)
    fused, per_edge = [], []
    for layer in model.layers:
        layer.register_message_and_aggregate_forward_hook(lambda *args: fused.append(1))
        layer.register_message_forward_hook(lambda *args: per_edge.append(1))
    adj = g.adjacency(dtype=torch.double)
    e_u, e_r = model.users.weight, model.responses.weight
    layer = model.layers[0]
    with torch.no_grad():
        messages = layer.signed(e_u, e_r, adj)
        assert len(fused) == 4 and not per_edge  # propagate() on the EdgeIndex routes to the CSR product
        for direct, through_pyg in zip(_signed(adj, e_u, e_r), messages):
            torch.testing.assert_close(direct, through_pyg)
        layer.fuse = False  # PyG's unfused path: message() per edge, then a sum per receiver
        for per, through_pyg in zip(layer.signed(e_u, e_r, adj), messages):
            torch.testing.assert_close(per, through_pyg)
        assert len(per_edge) == 4
        layer.fuse = True
    if variant == "lightgcn":
        fused.clear()
        out_u, _ = model(adj)
        assert len(fused) == 2 * 4 and out_u.shape == e_u.shape


def test_edge_dropout_draws_from_the_run_generator_only():
    g = PreferenceGraph.from_pairs(PAIRS)
    torch.manual_seed(11)
    before = torch.get_rng_state()
    gen = torch.Generator().manual_seed(4)
    adj = g.adjacency(edge_dropout=0.5, generator=gen)
    assert torch.equal(torch.get_rng_state(), before)  # the global stream is left as it was
    same = torch.Generator().manual_seed(4)
    keep_p = torch.rand(g.pos.shape[1], generator=same) >= 0.5  # what the generator's own draws would keep
    keep_n = torch.rand(g.neg.shape[1], generator=same) >= 0.5
    assert torch.equal(gen.get_state(), same.get_state())  # ... and the generator advanced by exactly those draws
    kept = {tuple(e) for e in adj.pos_ur.edge_index.flip(0).T.tolist()}
    assert kept == {tuple(e) for e in g.pos[:, keep_p].T.tolist()}
    assert adj.neg_ur.edge_index.shape[1] == int(keep_n.sum())
    torch.testing.assert_close(adj.pos_ur.weight, g.weights[0][keep_p] / 0.5)


def test_resume_with_edge_dropout_gives_the_same_model(tiny_dir, tmp_path):
    ds = load(tiny_dir)
    cfg = _cfg(batch_size=300, edge_dropout=0.2)
    straight = train_gcf(ds, tmp_path / "a", cfg, seed=3, progress=False)

    def interrupt(epoch, metrics):
        if epoch == 2:
            raise KeyboardInterrupt

    with pytest.raises(CoplError, match="resume after epoch 2"):
        train_gcf(ds, tmp_path / "b", cfg, seed=3, progress=False, on_epoch_end=interrupt)
    torch.manual_seed(123)  # whatever the global random state, the run's own stream decides the dropped edges
    resumed = train_gcf(ds, tmp_path / "b", cfg, seed=3, progress=False)
    assert [h["loss"] for h in resumed["history"]] == [h["loss"] for h in straight["history"]]
    a = load_file(str(tmp_path / "a" / "embeddings.safetensors"))
    b = load_file(str(tmp_path / "b" / "embeddings.safetensors"))
    assert torch.equal(a["users"], b["users"]) and torch.equal(a["responses"], b["responses"])


def test_selecting_on_personal_valid_pairs_scores_only_those_against_the_majority(tiny_dir, tmp_path):
    from coplctl.data.signal import against_majority

    ds = load(tiny_dir)
    every = train_gcf(ds, tmp_path / "all", _cfg(), progress=False)
    mine = train_gcf(ds, tmp_path / "personal", _cfg(select_on="personal"), progress=False)
    personal = int(against_majority(ds.split("valid"), ds.split("train")).sum())
    assert 20 <= personal < every["valid_pairs_scored"]
    assert mine["valid_pairs_scored"] <= personal  # those inside the graph
