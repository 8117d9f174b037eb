"""New users from any text: pairs on responses outside the run, placed by nearest graph responses (CoPL) or
scored by the backbone (baselines); --in-graph-only keeps the paper's behaviour."""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest
import torch

from coplctl.cli import main
from coplctl.copl.adapt import AdaptConfig, adapt_users
from coplctl.copl.method import CoPL
from coplctl.copl.placement import TEMPERATURE, Placement, nearest, place, ridge_map
from coplctl.core.errors import DataError
from coplctl.data import load
from coplctl.data.userfile import read_user_file
from coplctl.graph.run import GCFRun
from coplctl.models.reward import load_method


@pytest.fixture(scope="module")
def runs(micro_dir, tmp_path_factory):
    """A saved frozen-mode CoPL run (with its gcf/) and a saved I2E run on the micro dataset."""
    from coplctl.baselines.i2e import I2E

    root = tmp_path_factory.mktemp("runs")
    ds = load(micro_dir)
    copl = CoPL(gcf_overrides={"dim": 8, "epochs": 20}, epochs=1)
    copl.fit(ds, work_dir=root / "work", progress=False)
    copl.save(root / "copl")
    i2e = I2E(epochs=1, adapt_steps=5)
    i2e.fit(ds, backbone=copl.backbone, progress=False)
    i2e.save(root / "i2e")
    return root, ds


def _rephrased_lines(ds, users=("alice", "bob")):
    """The unseen users' few-shot preferences, each response rephrased: texts no run knows, with prompts."""
    fs = ds.split("fewshot")
    r = ds.responses.set_index("response_id")
    unseen = list(dict.fromkeys(fs["user_id"]))
    lines = []
    for new, old in zip(users, unseen):
        for c, rj in zip(*fs[fs["user_id"] == old][["chosen_id", "rejected_id"]].to_numpy().T):
            lines.append({"user": new, "prompt": r.prompt[c], "chosen": r.text[c] + " In short, that is it.",
                          "rejected": r.text[rj] + " In short, that is it."})
    return lines


def _write(path, lines):
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


def _one_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.startswith("error: "), err
    return " ".join(err.split())


def test_nearest_is_cosine_knn_with_ties_by_index():
    g = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 0.0], [1.0, 1.0], [-1.0, 0.0]])
    x = torch.tensor([[1.0, 0.1], [0.0, -1.0]])
    idx, w = nearest(g, x, 3)
    assert idx[0].tolist() == [0, 2, 3]  # rows 0 and 2 tie (same direction): the lower index first
    assert idx.tolist() == nearest(g, x, 3)[0].tolist()  # deterministic
    sim = torch.nn.functional.cosine_similarity(x[0:1], g[idx[0]])
    torch.testing.assert_close(w[0], torch.softmax(sim / TEMPERATURE, 0))
    torch.testing.assert_close(w.sum(1), torch.ones(2))
    assert nearest(g, x, 99)[0].shape == (2, 5)  # never more neighbours than graph responses


def test_ridge_map_recovers_a_linear_map():
    gen = torch.Generator().manual_seed(0)
    x, w = torch.randn(200, 6, generator=gen), torch.randn(6, 3, generator=gen)
    torch.testing.assert_close(ridge_map(x, x @ w, ridge=1e-8), w, rtol=1e-4, atol=1e-4)
    assert ridge_map(x, x @ w, ridge=10.0).norm() < w.norm()  # shrunk towards 0


def test_a_rephrased_graph_response_is_placed_at_its_original(runs):
    root, ds = runs
    method = load_method(root / "copl")
    run = GCFRun(method.gcf_dir)
    lines = _rephrased_lines(ds)
    uf = read_user_file(_write(root / "rephrased.jsonl", lines), method.responses, new_responses=True)
    placement = place(method.backbone, run, uf.pairs, uf.new_responses, 8)
    assert sorted(placement.ids) == sorted(uf.new_responses["response_id"]) and placement.k == 8
    original = {rid: method.responses.response_id[(method.responses.prompt == p)
                                                  & (method.responses.text + " In short, that is it." == t)].iloc[0]
                for rid, p, t in uf.new_responses[["response_id", "prompt", "text"]].itertuples(index=False)}
    top = [run.graph.response_ids[i] for i in placement.nearest[:, 0].tolist()]
    in_graph = [original[rid] in run.graph.response_index for rid in placement.ids]
    assert sum(in_graph) > 10
    assert all(t == original[rid] for t, rid, ok in zip(top, placement.ids, in_graph) if ok)
    assert (placement.weights[:, 0] > 0.5).float().mean() > 0.5  # the original mostly takes its place alone
    assert placement.emb.shape == (len(placement.ids), run.response_emb.shape[1])
    assert torch.isfinite(placement.emb).all()
    # ridge embeddings keep the direction of the originals' differences within each pair
    at = {rid: i for i, rid in enumerate(placement.ids)}
    pairs = [(at[c], at[r]) for c, r in zip(uf.pairs.chosen_id, uf.pairs.rejected_id)
             if original[c] in run.graph.response_index and original[r] in run.graph.response_index]
    node = [[run.graph.response_index[original[placement.ids[i]]] for i in p] for p in pairs]
    got = torch.stack([placement.emb[a] - placement.emb[b] for a, b in pairs])
    true = torch.stack([run.response_emb[a] - run.response_emb[b] for a, b in node])
    assert torch.nn.functional.cosine_similarity(got, true).mean() > 0.5
    neighbours = place(method.backbone, run, uf.pairs, uf.new_responses, 8, embedding="neighbours")
    assert neighbours.emb is None and torch.equal(neighbours.nearest, placement.nearest)


def test_a_placed_pair_is_its_nearest_responses_pair(runs):
    """Placed at one neighbour, a response outside the graph adapts exactly as that graph response."""
    root, _ = runs
    run = GCFRun(root / "copl" / "gcf")
    g = run.graph
    by_prompt = run.responses.groupby("prompt", sort=True)["response_id"].apply(list)
    a, b = next(v for v in by_prompt if len(v) >= 2)[:2]
    placement = Placement(["new-x"], torch.tensor([[g.response_index[a]]]), torch.ones(1, 1), 1)  # neighbours
    placed = adapt_users(run, pd.DataFrame({"user_id": ["u"], "chosen_id": ["new-x"], "rejected_id": [b]}),
                         placement=placement)
    direct = adapt_users(run, pd.DataFrame({"user_id": ["u"], "chosen_id": [a], "rejected_id": [b]}))
    torch.testing.assert_close(placed.embeddings, direct.embeddings)
    assert placed.report["per_user"]["u"]["neighbours"] == direct.report["per_user"]["u"]["neighbours"] > 0
    assert (placed.report["pairs_in_graph"], placed.report["pairs_placed"], placed.report["pairs_outside_graph"]) \
        == (0, 1, 0)
    assert placed.report["placement"] == {"k": 1, "responses": 1}
    unplaced = adapt_users(run, pd.DataFrame({"user_id": ["u"], "chosen_id": ["new-x"], "rejected_id": [b]}))
    assert unplaced.report["pairs_outside_graph"] == 1 and unplaced.report["fallback_users"] == 1
    optimized = adapt_users(run, pd.DataFrame({"user_id": ["u"], "chosen_id": ["new-x"], "rejected_id": [b]}),
                            AdaptConfig(method="optimize", steps=5), placement=placement)
    assert optimized.report["pairs_placed"] == 1 and torch.isfinite(optimized.embeddings).all()


def test_copl_adapts_users_whose_responses_are_all_new_texts(runs, tmp_path, capsys):
    root, ds = runs
    lines = _rephrased_lines(ds)
    f = _write(tmp_path / "new.jsonl", lines)
    out = tmp_path / "plus"
    assert main(["adapt", "--model", str(root / "copl"), "--user-file", str(f), "--out", str(out), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary == json.loads((out / "summary.json").read_text())
    n, texts = len(lines), len({(x["prompt"], x[k]) for x in lines for k in ("chosen", "rejected")})
    assert (summary["pairs"], summary["pairs_in_graph"], summary["pairs_placed"], summary["pairs_outside_graph"]) \
        == (n, 0, n, 0)
    assert summary["new_responses"] == texts and summary["placement"] == {"k": 8, "responses": texts}
    assert summary["fallback_users"] == 0 and summary["in_graph_only"] is False
    assert {u: (p["pairs_placed"], p["pairs_in_graph"]) for u, p in summary["per_user"].items()} == {
        u: (sum(x["user"] == u for x in lines), 0) for u in ("alice", "bob")}
    method = load_method(out)
    table = method.net.user_table
    assert method.user_ids[-2:] == ["alice", "bob"] and torch.isfinite(table).all()
    assert not torch.equal(table[-1], table[-2])
    x = lines[0]
    assert main(["score", str(out), "--user", "alice", "--prompt", x["prompt"], "--response", x["chosen"]]) == 0
    assert math.isfinite(float(capsys.readouterr().out))
    again = tmp_path / "again"  # deterministic: the same file gives the same users
    assert main(["adapt", "--model", str(root / "copl"), "--user-file", str(f), "--out", str(again)]) == 0
    assert torch.equal(load_method(again).net.user_table, table)


def test_in_graph_only_reproduces_the_paper_adaptation(runs, micro_dir, tmp_path, capsys):
    root, ds = runs
    f = _write(tmp_path / "new.jsonl", _rephrased_lines(ds))
    argv = ["adapt", "--model", str(root / "copl"), "--out", str(tmp_path / "o")]
    assert main([*argv, "--user-file", str(f), "--in-graph-only"]) == 1  # new texts are refused, as before
    assert f"{f} line 1: chosen is neither the id nor the exact text of a response of this run" in _one_line(capsys)
    # the dataset's unseen users: their few-shot pairs outside the graph are dropped, or placed
    gcf = GCFRun(root / "copl" / "gcf")
    fs = ds.split("fewshot")
    outside = int((~(fs["chosen_id"].isin(gcf.graph.response_index)
                     & fs["rejected_id"].isin(gcf.graph.response_index))).sum())
    assert outside > 0, "the micro dataset should have few-shot pairs outside the graph"
    got = {}
    for flag in ([], ["--in-graph-only"]):
        out = tmp_path / f"data{len(flag)}"
        assert main(["adapt", "--model", str(root / "copl"), "--data", str(micro_dir), "--out", str(out), *flag]) == 0
        got[bool(flag)] = json.loads((out / "summary.json").read_text()), load_method(out)
    (paper, paper_run), (placed, _) = got[True], got[False]
    assert (paper["pairs_placed"], paper["pairs_outside_graph"], paper["placement"]) == (0, outside, None)
    assert (placed["pairs_placed"], placed["pairs_outside_graph"]) == (outside, 0)
    assert paper["pairs_in_graph"] == placed["pairs_in_graph"] == len(fs) - outside
    expected = adapt_users(gcf, fs, AdaptConfig())  # the adaptation without any placement
    torch.testing.assert_close(paper_run.net.user_table[-len(expected.user_ids):], expected.embeddings)
    assert json.loads((tmp_path / "data1" / "method.json").read_text())["config"]["place_k"] == 8  # run's own


def test_new_text_without_prompt_is_one_error_naming_file_and_line(runs, tmp_path, capsys):
    root, ds = runs
    lines = _rephrased_lines(ds)
    bad = {k: v for k, v in lines[1].items() if k != "prompt"}
    f = _write(tmp_path / "bad.jsonl", [lines[0], bad, *lines[2:]])
    out = tmp_path / "o"
    assert main(["adapt", "--model", str(root / "copl"), "--user-file", str(f), "--out", str(out)]) == 1
    assert _one_line(capsys) == (f"error: {f} line 2: chosen is neither the id nor the exact text of a response "
                                 f"of this run; to give a new response by its text, add the line's \"prompt\"")
    assert not out.exists()
    ghost = {**lines[0], "chosen": "r9999"}  # shaped like the run's ids: an unknown id, not a new text
    f = _write(tmp_path / "ghost.jsonl", [ghost])
    assert main(["adapt", "--model", str(root / "copl"), "--user-file", str(f), "--out", str(out)]) == 1
    assert f"{f} line 1: chosen is neither the id nor the exact text" in _one_line(capsys)


def test_user_file_makes_new_responses_of_the_lines_prompt(runs, tmp_path):
    _, ds = runs
    r = ds.responses
    p, q = r.prompt[0], r.prompt[2]
    f = _write(tmp_path / "u.jsonl", [
        {"user": "a", "prompt": p, "chosen": "brand new", "rejected": r.text[0]},  # a new text and a known one
        {"user": "a", "prompt": q, "chosen": "brand new", "rejected": r.text[0]},  # same texts, another prompt
        {"user": "b", "prompt": p, "chosen": "brand new", "rejected": r.response_id[0]},
    ])
    assert r.prompt[0] != q
    with pytest.raises(DataError, match="line 1: chosen is neither"):
        read_user_file(f, r)  # graph runs: no new responses
    uf = read_user_file(f, r, new_responses=True)
    new = uf.new_responses
    assert new["prompt"].tolist() == [p, q, q] and new["text"].tolist() == ["brand new"] * 2 + [r.text[0]]
    assert new["response_id"].str.startswith("new-").all() and new["response_id"].is_unique
    assert uf.pairs["chosen_id"].tolist() == [new.response_id[0], new.response_id[1], new.response_id[0]]
    # r.text[0] answers p as a known response, and q as a new one
    assert uf.pairs["rejected_id"].tolist() == [r.response_id[0], new.response_id[2], r.response_id[0]]
    assert read_user_file(f, r, new_responses=True).new_responses.equals(new)


def test_baselines_score_new_texts_with_the_backbone(runs, tmp_path, capsys):
    import coplctl

    root, ds = runs
    lines = _rephrased_lines(ds, users=("carol",))
    f = _write(tmp_path / "new.jsonl", lines)
    out = tmp_path / "i2e-plus"
    assert main(["adapt", "--model", str(root / "i2e"), "--user-file", str(f), "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["users"] == 1 and summary["pairs"] == len(lines) and summary["new_responses"] == 2 * len(lines)
    assert summary["in_graph_only"] is False
    capsys.readouterr()
    x = lines[0]
    assert main(["score", str(out), "--user", "carol", "--prompt", x["prompt"], "--response", x["chosen"]]) == 0
    assert math.isfinite(float(capsys.readouterr().out))
    rm = coplctl.load(root / "copl")  # the Python API takes new texts too
    report = rm.adapt([{**x, "user": "dora"}])
    assert report["pairs_placed"] == 1 and math.isfinite(float(rm.reward("dora", x["prompt"], x["chosen"])[0]))


def test_plain_backbone_switches_mole_layers_off_and_back():
    """lora-mode runs have MoLE layers inside the backbone: placement embeds with the plain one."""
    from torch import nn

    from coplctl.copl.mole import MoLELinear, inject_mole
    from coplctl.copl.placement import plain_backbone

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    base = [model[0], model[2]]
    x = torch.randn(3, 4)
    expected = model(x)
    inject_mole(model, ["0", "2"], 2, num_experts=2, rank=2)
    with pytest.raises(RuntimeError, match="without a user"):
        model(x)
    with plain_backbone(model):
        assert model[0] is base[0] and model[2] is base[1]
        torch.testing.assert_close(model(x), expected)
    assert isinstance(model[0], MoLELinear) and isinstance(model[2], MoLELinear)
