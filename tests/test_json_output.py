"""`--json` on every command that prints results: exactly one JSON document on stdout, holding the facts the
command otherwise prints as tables or lines; logs stay on stderr and errors stay one line."""

from __future__ import annotations

import contextlib
import io
import json
import shutil

import pytest

from coplctl.cli import main
from coplctl.data import load


def _json(capsys, *argv, code=0):
    """Run coplctl with --json; the exit code, then stdout parsed as one JSON document."""
    assert main([*argv, "--json"]) == code, capsys.readouterr().err
    return json.loads(capsys.readouterr().out)


@pytest.fixture(scope="module")
def copl_run(micro_dir, tmp_path_factory):
    """One small CoPL run for the module, trained with --json (its stdout kept for the train test)."""
    run = tmp_path_factory.mktemp("json") / "copl"
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        assert main(["train", "copl", "--data", str(micro_dir), "--out", str(run), "--epochs", "1",
                     "--set", "gcf_overrides={dim: 8, epochs: 2}", "--json"]) == 0
    return run, stdout.getvalue()


def test_train_prints_the_run_and_what_training_json_records(copl_run):
    run, stdout = copl_run
    printed = json.loads(stdout)
    assert printed == {"run": str(run), **json.loads((run / "training.json").read_text())}
    assert printed["method"] == "copl" and 0 <= printed["metrics"]["valid_accuracy"] <= 1


def test_adapt_evaluate_score_and_experts_on_a_model_run(copl_run, micro_dir, tmp_path, capsys):
    run, _ = copl_run
    plus = tmp_path / "plus"
    summary = _json(capsys, "adapt", "--model", str(run), "--data", str(micro_dir), "--out", str(plus))
    assert summary == json.loads((plus / "summary.json").read_text()) and summary["users"] == 2

    result = _json(capsys, "evaluate", str(run), "--data", str(micro_dir))
    assert set(result["metrics"]) == {"seen", "unseen"}

    ds = load(micro_dir)
    user, prompt, text = ds.user_ids("seen")[0], ds.responses.prompt[0], ds.responses.text[0]
    one = _json(capsys, "score", str(run), "--user", user, "--prompt", prompt, "--response", text)
    assert [r["user"] for r in one] == [user] and isinstance(one[0]["reward"], float)
    requests, rewards = tmp_path / "req.jsonl", tmp_path / "rewards.jsonl"
    requests.write_text("".join(json.dumps({"user": user, "prompt": prompt, "response": t}) + "\n"
                                for t in ds.responses.text[:2]))
    scored = _json(capsys, "score", str(run), "--input", str(requests), "--output", str(rewards))
    assert scored == [json.loads(line) for line in rewards.read_text().splitlines()] and len(scored) == 2
    assert scored[0]["reward"] == pytest.approx(one[0]["reward"], rel=1e-5)  # batch of 2 vs 1: GEMM rounding

    info = _json(capsys, "plot", "experts", str(run), "--out", str(tmp_path / "e.png"))
    assert info["path"] == str(tmp_path / "e.png") and (tmp_path / "e.png").exists()
    assert list(info["routing"]) == ["trunk.0", "trunk.2"] and info["layers"] == 2


def test_graph_train_adapt_and_embeddings(micro_dir, tmp_path, capsys):
    gcf = tmp_path / "gcf"
    trained = _json(capsys, "graph", "train", "--data", str(micro_dir), "--out", str(gcf), "--dim", "8",
                    "--epochs", "3")
    assert trained["run"] == str(gcf) and trained["config"]["dim"] == 8
    assert trained["metrics"] == json.loads((gcf / "metrics.json").read_text())
    assert len(trained["metrics"]["history"]) == trained["metrics"]["epochs_run"] == 3
    new = tmp_path / "new"
    summary = _json(capsys, "adapt", "--model", str(gcf), "--data", str(micro_dir), "--out", str(new))
    assert summary == json.loads((new / "summary.json").read_text())
    assert summary["users"] == 2 and summary["method"] == "weighted" and "held_out_graph_accuracy" in summary
    drawn = _json(capsys, "plot", "embeddings", str(gcf), "--adapted", str(new), "--out", str(tmp_path / "t.png"))
    assert drawn == {"seen": 16, "adapted": 2, "groups": drawn["groups"], "path": str(tmp_path / "t.png")}


def _check_dataset(printed, path):
    assert printed["path"] == str(path) and printed["counts"] == load(path).counts()
    assert all(k.startswith("dropped") and isinstance(v, int) for k, v in printed["dropped"].items())


def test_data_simulate_and_import(tiny_dir, tmp_path, capsys):
    from test_import import flat, write

    out = tmp_path / "sim"
    printed = _json(capsys, "data", "simulate", "--variant", "uf-p-2", "--annotations", "all", "--users", "40",
                    "--unseen-users", "4", "--survey-pairs", "300", "--out", str(out))
    _check_dataset(printed, out)
    assert printed["counts"]["users"] == {"seen": 40, "unseen": 4} and "dropped_tied_prompts" in printed["dropped"]
    assert main(["data", "inspect", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["users"] == {"seen": 40, "unseen": 4}

    table = flat(load(tiny_dir))
    src = write(table.iloc[list(range(len(table))) + [0]], tmp_path / "flat.jsonl")  # one judgement twice
    printed = _json(capsys, "data", "import", str(src), "--out", str(tmp_path / "imported"))
    _check_dataset(printed, tmp_path / "imported")
    assert printed["dropped"]["dropped_repeated_judgements"] == 1


def test_data_builders(tmp_path, capsys):
    from test_personalllm import ARGS as PLM_ARGS
    from test_personalllm import plm_table
    from test_tldr import ARGS as TLDR_ARGS
    from test_tldr import WORKERS, comparisons
    from test_ufp_builder import write_fixture

    (tmp_path / "tldr").mkdir()
    comparisons(200, 0, "train", "train", WORKERS).to_parquet(tmp_path / "tldr" / "train-00000-of-00001.parquet")
    comparisons(60, 1, "valid", "valid1", WORKERS).to_parquet(tmp_path / "tldr" / "validation-00000-of-00001.parquet")
    printed = _json(capsys, "data", "build-tldr", "--tldr", str(tmp_path / "tldr"), *TLDR_ARGS,
                    "--out", str(tmp_path / "t"))
    _check_dataset(printed, tmp_path / "t")
    assert printed["dropped"]["dropped_missing_post_or_text"] > 0

    (tmp_path / "plm").mkdir()
    plm_table(60, 0, "train").to_parquet(tmp_path / "plm" / "train-00000-of-00001.parquet")
    plm_table(20, 1, "test").to_parquet(tmp_path / "plm" / "test-00000-of-00001.parquet")
    printed = _json(capsys, "data", "build-personalllm", "--personalllm", str(tmp_path / "plm"), *PLM_ARGS,
                    "--out", str(tmp_path / "p"))
    _check_dataset(printed, tmp_path / "p")

    uf, cleaned, _, _ = write_fixture(tmp_path, n_random=700)
    printed = _json(capsys, "data", "build-ufp", "--variant", "uf-p-2", "--annotations", "all", "--users", "20",
                    "--unseen-users", "2", "--survey-pairs", "0", "--ultrafeedback", str(uf), "--cleaned",
                    str(cleaned), "--out", str(tmp_path / "u"))
    _check_dataset(printed, tmp_path / "u")
    assert printed["dropped"]["dropped_duplicate_prompts"] == 1


def test_benchmark_report_and_compare(micro_dir, tmp_path, capsys):
    spec = tmp_path / "micro.yaml"
    spec.write_text(f"version: 1\nname: micro\ndata: {{source: directory, path: {micro_dir}}}\nmethods: [uniform]\n"
                    "seeds: [0]\ncommon: {epochs: 1}\n")
    res = tmp_path / "res"
    ran = _json(capsys, "benchmark", str(spec), "--out", str(res))
    result = res / "micro" / "results" / "uniform" / "seed0.json"
    assert ran["results"] == str(res / "micro") and ran["done"] == [str(result)] and ran["skipped"] == []
    tables = {t["key"]: t for t in ran["tables"]}
    seen = tables["table1-seen"]["rows"][0]
    accuracy = json.loads(result.read_text())["metrics"]["seen"]["accuracy"]
    assert seen["row"] == "Uniform" and seen["cells"]["micro"]["mean"] == pytest.approx(100 * accuracy)
    again = _json(capsys, "benchmark", str(spec), "--out", str(res))
    assert again["done"] == [] and again["skipped"] == [str(result)] and again["tables"] == ran["tables"]
    assert "quick" in _json(capsys, "benchmark", "--list")

    report = _json(capsys, "report", str(res), "--out", str(tmp_path / "rep"))
    assert report["tables"] == ran["tables"]
    assert report["files"] == [str(tmp_path / "rep" / f"tables.{x}") for x in ("md", "csv", "tex")]
    assert all((tmp_path / "rep" / f"tables.{x}").exists() for x in ("md", "csv", "tex"))

    same = _json(capsys, "compare", str(res), str(res))
    assert same["failed"] is False and same["regressions"] == [] and {r["status"] for r in same["rows"]} == {"ok"}
    worse = tmp_path / "worse"
    shutil.copytree(res, worse)
    r = json.loads(result.read_text())
    r["metrics"]["seen"]["accuracy"] -= 0.2
    (worse / result.relative_to(res)).write_text(json.dumps(r))
    dropped = _json(capsys, "compare", str(res), str(worse), code=1)
    assert dropped["failed"] is True and [(x["metric"], x["status"]) for x in dropped["regressions"]] == [
        ("seen.accuracy", "regressed")]
    assert dropped["regressions"][0]["delta"] == pytest.approx(-20)


def test_errors_stay_one_line_on_stderr_with_json(tmp_path, capsys):
    assert main(["report", str(tmp_path / "nothing"), "--json"]) == 1
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.strip().startswith("error: no results under")
