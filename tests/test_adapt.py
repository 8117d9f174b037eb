"""Unseen-user adaptation and user files."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open

from coplctl.adapt import AdaptConfig, adapt_users, graph_accuracy
from coplctl.cli import main
from coplctl.data import load
from coplctl.data.userfile import read_user_file
from coplctl.errors import CoplError, DataError
from coplctl.graph.run import GCFRun
from coplctl.graph.train import preset_config, train_gcf


@pytest.fixture(scope="module")
def run(tiny_dir, tmp_path_factory):
    path = tmp_path_factory.mktemp("gcf") / "run"
    train_gcf(load(tiny_dir), path, preset_config("cpu", dim=8, layers=2, epochs=15), progress=False)
    return GCFRun(path)


def _manual_neighbours(run, chosen_ids):
    g = run.graph
    chosen = {g.response_index[c] for c in chosen_ids}
    return sorted({u for u, r in g.pos.T.tolist() if r in chosen})


def test_weighted_matches_the_formula(run, tiny_dir):
    ds = load(tiny_dir)
    uid = ds.user_ids("unseen")[0]
    pairs = ds.split("fewshot")
    pairs = pairs[pairs["user_id"] == uid]
    known = pairs["chosen_id"].isin(run.graph.response_index) & pairs["rejected_id"].isin(run.graph.response_index)
    got = adapt_users(run, pairs)
    assert got.report["per_user"][uid]["pairs_outside_graph"] == int((~known).sum())
    pairs = pairs[known]
    nb = torch.tensor(_manual_neighbours(run, pairs["chosen_id"]))
    assert got.report["per_user"][uid]["neighbours"] == len(nb) > 0
    g = run.graph
    a = torch.tensor([g.response_index[x] for x in pairs["chosen_id"]])
    b = torch.tensor([g.response_index[x] for x in pairs["rejected_id"]])
    gamma = torch.stack([F.logsigmoid((run.user_emb[u] * (run.response_emb[a] - run.response_emb[b])).sum(-1)).sum()
                         for u in nb])
    w = torch.softmax(gamma / 0.07, 0)
    torch.testing.assert_close(got.embeddings[0], w @ run.exported_user_emb[nb])
    naive = adapt_users(run, pairs, AdaptConfig(method="average"))
    torch.testing.assert_close(naive.embeddings[0], run.exported_user_emb[nb].mean(0))


def test_four_hops_reach_more_users(run, tiny_dir):
    ds = load(tiny_dir)
    pairs = ds.split("fewshot")
    two = adapt_users(run, pairs, AdaptConfig(hops=2)).report["per_user"]
    four = adapt_users(run, pairs, AdaptConfig(hops=4)).report["per_user"]
    assert all(four[u]["neighbours"] >= two[u]["neighbours"] for u in two)
    assert sum(v["neighbours"] for v in four.values()) > sum(v["neighbours"] for v in two.values())
    with pytest.raises(CoplError, match="even number"):
        AdaptConfig(hops=3)


def test_no_neighbour_falls_back_explicitly(run):
    g = run.graph
    never_chosen = sorted(set(range(g.num_responses)) - set(g.pos[1].tolist()))
    assert never_chosen, "the fixture should have a response nobody chose"
    lonely = g.response_ids[never_chosen[0]]
    other = next(r for r in g.response_ids if r != lonely)
    pairs = pd.DataFrame({"user_id": ["new"], "chosen_id": [lonely], "rejected_id": [other]})
    got = adapt_users(run, pairs)
    assert got.report["fallback_users"] == 1 and got.report["per_user"]["new"]["fallback"] is True
    assert got.report["per_user"]["new"]["neighbours"] == 0
    delta = run.response_emb[g.response_index[lonely]] - run.response_emb[g.response_index[other]]
    w = torch.softmax(F.logsigmoid(run.user_emb @ delta) / 0.07, 0)
    torch.testing.assert_close(got.embeddings[0], w @ run.exported_user_emb)
    assert got.embeddings[0].abs().sum() > 0


def test_user_optimisation_fits_its_pairs(run, tiny_dir):
    ds = load(tiny_dir)
    pairs = ds.split("fewshot")
    got = adapt_users(run, pairs, AdaptConfig(method="optimize", steps=200))
    acc, n = graph_accuracy(run, got, pairs)
    start = adapt_users(run, pairs, AdaptConfig(method="optimize", steps=0))  # the starting point: mean user
    acc0, _ = graph_accuracy(run, start, pairs)
    assert n == got.report["pairs"] > 0 and acc > max(acc0, 0.6)
    held_out, scored = graph_accuracy(run, got, ds.split("valid"))
    assert scored > 0 and 0 <= held_out <= 1


def _responses(run):
    return run.responses


def _write(tmp_path, lines):
    f = tmp_path / "users.jsonl"
    f.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    return f


def test_user_file_resolves_ids_and_texts(run, tmp_path):
    r = run.responses
    same_prompt = r[r["prompt"] == r["prompt"].value_counts().index[0]].index[:2]
    i, j = int(same_prompt[0]), int(same_prompt[1])
    f = _write(tmp_path, [
        {"user": "alice", "chosen": r.response_id[0], "rejected": r.response_id[1]},
        {"user": "alice", "chosen": r.text[i], "rejected": r.text[j], "prompt": r.prompt[i]},
        {"user": 7, "chosen": r.response_id[4], "rejected": r.text[5]},
    ])
    uf = read_user_file(f, r)
    assert uf.pairs[["user_id", "chosen_id", "rejected_id"]].values.tolist() == [
        ["alice", r.response_id[0], r.response_id[1]], ["alice", r.response_id[i], r.response_id[j]],
        ["7", r.response_id[4], r.response_id[5]]]


@pytest.mark.parametrize("bad, message", [
    ("{not json", "line 2: invalid JSON"),
    ({"user": "bob", "chosen": "r-nope", "rejected": "R1"}, "line 2: chosen is neither a known response id"),
    ({"user": "bob", "chosen": "R1", "rejected": "R1"}, "line 2: chosen and rejected are the same response"),
    ({"user": "bob", "chosen": "R1"}, "line 2: missing field rejected"),
    ({"user": "alice", "chosen": "R1", "rejected": "R0"}, "line 2: repeats the pair of line 1"),
])
def test_user_file_errors_name_the_line(run, tmp_path, bad, message):
    r = run.responses
    fix = lambda x: json.loads(json.dumps(x).replace('"R0"', json.dumps(r.response_id[0]))  # noqa: E731
                               .replace('"R1"', json.dumps(r.response_id[1]))) if isinstance(x, dict) else x
    f = _write(tmp_path, [{"user": "alice", "chosen": r.response_id[0], "rejected": r.response_id[1]}, fix(bad)])
    with pytest.raises(DataError, match=message):
        read_user_file(f, r)
    uf = read_user_file(f, r, skip_invalid=True)
    assert len(uf.pairs) == 1 and uf.skipped_lines[0]["line"] == 2


def test_user_without_usable_pair(run, tmp_path):
    r = run.responses
    f = _write(tmp_path, [{"user": "alice", "chosen": r.response_id[0], "rejected": r.response_id[1]},
                          {"user": "carol", "chosen": "unknown text", "rejected": r.response_id[1]}])
    with pytest.raises(DataError, match="line 2: chosen is neither"):
        read_user_file(f, r)
    uf = read_user_file(f, r, skip_invalid=True)
    assert uf.skipped_users == [{"user": "carol", "lines": [2], "reason": "no usable pair"}]


def test_adapt_command_writes_embeddings_and_summary(run, tiny_dir, tmp_path, capsys):
    ds = load(tiny_dir)
    fs = ds.split("fewshot")
    fs = fs[fs["chosen_id"].isin(run.graph.response_index) & fs["rejected_id"].isin(run.graph.response_index)]
    lines = [{"user": u, "chosen": c, "rejected": rj} for u, c, rj in zip(fs.user_id, fs.chosen_id, fs.rejected_id)]
    f = _write(tmp_path, [*lines, "{broken"])
    out = tmp_path / "adapted"
    argv = ["adapt", "--model", str(run.path), "--user-file", str(f), "--out", str(out)]
    assert main(argv) == 1
    assert f"{f} line {len(lines) + 1}: invalid JSON" in capsys.readouterr().err
    assert not out.exists()
    assert main([*argv, "--skip-invalid"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["users"] == 8 and summary["pairs_unusable"] == 1 and summary["method"] == "weighted"
    with safe_open(str(out / "embeddings.safetensors"), "pt") as fh:
        assert json.loads(fh.metadata()["user_ids"]) == ds.user_ids("unseen")
        assert fh.get_tensor("embeddings").shape == (8, 8)


def test_plot_embeddings_with_adapted_users(run, tiny_dir, tmp_path):
    from PIL import Image

    out = tmp_path / "adapted"
    assert main(["adapt", "--model", str(run.path), "--data", str(tiny_dir), "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["held_out_pairs"] > 0 and 0 <= summary["held_out_graph_accuracy"] <= 1
    png = tmp_path / "fig.png"
    assert main(["plot", "embeddings", str(run.path), "--adapted", str(out), "--out", str(png)]) == 0
    with Image.open(png) as im:
        assert im.format == "PNG" and im.size[0] > 300
