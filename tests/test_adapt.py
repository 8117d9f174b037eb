"""Unseen-user adaptation and user files."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open

from coplctl.cli import main
from coplctl.copl.adapt import AdaptConfig, Adapted, adapt_users, graph_accuracy
from coplctl.core.errors import CoplError, DataError
from coplctl.data import load
from coplctl.data.userfile import read_user_file
from coplctl.graph.config import preset_config
from coplctl.graph.run import GCFRun
from coplctl.graph.train import train_gcf


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


def test_official_variant_weights_as_the_authors_code(tiny_dir, tmp_path):
    """official runs: γ from L2-normalised user and raw response embeddings (as the authors' code scores),
    averaged over the user's pairs."""
    path = tmp_path / "official"
    train_gcf(load(tiny_dir), path, preset_config("official", dim=8, layers=2, epochs=15, batch_size=0,
                                                  lr=2e-2), progress=False)
    run = GCFRun(path)
    ds = load(tiny_dir)
    uid = ds.user_ids("unseen")[0]
    pairs = ds.split("fewshot")
    pairs = pairs[(pairs["user_id"] == uid) & pairs["chosen_id"].isin(run.graph.response_index)
                  & pairs["rejected_id"].isin(run.graph.response_index)]
    assert len(pairs) > 1
    got = adapt_users(run, pairs)
    nb = torch.tensor(_manual_neighbours(run, pairs["chosen_id"]))
    g = run.graph
    a = torch.tensor([g.response_index[x] for x in pairs["chosen_id"]])
    b = torch.tensor([g.response_index[x] for x in pairs["rejected_id"]])
    eu, er = F.normalize(run.user_emb, dim=-1), run.response_emb
    gamma = torch.stack([F.logsigmoid((eu[u] * (er[a] - er[b])).sum(-1)).mean() for u in nb])
    w = torch.softmax(gamma / 0.07, 0)
    torch.testing.assert_close(got.embeddings[0], w @ run.exported_user_emb[nb])
    summed = torch.stack([F.logsigmoid((run.user_emb[u] * (run.response_emb[a] - run.response_emb[b])).sum(-1)).sum()
                          for u in nb])  # the paper's γ gives other weights here
    assert not torch.allclose(torch.softmax(summed / 0.07, 0), w)


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
    mean = run.user_emb.mean(0).expand(len(got.user_ids), -1)  # the starting point: the mean user
    acc0, _ = graph_accuracy(run, Adapted(got.user_ids, run.export(mean), mean), pairs)
    assert n == got.report["pairs"] > 0 and acc > max(acc0, 0.6)
    held_out, scored = graph_accuracy(run, got, ds.split("valid"))
    assert scored > 0 and 0 <= held_out <= 1


def _write(tmp_path, lines):
    f = tmp_path / "users.jsonl"
    f.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    return f


def _prompt_pairs(r, n=3):
    """Row positions (i, j) of two responses to one prompt, for n different prompts."""
    groups = [list(v) for v in r.reset_index(drop=True).groupby("prompt", sort=True).indices.values() if len(v) >= 2]
    return [(int(g[0]), int(g[1])) for g in groups[:n]]


def test_user_file_resolves_ids_and_texts(run, tmp_path):
    r = run.responses
    (a, b), (i, j), (c, d) = _prompt_pairs(r)
    f = _write(tmp_path, [
        {"user": "alice", "chosen": r.response_id[a], "rejected": r.response_id[b]},
        {"user": "alice", "chosen": r.text[i], "rejected": r.text[j], "prompt": r.prompt[i]},
        {"user": 7, "chosen": r.response_id[c], "rejected": r.text[d]},
    ])
    uf = read_user_file(f, r)
    assert uf.pairs[["user_id", "chosen_id", "rejected_id"]].values.tolist() == [
        ["alice", r.response_id[a], r.response_id[b]], ["alice", r.response_id[i], r.response_id[j]],
        ["7", r.response_id[c], r.response_id[d]]]


@pytest.mark.parametrize("bad, message", [
    ("{not json", "line 2: invalid JSON"),
    ({"user": "bob", "chosen": "r-nope", "rejected": "R1"}, "line 2: chosen is neither the id nor the exact text of a response of this run"),
    ({"user": "bob", "chosen": "R1", "rejected": "R1"}, "line 2: chosen and rejected are the same response"),
    ({"user": "bob", "chosen": "R1"}, "line 2: missing field rejected"),
    ({"user": "alice", "chosen": "R1", "rejected": "R0"}, "line 2: repeats the pair of line 1"),
    ({"user": "bob", "chosen": "R1", "rejected": "R2"}, "line 2: chosen and rejected answer different prompts"),
])
def test_user_file_errors_name_the_line(run, tmp_path, bad, message):
    r = run.responses
    (a, b), (c, _), _ = _prompt_pairs(r)
    ids = {"R0": r.response_id[a], "R1": r.response_id[b], "R2": r.response_id[c]}
    fix = (lambda x: {k: ids.get(v, v) for k, v in x.items()}) if isinstance(bad, dict) else (lambda x: x)
    f = _write(tmp_path, [{"user": "alice", "chosen": ids["R0"], "rejected": ids["R1"]}, fix(bad)])
    with pytest.raises(DataError, match=message):
        read_user_file(f, r)
    uf = read_user_file(f, r, skip_invalid=True)
    assert len(uf.pairs) == 1 and uf.skipped_lines[0]["line"] == 2


def test_user_without_usable_pair(run, tmp_path):
    r = run.responses
    (a, b), *_ = _prompt_pairs(r)
    f = _write(tmp_path, [{"user": "alice", "chosen": r.response_id[a], "rejected": r.response_id[b]},
                          {"user": "carol", "chosen": "unknown text", "rejected": r.response_id[b]}])
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


# -- linear-time adaptation gives the straightforward per-user numbers -------------------------------------

def _reference(run, pairs, method, hops, temperature=0.07):
    """The definition, one user at a time with Python sets: k-hop neighbours, softmax(γ/κ) or plain mean."""
    g = run.graph
    chose = {}  # seen user -> responses chosen
    for u, r in g.pos.T.tolist():
        chose.setdefault(u, set()).add(r)
    chosen_by = {}
    for u, rs in chose.items():
        for r in rs:
            chosen_by.setdefault(r, set()).add(u)
    out_raw, out_emb, counts = [], [], []
    for uid in dict.fromkeys(pairs["user_id"]):
        mine = pairs[(pairs["user_id"] == uid) & pairs["chosen_id"].isin(g.response_index)
                     & pairs["rejected_id"].isin(g.response_index)]
        resp = {g.response_index[c] for c in mine["chosen_id"]}
        users = set()
        for step in range(hops // 2):
            users = set().union(*(chosen_by.get(r, set()) for r in resp))
            resp = set().union(*(chose.get(u, set()) for u in users))
        counts.append(len(users))
        nb = torch.tensor(sorted(users) or range(g.num_users))
        if method == "weighted":
            a = torch.tensor([g.response_index[x] for x in mine["chosen_id"]], dtype=torch.long)
            b = torch.tensor([g.response_index[x] for x in mine["rejected_id"]], dtype=torch.long)
            delta = run.response_emb[a] - run.response_emb[b]
            w = torch.softmax(F.logsigmoid(run.user_emb[nb] @ delta.T).sum(1) / temperature, 0)
        else:
            w = torch.full((len(nb),), 1.0 / len(nb))
        out_raw.append(w @ run.user_emb[nb])
        out_emb.append(w @ run.exported_user_emb[nb])
    return torch.stack(out_raw), torch.stack(out_emb), counts


def _mixed_pairs(run, tiny_dir):
    """Unseen users' pairs in shuffled order, plus a user nobody shares a choice with (fallback) and a user
    whose only pair is outside the graph."""
    g = run.graph
    pairs = load(tiny_dir).split("fewshot")[["user_id", "chosen_id", "rejected_id"]]
    lonely = g.response_ids[sorted(set(range(g.num_responses)) - set(g.pos[1].tolist()))[0]]
    extra = pd.DataFrame({"user_id": ["lonely", "outside", "lonely"],
                          "chosen_id": [lonely, "not-a-response", lonely],
                          "rejected_id": [g.response_ids[0], g.response_ids[1], g.response_ids[2]]})
    return pd.concat([pairs.sample(frac=1, random_state=3), extra], ignore_index=True)


@pytest.mark.parametrize("method", ["weighted", "average"])
@pytest.mark.parametrize("hops", [2, 4])
def test_vectorised_adaptation_matches_the_per_user_reference(run, tiny_dir, method, hops):
    pairs = _mixed_pairs(run, tiny_dir)
    got = adapt_users(run, pairs, AdaptConfig(method=method, hops=hops))
    raw, emb, counts = _reference(run, pairs, method, hops)
    assert got.user_ids == list(dict.fromkeys(pairs["user_id"]))
    assert [got.report["per_user"][u]["neighbours"] for u in got.user_ids] == counts
    assert got.report["fallback_users"] == counts.count(0) == 2  # "lonely" and "outside"
    assert got.report["per_user"]["outside"] == {"pairs_used": 0, "pairs_in_graph": 0, "pairs_placed": 0,
                                                 "pairs_outside_graph": 1, "neighbours": 0, "fallback": True}
    torch.testing.assert_close(got.raw, raw, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.embeddings, emb, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("settings", [
    {"USER_BLOCK": 3, "CHUNK_ELEMENTS": 1},  # blocks of 3 users, one user per padded batch
    {"BITMAP_LIMIT": 0},  # neighbours by sorted keys only
    {"BITMAP_SPARSITY": 10 ** 9},  # neighbours by bitmaps only
])
def test_blocks_chunks_and_neighbour_search_do_not_change_the_numbers(run, tiny_dir, monkeypatch, settings):
    import coplctl.copl.adapt as adapt_module

    pairs = _mixed_pairs(run, tiny_dir)
    for hops in (2, 4):
        whole = adapt_users(run, pairs, AdaptConfig(hops=hops))
        with monkeypatch.context() as m:
            for name, value in settings.items():
                m.setattr(adapt_module, name, value)
            other = adapt_users(run, pairs, AdaptConfig(hops=hops))
        assert other.report == whole.report
        torch.testing.assert_close(other.embeddings, whole.embeddings, rtol=1e-5, atol=1e-6)  # float sums


def test_adaptation_prints_no_sparse_warnings(run, tiny_dir):
    import warnings

    always = torch._C._get_warnAlways()
    torch._C._set_warnAlways(True)  # torch's own warnings otherwise fire once per process
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            adapt_users(run, load(tiny_dir).split("fewshot"), AdaptConfig(hops=4))
    finally:
        torch._C._set_warnAlways(always)
    assert not [str(w.message) for w in caught if "parse" in str(w.message)]


@pytest.mark.parametrize("bad, message", [
    ({"temperature": float("nan")}, "temperature: expected a finite number"),
    ({"temperature": 0.0}, "temperature: 0.0 is out of range"),
    ({"temperature": -1}, "temperature: -1.0 is out of range"),
    ({"hops": 3}, "hops: 3 is odd"),
    ({"hops": 0}, "hops: 0 is out of range"),
    ({"hops": "abc"}, "hops: expected a whole number"),
    ({"steps": 0}, "steps: 0 is out of range"),
    ({"lr": 0}, "lr: 0.0 is out of range"),
    ({"lr": float("inf")}, "lr: expected a finite number"),
    ({"l2": -1e-3}, "l2: -0.001 is out of range"),
    ({"method": "magic"}, "method: unknown 'magic'"),
])
def test_adapt_config_rejects_bad_values(bad, message):
    with pytest.raises(CoplError, match=f"adapt option {message}"):
        AdaptConfig(**bad)
    assert AdaptConfig(temperature=1, hops=4, l2=0).temperature == 1.0


# -- the command: inputs are never replaced, seen users never overwritten, one line per problem -------------

def _graph_lines(run, users=("zoe", "yan"), per_user=3):
    """Valid user-file lines: pairs of graph responses to one prompt."""
    r = run.responses
    by_prompt = [v for v in r.groupby("prompt", sort=True)["response_id"].apply(list) if len(v) >= 2]
    return [{"user": u, "chosen": by_prompt[i * per_user + k][0], "rejected": by_prompt[i * per_user + k][1]}
            for i, u in enumerate(users) for k in range(per_user)]


def _one_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.startswith("error: ")
    return " ".join(err.split())


def test_out_may_not_be_or_hold_an_input(run, tiny_dir, tmp_path, capsys):
    import shutil

    model = tmp_path / "gcf"
    shutil.copytree(run.path, model)
    f = _write(tmp_path, _graph_lines(run))
    before = sorted(p.name for p in model.iterdir())
    cases = [
        (["--model", str(model), "--user-file", str(f), "--out", str(model)], f"--out {model} is the model run"),
        (["--model", str(model), "--user-file", str(f), "--out", str(model / "sub")], "is inside the model run"),
        (["--model", str(model), "--user-file", str(f), "--out", str(tmp_path)], "contains the model run"),
        (["--model", str(model) + "/.", "--user-file", str(f), "--out", str(model)], "is the model run"),
        (["--model", str(model), "--user-file", str(f), "--out", str(f)], f"--out {f} is the user file"),
        (["--model", str(model), "--data", str(tiny_dir), "--out", str(tiny_dir)], "is the dataset"),
        (["--model", str(model), "--data", str(tiny_dir), "--out", str(tiny_dir / "x")], "is inside the dataset"),
    ]
    for argv, message in cases:
        assert main(["adapt", *argv, "--force"]) == 1
        line = _one_line(capsys)
        assert message in line and "choose another --out" in line, line
    assert sorted(p.name for p in model.iterdir()) == before and f.exists()
    assert (tiny_dir / "meta.json").exists() and not (tiny_dir / "x").exists()


def test_embeddings_file_gets_the_usual_permissions(run, tmp_path):
    import os
    import stat

    f = _write(tmp_path, _graph_lines(run))
    old = os.umask(0o022)
    try:
        assert main(["adapt", "--model", str(run.path), "--user-file", str(f), "--out", str(tmp_path / "o")]) == 0
    finally:
        os.umask(old)
    for name in ("embeddings.safetensors", "summary.json"):
        assert stat.S_IMODE((tmp_path / "o" / name).stat().st_mode) == 0o644, name


def test_seen_users_are_not_replaced(run, tmp_path, capsys):
    seen = run.graph.user_ids[3]
    lines = _graph_lines(run)
    f = _write(tmp_path, [*lines, {**lines[0], "user": seen}])
    argv = ["adapt", "--model", str(run.path), "--user-file", str(f), "--out", str(tmp_path / "o")]
    assert main(argv) == 1
    assert _one_line(capsys) == (f"error: {f} line {len(lines) + 1}: user {seen!r} is a seen user of the run; "
                                 f"adapt gives new users only, pick another id")
    assert main([*argv, "--skip-invalid"]) == 0
    summary = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert summary["users"] == 2 and summary["skipped_users"] == []
    assert summary["skipped_lines"] == [{"line": len(lines) + 1, "user": seen,
                                         "reason": f"user {seen!r} is a seen user of the run; adapt gives new "
                                                   f"users only, pick another id"}]
    with safe_open(str(tmp_path / "o" / "embeddings.safetensors"), "pt") as fh:
        assert json.loads(fh.metadata()["user_ids"]) == ["zoe", "yan"]


def test_dataset_users_that_are_seen_users_are_refused(run, tiny_dir):
    from coplctl.serving.adapt_run import new_user_pairs

    unseen = load(tiny_dir).user_ids("unseen")
    with pytest.raises(DataError, match=f"user {unseen[1]!r} is a seen user of the run.*\\(and 1 more\\)"):
        new_user_pairs(None, data=tiny_dir, seen_users={unseen[1], unseen[4]})
    uf, _ = new_user_pairs(None, data=tiny_dir, skip_invalid=True, seen_users={unseen[1]})
    assert unseen[1] not in set(uf.pairs["user_id"]) and len(set(uf.pairs["user_id"])) == len(unseen) - 1
    assert [s["user"] for s in uf.skipped_users] == [unseen[1]]


def test_missing_or_wrong_model_is_one_line(run, tiny_dir, tmp_path, capsys):
    f = _write(tmp_path, _graph_lines(run))
    cases = [(tmp_path / "nope", "nope is not a run directory (it does not exist)"), (f, "is not a run directory"),
             (tiny_dir, "is not a trained GCF run")]
    for model, message in cases:
        assert main(["adapt", "--model", str(model), "--user-file", str(f), "--out", str(tmp_path / "o")]) == 1
        assert message in _one_line(capsys)
    assert main(["adapt", "--model", str(run.path), "--user-file", str(f), "--out", str(tmp_path / "o"),
                 "--temperature", "nan"]) == 1
    assert "adapt option temperature: expected a finite number" in _one_line(capsys)
    assert not (tmp_path / "o").exists()
