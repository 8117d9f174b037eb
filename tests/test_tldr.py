"""`coplctl data build-tldr` on fixture files in the hub's layout, and the TL;DR twin (`data simulate --variant tldr`)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from coplctl.cli import main
from coplctl.data import load

POLICIES = ("sup4_6b_t0.7", "sup2_t0.7", "sup4_ppo_rm3_t0.7", "ref", "pretrain_6b_t0.7")


def comparisons(n_posts: int, seed: int, tag: str, split: str, workers: list[str]) -> pd.DataFrame:
    """Rows shaped as openai/summarize_from_feedback's comparisons: several per post, mixed policies and
    labellers, a few CNN/DM-style rows without a post."""
    rng = np.random.default_rng(seed)
    rows = []
    for p in range(n_posts):
        post = None if p % 17 == 16 else f"{tag} post {p}: my roommate never cleans and I am tired of it."
        texts = [f"{tag} {p} summary {k}: " + "roommate messy " * int(rng.integers(1, 12)) for k in range(4)]
        for _ in range(3):
            i, j = rng.choice(4, 2, replace=False)
            rows.append({"info": {"id": f"{tag}{p}", "post": post, "title": "roommate", "subreddit": "relationships",
                                  "site": None, "article": None if post else "news article"},
                         "summaries": [{"text": texts[i], "policy": POLICIES[rng.choice(5, p=[.4, .4, .1, .05, .05])],
                                        "note": None},
                                       {"text": texts[j], "policy": POLICIES[rng.choice(5, p=[.4, .4, .1, .05, .05])],
                                        "note": None}],
                         "choice": int(rng.integers(2)), "worker": workers[int(rng.zipf(1.6)) % len(workers)],
                         "batch": "batch3", "split": split, "extra": {"confidence": int(rng.integers(1, 10))}})
    return pd.DataFrame(rows)


WORKERS = [f"w{i:02d}" for i in range(14)]


@pytest.fixture
def tldr_dir(tmp_path):
    (tmp_path / "tldr" / "comparisons").mkdir(parents=True)
    train = comparisons(400, 0, "train", "train", WORKERS)
    valid = comparisons(120, 1, "valid", "valid1", WORKERS)
    valid.at[0, "info"] = {**valid.at[0, "info"], "post": train.at[0, "info"]["post"]}  # a post in both splits
    train.to_parquet(tmp_path / "tldr" / "comparisons" / "train-00000-of-00001.parquet")
    valid.to_parquet(tmp_path / "tldr" / "comparisons" / "validation-00000-of-00001.parquet")
    return tmp_path / "tldr", train, valid


ARGS = ["--users", "40", "--unseen-users", "4", "--test-pairs", "20", "--unseen-test-pairs", "10"]


def test_tldr_follows_the_authors_protocol(tldr_dir, tmp_path):
    path, train, valid = tldr_dir
    assert main(["data", "build-tldr", "--tldr", str(path), *ARGS, "--out", str(tmp_path / "d")]) == 0
    ds = load(tmp_path / "d")
    assert ds.meta["source"] == "tldr" and ds.meta["groups"] == ["shorter", "longer"]
    assert ds.text_format == "Human: {prompt} Assistant: {response}"  # the authors' datagen_tldr.py format
    stats = ds.meta["filter_stats"]
    sup = lambda df: df["summaries"].map(lambda s: all("sup" in x["policy"] and "ppo" not in x["policy"] for x in s))
    tr = train[sup(train)]
    counts = tr["worker"].value_counts()
    top = sorted(counts.index, key=lambda w: (-counts[w], w))[:10]
    assert [w for w, _ in stats["workers"]] == top and len(top) == 10  # the ten busiest labellers of sup-vs-sup pairs
    assert stats["dropped_not_supervised_policies"] == int((~sup(train)).sum() + (~sup(valid)).sum())
    assert stats["dropped_train_pairs_on_validation_posts"] > 0
    allowed = set()  # every response comes from a kept comparison
    for df in (tr[tr["worker"].isin(top)], valid[sup(valid) & valid["worker"].isin(top)]):
        for info, s in zip(df["info"], df["summaries"]):
            allowed |= {(info["post"], x["text"]) for x in s}
    r = ds.responses.set_index("response_id")
    assert set(zip(r["prompt"], r["text"])) <= allowed and r["prompt"].notna().all()
    test_prompts = set(r.loc[ds.split("test")["chosen_id"], "prompt"])
    valid_posts = {info["post"] for info in valid["info"]}
    assert test_prompts <= valid_posts  # the validation split is the test pool, its posts never trained on
    assert not valid_posts & set(r.loc[ds.split("train")["chosen_id"], "prompt"])
    length = r["length"]
    d = length.loc[ds.pairs["chosen_id"]].to_numpy() - length.loc[ds.pairs["rejected_id"]].to_numpy()
    group = ds.pairs["user_id"].map(ds.users.set_index("user_id")["group"]).to_numpy()
    assert (d[group == "shorter"] <= 0).all() and (d[group == "longer"] >= 0).all()  # labels by length
    assert (length == r["text"].str.len()).all() and ds.pairs["controversial"].all()
    seen = ds.user_ids("seen")
    assert (ds.split("train").groupby("user_id").size().reindex(seen) == 7).all()  # ALL: 8 = 7 train + 1 valid
    assert (ds.split("fewshot").groupby("user_id").size() == 8).all()


def test_raw_batch_files_give_the_same_dataset_and_bad_rows_are_named(tldr_dir, tmp_path, capsys):
    path, train, valid = tldr_dir
    (tmp_path / "raw").mkdir()
    for k, df in enumerate((train, valid)):  # OpenAI's batch files: rows carry their split
        (tmp_path / "raw" / f"batch{k}.json").write_text("\n".join(json.dumps(r) for r in df.to_dict("records")) + "\n")
        (tmp_path / "raw" / f"batch{k}.json").rename(tmp_path / "raw" / f"batch{k}.jsonl")
    assert main(["data", "build-tldr", "--tldr", str(path), *ARGS, "--out", str(tmp_path / "a")]) == 0
    assert main(["data", "build-tldr", "--tldr", str(tmp_path / "raw"), *ARGS, "--out", str(tmp_path / "b")]) == 0
    a, b = load(tmp_path / "a"), load(tmp_path / "b")
    assert a.pairs.equals(b.pairs) and a.responses.equals(b.responses)
    lines = (tmp_path / "raw" / "batch1.jsonl").read_text().splitlines()
    rec = json.loads(lines[4])
    rec["summaries"] = rec["summaries"][:1]
    lines[4] = json.dumps(rec)
    (tmp_path / "raw" / "batch1.jsonl").write_text("\n".join(lines) + "\n")
    capsys.readouterr()
    assert main(["data", "build-tldr", "--tldr", str(tmp_path / "raw"), *ARGS, "--out", str(tmp_path / "c")]) == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "batch1.jsonl line 5: field summaries must be a list of two" in err, err


def test_the_twin_has_the_protocol_and_labels_by_length(tmp_path):
    args = ["data", "simulate", "--variant", "tldr", "--annotations", "avg", "--users", "60", "--unseen-users", "4",
            "--survey-pairs", "600"]
    assert main([*args, "--out", str(tmp_path / "a")]) == 0
    assert main([*args, "--out", str(tmp_path / "b")]) == 0
    a, b = load(tmp_path / "a"), load(tmp_path / "b")
    assert a.pairs.equals(b.pairs) and a.responses.equals(b.responses)  # deterministic
    assert a.meta["variant"] == "tldr" and set(a.users["group"]) == {"shorter", "longer"}
    assert a.meta["protocol_stats"]["survey_pairs"] == 600
    r = a.responses.set_index("response_id")
    d = r.loc[a.pairs["chosen_id"], "length"].to_numpy() - r.loc[a.pairs["rejected_id"], "length"].to_numpy()
    group = a.pairs["user_id"].map(a.users.set_index("user_id")["group"]).to_numpy()
    assert (d[group == "shorter"] <= 0).all() and (d[group == "longer"] >= 0).all()
    train = a.split("train").groupby("user_id").size()
    assert train.min() >= 1 and train.max() <= 15  # AVG: 1-15 annotations
    assert main(["data", "build-ufp", "--variant", "tldr", "--out", str(tmp_path / "c")]) == 1


def test_the_hub_id_reads_the_datasets_cache_as_a_download_left_it(tldr_dir, tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets", reason="the hub extra (datasets) is not installed")
    from hub_datasets import install_dataset_in_cache

    path, train, valid = tldr_dir
    cache = tmp_path / "hf-datasets"
    install_dataset_in_cache("openai/summarize_from_feedback", {"train": train, "validation": valid}, cache,
                             tmp_path / "prep", config="comparisons")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    assert main(["data", "build-tldr", *ARGS, "--out", str(tmp_path / "hub")]) == 0  # the default: the hub id
    assert main(["data", "build-tldr", "--tldr", str(path), *ARGS, "--out", str(tmp_path / "local")]) == 0
    hub, local = load(tmp_path / "hub"), load(tmp_path / "local")
    assert hub.pairs.equals(local.pairs) and hub.responses.equals(local.responses)
    assert hub.meta["inputs"]["tldr"] == "openai/summarize_from_feedback"
