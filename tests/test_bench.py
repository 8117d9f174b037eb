"""Benchmark specs, the runner's resume, reports from stored results, and the CI comparison."""

from __future__ import annotations

import json
import textwrap

import pytest

import coplctl.bench.runner as runner
from coplctl.bench.results import load_results
from coplctl.bench.spec import SpecError, experiment_options, list_specs, load_spec
from coplctl.bench.tables import build_report, to_csv, to_latex, to_markdown
from coplctl.cli import main
from coplctl.core.errors import CoplError


@pytest.mark.parametrize("path", list_specs(), ids=lambda p: p.stem)
def test_every_shipped_spec_loads_and_validates(path):
    spec = load_spec(str(path))
    assert spec.name == path.stem and spec.version == 1 and spec.methods and spec.seeds
    if spec.name.startswith("sim-"):
        assert spec.data.source == "simulated" and spec.mode == "frozen" and spec.backbone == "minilm"


def test_include_merges_and_overrides():
    twin = load_spec("sim-uf-p-4-avg")
    assert (twin.data.variant, twin.data.annotations, twin.data.source) == ("uf-p-4", "avg", "simulated")
    copl = experiment_options(twin, "copl")
    assert copl.adaptation_variants == ["weighted", "average", "optimize"] and twin.ablations == []
    assert copl.fewshot_curve.hops == [2, 4] and copl.pseudo_labels is None
    assert [a.name for a in load_spec("sim-uf-p-4-all").ablations][0] == "copl-without-gnn"


def _write(tmp_path, text, name="bad.yaml"):
    f = tmp_path / name
    f.write_text(textwrap.dedent(text))
    return f


@pytest.mark.parametrize("body, message", [
    ("version: 1\nname: x\nseedz: [1]\n", r"bad.yaml: unknown key seedz \(did you mean 'seeds'\?\)"),
    ("version: 1\nname: x\ndata: {users: many}\n", r"bad.yaml: data.users must be int"),
    ("version: 1\nname: x\ndata: {colour: red}\n", r"bad.yaml: unknown key data.colour"),
    ("version: 1\nname: x\nmethods: [copl, unifrom]\n", r"bad.yaml: unknown method 'unifrom' \(did you mean 'uniform'\?\)"),
    ("version: 2\nname: x\n", r"bad.yaml: version is 2"),
    ("name: x\n", r"bad.yaml: missing key version"),
    ("version: 1\nname: x\ninclude: nope.yaml\n", r"nope.yaml: no such spec file"),
    ("version: 1\nname: x\nablations: [{name: a, method: copl, extra: 1}]\n", r"unknown key ablations\[0\].extra"),
    ("version: 1\nname: [x\n", r"bad.yaml line 3: invalid YAML"),
    ("version: 1\nname: ../x\n", r"bad.yaml: name '../x' is not a safe name"),
    ("version: 1\nname: /tmp/x\n", r"bad.yaml: name '/tmp/x' is not a safe name"),
    ("version: 1\nname: a/b\n", r"bad.yaml: name 'a/b' is not a safe name"),
    ("version: 1\nname: 'a\\b'\n", r"bad.yaml: name 'a\\\\b' is not a safe name"),
    ("version: 1\nname: ''\n", r"bad.yaml: name '' is not a safe name"),
    ("version: 1\nname: ..\n", r"bad.yaml: name '..' is not a safe name"),
    ("version: 1\nname: .hidden\n", r"bad.yaml: name '.hidden' is not a safe name"),
    ("version: 1\nname: x\nablations: [{name: ../../etc, method: copl}]\n",
     r"bad.yaml: ablations\[0\].name '../../etc' is not a safe name"),
    ("version: 1\nname: x\nmethods: [copl]\nablations: [{name: copl, method: copl}]\n",
     r"bad.yaml: ablations\[0\].name 'copl' repeats methods\[0\]"),
    ("version: 1\nname: x\nseeds: [0, 0]\n", r"bad.yaml: seeds repeats a seed"),
    ("version: 1\nname: x\noverrides: {copl: 5}\n", r"bad.yaml: overrides.copl must be a mapping"),
    ("version: 1\nname: x\ncommon: ", r"bad.yaml: YAML nested too deeply to read"),
])
def test_invalid_specs_name_the_file_and_key(tmp_path, body, message):
    if body.endswith("common: "):
        body += "[" * 100_000
    with pytest.raises(SpecError, match=message):
        load_spec(str(_write(tmp_path, body)))


@pytest.mark.parametrize("body, message", [
    ("version: 1\nname: x\nadaptation: [weighted]\n",
     r"bad.yaml: adaptation is one of method copl's experiments now: write it as experiments: \{copl: \{adaptation_variants: ...\}\}"),
    ("version: 1\nname: x\nfewshot_curve: {shots: [1]}\n",
     r"bad.yaml: fewshot_curve is one of method copl's experiments now: write it as experiments: \{copl: \{fewshot_curve: ...\}\}"),
    ("version: 1\nname: x\nfigures: false\n", r"experiments: \{copl: \{run_figures: ...\}\}"),
    ("version: 1\nname: x\nexperiments: {copl: {adaptation_variants: [best]}}\n",
     r"bad.yaml: experiments.copl: adaptation_variants entries are weighted, average, optimize, not 'best'"),
    ("version: 1\nname: x\nexperiments: {copl: {run_figures: maybe}}\n", r"bad.yaml: experiments.copl.run_figures must be bool"),
    ("version: 1\nname: x\nexperiments: {copl: {figure: false}}\n",
     r"bad.yaml: unknown key experiments.copl.figure \(did you mean 'run_figures'\?\)"),
    ("version: 1\nname: x\nexperiments: {copl: {fewshot_curve: {shots: 2}}}\n",
     r"bad.yaml: experiments.copl.fewshot_curve.shots must be a list"),
    ("version: 1\nname: x\nexperiments: {uniform: {}}\n", r"bad.yaml: experiments.uniform: method uniform has no experiments"),
    ("version: 1\nname: x\nexperiments: {cpol: {}}\n", r"bad.yaml: unknown method 'cpol' \(did you mean 'copl'\?\)"),
    ("version: 1\nname: x\nexperiments: [copl]\n", r"bad.yaml: experiments must be a mapping"),
])
def test_methods_own_their_experiments_and_old_keys_say_where_they_moved(tmp_path, body, message):
    with pytest.raises(SpecError, match=message):
        load_spec(str(_write(tmp_path, body)))


def test_bench_names_no_method_and_no_experiment_key():
    """The runner, results, tables and comparison know no method: every method-specific piece (experiments,
    their tables, figures and compared metrics, whether a method can run) comes through the method's hooks."""
    import dataclasses
    import re
    from pathlib import Path

    from coplctl.core.registry import METHODS, method_label

    words = set()
    for name in METHODS.names():
        words |= {name, method_label(name)}
        options = METHODS.get(name).Experiments
        words |= {f.name for f in dataclasses.fields(options)} if options is not None else set()
    bench = Path(runner.__file__).parent
    found = [f"{f.name}:{n}: {w}" for f in sorted(bench.glob("*.py"))
             for n, line in enumerate(f.read_text().splitlines(), 1)
             for w in sorted(words) if re.search(rf"(?<![\w-]){re.escape(w)}(?![\w-])", line, re.IGNORECASE)]
    assert not found, found
    assert "copl" in words and "adaptation_variants" in words  # the check sees what it must


def test_the_runner_leaves_the_callers_spec_alone_and_stamps_provenance_once(tmp_path, monkeypatch):
    spec = load_spec(str(_write(tmp_path, TINY.format(extra=""), "tiny.yaml")))
    spec.methods, spec.experiments, spec.seeds = ["uniform"], {}, [0, 1]
    before = json.dumps(__import__("dataclasses").asdict(spec), sort_keys=True)
    calls = []
    real = runner.provenance
    monkeypatch.setattr(runner, "provenance", lambda path: calls.append(path) or real(path))
    runner.run_benchmark(spec, tmp_path / "out", progress=False, sets={"epochs": 1})
    assert json.dumps(__import__("dataclasses").asdict(spec), sort_keys=True) == before  # no --set leaked into it
    assert len(calls) == 1  # one data hash and one git call for the whole benchmark
    results = load_results(tmp_path / "out")
    assert len(results) == 2 and {r["config"]["epochs"] for r in results} == {1}
    assert results[0]["provenance"]["data_hash"] == results[1]["provenance"]["data_hash"]


def test_spec_files_that_are_not_utf8_are_one_error(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_bytes("version: 1\nname: x\n".encode("utf-16"))
    with pytest.raises(SpecError, match=r"bad.yaml: is not UTF-8 text"):
        load_spec(str(f))
    f.write_bytes(b"version: 1\nname: caf\xe9\n")
    with pytest.raises(SpecError, match=r"bad.yaml: is not UTF-8 text"):
        load_spec(str(f))


TINY = """\
version: 1
name: tiny
data: {{source: simulated, variant: uf-p-2, annotations: all, users: 60, unseen_users: 4, survey_pairs: 150}}
methods: [uniform, copl]
seeds: [0]
common: {{epochs: 2}}
overrides: {{copl: {{gcf_overrides: {{dim: 8, epochs: 30}}}}{extra}}}
experiments:
  copl:
    adaptation_variants: [weighted, average]
    fewshot_curve: {{shots: [1, 4], hops: [2, 4]}}
    run_figures: false
"""


def test_interrupted_benchmark_resumes_without_redoing_finished_runs(tmp_path, monkeypatch):
    spec = load_spec(str(_write(tmp_path, TINY.format(extra=""), "tiny.yaml")))
    real = runner.run_job
    calls = []

    def interrupt_second(run, job, *a, **kw):
        calls.append(job.name)
        if len(calls) == 2:
            raise KeyboardInterrupt  # Ctrl-C while the second model trains
        return real(run, job, *a, **kw)

    monkeypatch.setattr(runner, "run_job", interrupt_second)
    with pytest.raises(KeyboardInterrupt):
        runner.run_benchmark(spec, tmp_path / "out", progress=False)
    first = tmp_path / "out" / "tiny" / "results" / "uniform" / "seed0.json"
    assert first.exists() and not (tmp_path / "out" / "tiny" / "results" / "copl").exists()
    before = first.read_text()
    calls.clear()
    summary = runner.run_benchmark(spec, tmp_path / "out", progress=False)
    assert calls == ["uniform", "copl"][1:]  # only the unfinished run
    assert first.read_text() == before and summary["skipped"] == [str(first)]
    results = load_results(tmp_path / "out")
    copl = next(r for r in results if r["name"] == "copl")
    assert set(copl["extra"]["adaptation"]) == {"weighted", "average"}
    assert set(copl["extra"]["fewshot_curve"]) == {"2", "4"} and copl["provenance"]["data_hash"]
    tables = {t.key: t for t in build_report(results)[0]}
    assert {"table1-seen", "table1-unseen", "table2-tiny", "table4", "table5"} <= set(tables)
    md = to_markdown(tables["table1-seen"])
    assert "| CoPL |" in md and "| Uniform |" in md and "**" in md
    assert "table1-seen,CoPL,tiny" in to_csv(tables["table1-seen"]) and "\\textbf" in to_latex(tables["table1-seen"])


def test_compare_fails_on_a_deliberately_worsened_method(tmp_path, capsys):
    good = load_spec(str(_write(tmp_path, TINY.format(extra=""), "tiny.yaml")))
    good.methods, good.experiments = ["uniform"], {}
    runner.run_benchmark(good, tmp_path / "base", progress=False)
    worse = load_spec(str(_write(tmp_path, TINY.format(extra=", uniform: {lr: 0.0}"), "tiny.yaml")))
    worse.methods, worse.experiments = ["uniform"], {}  # lr 0: it learns nothing
    runner.run_benchmark(worse, tmp_path / "cur", progress=False)

    assert main(["compare", str(tmp_path / "base"), str(tmp_path / "base")]) == 0
    capsys.readouterr()
    assert main(["compare", str(tmp_path / "base"), str(tmp_path / "cur"), "--tolerance", "2"]) == 1
    out, err = capsys.readouterr()
    assert "regressed" in out and "uniform" in out and "regressed or went missing" in err
    base = json.loads((tmp_path / "base" / "tiny" / "results" / "uniform" / "seed0.json").read_text())
    cur = json.loads((tmp_path / "cur" / "tiny" / "results" / "uniform" / "seed0.json").read_text())
    assert cur["metrics"]["seen"]["accuracy"] < base["metrics"]["seen"]["accuracy"] - 0.02
    (tmp_path / "cur" / "tiny" / "results" / "uniform" / "seed0.json").unlink()
    assert main(["compare", str(tmp_path / "base"), str(tmp_path / "cur")]) == 1  # a missing result fails too
    assert main(["compare", str(tmp_path / "nothing"), str(tmp_path / "base")]) == 1  # so does an empty baseline
    assert "no results under" in capsys.readouterr().err


def test_pseudo_labels_and_report_in_every_format(tmp_path, capsys):
    text = TINY.format(extra="") + "    pseudo_labels: {pairs_per_user: 2, users_per_group: 1, pairs_per_specific_user: 40}\n"
    spec = load_spec(str(_write(tmp_path, text, "tiny.yaml")))
    spec.methods = ["copl"]
    runner.run_benchmark(spec, tmp_path / "res", progress=False)
    copl = load_results(tmp_path / "res")[0]
    pseudo = copl["extra"]["pseudo_labels"]
    assert pseudo["pairs_added"] == 2 * 60 and pseudo["user_specific"]["users"] == 2
    assert 0 <= pseudo["pseudo_label"]["accuracy"] <= 1
    assert main(["report", str(tmp_path / "res"), "--out", str(tmp_path / "rep")]) == 0
    printed = capsys.readouterr().out
    assert "Table 1 (seen users)" in printed and "Table 6" in printed and "| User-specific |" in printed
    for f in ("tables.md", "tables.csv", "tables.tex", "figure2.png"):
        assert (tmp_path / "rep" / f).stat().st_size > 0
    assert main(["report", str(tmp_path / "nothing")]) == 1


def test_real_data_spec_without_data_says_how_to_build_it(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    spec = load_spec("uf-p-4-avg")
    with pytest.raises(CoplError, match=r"data/uf-p-4-avg does not exist.*coplctl data build-ufp.*sim-uf-p-4-avg.*"
                                        r"--no-download: nothing is downloaded"):
        runner.run_benchmark(spec, tmp_path / "out", progress=False, download=False)
    assert main(["benchmark", "tldr-all", "--no-download", "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err, err
    assert "coplctl data build-tldr --annotations all --tokenizer google/gemma-2b-it --max-tokens 1024 --out data/tldr-all" in err
    assert not (tmp_path / "data").exists()


def test_an_offline_hub_without_the_source_in_its_cache_stops_with_one_clear_error(tmp_path, monkeypatch, capsys):
    datasets = pytest.importorskip("datasets", reason="the hub extra (datasets) is not installed")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "empty-cache")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    assert main(["benchmark", "uf-p-2-all", "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert "could not build data/uf-p-2-all: could not load argilla/ultrafeedback-binarized-preferences-cleaned" in err
    assert "By hand instead: data/uf-p-2-all does not exist. Build it from UltraFeedback first" in err, err
    assert "Traceback" not in err and not (tmp_path / "data" / "uf-p-2-all").exists()


def test_the_dry_run_plans_every_training_and_trains_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["benchmark", "uf-p-4-avg", "--backbone", "gemma-7b-it", "--dry-run", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    spec = load_spec("uf-p-4-avg")
    searched = [m for m in spec.methods if m != "copl"]
    assert len(plan["jobs"]) == 3 * (4 * len(searched) + 1) == plan["to_run"]  # 3 seeds, a 4-rate grid, CoPL at 5e-5
    assert {j["lr"] for j in plan["jobs"] if j["name"] == "uniform"} == {1e-4, 5e-5, 1e-5, 5e-6}
    assert plan["data"]["build"] and "openbmb/UltraFeedback" in plan["data"]["status"]
    assert plan["backbones"] == [{"backbone": "gemma-7b-it", "mode": "lora", "precision": "float32",
                                  "precision_setting": "auto"}]
    gpu = plan["memory"]["copl"]["gpu"]
    assert gpu["dtype"] == "bfloat16" and gpu["parameters"] == 8_537_680_896  # gemma-7b without its LM head
    assert gpu["adapted_linears"] == 56 and gpu["tokens"] == 2 * 32 * 512  # q_proj, v_proj of 28 layers
    assert gpu["total"] == gpu["weights"] + gpu["trainable"] + gpu["activations"]
    assert gpu["total_other_checkpointing"] < gpu["total"] / 4
    assert plan["memory"]["copl"]["cpu"]["weights"] == 2 * gpu["weights"]
    assert not (tmp_path / "results").exists() and not (tmp_path / "data").exists()
    assert main(["benchmark", "uf-p-2-avg", "--seeds", "0", "--set", "lr=[1e-4,5e-5]", "--dry-run", "--json"]) == 0
    jobs = json.loads(capsys.readouterr().out)["jobs"]
    assert [j["lr"] for j in jobs if j["name"] == "uniform"] == [1e-4, 5e-5]  # --set lr replaces the spec's grid
    assert [j["lr"] for j in jobs if j["name"] == "copl"] == [5e-5]  # a method's own override still wins
    tiny = _write(tmp_path, TINY.format(extra=""), "tiny.yaml")
    runner.run_benchmark(load_spec(str(tiny)), tmp_path / "out", names=["uniform"], progress=False)
    dry = ["benchmark", str(tiny), "--out", str(tmp_path / "out"), "--dry-run"]
    assert main(dry) == 0
    text = capsys.readouterr().out
    assert "2 trainings: 1 to run, 1 finished" in text and "simulated earlier" in text, text
    assert main([*dry, "--force"]) == 0
    assert "2 trainings: 2 to run, 0 finished" in capsys.readouterr().out
    assert main([*dry, "--set", "epochs=3"]) == 0  # the stored result was made with epochs 2: the run would stop
    assert "uniform; stops:" in capsys.readouterr().out.replace("\n", " ")
    assert main([*dry[:-3], "--out", str(tmp_path / "tiny.yaml"), "--dry-run"]) == 1
    assert "is a file; the results directory must be a directory" in capsys.readouterr().err
    stale = _write(tmp_path, TINY.format(extra="").replace("users: 60", "users: 61"), "stale.yaml")
    assert main(["benchmark", str(stale), "--out", str(tmp_path / "out"), "--dry-run"]) == 0
    assert "simulated with other settings than the spec's: the run stops" in capsys.readouterr().out


def test_finished_results_are_reused_only_with_the_same_settings(tmp_path):
    spec = load_spec(str(_write(tmp_path, TINY.format(extra=""), "tiny.yaml")))
    spec.methods, spec.experiments = ["uniform"], {}
    runner.run_benchmark(spec, tmp_path / "out", progress=False)
    with pytest.raises(CoplError, match=r"produced with other settings \(epochs: 2 -> 3\)"):
        spec.common["epochs"] = 3
        runner.run_benchmark(spec, tmp_path / "out", progress=False)
    summary = runner.run_benchmark(spec, tmp_path / "out", progress=False, force=True)
    assert len(summary["done"]) == 1
    spec.methods = ["uniform", "copl"]
    spec.common["experts"] = 4  # a CoPL option: uniform ignores it, so its result still stands
    assert runner.run_benchmark(spec, tmp_path / "out", names=["uniform"], progress=False)["skipped"]
    spec.common["expert"] = 4
    with pytest.raises(CoplError, match="no method of tiny has the option 'expert'; did you mean experts"):
        runner.run_benchmark(spec, tmp_path / "out", progress=False)


def test_benchmark_under_two_processes_writes_each_result_once(tmp_path):
    import subprocess
    import sys

    f = _write(tmp_path, TINY.format(extra="").replace("methods: [uniform, copl]", "methods: [uniform]"), "tiny.yaml")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "-m", "coplctl", "benchmark", str(f), "--out", str(tmp_path / "out")]
    res = subprocess.run(cmd, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    results = load_results(tmp_path / "out")
    assert len(results) == 1 and results[0]["training"]["processes"] == 2
    assert (tmp_path / "out" / "tiny" / "runs" / "uniform" / "seed0" / "method.json").exists()


def _no_work(*a, **k):
    raise AssertionError("work started before the check")


@pytest.mark.parametrize("change, message", [
    (("epochs: 2", "epochs: abc"), r"tiny.yaml: common.epochs: .*whole number, got 'abc'"),
    (("{gcf_overrides", "{lr: fast, gcf_overrides"), r"tiny.yaml: overrides.copl.lr: .*number, got 'fast'"),
    (("run_figures: false", "run_figures: false\nablations: [{name: no-mole, method: copl, overrides: {mole: maybe}}]"),
     r"tiny.yaml: ablations\[0\].overrides.mole: .*true or false, got 'maybe'"),
    (("run_figures: false", "run_figures: false\nmode: lorra"), r"tiny.yaml: mode: .*lorra"),
    (("run_figures: false", "run_figures: false\nseeds: [-1]"), r"tiny.yaml: seeds: -1 is out of range"),
    (("run_figures: false", "run_figures: false\ndata: {users: 0}"), r"tiny.yaml: data: protocol option users: 0"),
])
def test_wrong_config_values_stop_the_benchmark_before_any_work(tmp_path, monkeypatch, change, message):
    monkeypatch.setattr(runner, "prepare_data", _no_work)
    with pytest.raises(SpecError, match=message):  # when the spec loads (data protocol) or the run starts
        spec = load_spec(str(_write(tmp_path, TINY.format(extra="").replace(*change), "tiny.yaml")))
        runner.run_benchmark(spec, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("args, message", [
    (["--set", "epochs=abc"], r"^error: --set epochs: .*whole number, got 'abc'$"),
    (["--mode", "lorra"], r"^error: --mode: .*lorra"),
    (["--seeds", "abc"], r"^error: --seeds expects comma-separated whole numbers \(e.g. 0,1,2\), got 'abc'$"),
    (["--seeds", ","], r"^error: --seeds expects comma-separated whole numbers"),
    (["--seeds=-1"], r"^error: --seeds: -1 is out of range"),
    (["--set", "epochs="], r"^error: --set epochs: empty value"),
    (["--set", "common={a: 1"], r"^error: --set common: invalid value"),
    (["--methods", " , "], r"^error: --methods expects comma-separated names"),
    (["--out", "FILE"], r"^error: --out .*FILE: .*FILE is a file; the results directory must be a directory$"),
    (["--out", "FILE/sub"], r"^error: cannot create .*FILE/sub/tiny \(Not a directory\); choose another --out$"),
])
def test_bad_benchmark_options_are_one_line(tmp_path, monkeypatch, capsys, args, message):
    f = _write(tmp_path, TINY.format(extra=""), "tiny.yaml")
    (tmp_path / "FILE").write_text("not a directory")
    monkeypatch.setattr(runner, "prepare_data", _no_work)
    args = [a.replace("FILE", str(tmp_path / "FILE")) for a in args]
    assert main(["benchmark", str(f), "--out", str(tmp_path / "out"), *args]) == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and __import__("re").search(message, err), err


def test_a_second_benchmark_into_the_same_out_stops_at_once(tmp_path, monkeypatch):
    spec = load_spec(str(_write(tmp_path, TINY.format(extra=""), "tiny.yaml")))
    seen = []

    def second_run_while_the_first_prepares_data(spec, base, force=False, **options):
        with pytest.raises(CoplError) as e:  # another coplctl benchmark of the same spec and --out
            runner.run_benchmark(spec, tmp_path / "out", progress=False)
        seen.append(str(e.value))
        raise KeyboardInterrupt

    monkeypatch.setattr(runner, "prepare_data", second_run_while_the_first_prepares_data)
    with pytest.raises(KeyboardInterrupt):
        runner.run_benchmark(spec, tmp_path / "out", progress=False)
    import os

    assert seen == [f"{tmp_path / 'out'} is in use by another coplctl benchmark tiny (pid {os.getpid()}); "
                    f"wait for it or use another --out"]
    monkeypatch.setattr(runner, "prepare_data", lambda *a, **k: seen.append("free again") or (_ for _ in ()).throw(
        KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):  # the lock went with the first run
        runner.run_benchmark(spec, tmp_path / "out", progress=False)
    assert seen[-1] == "free again"


def _result(root, name="uniform", seed=0, accuracy=0.7):
    r = {"spec": "t", "name": name, "seed": seed, "metrics": {"seen": {"accuracy": accuracy, "common": 0.8},
                                                              "unseen": None},
         "extra": None}
    f = root / "t" / "results" / name / f"seed{seed}.json"
    f.parent.mkdir(parents=True, exist_ok=True)
    f.write_text(json.dumps(r))
    return f


@pytest.mark.parametrize("damage, message", [
    (lambda r: {**r, "metrics": None}, r"key 'metrics' must be a JSON object, not null"),
    (lambda r: [r], r"must hold a JSON object, not a list"),
    (lambda r: {k: v for k, v in r.items() if k != "spec"}, r"missing key 'spec'"),
    (lambda r: {**r, "seed": "0"}, r"key 'seed' must be a whole number, not text"),
    (lambda r: {**r, "metrics": {"seen": {"accuracy": "high"}}}, r"key 'metrics.seen.accuracy' must be a number"),
    (lambda r: {**r, "metrics": {"seen": 3}}, r"key 'metrics.seen' must be a JSON object or null"),
    (lambda r: {**r, "extra": {"gcf": None, "fewshot_curve": {"2": {"x": 0.5}}}}, r"extra.fewshot_curve.2.x"),
    (lambda r: {**r, "extra": {"pseudo_labels": {"user_specific": {"accuracy": []}}}},
     r"key 'extra.pseudo_labels.user_specific.accuracy' must be a number or null, not a list"),
    ("utf-16", r"is not UTF-8 text"),
    ("deep", r"JSON nested too deeply to read"),
    ("cut", r"invalid JSON"),
])
def test_damaged_results_are_one_error_naming_the_file(tmp_path, capsys, damage, message):
    from coplctl.core.errors import DataError

    for side in ("base", "cur"):
        _result(tmp_path / side, "uniform")
        _result(tmp_path / side, "copl", accuracy=0.8)
    bad = tmp_path / "cur" / "t" / "results" / "copl" / "seed0.json"
    if damage == "utf-16":
        bad.write_bytes(bad.read_text().encode("utf-16"))
    elif damage == "deep":
        bad.write_text("[" * 100_000 + "]" * 100_000)
    elif damage == "cut":
        bad.write_text(bad.read_text()[:30])
    else:
        bad.write_text(json.dumps(damage(json.loads(bad.read_text()))))
    with pytest.raises(DataError, match=message) as e:
        load_results(tmp_path / "cur")
    assert e.value.file == str(bad)
    for argv in (["compare", "base", "cur"], ["compare", "cur", "base"], ["report", "cur"], ["report", str(bad)]):
        assert main([str(tmp_path / a) if a in ("base", "cur") else a for a in argv]) == 1
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"error: {bad}") and "\n" not in err, (argv, err)


def test_report_outputs_never_replace_the_results(tmp_path, capsys):
    good = _result(tmp_path / "res")
    before = good.read_text()
    assert main(["report", str(tmp_path / "res"), "--out", str(tmp_path / "res")]) == 0  # beside them is fine
    assert good.read_text() == before and len(load_results(tmp_path / "res")) == 1
    assert (tmp_path / "res" / "tables.md").stat().st_size > 0
    capsys.readouterr()
    for out in (good, good / "sub"):
        assert main(["report", str(good), "--out", str(out)]) == 1
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and ("is a file" in err or "cannot create" in err), err
    assert good.read_text() == before


def test_your_own_dataset_directory_runs_through_benchmark_and_report(micro_dir, tmp_path, capsys):
    """A dataset that is not UF-P (no variant in meta.json, no groups): Oracle is skipped with a note,
    the others run, and the results record the dataset's own counts and hash."""
    from coplctl.data import PreferenceDataset, load

    ds = load(micro_dir)
    users = ds.users.assign(group=None)
    meta = {k: v for k, v in ds.meta.items() if k not in ("variant", "annotations", "protocol", "counts")}
    pairs = ds.pairs.assign(controversial=False)  # no group structure to mark pairs by
    mine = PreferenceDataset(ds.responses, users, pairs, {**meta, "source": "my-lab"}).save(tmp_path / "mine")
    spec = _write(tmp_path, textwrap.dedent(f"""\
        version: 1
        name: mine
        data: {{source: directory, path: {mine}}}
        methods: [oracle, uniform, copl]
        seeds: [0]
        common: {{epochs: 1}}
        overrides: {{copl: {{gcf_overrides: {{dim: 8, epochs: 10}}}}}}
        experiments: {{copl: {{run_figures: false}}}}
        """), "mine.yaml")
    assert main(["benchmark", str(spec), "--out", str(tmp_path / "out")]) == 0
    results = {r["name"]: r for r in load_results(tmp_path / "out")}
    assert results["oracle"]["metrics"] == {} and "preference group" in results["oracle"]["skipped"]
    assert results["uniform"]["metrics"]["seen"]["pairs"] > 0 and results["copl"]["metrics"]["unseen"]
    data = results["copl"]["data"]
    assert data["source"] == "directory" and data["counts"] == load(mine).counts() and "users" not in data
    assert results["copl"]["provenance"]["data_hash"]
    capsys.readouterr()
    assert main(["report", str(tmp_path / "out"), "--out", str(tmp_path / "report")]) == 0
    md = (tmp_path / "report" / "tables.md").read_text()
    assert "| Uniform |" in md and "| CoPL |" in md and "| Oracle |" not in md
    assert "_Note: Oracle skipped on mine: needs every user's preference group" in md
    assert "_Note: No Table 2 for mine: none of its seen users' test pairs is marked controversial._" in md


def test_lr_grid_keeps_the_best_validation_candidate_and_resumes_per_candidate(tmp_path, monkeypatch, capsys):
    """Planted: at 1e-12 nothing trains, so 1e-2 must win; the search is recorded, reported, and an
    interrupted search redoes only the missing candidate."""
    spec = _write(tmp_path, TINY.format(extra=""), "tiny.yaml")
    args = ["benchmark", str(spec), "--methods", "uniform", "--out", str(tmp_path / "out"), "--set", "lr=[1e-12, 1e-2]"]
    assert main(args) == 0
    (result,) = load_results(tmp_path / "out" / "tiny" / "results")
    search = result["lr_search"]
    assert search["grid"] == [1e-12, 1e-2] and search["chosen"] == 1e-2 and result["config"]["lr"] == [1e-12, 1e-2]
    scores = {c["lr"]: c["valid_accuracy"] for c in search["candidates"]}
    assert scores[1e-2] > scores[1e-12] and result["training"]["valid_accuracy"] == scores[1e-2]
    assert result["training"]["lr"] == 1e-2 and result["run_dir"].endswith("seed0-lr0.01")
    candidates = tmp_path / "out" / "tiny" / "search" / "uniform" / "seed0"
    assert sorted(p.name for p in candidates.iterdir()) == ["lr0.01.json", "lr1e-12.json"]

    (tmp_path / "out" / "tiny" / "results" / "uniform" / "seed0.json").unlink()  # as if stopped mid-search
    (candidates / "lr0.01.json").unlink()
    real, calls = runner.run_job, []
    monkeypatch.setattr(runner, "run_job", lambda *a, **kw: calls.append(kw["tag"]) or real(*a, **kw))
    assert main(args) == 0 and calls == ["-lr0.01"]
    again = load_results(tmp_path / "out" / "tiny" / "results")[0]
    assert again["lr_search"] == search and again["metrics"] == result["metrics"]
    capsys.readouterr()
    assert main(["report", str(tmp_path / "out"), "--out", str(tmp_path / "report")]) == 0
    md = (tmp_path / "report" / "tables.md").read_text()
    assert "_Note: Uniform on tiny: learning rate searched over 1e-12, 0.01 by validation accuracy; kept 0.01 (seed 0)._" in md
    assert "_Note: tiny: its valid pairs come from the survey that other users train on" in md


def test_bad_lr_grids_are_one_error(tmp_path, capsys):
    spec = _write(tmp_path, TINY.format(extra="").replace("run_figures: false", "run_figures: false\nlr_grid: [1e-4, 1e-4]"),
                  "tiny.yaml")
    assert main(["benchmark", str(spec), "--out", str(tmp_path / "out")]) == 1
    assert "repeats a value" in capsys.readouterr().err
    spec.write_text(spec.read_text().replace("lr_grid: [1e-4, 1e-4]", "lr_grid: [1e-4, -1]"))
    assert main(["benchmark", str(spec), "--out", str(tmp_path / "out")]) == 1
    assert "positive numbers, not -1" in capsys.readouterr().err


def test_a_diverging_candidate_is_recorded_never_chosen_and_a_diverging_run_is_one_error(tmp_path, monkeypatch, capsys):
    """Planted: at lr 1e30 the weights overflow at once, so the loss is not finite."""
    spec = _write(tmp_path, TINY.format(extra=""), "tiny.yaml")
    args = ["benchmark", str(spec), "--methods", "uniform", "--out", str(tmp_path / "out"), "--set", "lr=[1e30, 1e-2]"]
    assert main(args) == 0
    (result,) = load_results(tmp_path / "out" / "tiny" / "results")
    bad, good = result["lr_search"]["candidates"]
    assert result["lr_search"]["chosen"] == 1e-2 and good["valid_accuracy"] > 0.5
    assert bad["valid_accuracy"] is None and "loss became" in bad["diverged"] and "lr 1e+30" in bad["diverged"]
    stored = json.loads((tmp_path / "out" / "tiny" / "search" / "uniform" / "seed0" / "lr1e+30.json").read_text())
    assert stored["metrics"] == {} and stored["diverged"] == bad["diverged"] and stored["config"]["lr"] == 1e30
    (tmp_path / "out" / "tiny" / "results" / "uniform" / "seed0.json").unlink()  # as if stopped mid-search
    monkeypatch.setattr(runner, "run_job", lambda *a, **kw: pytest.fail("a stored candidate was retrained"))
    assert main(args) == 0 and load_results(tmp_path / "out" / "tiny" / "results")[0]["lr_search"] == result["lr_search"]
    monkeypatch.undo()
    capsys.readouterr()
    assert main(["report", str(tmp_path / "out"), "--out", str(tmp_path / "report")]) == 0
    assert "kept 0.01 (seed 0); training diverged at 1e+30" in (tmp_path / "report" / "tables.md").read_text()
    plain = ["benchmark", str(spec), "--methods", "uniform", "--out", str(tmp_path / "plain"), "--set", "lr=1e30"]
    capsys.readouterr()
    assert main(plain) == 1
    err = capsys.readouterr().err
    assert "training loss became" in err and "lower the learning rate" in err and "Traceback" not in err


def test_cells_on_few_test_pairs_say_how_few():
    """A cell resting on 17 test pairs (one pair = 5.9 points) says so in a note; Table 2 counts its
    controversial pairs; 100 pairs or more need no note."""
    def result(spec, name, pairs, controversial):
        seen = {"accuracy": 0.6, "common": 0.7, "controversial": 0.4, "pairs": pairs,
                "controversial_pairs": controversial}
        return {"spec": spec, "name": name, "seed": 0, "metrics": {"seen": seen}}

    tables = {t.key: t for t in build_report([result("small", "uniform", 17, 5), result("small", "copl", 17, 5),
                                              result("big", "uniform", 400, 150)])[0]}
    assert tables["table1-seen"].notes == ["small: the seen users' cells rest on 17 test pairs per seed (one pair is "
                                           "5.9 points)"]
    assert tables["table2-small"].notes == [
        "small: the seen users' cells rest on 5 controversial test pairs per seed (one pair is 20.0 points)",
        "small: the seen users' cells rest on 17 test pairs in all per seed (one pair is 5.9 points)"]
    assert tables["table2-big"].notes == []
    assert "_Note: small: the seen users' cells rest on 17 test pairs" in to_markdown(tables["table1-seen"])


def test_every_real_data_spec_searches_the_baselines_rate_over_the_papers_grid():
    """Appendix C.2: each baseline's learning rate searched over {1e-4, 5e-5, 1e-5, 5e-6}; CoPL keeps 5e-5."""
    from coplctl.bench.spec import search_dirs

    names = sorted({p.stem for d in search_dirs() for p in d.glob("*.yaml")})
    real = [n for n in names if load_spec(n).mode == "lora"]
    assert {"uf-p-2-all", "uf-p-4-avg", "tldr-all", "personalllm-avg"} <= set(real)
    for name in real:
        jobs = {job: o.get("lr") for job, _, o in load_spec(name).jobs()}
        assert jobs.pop("copl") == 5e-5, name
        assert all(v == [1e-4, 5e-5, 1e-5, 5e-6] for k, v in jobs.items()
                   if not k.startswith("copl") and k != "ceiling"), (name, jobs)  # the ceiling trains nothing
    for name in set(names) - set(real):  # their frozen twins (which include them) train at the mode's rates
        assert load_spec(name).lr_grid == [] and {o.get("lr") for _, _, o in load_spec(name).jobs()} == {None}, name


def test_table_2_notes_the_personal_signal_the_results_recorded():
    sig = {"labels": 900, "without_majority": 10, "users": 100, "share": 0.111, "share_of_labels": 0.11,
           "personal_per_user": 1.6, "labels_per_user": 14.4}
    seen = {"accuracy": 0.6, "common": 0.7, "controversial": 0.4, "pairs": 400, "controversial_pairs": 150}
    results = [{"spec": "mix", "name": n, "seed": 0, "metrics": {"seen": seen}, "data": {"personal_signal": sig}}
               for n in ("uniform", "copl")]
    (note,) = {t.key: t for t in build_report(results)[0]}["table2-mix"].notes
    assert note == ("mix: 11.1% of a seen user's training labels differ from the other users' majority on the same "
                    "pair (mean over 100 users; 1.60 personal of 14.40 comparable labels per user)")


def test_mixture_users_get_table_6_and_the_ceiling(tmp_path, capsys):
    """Users without groups: the user-specific models of Table 6 go to random users (one per attribute here);
    the ceiling runs beside the Oracle; every stored number is finite or null, so the report reads them."""
    text = TINY.format(extra="").replace(
        "variant: uf-p-2, annotations: all, users: 60", "variant: uf-p-4, annotations: all, preferences: mixture, users: 60")
    text += "    pseudo_labels: {pairs_per_user: 2, users_per_group: 1, pairs_per_specific_user: 40}\n"
    spec = load_spec(str(_write(tmp_path, text, "tiny.yaml")))
    spec.methods = ["ceiling", "copl"]
    runner.run_benchmark(spec, tmp_path / "res", progress=False)
    results = {r["name"]: r for r in load_results(tmp_path / "res")}
    assert results["copl"]["extra"]["pseudo_labels"]["user_specific"]["users"] == 4
    assert 0.5 < results["ceiling"]["metrics"]["seen"]["accuracy"] <= 1
    assert main(["report", str(tmp_path / "res"), "--out", str(tmp_path / "rep")]) == 0
    printed = capsys.readouterr().out
    assert "| Ceiling |" in printed and "| User-specific |" in printed


@pytest.mark.parametrize("data, message", [
    ("{build: foo}", r"data.build must be one of tldr, personalllm, not 'foo'"),
    ("{source: ultrafeedback, build: tldr}", r"data.build is for directory sources"),
    ("{tokenizer: null}", r"data.max_tokens needs data.tokenizer"),
    ("{max_tokens: -5}", r"data: protocol option max_tokens: -5 is out of range"),
])
def test_bad_data_build_keys_are_one_error_naming_the_file_and_key(tmp_path, data, message):
    from coplctl.bench.spec import find_spec

    f = _write(tmp_path, f"version: 1\ninclude: {find_spec('tldr-all')}\nname: t\ndata: {data}\n")
    with pytest.raises(SpecError, match=rf"{f}: .*{message}"):
        load_spec(str(f))
