"""`coplctl data build-personalllm`: the CoPL authors' PersonalLLM protocol on fixture files in the hub's layout."""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pytest

from coplctl.cli import main
from coplctl.data import load

MODELS = ("gemma_2b", "gemma_7b", "mistral_raft", "mistral_ray", "mistral_weqweasdas", "llama3_sfairx",
          "oasst_deberta_v3", "beaver_7b", "oasst_pythia_7b", "oasst_pythia_1b")  # PersonalLLM's ten
USED = ("gemma_7b", "mistral_weqweasdas", "llama3_sfairx", "oasst_deberta_v3")


def plm_table(n_prompts: int, seed: int, tag: str) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    for p in range(n_prompts):
        row = {"prompt": f"{tag} prompt {p}: how should I plan a trip?", "subset": "x", "prompt_id": p}
        for i in range(1, 9):
            row[f"response_{i}"] = f"{tag} answer {i} to prompt {p}, variant {rng.integers(1000)}"
            for m in MODELS:
                row[f"response_{i}_{m}"] = float(rng.normal())
        rows.append(row)
    return pd.DataFrame(rows)


@pytest.fixture
def plm_dir(tmp_path):
    (tmp_path / "plm" / "data").mkdir(parents=True)
    plm_table(60, 0, "train").to_parquet(tmp_path / "plm" / "data" / "train-00000-of-00001.parquet")
    plm_table(20, 1, "test").to_parquet(tmp_path / "plm" / "data" / "test-00000-of-00001.parquet")
    return tmp_path / "plm"


ARGS = ["--users", "40", "--unseen-users", "4", "--fewshot-pairs", "4", "--test-pairs", "5", "--unseen-test-pairs", "5"]


def test_personalllm_follows_the_authors_protocol(plm_dir, tmp_path):
    assert main(["data", "build-personalllm", "--personalllm", str(plm_dir), *ARGS, "--out", str(tmp_path / "d")]) == 0
    ds = load(tmp_path / "d")
    assert ds.meta["source"] == "personalllm" and ds.meta["groups"] == [] and ds.users["group"].isna().all()
    assert ds.text_format == "{response}"  # the authors' datagen_plm.py feeds the response alone
    r = ds.responses.set_index("response_id")
    assert set(r["text"].str.extract(r"answer (\d)")[0]) <= {"5", "6", "7"}  # responses 5-7 only
    split_of_prompt = r["prompt"].str.split(" ").str[0]
    pair_split = ds.pairs["chosen_id"].map(split_of_prompt)
    assert (pair_split[ds.pairs["split"] == "test"] == "test").all()  # the dataset's own test split
    assert (pair_split[ds.pairs["split"] != "test"] == "train").all()
    margins = r.loc[ds.pairs["chosen_id"], list(USED)].to_numpy() - r.loc[ds.pairs["rejected_id"], list(USED)].to_numpy()
    assert not ((margins > 0).all(1) | (margins < 0).all(1)).any()  # the reward models disagree on every pair
    w = ds.users.set_index("user_id")[[f"weight_{m}" for m in USED]]
    assert np.allclose(w.sum(axis=1), 1)
    assert ((w.loc[ds.pairs["user_id"]].to_numpy() * margins).sum(1) > 0).all()  # labelled by the mixed score
    seen = ds.user_ids("seen")
    train = ds.split("train").groupby("user_id").size().reindex(seen)
    assert (train == 15).all() and (ds.split("test").groupby("user_id").size().reindex(seen) == 5).all()
    assert (ds.split("fewshot").groupby("user_id").size() == 4).all()


def test_a_jsonl_copy_gives_the_same_dataset_and_bad_scores_are_named(plm_dir, tmp_path, capsys):
    (tmp_path / "j").mkdir()
    for split in ("train", "test"):
        pd.read_parquet(next((plm_dir / "data").glob(f"{split}-*"))).to_json(
            tmp_path / "j" / f"{split}.jsonl", orient="records", lines=True)
    assert main(["data", "build-personalllm", "--personalllm", str(plm_dir), *ARGS, "--out", str(tmp_path / "a")]) == 0
    assert main(["data", "build-personalllm", "--personalllm", str(tmp_path / "j"), *ARGS, "--out", str(tmp_path / "b")]) == 0
    a, b = load(tmp_path / "a"), load(tmp_path / "b")
    assert a.pairs.equals(b.pairs) and a.users.equals(b.users)
    lines = (tmp_path / "j" / "test.jsonl").read_text().splitlines()
    lines[2] = lines[2].replace('"response_6_gemma_7b":', '"response_6_gemma_7b":"high","x":')
    (tmp_path / "j" / "test.jsonl").write_text("\n".join(lines) + "\n")
    capsys.readouterr()
    assert main(["data", "build-personalllm", "--personalllm", str(tmp_path / "j"), *ARGS, "--out", str(tmp_path / "c")]) == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "test.jsonl line 3: field response_6_gemma_7b must be a finite number" in err, err
    (tmp_path / "j" / "extra.jsonl").write_text(lines[0] + "\n")
    assert main(["data", "build-personalllm", "--personalllm", str(tmp_path / "j"), *ARGS, "--out", str(tmp_path / "c")]) == 1
    assert "extra.jsonl: a PersonalLLM file's name must start with train or test" in capsys.readouterr().err


@pytest.mark.parametrize("bad, expect", [
    ('"response_6_gemma_7b": 1' + "0" * 400, "line 2: field response_6_gemma_7b must be a finite number"),
    ('"response_6": 7', "line 2: field response_6 must be a text"),
    ('"prompt": ' + "[" * 30000 + "]" * 30000, "line 2: JSON nested too deeply"),
])
def test_odd_values_in_a_jsonl_copy_are_one_error_naming_the_line(plm_dir, tmp_path, capsys, bad, expect):
    (tmp_path / "j").mkdir()
    for split in ("train", "test"):
        pd.read_parquet(next((plm_dir / "data").glob(f"{split}-*"))).to_json(
            tmp_path / "j" / f"{split}.jsonl", orient="records", lines=True)
    lines = (tmp_path / "j" / "test.jsonl").read_text().splitlines()
    lines[1] = lines[1][:-1] + ", " + bad + "}"  # a repeated key: JSON keeps the last
    (tmp_path / "j" / "test.jsonl").write_text("\n".join(lines) + "\n")
    assert main(["data", "build-personalllm", "--personalllm", str(tmp_path / "j"), *ARGS, "--out", str(tmp_path / "c")]) == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and f"test.jsonl {expect}" in err, err
    assert main(["data", "build-personalllm", "--personalllm", str(plm_dir), *ARGS, "--reward-models",
                 "gemma_7b,gemma_7b", "--out", str(tmp_path / "d")]) == 1
    assert "at least two distinct reward models" in capsys.readouterr().err


@pytest.fixture
def offline_hub(plm_dir, tmp_path, monkeypatch):
    """The fixture's tables as namkoong-lab/PersonalLLM in a `datasets` cache, the hub offline."""
    datasets = pytest.importorskip("datasets", reason="the hub extra (datasets) is not installed")
    from hub_datasets import install_dataset_in_cache

    splits = {s: pd.read_parquet(next((plm_dir / "data").glob(f"{s}-*"))) for s in ("train", "test")}
    cache = tmp_path / "hf-datasets"
    install_dataset_in_cache("namkoong-lab/PersonalLLM", splits, cache, tmp_path / "prep")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)


def test_the_hub_id_reads_the_datasets_cache_as_a_download_left_it(plm_dir, tmp_path, offline_hub):
    assert main(["data", "build-personalllm", *ARGS, "--out", str(tmp_path / "hub")]) == 0
    assert main(["data", "build-personalllm", "--personalllm", str(plm_dir), *ARGS, "--out", str(tmp_path / "local")]) == 0
    hub, local = load(tmp_path / "hub"), load(tmp_path / "local")
    assert hub.pairs.equals(local.pairs) and hub.users.equals(local.users)


def test_a_benchmark_builds_its_missing_dataset_on_first_use_from_the_datasets_cache(plm_dir, tmp_path, monkeypatch,
                                                                                     offline_hub, capsys):
    from coplctl.bench.spec import find_spec

    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    (work / "plm.yaml").write_text(f"""version: 1
include: {find_spec("personalllm-all")}
name: plm-tiny
data: {{path: data/plm, users: 40, unseen_users: 4, fewshot_pairs: 4, test_pairs: 5, unseen_test_pairs: 5,
       tokenizer: null, max_tokens: null}}
methods: [ceiling]
seeds: [0]
ablations: []
""")
    assert main(["benchmark", "plm.yaml", "--dry-run"]) == 0
    assert "missing: built on first use (PersonalLLM) from namkoong-lab/PersonalLLM" in capsys.readouterr().out
    assert main(["benchmark", "plm.yaml", "--no-download", "--out", "res"]) == 1
    recipe = re.search(r"`(coplctl data build-personalllm [^`]+)`", capsys.readouterr().err).group(1)
    assert recipe == ("coplctl data build-personalllm --annotations all --users 40 --unseen-users 4 --fewshot-pairs 4 "
                      "--test-pairs 5 --unseen-test-pairs 5 --out data/plm")
    assert not (work / "data").exists()
    assert main(["benchmark", "plm.yaml", "--out", "res"]) == 0
    assert "data/plm does not exist: building PersonalLLM" in capsys.readouterr().err
    by_hand = recipe.split()[1:-2] + ["--personalllm", str(plm_dir), "--out", str(tmp_path / "by-hand")]
    assert main(by_hand) == 0  # the recipe --no-download gives builds the same data
    built, by_hand = load(work / "data" / "plm"), load(tmp_path / "by-hand")
    assert built.pairs.equals(by_hand.pairs) and built.users.equals(by_hand.users)
    assert built.meta["protocol"] == by_hand.meta["protocol"]
    assert (work / "res" / "plm-tiny" / "results" / "ceiling" / "seed0.json").exists()
    assert main(["benchmark", "plm.yaml", "--out", "res", "--force"]) == 0  # the second run reuses the data
    assert "building" not in capsys.readouterr().err
    assert main(["benchmark", "plm.yaml", "--dry-run"]) == 0
    assert "data: directory data/plm: exists" in capsys.readouterr().out
