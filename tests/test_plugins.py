"""A method from outside this repository: registered through the ``coplctl.methods`` entry-point group, it
runs in a benchmark with its own experiments (checked by its own dataclass), and adds its own table and
compared metric to reports, with no edit anywhere in coplctl."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

TESTS = Path(__file__).resolve().parent

PLUGIN = '''
from dataclasses import dataclass

from reference_method import ResponseBT

from coplctl.core.errors import DataError
from coplctl.core.registry import register_method
from coplctl.core.tables import Cell, ReportPart, Table


@dataclass
class EchoExperiments:
    repeats: int = 1
    """How often to echo."""


@register_method("echo-plugin", label="Echo")
class Echo(ResponseBT):
    """Echo: the reference method with an experiment of its own."""

    Experiments = EchoExperiments

    def experiments(self, ctx):
        return {"echo": {"repeats": ctx.options.repeats, "seen": len(ctx.data.user_ids("seen"))}}

    @classmethod
    def check_extra(cls, extra, file):
        if not isinstance((extra.get("echo") or {}).get("repeats"), int):
            raise DataError(file, "key 'extra.echo.repeats' must be a whole number")

    @classmethod
    def report(cls, results):
        mine = [r for r in results if r["name"] == cls.registry_name and r.get("extra")]
        cells = [Cell([float(r["extra"]["echo"]["repeats"]) for r in mine])]
        return ReportPart(tables=[Table("echo", "Echo table: repeats", ["all"], rows=[("repeats", cells)])])

    @classmethod
    def compared_metrics(cls, result):
        return {"echo.repeats": float(result["extra"]["echo"]["repeats"])}
'''


def test_a_plugin_method_brings_its_own_experiments_and_report(tmp_path):
    plug = tmp_path / "plug"
    (plug / "echo_plugin").mkdir(parents=True)
    (plug / "echo_plugin" / "__init__.py").write_text("")
    (plug / "echo_plugin" / "method.py").write_text(PLUGIN)
    dist = plug / "echo_plugin-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: echo-plugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[coplctl.methods]\necho-plugin = echo_plugin.method:Echo\n")
    spec = tmp_path / "plug.yaml"
    spec.write_text(textwrap.dedent("""\
        version: 1
        name: plug
        data: {source: simulated, variant: uf-p-2, annotations: all, users: 60, unseen_users: 4, survey_pairs: 150}
        methods: [echo-plugin]
        seeds: [0]
        experiments: {echo-plugin: {repeats: 3}}
        """))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(plug), str(TESTS)])}

    def coplctl(*args):
        return subprocess.run([sys.executable, "-m", "coplctl", *map(str, args)], capture_output=True, text=True,
                              env=env, cwd=tmp_path, timeout=300)

    listed = coplctl("methods")
    assert listed.returncode == 0 and "echo-plugin" in listed.stdout, listed.stderr
    ran = coplctl("benchmark", spec, "--out", tmp_path / "out")
    assert ran.returncode == 0, ran.stderr[-3000:]
    result = json.loads((tmp_path / "out" / "plug" / "results" / "echo-plugin" / "seed0.json").read_text())
    assert result["extra"] == {"echo": {"repeats": 3, "seen": 60}}
    assert "Echo table: repeats" in ran.stdout and "| repeats | 3.00 |" in ran.stdout  # its part of the report
    compared = coplctl("compare", tmp_path / "out", tmp_path / "out", "--json")
    assert compared.returncode == 0 and any(r["metric"] == "echo.repeats" for r in json.loads(compared.stdout)["rows"])

    spec.write_text(spec.read_text().replace("repeats: 3", "repeat: 3"))
    bad = coplctl("benchmark", spec, "--out", tmp_path / "out")
    assert bad.returncode == 1 and "unknown key experiments.echo-plugin.repeat (did you mean 'repeats'?)" in bad.stderr
