"""The import graph runs one way: cli → bench → methods → models → graph → data → base. Read from the
source (every import statement, lazy ones inside functions included), so an arrow back up fails here."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

#: Layer of every module, by longest matching prefix; a module may import its own layer and those below.
LAYERS = {
    "coplctl.errors": 0, "coplctl.files": 0, "coplctl.config": 0, "coplctl.atomic": 0, "coplctl.progress": 0,
    "coplctl.checkpoint": 0, "coplctl.optim": 0, "coplctl.registry": 0,
    "coplctl.data": 1,
    "coplctl.graph": 2,
    "coplctl.backbone": 3, "coplctl.features": 3, "coplctl.encoders": 3, "coplctl.mole": 3, "coplctl.peft_mole": 3, "coplctl.reward": 3,
    "coplctl.trainer": 3, "coplctl.neural": 3, "coplctl.adapt": 3, "coplctl.evaluate": 3, "coplctl.plots": 3,
    "coplctl.adapt_run": 3, "coplctl.resume": 3, "coplctl.tracking": 3, "coplctl.placement": 3,
    "coplctl.copl": 4, "coplctl.baselines": 4,
    "coplctl.bench": 5, "coplctl.api": 5, "coplctl.integrations": 5, "coplctl.serve": 5,
    "coplctl.export": 5, "coplctl.model_card": 5,
    "coplctl.cli": 6, "coplctl.__main__": 6,
}
NAMES = {0: "base", 1: "data", 2: "graph", 3: "models", 4: "methods", 5: "bench", 6: "cli"}


def _layer(module: str) -> int | None:
    match = [p for p in LAYERS if module == p or module.startswith(p + ".")]
    return LAYERS[max(match, key=len)] if match else None


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
            out.update(f"{node.module}.{a.name}" for a in node.names)  # `from coplctl import files`
    return {m for m in out if m.split(".")[0] == "coplctl"}


def test_every_module_has_a_layer():
    assert not [m for m in _modules() if m != "coplctl" and _layer(m) is None]


def test_pyproject_installs_every_package_and_no_top_level_baselines():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+

    setup = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    packages = {m for m, p in _modules().items() if p.name == "__init__.py"}
    assert set(setup["packages"]) == packages
    assert setup["package-dir"] == {"coplctl.baselines": "baselines"}
    assert not any(p.split(".")[0] == "baselines" for p in setup["packages"])


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
