"""The dataset directory format: round trip, and one clear error per broken rule."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from coplctl.core.errors import CoplError, DataError
from coplctl.data import PreferenceDataset, load


def _edit(path, table, change):
    """Rewrite ``path/table.parquet`` after ``change(df)`` (which may return a new frame)."""
    f = path / f"{table}.parquet"
    df = pd.read_parquet(f)
    new = change(df)
    (new if new is not None else df).to_parquet(f, index=False)


def _expect(path, file, row, text):
    with pytest.raises(DataError) as info:
        load(path)
    e = info.value
    assert e.file.endswith(file), str(e)
    assert e.row == row, str(e)
    assert text in str(e), str(e)
    assert f"{file} row {row}:" in str(e)
    return e


def test_round_trip_keeps_every_table(tiny_dir, tmp_path):
    ds = load(tiny_dir)
    again = ds.save(tmp_path / "again")
    back = load(again)
    for name in ("responses", "users", "pairs"):
        pd.testing.assert_frame_equal(getattr(ds, name), getattr(back, name))
    assert back.meta["format_version"] == 1
    assert back.meta["counts"]["users"] == {"seen": 120, "unseen": 8}


def test_missing_column_is_named(tiny_copy):
    _edit(tiny_copy, "pairs", lambda df: df.drop(columns=["split"]))
    with pytest.raises(DataError, match=r"pairs.parquet: missing column split"):
        load(tiny_copy)


def test_unknown_user_id(tiny_copy):
    _edit(tiny_copy, "pairs", lambda df: df.__setitem__("user_id", df["user_id"].where(df.index != 5, "ghost")))
    _expect(tiny_copy, "pairs.parquet", 5, "unknown user_id")


@pytest.mark.parametrize("col", ["chosen_id", "rejected_id"])
def test_unknown_response_id(tiny_copy, col):
    _edit(tiny_copy, "pairs", lambda df: df.__setitem__(col, df[col].where(df.index != 3, "r-missing")))
    _expect(tiny_copy, "pairs.parquet", 3, f"unknown {col}")


def test_chosen_equals_rejected(tiny_copy):
    def change(df):
        df.loc[7, "rejected_id"] = df.loc[7, "chosen_id"]
    _edit(tiny_copy, "pairs", change)
    _expect(tiny_copy, "pairs.parquet", 7, "chosen_id equals rejected_id")


def test_duplicate_pair_even_when_flipped(tiny_copy):
    def change(df):
        row = df.iloc[[0]].copy()
        row[["chosen_id", "rejected_id"]] = row[["rejected_id", "chosen_id"]].to_numpy()
        return pd.concat([df, row], ignore_index=True)
    _edit(tiny_copy, "pairs", change)
    n = len(pd.read_parquet(tiny_copy / "pairs.parquet"))
    _expect(tiny_copy, "pairs.parquet", n - 1, "duplicate pair")


def test_empty_text(tiny_copy):
    _edit(tiny_copy, "responses", lambda df: df.__setitem__("text", df["text"].where(df.index != 2, "   ")))
    _expect(tiny_copy, "responses.parquet", 2, "empty text")


def test_null_text(tiny_copy):
    _edit(tiny_copy, "responses", lambda df: df.__setitem__("text", df["text"].where(df.index != 4, None)))
    _expect(tiny_copy, "responses.parquet", 4, "text is empty (null)")


def test_duplicate_response_id(tiny_copy):
    def change(df):
        df.loc[9, "response_id"] = df.loc[8, "response_id"]
    _edit(tiny_copy, "responses", change)
    _expect(tiny_copy, "responses.parquet", 9, "duplicate response_id")


def test_seen_user_without_train_pairs(tiny_copy):
    users = pd.read_parquet(tiny_copy / "users.parquet")
    row = int(users.index[users["role"] == "seen"][3])
    victim = users.loc[row, "user_id"]
    _edit(tiny_copy, "pairs", lambda df: df[~((df["user_id"] == victim) & (df["split"] == "train"))])
    _expect(tiny_copy, "users.parquet", row, "seen user has no train pairs")


def test_unseen_user_without_fewshot_pairs(tiny_copy):
    users = pd.read_parquet(tiny_copy / "users.parquet")
    row = int(users.index[users["role"] == "unseen"][0])
    victim = users.loc[row, "user_id"]
    _edit(tiny_copy, "pairs", lambda df: df[~((df["user_id"] == victim) & (df["split"] == "fewshot"))])
    _expect(tiny_copy, "users.parquet", row, "unseen user has no fewshot pairs")


def test_bad_split_and_role(tiny_copy):
    _edit(tiny_copy, "pairs", lambda df: df.__setitem__("split", df["split"].where(df.index != 1, "dev")))
    _expect(tiny_copy, "pairs.parquet", 1, "split must be one of")


def test_unseen_user_with_train_pair(tiny_copy):
    pairs = pd.read_parquet(tiny_copy / "pairs.parquet")
    row = int(pairs.index[pairs["split"] == "fewshot"][0])
    _edit(tiny_copy, "pairs", lambda df: df.__setitem__("split", df["split"].where(df.index != row, "train")))
    _expect(tiny_copy, "pairs.parquet", row, "split train for a unseen user")


def test_count_of_further_bad_rows_is_reported(tiny_copy):
    _edit(tiny_copy, "pairs", lambda df: df.__setitem__("user_id", df["user_id"].where(df.index % 100 != 0, "ghost")))
    e = _expect(tiny_copy, "pairs.parquet", 0, "unknown user_id")
    assert e.more > 0 and f"and {e.more} more rows" in str(e)


def test_truncated_parquet(tiny_copy):
    f = tiny_copy / "pairs.parquet"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(DataError, match=r"pairs.parquet: is not a readable Parquet file"):
        load(tiny_copy)


def test_nonexistent_path_and_file_instead_of_dir(tmp_path):
    with pytest.raises(DataError, match="no such dataset directory"):
        load(tmp_path / "nope")
    (tmp_path / "f").write_text("x")
    with pytest.raises(DataError, match="is a file"):
        load(tmp_path / "f")


def test_missing_file_and_bad_meta(tiny_copy):
    meta = tiny_copy / "meta.json"
    meta.write_text(json.dumps({"format_version": 99}))
    with pytest.raises(DataError, match="format_version is 99"):
        load(tiny_copy)
    meta.write_text("{not json")
    with pytest.raises(DataError, match="meta.json: invalid JSON"):
        load(tiny_copy)
    meta.unlink()
    with pytest.raises(DataError, match="meta.json: missing"):
        load(tiny_copy)


def test_invalid_dataset_is_never_written(tiny_dir, tmp_path):
    ds = load(tiny_dir)
    ds.pairs.loc[0, "rejected_id"] = ds.pairs.loc[0, "chosen_id"]
    dest = tmp_path / "out"
    with pytest.raises(DataError, match="chosen_id equals rejected_id"):
        ds.save(dest)
    assert not dest.exists()
    assert list(tmp_path.iterdir()) == []  # no temporary directory left behind either


def test_crash_while_writing_leaves_nothing(tiny_dir, tmp_path, monkeypatch):
    ds = load(tiny_dir)
    import coplctl.data.dataset as mod

    calls = []

    def exploding(df, path):
        calls.append(path)
        if len(calls) == 2:
            raise OSError("disk full")
        df.to_parquet(path, index=False)

    monkeypatch.setattr(mod, "_write_parquet", exploding)
    with pytest.raises(OSError):
        ds.save(tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_existing_output_needs_overwrite(tiny_dir, tmp_path):
    ds = load(tiny_dir)
    dest = ds.save(tmp_path / "out")
    with pytest.raises(CoplError, match="already exists"):
        ds.save(dest)
    ds.save(dest, overwrite=True)
    assert load(dest).counts() == ds.counts()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_accessors(tiny_dir):
    ds: PreferenceDataset = load(tiny_dir)
    assert set(ds.split("fewshot")["user_id"]) == set(ds.user_ids("unseen"))
    assert ds.groups == ["helpfulness", "honesty"]


def test_an_empty_dataset_is_refused_before_training(tiny_copy, capsys):
    for name in ("responses.parquet", "users.parquet", "pairs.parquet"):
        df = pd.read_parquet(tiny_copy / name)
        df.iloc[0:0].to_parquet(tiny_copy / name, index=False)
    with pytest.raises(DataError, match="users.parquet: holds no seen user"):
        load(tiny_copy)
    from coplctl.cli import main

    assert main(["graph", "train", "--data", str(tiny_copy), "--out", str(tiny_copy.parent / "g")]) == 1
    assert "holds no seen user" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["train uniform", "graph train"])
def test_an_output_never_replaces_its_dataset(tiny_copy, capsys, command):
    from coplctl.cli import main

    before = sorted(p.name for p in tiny_copy.iterdir())
    for out in (tiny_copy, tiny_copy / "inside", tiny_copy.parent):
        code = main([*command.split(), "--data", str(tiny_copy), "--out", str(out), "--force"])
        assert code == 1 and "the dataset" in capsys.readouterr().err
    assert sorted(p.name for p in tiny_copy.iterdir()) == before
    load(tiny_copy)


def test_force_never_replaces_a_directory_of_another_kind(tiny_dir, tmp_path, capsys):
    from coplctl.cli import main

    other = tmp_path / "notes"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    cases = [["data", "simulate", "--users", "20", "--out", str(other), "--force"],
             ["train", "uniform", "--data", str(tiny_dir), "--out", str(other), "--force"],
             ["graph", "train", "--data", str(tiny_dir), "--out", str(other), "--force"]]
    for argv in cases:
        assert main(argv) == 1, argv
        assert "refusing to replace it" in capsys.readouterr().err
    assert [p.name for p in other.iterdir()] == ["keep.txt"]


def test_personal_signal_counts_labels_against_the_other_users_majority():
    import pandas as pd

    from coplctl.data.signal import personal_signal

    rows = [("a", "r1", "r2"), ("b", "r1", "r2"), ("c", "r2", "r1"),  # c goes against a and b
            ("a", "r3", "r4"), ("b", "r4", "r3"),  # one each way: for a, b's is the majority (1 vs 0)
            ("c", "r5", "r6")]  # nobody else labelled r5/r6: no majority
    got = personal_signal(pd.DataFrame(rows, columns=["user_id", "chosen_id", "rejected_id"]))
    # a: r1>r2 agrees (others +0: b agrees, c not: tie -> not counted), r3>r4 vs b: personal
    # b: r1>r2 tie of others (a agrees, c not) -> not counted; r4>r3 vs a: personal
    # c: r2>r1 vs a and b: personal; r5/r6 not counted
    assert got["labels"] == 3 and got["without_majority"] == 3 and got["users"] == 3
    assert got["share"] == 1.0 and got["personal_per_user"] == 1.0
    got = personal_signal(pd.DataFrame([("a", "r1", "r2"), ("b", "r1", "r2"), ("c", "r1", "r2")],
                                       columns=["user_id", "chosen_id", "rejected_id"]))
    assert got["share"] == 0.0 and got["labels"] == 3  # everybody agrees: nothing personal


@pytest.mark.parametrize("fmt, problem", [
    ("Human: {prompt}", "{response} once"), ("{response} {response}", "{response} once"),
    ("{user}: {response}", "no other field"), ("{response", "not a format"), (5, "must be a text")])
def test_a_bad_text_format_is_one_error(fmt, problem):
    from coplctl.core.errors import CoplError
    from coplctl.data.dataset import check_text_format

    with pytest.raises(CoplError, match=problem.replace("{", r"\{").replace("}", r"\}")):
        check_text_format(fmt)


def test_a_datasets_text_format_is_what_methods_read_and_record(micro_dir, tmp_path):
    """A dataset that feeds the response alone: the run records that format, scores ignore the prompt, and an
    old dataset without the key keeps today's format."""
    import json

    from coplctl.core.registry import METHODS
    from coplctl.data import load
    from coplctl.models.evaluate import score_frame
    from coplctl.models.reward import load_method

    import shutil

    tiny_copy = Path(shutil.copytree(micro_dir, tmp_path / "data"))
    meta = json.loads((tiny_copy / "meta.json").read_text())
    assert "text_format" not in meta and load(tiny_copy).text_format == "Human: {prompt}\n\nAssistant: {response}"
    (tiny_copy / "meta.json").write_text(json.dumps({**meta, "text_format": "{response}"}))
    m = METHODS.get("uniform")(mode="frozen", epochs=1)
    m.fit(load(tiny_copy), seed=0, progress=False)
    m.save(tmp_path / "run")
    assert json.loads((tmp_path / "run" / "method.json").read_text())["config"]["text_format"] == "{response}"
    run = load_method(tmp_path / "run")
    a, b = (run.score(["x"], score_frame([{"prompt": p, "response": "Same answer."}])) for p in ("Q1?", "Other Q?"))
    assert bool((a == b).all())  # the prompt is not read


def test_against_majority_marks_labels_that_go_against_the_reference():
    import pandas as pd

    from coplctl.data.signal import against_majority

    ref = pd.DataFrame([("a", "r1", "r2"), ("b", "r1", "r2"), ("c", "r4", "r3"), ("d", "r3", "r4")],
                       columns=["user_id", "chosen_id", "rejected_id"])
    valid = pd.DataFrame([("x", "r2", "r1"), ("y", "r1", "r2"), ("z", "r3", "r4"), ("w", "r5", "r6")],
                         columns=["user_id", "chosen_id", "rejected_id"])
    assert against_majority(valid, ref).tolist() == [True, False, False, False]  # r3/r4 tie; r5/r6 unlabelled
