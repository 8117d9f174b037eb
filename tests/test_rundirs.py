"""Damaged run directories: every kind of damage is one clear line and exit 1, never a traceback."""

from __future__ import annotations

import json
import shutil

import pytest

from coplctl.cli import main
from coplctl.copl.method import CoPL
from coplctl.data import load


@pytest.fixture(scope="module")
def runs(tiny_dir, tmp_path_factory):
    """A saved frozen-mode CoPL run (with its gcf/) and a saved Uniform run."""
    from coplctl.baselines.uniform import Uniform

    root = tmp_path_factory.mktemp("runs")
    ds = load(tiny_dir)
    copl = CoPL(gcf_overrides={"dim": 8, "epochs": 5}, epochs=1)
    copl.fit(ds, work_dir=root / "work", progress=False)
    copl.save(root / "copl")
    uniform = Uniform(epochs=1)
    uniform.fit(ds, progress=False)
    uniform.save(root / "uniform")
    return root, ds


def _damage(run, name, how):
    f = run / name
    if how == "delete":
        f.unlink()
    elif how == "truncate":
        f.write_bytes(f.read_bytes()[: max(1, f.stat().st_size // 2)])
    elif how == "empty":
        f.write_bytes(b"")
    elif how == "utf16":
        f.write_text(f.read_text(encoding="utf-8"), encoding="utf-16")
    elif how == "deep":
        f.write_text("[" * 100_000 + "]" * 100_000)
    else:
        f.write_text(how)


def _score(run, capsys, user="u0000"):
    code = main(["score", str(run), "--user", user, "--prompt", "p", "--response", "r"])
    err = " ".join(capsys.readouterr().err.split())
    return code, err


MODEL_CASES = [
    ("method.json", "{not json", "method.json: invalid JSON"),
    ("method.json", "[1, 2]", "method.json: must hold a JSON object, not a list"),
    ("method.json", '{"method": "copl"}', "missing key 'config'"),
    ("method.json", '{"method": 5, "config": {}}', "key 'method' must be text"),
    ("method.json", '{"method": "copl", "config": {"experts": "many"}}', "experts: expected a whole number"),
    ("method.json", '{"method": "copl", "config": {"nonsense": 1}}', "no option 'nonsense'"),
    ("method.json", '{"method": "nope", "config": {}}', "unknown method 'nope'"),
    ("method.json", '{"method": "copl", "config": {}}', "method.json: missing key 'sizes'"),
    ("method.json", '{"method": "copl", "config": {}, "sizes": {"users": 1, "user_dim": 32}}',
     "sizes.users is 1, but users.json lists"),
    ("method.json", "utf16", "method.json: is not UTF-8 text"),
    ("method.json", "deep", "nested too deeply"),
    ("model.safetensors", "truncate", "model.safetensors: is not a readable safetensors file"),
    ("model.safetensors", "empty", "model.safetensors: is not a readable safetensors file"),
    ("model.safetensors", "delete", "model.safetensors: no such weights file"),
    ("users.json", "delete", "users.json: no such user id list"),
    ("users.json", '{"a": 1}', "users.json: must hold a list"),
    ("users.json", '["a", "a"]', "user id 'a' appears twice"),
    ("users.json", '["a", 3]', "item 1 must be a non-empty user id"),
    ("responses.parquet", "delete", "responses.parquet: no such responses table"),
    ("responses.parquet", "truncate", "responses.parquet: is not a readable Parquet file"),
]


@pytest.mark.parametrize("name, how, words", MODEL_CASES)
def test_a_damaged_model_run_is_one_clear_error(runs, tmp_path, capsys, name, how, words):
    run = tmp_path / "run"
    shutil.copytree(runs[0] / "copl", run)
    _damage(run, name, how)
    code, err = _score(run, capsys)
    assert code == 1 and words in err and "Traceback" not in err, err


def test_weights_of_another_method_are_named(runs, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(runs[0] / "copl", run)
    shutil.copy(runs[0] / "uniform" / "model.safetensors", run / "model.safetensors")
    code, err = _score(run, capsys)
    assert code == 1 and "model.safetensors: saved weights do not match the model (missing [" in err, err
    info = json.loads((runs[0] / "uniform" / "method.json").read_text())
    info["config"]["trunk_width"] = 64  # weights of other settings
    run2 = tmp_path / "run2"
    shutil.copytree(runs[0] / "uniform", run2)
    (run2 / "method.json").write_text(json.dumps(info))
    code, err = _score(run2, capsys)
    assert code == 1 and "model.safetensors:" in err and "shape" in err and "Traceback" not in err, err


def test_a_missing_or_non_directory_run_is_named(tmp_path, capsys):
    code, err = _score(tmp_path / "nope", capsys)
    assert code == 1 and "does not exist" in err
    (tmp_path / "f").write_text("x")
    code, err = _score(tmp_path / "f", capsys)
    assert code == 1 and "is not a run directory" in err


GRAPH_CASES = [
    ("embeddings.safetensors", "truncate", "embeddings.safetensors: is not a readable safetensors file"),
    ("graph.json", "truncate", "graph.json: invalid JSON"),
    ("graph.json", '{"users": [], "responses": []}', "graph.safetensors: tensor 'pos' names nodes beyond"),
    ("graph.safetensors", "empty", "graph.safetensors: is not a readable safetensors file"),
    ("config.json", '{"gcf": {"variant": "gat"}}', "config.json: gcf.variant must be one of"),
    ("config.json", "[]", "config.json: must hold a JSON object"),
    ("metrics.json", "utf16", "metrics.json: is not UTF-8 text"),
    ("responses.parquet", "truncate", "responses.parquet: is not a readable Parquet file"),
]


@pytest.mark.parametrize("name, how, words", GRAPH_CASES)
def test_a_damaged_graph_run_is_one_clear_error(runs, tmp_path, capsys, name, how, words):
    run = tmp_path / "gcf"
    shutil.copytree(runs[0] / "copl" / "gcf", run)
    _damage(run, name, how)
    users = tmp_path / "new.jsonl"
    rid = runs[1].responses["response_id"]
    users.write_text(json.dumps({"user": "new", "chosen": rid.iloc[0], "rejected": rid.iloc[1]}) + "\n")
    code = main(["adapt", "--model", str(run), "--user-file", str(users), "--out", str(tmp_path / "out")])
    err = " ".join(capsys.readouterr().err.split())
    assert code == 1 and words in err and "Traceback" not in err, err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("content, words", [
    ('[1, 2]\n', "requests.jsonl line 1: each line must be a JSON object"),
    ('"text"\n', "requests.jsonl line 1: each line must be a JSON object"),
    ('{"user": "u0000", "prompt": "p"}\n', "requests.jsonl line 1: missing or non-text field response"),
    ('\n{"user": "u0000", "prompt": "p", "response": "r"}\n{"user": "ghost", "prompt": "p", "response": "r"}\n',
     "requests.jsonl line 3: unknown user 'ghost'"),
    ('{"user": "u0000", "prompt": "p", "response": "r"', "requests.jsonl line 1: invalid JSON"),
    ("[" * 100_000 + "]" * 100_000 + "\n", "requests.jsonl line 1: JSON nested too deeply"),
    ("", "requests.jsonl: holds no request"),
])
def test_score_input_errors_name_the_line(runs, tmp_path, capsys, content, words):
    f = tmp_path / "requests.jsonl"
    f.write_text(content.replace("u0000", runs[1].user_ids("seen")[0]))
    code = main(["score", str(runs[0] / "copl"), "--input", str(f)])
    err = " ".join(capsys.readouterr().err.split())
    assert code == 1 and words in err and "Traceback" not in err, err


def test_score_input_and_output_paths(runs, tmp_path, capsys):
    run = str(runs[0] / "copl")
    f = tmp_path / "requests.jsonl"
    f.write_text(json.dumps({"user": runs[1].user_ids("seen")[0], "prompt": "p", "response": "r"}) + "\n")
    cases = [(["--input", str(tmp_path / "missing.jsonl")], "missing.jsonl: no such request file"),
             (["--input", str(tmp_path)], "is a directory, not a request file"),
             (["--input", str(f), "--output", str(tmp_path)], "contains the --input file"),
             (["--input", str(f), "--output", str(tmp_path / "d")], "is a directory; coplctl never replaces one"),
             (["--input", str(f), "--output", str(f)], "is the --input file")]
    (tmp_path / "d").mkdir()
    (tmp_path / "u16.jsonl").write_text(f.read_text(), encoding="utf-16")
    cases.append((["--input", str(tmp_path / "u16.jsonl")], "u16.jsonl: is not UTF-8 text"))
    for args, words in cases:
        code = main(["score", run, *args])
        err = " ".join(capsys.readouterr().err.split())
        assert code == 1 and words in err and "Traceback" not in err, (args, err)
    assert main(["score", run, "--input", str(f), "--output", str(tmp_path / "out.jsonl")]) == 0
    assert "reward" in json.loads((tmp_path / "out.jsonl").read_text())


def test_every_saved_file_has_the_usual_permissions(runs):
    import os

    mask = os.umask(0)
    os.umask(mask)
    files = [p for p in (runs[0] / "copl").rglob("*") if p.is_file()]
    assert any(p.name == "model.safetensors" for p in files)
    assert {p.name: oct(p.stat().st_mode & 0o777) for p in files} == {p.name: oct(0o666 & ~mask) for p in files}


def test_adapting_a_model_run_takes_new_users_only(runs, tmp_path, capsys):
    root, ds = runs
    seen = ds.user_ids("seen")[0]
    pairs = ds.split("fewshot")
    lines = [{"user": f"new-{u}", "chosen": c, "rejected": r} for u, c, r in
             zip(pairs["user_id"], pairs["chosen_id"], pairs["rejected_id"])]
    lines.append({**lines[0], "user": seen})
    f = tmp_path / "users.jsonl"
    f.write_text("".join(json.dumps(x) + "\n" for x in lines))
    argv = ["adapt", "--model", str(root / "copl"), "--user-file", str(f), "--out", str(tmp_path / "o")]
    assert main(argv) == 1
    err = " ".join(capsys.readouterr().err.split())
    assert f"line {len(lines)}: user {seen!r} is a seen user of the run" in err and not (tmp_path / "o").exists()
    assert main([*argv, "--skip-invalid"]) == 0
    assert f"skipped {f} line {len(lines)}" in " ".join(capsys.readouterr().err.split())
    adapted = json.loads((tmp_path / "o" / "users.json").read_text())
    assert adapted[-len(set(pairs["user_id"])):] == [f"new-{u}" for u in dict.fromkeys(pairs["user_id"])]
    before = (root / "copl" / "users.json").read_text()
    assert main(["adapt", "--model", str(root / "copl"), "--user-file", str(f), "--out", str(root / "copl"),
                 "--force"]) == 1
    assert "is the model run" in capsys.readouterr().err and (root / "copl" / "users.json").read_text() == before
    no_gcf = tmp_path / "no-gcf"
    shutil.copytree(root / "copl", no_gcf)
    shutil.rmtree(no_gcf / "gcf")
    assert main(["adapt", "--model", str(no_gcf), "--user-file", str(f), "--out", str(tmp_path / "o2"),
                 "--skip-invalid"]) == 1
    assert "has no gcf/ directory" in capsys.readouterr().err and not (tmp_path / "o2").exists()
