"""Benchmark specs, the runner's resume, reports from stored results, and the CI comparison."""

from __future__ import annotations

import json
import textwrap

import pytest

import coplctl.bench.runner as runner
from coplctl.bench.results import load_results
from coplctl.bench.spec import SpecError, list_specs, load_spec
from coplctl.bench.tables import build_tables, to_csv, to_latex, to_markdown
from coplctl.cli import main
from coplctl.errors import CoplError


@pytest.mark.parametrize("path", list_specs(), ids=lambda p: p.stem)
def test_every_shipped_spec_loads_and_validates(path):
    spec = load_spec(str(path))
    assert spec.name == path.stem and spec.version == 1 and spec.methods and spec.seeds
    if spec.name.startswith("sim-"):
        assert spec.data.source == "simulated" and spec.mode == "frozen" and spec.backbone == "minilm"


def test_include_merges_and_overrides():
    twin = load_spec("sim-uf-p-4-avg")
    assert (twin.data.variant, twin.data.annotations, twin.data.source) == ("uf-p-4", "avg", "simulated")
    assert twin.adaptation == ["weighted", "average", "optimize"] and twin.ablations == []
    assert twin.fewshot_curve.hops == [2, 4] and twin.pseudo_labels is None
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
    ("version: 1\nname: [x\n", r"bad.yaml: not valid YAML"),
])
def test_invalid_specs_name_the_file_and_key(tmp_path, body, message):
    with pytest.raises(SpecError, match=message):
        load_spec(str(_write(tmp_path, body)))


TINY = """\
version: 1
name: tiny
data: {{source: simulated, variant: uf-p-2, annotations: all, users: 60, unseen_users: 4, survey_pairs: 150}}
methods: [uniform, copl]
seeds: [0]
common: {{epochs: 2}}
overrides: {{copl: {{gcf_overrides: {{dim: 8, epochs: 30}}}}{extra}}}
adaptation: [weighted, average]
fewshot_curve: {{shots: [1, 4], hops: [2, 4]}}
figures: false
"""


def test_interrupted_benchmark_resumes_without_redoing_finished_runs(tmp_path, monkeypatch):
    spec = load_spec(str(_write(tmp_path, TINY.format(extra=""), "tiny.yaml")))
    real = runner.run_job
    calls = []

    def interrupt_second(spec, ds, base, name, *a, **kw):
        calls.append(name)
        if len(calls) == 2:
            raise KeyboardInterrupt  # Ctrl-C while the second model trains
        return real(spec, ds, base, name, *a, **kw)

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
    tables = {t.key: t for t in build_tables(results)}
    assert {"table1-seen", "table1-unseen", "table2-tiny", "table4", "table5"} <= set(tables)
    md = to_markdown(tables["table1-seen"])
    assert "| CoPL |" in md and "| Uniform |" in md and "**" in md
    assert "table1-seen,CoPL,tiny" in to_csv(tables["table1-seen"]) and "\\textbf" in to_latex(tables["table1-seen"])


def test_compare_fails_on_a_deliberately_worsened_method(tmp_path, capsys):
    good = load_spec(str(_write(tmp_path, TINY.format(extra=""), "tiny.yaml")))
    good.methods, good.adaptation, good.fewshot_curve = ["uniform"], [], None
    runner.run_benchmark(good, tmp_path / "base", progress=False)
    worse = load_spec(str(_write(tmp_path, TINY.format(extra=", uniform: {lr: 0.0}"), "tiny.yaml")))
    worse.methods, worse.adaptation, worse.fewshot_curve = ["uniform"], [], None  # lr 0: it learns nothing
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
    text = TINY.format(extra="") + "pseudo_labels: {pairs_per_user: 2, users_per_group: 1, pairs_per_specific_user: 40}\n"
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


def test_real_data_spec_without_data_says_how_to_build_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    spec = load_spec("uf-p-4-avg")
    with pytest.raises(CoplError, match=r"data/uf-p-4-avg does not exist.*coplctl data build-ufp.*sim-uf-p-4-avg"):
        runner.run_benchmark(spec, tmp_path / "out", progress=False)


def test_finished_results_are_reused_only_with_the_same_settings(tmp_path):
    spec = load_spec(str(_write(tmp_path, TINY.format(extra=""), "tiny.yaml")))
    spec.methods, spec.adaptation, spec.fewshot_curve = ["uniform"], [], None
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
