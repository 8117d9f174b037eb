"""The README's commands: the two set-up commands are what users and CI run, and every `coplctl`
command line shown parses (a renamed option or command breaks this test, not a user)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _quick_start_commands() -> list[str]:
    section = README.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```bash\n(.+?)\n```", section, flags=re.S)


def test_two_commands_and_ci_runs_the_test_one():
    commands = _quick_start_commands()
    assert len(commands) == 2 and all("\n" not in c for c in commands)
    main_job, tests = commands
    assert "pip install -e ." in main_job and "coplctl " in main_job
    assert "pytest" in tests
    assert tests in (ROOT / ".ci" / "run").read_text().splitlines()


def _coplctl_lines() -> list[list[str]]:
    """Argument lists of every coplctl invocation in the README's bash blocks."""
    found = []
    for block in re.findall(r"```bash\n(.+?)\n```", README, flags=re.S):
        text = block.replace("\\\n", " ")
        for line in text.splitlines():
            line = line.split("  #")[0]
            for part in re.split(r"&&|;|\|", line):
                words = shlex.split(part)
                if "coplctl" not in words or any("$" in w for w in words):
                    continue
                found.append(words[words.index("coplctl") + 1:])
    return found


@pytest.mark.parametrize("args", _coplctl_lines(), ids=lambda a: " ".join(a[:3]))
def test_readme_command_lines_parse(args):
    import typer.main

    from coplctl.cli import app

    group = typer.main.get_command(app)
    ctx = group.make_context("coplctl", list(args))
    rest = ctx._protected_args + ctx.args
    command, path = group, ["coplctl"]
    while rest:  # walk down the command groups; the leaf parses (and type-checks) its options
        name, command, rest = command.resolve_command(ctx, rest)
        path.append(name)
        ctx = command.make_context(" ".join(path), list(rest), parent=ctx)
        rest = (getattr(ctx, "_protected_args", []) + ctx.args) if hasattr(command, "commands") else []
    assert len(path) > 1 or "--help" in args


def test_the_first_run_walkthrough_shows_what_the_dry_run_prints(tmp_path, monkeypatch, capsys):
    from coplctl.cli import main

    section = README.split("### Reproducing the paper on GPUs", 1)[1].split("\n### ", 1)[0]
    command = next(line for line in re.findall(r"```bash\n(.+?)\n```", section, flags=re.S)[0].splitlines()
                   if "--dry-run" in line)
    shown = next(piece for piece in section.split("```") if piece.lstrip().startswith("plan of uf-p-4-avg"))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("COLUMNS", "200")
    assert main(shlex.split(command)[1:]) == 0
    printed = capsys.readouterr().out
    rows = lambda text: [line.strip() for line in text.splitlines() if line.strip().startswith(("│", "┃"))]  # noqa: E731
    assert rows(shown) and rows(shown) == rows(printed), printed
    assert "75 trainings: 75 to run, 0 finished in results/uf-p-4-avg (skipped)" in shown
    assert "75 trainings: 75 to run, 0 finished in results/uf-p-4-avg (skipped)" in printed
