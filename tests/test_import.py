"""`coplctl data import`: flat preference tables (JSONL, JSON, CSV, Parquet; text or chat cells) into datasets."""

from __future__ import annotations

import json
import textwrap

import numpy as np
import pandas as pd
import pytest

from coplctl.bench.results import load_results
from coplctl.cli import main
from coplctl.data import load


def flat(ds, split_column: bool = True) -> pd.DataFrame:
    """A dataset as the flat table a user would bring: one row per judgement, texts instead of ids."""
    r = ds.responses.set_index("response_id")
    p = ds.pairs
    table = pd.DataFrame({
        "user": p["user_id"].to_numpy(),
        "prompt": r.loc[p["chosen_id"], "prompt"].to_numpy(),
        "chosen": r.loc[p["chosen_id"], "text"].to_numpy(),
        "rejected": r.loc[p["rejected_id"], "text"].to_numpy(),
        "group": p["user_id"].map(ds.users.set_index("user_id")["group"]).to_numpy(),
    })
    if split_column:
        table["split"] = p["split"].to_numpy()
    return table


def write(df: pd.DataFrame, path):
    if path.suffix == ".jsonl":
        df.to_json(path, orient="records", lines=True, force_ascii=False)
    elif path.suffix == ".csv":
        df.to_csv(path, index=False)
    else:
        df.to_parquet(path)
    return path


def judgements(ds) -> set:
    r = ds.responses.set_index("response_id")
    return {(u, r.at[c, "prompt"], r.at[c, "text"], r.at[j, "text"], s)
            for u, c, j, s in ds.pairs[["user_id", "chosen_id", "rejected_id", "split"]].itertuples(index=False)}


def test_a_dataset_exported_flat_imports_back_the_same_in_every_format(tiny_dir, tmp_path):
    original = load(tiny_dir)
    table = flat(original)
    built = {}
    for suffix in (".jsonl", ".csv", ".parquet"):
        src = write(table, tmp_path / f"flat{suffix}")
        assert main(["data", "import", str(src), "--out", str(tmp_path / suffix[1:])]) == 0
        built[suffix] = load(tmp_path / suffix[1:])
    ds = built[".jsonl"]
    assert judgements(ds) == judgements(original)
    assert ds.counts() == original.counts()
    assert ds.users.set_index("user_id").sort_index()[["group", "role"]].equals(
        original.users.set_index("user_id").sort_index()[["group", "role"]])
    assert ds.meta["source"] == "import" and ds.meta["groups"] == ["helpfulness", "honesty"]
    for other in (built[".csv"], built[".parquet"]):
        for name in ("responses", "users", "pairs"):
            assert getattr(other, name).equals(getattr(ds, name)), name


def test_the_protocol_holds_out_test_prompts_and_unseen_users(tiny_dir, tmp_path):
    table = flat(load(tiny_dir), split_column=False)
    table = pd.concat([table, table.iloc[:5]])  # a user's repeated judgements: the first is kept
    src = write(table, tmp_path / "flat.jsonl")
    args = ["data", "import", str(src), "--unseen-users", "6", "--fewshot-pairs", "4", "--test-prompt-fraction", "0.2"]
    assert main([*args, "--out", str(tmp_path / "a")]) == 0
    ds = load(tmp_path / "a")
    prompt = ds.pairs["chosen_id"].map(ds.responses.set_index("response_id")["prompt"])
    test_prompts = set(prompt[ds.pairs["split"] == "test"])
    assert test_prompts and not test_prompts & set(prompt[ds.pairs["split"] != "test"])
    assert abs(len(test_prompts) / prompt.nunique() - 0.2) < 0.05
    unseen = ds.user_ids("unseen")
    assert len(unseen) == 6
    assert (ds.split("fewshot").groupby("user_id").size().reindex(unseen) == 4).all()
    seen_valid = ds.split("valid")[ds.split("valid")["user_id"].isin(ds.user_ids("seen"))]
    assert seen_valid.groupby("user_id").size().max() == 1 and len(seen_valid) > 0
    assert ds.meta["filter_stats"]["dropped_repeated_judgements"] == 5
    assert len(ds.pairs) + 5 <= len(table)
    # two groups that disagree make pairs controversial; the simulator's ground truth agrees where both judged
    assert 0 < ds.pairs["controversial"].mean() < 1
    # the same seed gives the same dataset, another seed other test prompts
    assert main([*args, "--out", str(tmp_path / "b")]) == 0
    assert load(tmp_path / "b").pairs.equals(ds.pairs)
    assert main([*args, "--seed", "1", "--out", str(tmp_path / "c")]) == 0
    assert not load(tmp_path / "c").pairs.equals(ds.pairs)


def test_controversial_comes_from_group_majorities_or_the_column(tmp_path):
    rows = [  # pair (x, y) on prompt p: group A prefers x, group B prefers y; pair (x, z): both prefer x
        *({"user": f"a{i}", "group": "A", "prompt": "p", "chosen": "x", "rejected": "y"} for i in range(3)),
        *({"user": f"b{i}", "group": "B", "prompt": "p", "chosen": "y", "rejected": "x"} for i in range(3)),
        *({"user": u, "group": g, "prompt": "p", "chosen": "x", "rejected": "z"}
          for u, g in [("a0", "A"), ("b0", "B"), ("b1", "B")]),
        {"user": "a1", "group": "A", "prompt": "q", "chosen": "s", "rejected": "t"},
    ]
    src = write(pd.DataFrame(rows), tmp_path / "t.jsonl")
    assert main(["data", "import", str(src), "--out", str(tmp_path / "d"), "--split-column", "nosplit"]) == 1
    table = pd.DataFrame(rows).assign(split=["train"] * 9 + ["test"])
    assert main(["data", "import", str(write(table, tmp_path / "t2.jsonl")), "--out", str(tmp_path / "d")]) == 0
    ds = load(tmp_path / "d")
    text = ds.pairs["rejected_id"].map(ds.responses.set_index("response_id")["text"])
    flagged = dict(zip(text + "/" + ds.pairs["chosen_id"].map(ds.responses.set_index("response_id")["text"]),
                       ds.pairs["controversial"]))
    assert flagged["y/x"] and flagged["x/y"] and not flagged["z/x"] and not flagged["t/s"]
    marked = table.assign(controversial=["true"] * 3 + ["false"] * 7)
    assert main(["data", "import", str(write(marked, tmp_path / "t3.csv")), "--out", str(tmp_path / "e")]) == 0
    assert load(tmp_path / "e").pairs["controversial"].tolist() == [True] * 3 + [False] * 7


def test_chat_format_cells_as_trl_preference_datasets_hold_them(tmp_path):
    def conv(prompt, answer, history=()):
        return [*history, {"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]

    earlier = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    implicit = [{"user": 1, "chosen": conv("sum 2+2?", "4"), "rejected": conv("sum 2+2?", "5"), "split": "train"},
                {"user": 1, "chosen": conv("and 3+3?", "6", earlier), "rejected": conv("and 3+3?", "7", earlier),
                 "split": "test"}]
    explicit = [{"user": 1, "prompt": [{"role": "user", "content": "sum 2+2?"}],
                 "chosen": [{"role": "assistant", "content": "4"}], "rejected": [{"role": "assistant", "content": "5"}],
                 "split": "train"},
                {"user": 1, "prompt": [*earlier, {"role": "user", "content": "and 3+3?"}],
                 "chosen": [{"role": "assistant", "content": "6"}], "rejected": "7", "split": "test"}]
    got = []
    for name, rows in (("implicit", implicit), ("explicit", explicit)):
        src = tmp_path / f"{name}.jsonl"
        src.write_text("".join(json.dumps(r) + "\n" for r in rows))
        assert main(["data", "import", str(src), "--out", str(tmp_path / name)]) == 0
        got.append(load(tmp_path / name).responses[["prompt", "text"]].sort_values("text", ignore_index=True))
    assert got[0].equals(got[1])
    turn = "hi\n\nAssistant: hello\n\nHuman: and 3+3?"  # read as "Human: {prompt}\n\nAssistant: {response}"
    assert got[0]["prompt"].tolist() == ["sum 2+2?", "sum 2+2?", turn, turn]
    assert got[0]["text"].tolist() == ["4", "5", "6", "7"]


GOOD = '{"user": 1, "prompt": "q", "chosen": "a", "rejected": "b"}\n'


@pytest.mark.parametrize("name, text, expect", [
    ("empty.jsonl", GOOD + '{"user": 2, "prompt": "q", "chosen": "", "rejected": "b"}\n', "line 2: chosen (column chosen) is empty"),
    ("blank.jsonl", GOOD + "\n\n" + '{"user": 2, "prompt": "q", "chosen": "a", "rejected": 5}\n', "line 4: rejected"),
    ("json.jsonl", GOOD + '{"user": 2, "prompt": "q" "chosen": "a"}\n', "line 2: invalid JSON"),
    ("same.jsonl", GOOD + '{"user": 2, "prompt": "q", "chosen": "a", "rejected": "a"}\n', "line 2: chosen and rejected are the same text"),
    ("nouser.jsonl", GOOD + '{"prompt": "q", "chosen": "a", "rejected": "c"}\n', "line 2: this row has no field user"),
    ("null.jsonl", "null\n" + GOOD, "line 1: each line must hold a JSON object"),
    ("two.jsonl", GOOD.strip() + " " + GOOD, "line 1: invalid JSON (Extra data"),
    ("pretty.jsonl", GOOD + '{\n  "user": 2,\n  "prompt": "q"}\n', "line 2: invalid JSON"),
    ("deep.jsonl", GOOD + '{"user": ' + "[" * 30000 + "]" * 30000 + "}\n", "line 2: JSON nested too deeply"),
    ("nothing.jsonl", "\n\n", "holds no rows"),
    ("trailing.jsonl", '{"user": 1, "chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}, '
                       '{"role": "user", "content": "more?"}], "rejected": "b"}\n', "line 1: chosen (column chosen) must be"),
    ("other.jsonl", '{"user": 1, "chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], '
                    '"rejected": [{"role": "user", "content": "p"}, {"role": "assistant", "content": "b"}]}\n',
     "line 1: the conversation before the response differs"),
    ("blanks.csv", "user,prompt,chosen,rejected\n\n1,q,a,b\n\n1,r,a,a\n", "line 5: chosen and rejected are the same"),
    ("groups.csv", "user,prompt,chosen,rejected,group\n1,q,a,b,g1\n1,r,a,b,g2\n", "line 3: this user was given another group"),
    ("split.csv", "user,prompt,chosen,rejected,split\n1,q,a,b,train\n1,r,a,b,dev\n", "line 3: split (column split) must be one of"),
    ("both.csv", "user,prompt,chosen,rejected,split\n1,q,a,b,train\n1,r,a,b,fewshot\n", "line 2: a user with fewshot pairs"),
    ("orphan.csv", "user,prompt,chosen,rejected,split\n1,q,a,b,train\n2,r,a,b,test\n", "line 3: this user has no train pair"),
    ("columns.jsonl", '{"annotator": 1, "prompt": "q", "chosen": "a", "rejected": "b"}\n', "missing column user (found: annotator, prompt"),
    ("noprompt.jsonl", '{"user": 1, "chosen": "a", "rejected": "b"}\n', "line 1: missing column prompt"),
    ("list.json", '{"user": 1}', "must hold a list"),
    ("table.txt", "x", "not a table file"),
])
def test_bad_rows_are_one_error_naming_the_file_and_line(tmp_path, capsys, name, text, expect):
    src = tmp_path / name
    src.write_text(text)
    assert main(["data", "import", str(src), "--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and name in err and expect in err, err
    assert not (tmp_path / "out").exists()


def test_cells_are_kept_as_written_and_judgements_counted(tmp_path, capsys):
    """Ids are not reinterpreted (a big integer stays exact next to a float id; a date-like text stays text),
    a line that is not UTF-8 is named, repeated and contradicting judgements are counted apart, and split
    options that a split column would override are refused."""
    rows = [{"user": 2**62 + 1, "prompt": "2024-01-01", "chosen": "a", "rejected": "b", "split": "train"},
            {"user": 2**62 + 2, "prompt": "2024-01-01", "chosen": "a", "rejected": "c", "split": "train"},
            {"user": 1.5, "prompt": "q", "chosen": "a", "rejected": "b", "split": "train"},
            {"user": 1.5, "prompt": "q", "chosen": "a", "rejected": "b", "split": "test"},  # repeated
            {"user": 1.5, "prompt": "q", "chosen": "b", "rejected": "a", "split": "train"}]  # contradicting
    src = tmp_path / "t.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["data", "import", str(src), "--out", str(tmp_path / "out")]) == 0
    ds = load(tmp_path / "out")
    assert sorted(ds.users["user_id"]) == ["1.5", str(2**62 + 1), str(2**62 + 2)]
    assert "2024-01-01" in set(ds.responses["prompt"])
    stats = ds.meta["filter_stats"]
    assert (stats["dropped_repeated_judgements"], stats["dropped_contradicting_judgements"]) == (1, 1)
    assert "unseen_users" not in ds.meta["protocol"]  # the split column gave the splits
    capsys.readouterr()
    assert main(["data", "import", str(src), "--out", str(tmp_path / "o2"), "--unseen-users", "1"]) == 1
    assert "--unseen-users would be ignored" in capsys.readouterr().err
    src.write_bytes(b'{"user": 1, "prompt": "q", "chosen": "a", "rejected": "b"}\n{"user": 2, "prompt": "\xff"}\n')
    assert main(["data", "import", str(src), "--out", str(tmp_path / "o3")]) == 1
    assert "line 2: is not UTF-8" in capsys.readouterr().err
    assert main(["data", "import", "missing/t.jsonl", "--out", str(tmp_path / "o4")]) == 1
    assert "no such file" in capsys.readouterr().err


def test_an_imported_table_runs_through_benchmark_and_report(micro_dir, tmp_path, capsys):
    """The README's own-data path: flat JSONL -> data import -> a benchmark spec on the directory -> report."""
    src = write(flat(load(micro_dir), split_column=False), tmp_path / "judgements.jsonl")
    assert main(["data", "import", str(src), "--out", str(tmp_path / "mine"), "--unseen-users", "2",
                 "--fewshot-pairs", "2", "--test-prompt-fraction", "0.3"]) == 0
    spec = tmp_path / "mine.yaml"
    spec.write_text(textwrap.dedent(f"""\
        version: 1
        name: mine
        data: {{source: directory, path: {tmp_path / 'mine'}}}
        methods: [oracle, uniform, i2e]
        seeds: [0]
        common: {{epochs: 1}}
        """))
    assert main(["benchmark", str(spec), "--out", str(tmp_path / "out")]) == 0
    results = {r["name"]: r for r in load_results(tmp_path / "out")}
    assert results["oracle"]["metrics"]["seen"]["pairs"] > 0  # the table's groups reach Oracle
    assert results["i2e"]["metrics"]["unseen"]["pairs"] > 0
    assert results["i2e"]["data"]["counts"] == load(tmp_path / "mine").counts()
    capsys.readouterr()
    assert main(["report", str(tmp_path / "out"), "--out", str(tmp_path / "report")]) == 0
    assert "| I2E |" in (tmp_path / "report" / "tables.md").read_text()
    assert np.isfinite(results["uniform"]["metrics"]["seen"]["accuracy"])


def test_a_hub_id_reads_the_datasets_cache_as_a_download_left_it(tiny_dir, tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets", reason="the hub extra (datasets) is not installed")
    from hub_datasets import install_dataset_in_cache

    table = flat(load(tiny_dir))
    cache = tmp_path / "hf-datasets"
    install_dataset_in_cache("acme/judgements", {"train": table}, cache, tmp_path / "prep")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    assert main(["data", "import", "acme/judgements", "--out", str(tmp_path / "hub")]) == 0
    src = write(table, tmp_path / "t.parquet")
    assert main(["data", "import", str(src), "--out", str(tmp_path / "local")]) == 0
    hub, local = load(tmp_path / "hub"), load(tmp_path / "local")
    assert hub.pairs.equals(local.pairs) and hub.responses.equals(local.responses)
    assert judgements(hub) == judgements(load(tiny_dir))


def test_an_option_that_leaves_a_split_empty_is_noted(tiny_dir, tmp_path, capsys):
    src = write(flat(load(tiny_dir), split_column=False), tmp_path / "t.jsonl")
    assert main(["data", "import", str(src), "--out", str(tmp_path / "d"), "--valid-pairs", "100"]) == 0
    err = " ".join(capsys.readouterr().err.split())
    if load(tmp_path / "d").counts()["pairs"]["valid"] == 0:
        assert "the valid split(s) of" in err and "hold no pairs" in err
    else:
        pytest.fail("--valid-pairs 100 should leave no user with enough judgements for a valid split")
