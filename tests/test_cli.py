"""The command line as a user meets it: help with examples, one-line errors, exit codes."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from coplctl.cli import app, main


def _commands(group, prefix=()):
    """Every command path of the Typer app, e.g. ('data', 'simulate')."""
    import typer.main

    cmd = typer.main.get_command(group)
    stack = [(prefix, cmd)]
    while stack:
        path, c = stack.pop()
        yield path
        for name, sub in getattr(c, "commands", {}).items():
            stack.append(((*path, name), sub))


@pytest.mark.parametrize("path", sorted(_commands(app)), ids=lambda p: " ".join(p) or "coplctl")
def test_every_help_shows_examples(path, capsys):
    assert main([*path, "--help"]) == 0
    out = capsys.readouterr().out
    assert "Usage:" in out and "Examples" in out and "$ coplctl" in out


@pytest.mark.parametrize("argv, text", [
    (["dat"], "No such command 'dat'. Did you mean 'data'"),
    (["data", "simulate", "--sed", "3"], "No such option: --sed"),
    (["data", "simulate", "--variant", "uf-p-3"], "'uf-p-3' is not one of"),
    (["data", "inspect"], "Missing argument 'DIR'"),
])
def test_usage_errors_are_one_line(argv, text):
    res = subprocess.run([sys.executable, "-m", "coplctl", *argv], capture_output=True, text=True)
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and text in lines[0] and "--help" in lines[0], res.stderr
    assert res.stdout == ""


def test_known_error_is_one_red_line_exit_1(tmp_path):
    res = subprocess.run([sys.executable, "-m", "coplctl", "data", "inspect", str(tmp_path / "nope")],
                         capture_output=True, text=True)
    assert res.returncode == 1
    assert res.stderr.strip().splitlines() == [f"error: {tmp_path / 'nope'}: no such dataset directory "
                                               "(create one with `coplctl data simulate` or `coplctl data build-ufp`)"]


def test_simulate_then_inspect(tmp_path, capsys):
    out = tmp_path / "d"
    argv = ["data", "simulate", "--variant", "uf-p-2", "--annotations", "all", "--users", "40",
            "--unseen-users", "4", "--survey-pairs", "300", "--out", str(out)]
    assert main(argv) == 0
    assert main(argv) == 1  # exists: refuses without --force
    assert "already exists" in capsys.readouterr().err
    assert main([*argv, "--force"]) == 0
    capsys.readouterr()
    assert main(["data", "inspect", str(out), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["users"] == {"seen": 40, "unseen": 4}
    assert summary["annotations_per_seen_user"]["histogram"] == {"7": 40}  # 8 with the held-out valid pair
    stages = summary["filtering"]
    assert stages["survey_pairs"] == 300 and stages["kept_pairs"] <= stages["candidate_pairs"]
    assert 0 < summary["survey"]["controversial_share"] < 1  # UF-P-2: the UF-P-4 survey holds common pairs too
    assert main(["data", "inspect", str(out)]) == 0
    text = capsys.readouterr().out
    assert "Users per group and role" in text and "helpfulness" in text
    assert "counts after each stage" in text and "test pool controversial share" in text


def test_bad_input_leaves_no_output(tmp_path, capsys):
    out = tmp_path / "d"
    assert main(["data", "simulate", "--users", "5", "--survey-pairs", "3", "--out", str(out)]) == 1
    assert "survey pairs" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_version_is_the_installed_packages(capsys):
    from importlib.metadata import version

    import coplctl

    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"coplctl {version('coplctl')}" == f"coplctl {coplctl.__version__}"
