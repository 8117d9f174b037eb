"""The import graph runs one way: cli → bench, serving → methods (copl, baselines) → models → graph →
data → core. Read from the source (every import statement, lazy ones inside functions included), so an
arrow back up fails here. Layers are folders: every module of the package lives in one, and a new module
takes its folder's layer without an entry here."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

#: Layer of every sub-package of ``coplctl`` (a folder); a module may import its own layer and those below.
LAYERS = {
    "coplctl.core": 0,
    "coplctl.data": 1,
    "coplctl.graph": 2,
    "coplctl.models": 3,
    "coplctl.copl": 4, "coplctl.baselines": 4,
    "coplctl.bench": 5, "coplctl.serving": 5,
    "coplctl.cli": 6,
}
NAMES = {0: "core", 1: "data", 2: "graph", 3: "models", 4: "methods", 5: "bench/serving", 6: "cli"}
ROOT_MODULES = {"coplctl", "coplctl.__main__"}
"""The only modules outside a layer's folder: the package's ``__init__`` (lazy ``coplctl.load``) and
``__main__`` (``python -m coplctl``, the CLI)."""


def _layer(module: str) -> int | None:
    if module == "coplctl.__main__":
        return LAYERS["coplctl.cli"]
    folder = ".".join(module.split(".")[:2])
    return LAYERS.get(folder)


#: Installed package name of each source folder (pyproject's package-dir: baselines/ is coplctl.baselines).
SOURCES = {"coplctl": "coplctl", "baselines": "coplctl.baselines"}


def _modules() -> dict[str, Path]:
    found = {}
    for folder, package in SOURCES.items():
        for path in (ROOT / folder).rglob("*.py"):
            parts = path.relative_to(ROOT / folder).with_suffix("").parts
            found[".".join([package, *(p for p in parts if p != "__init__")])] = path
    return found


def _imports(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
            out.update(f"{node.module}.{a.name}" for a in node.names)  # `from coplctl.core import files`
    return {m for m in out if m.split(".")[0] == "coplctl"}


def test_every_module_lives_in_a_layer_folder():
    modules = _modules()
    assert not [m for m in modules if m not in ROOT_MODULES and _layer(m) is None]
    loose = sorted(m for m, p in modules.items() if m not in ROOT_MODULES and p.parent == ROOT / "coplctl")
    assert not loose, f"modules at the package root (move them into a layer's folder): {loose}"


def test_pyproject_installs_every_package_and_no_top_level_baselines():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+

    setup = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    packages = {m for m, p in _modules().items() if p.name == "__init__.py"}
    assert set(setup["packages"]) == packages | {"coplctl.specs"}  # the specs: data, no code
    assert setup["package-dir"] == {"coplctl.baselines": "baselines", "coplctl.specs": "benchmarks"}
    assert setup["package-data"] == {"coplctl.specs": ["*.yaml"]}
    assert not any(p.split(".")[0] in ("baselines", "benchmarks") for p in setup["packages"])


def test_baselines_import_as_coplctl_baselines():
    import importlib.util

    spec = importlib.util.find_spec("coplctl.baselines")
    assert spec is not None and Path(spec.submodule_search_locations[0]).resolve() == ROOT / "baselines"


def test_no_import_runs_back_up_the_layers():
    modules = _modules()
    upward = []
    for name, path in modules.items():
        mine = _layer(name)
        if mine is None:
            continue
        for target in _imports(path):
            theirs = _layer(target)
            if theirs is not None and theirs > mine and target in modules:
                upward.append(f"{name} ({NAMES[mine]}) imports {target} ({NAMES[theirs]})")
    assert not upward, "\n".join(sorted(upward))


def test_the_layer_check_sees_lazy_imports(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("def f():\n    from coplctl.cli.common import err\n")
    assert "coplctl.cli.common" in _imports(f)
