"""The package installs whole: a wheel built from this repository, installed into a fresh virtual environment
outside the checkout, finds its benchmark specs and methods from any working directory."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(cmd: list, cwd: Path, env: dict | None = None) -> str:
    res = subprocess.run([str(c) for c in cmd], cwd=cwd, capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, f"{cmd} failed:\n{res.stdout[-2000:]}\n{res.stderr[-3000:]}"
    return res.stdout


def test_a_wheel_installed_outside_the_checkout_ships_the_specs(tmp_path):
    # build from a copy of the sources the wheel is made of, so the build leaves nothing in the checkout
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("coplctl", "baselines", "benchmarks"):
        shutil.copytree(ROOT / name, src / name, ignore=ignore)
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", src, "-w", tmp_path / "dist"],
         tmp_path)
    (wheel,) = (tmp_path / "dist").glob("coplctl-*.whl")

    # a fresh environment: the wheel installed alone; its dependencies (torch ...) are read from this
    # environment's site-packages through a path file, which adds the folder but runs none of its own path
    # files (so this checkout's editable install stays out of sight)
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", venv], tmp_path)
    python, coplctl = venv / "bin" / "python", venv / "bin" / "coplctl"
    _run([python, "-m", "pip", "install", "-q", "--no-deps", "--no-index", wheel], tmp_path)
    site = Path(_run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], tmp_path).strip())
    (site / "borrowed_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")

    away = tmp_path / "elsewhere"
    away.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    where = _run([python, "-c", "import coplctl.bench.spec as s; print(s.__file__); print(s.search_dirs()[-1])"], away, env)
    module, specs = where.split()
    assert Path(module).is_relative_to(site) and Path(specs) == site / "coplctl" / "specs", where
    assert sorted(p.name for p in Path(specs).iterdir()) == sorted(p.name for p in (ROOT / "benchmarks").glob("*.yaml"))

    helped = _run([coplctl, "benchmark", "quick", "--help"], away, env)
    assert "Run every method of a benchmark spec" in helped
    listed = _run([coplctl, "benchmark", "--list"], away, env)
    names = [line.split()[0] for line in listed.splitlines() if line.strip()]
    assert sorted(names) == sorted(p.stem for p in (ROOT / "benchmarks").glob("*.yaml")) and "quick" in names
    methods = _run([coplctl, "methods"], away, env)
    assert all(m in methods for m in ("copl", "uniform", "oracle", "i2e", "i2e-proxy", "vpl", "pal"))
