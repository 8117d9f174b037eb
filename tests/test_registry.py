"""The generic registry: duplicates fail, unknown names suggest, sources are read without importing."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from coplctl.core.registry import METHODS, Registry, RegistryError, scan_package


def test_register_get_and_describe():
    reg = Registry("metric")

    @reg.register("accuracy")
    def accuracy():
        """Share of pairs ranked correctly."""

    assert reg.get("accuracy") is accuracy
    assert reg.describe() == [("accuracy", "Share of pairs ranked correctly.")]
    with pytest.raises(RegistryError, match="already registered"):
        reg.register("accuracy")(lambda: None)


def test_unknown_name_suggests_close_matches():
    reg = Registry("method")
    for name in ("uniform", "oracle", "i2e-proxy"):
        reg.register(name)(type(name, (), {}))
    with pytest.raises(RegistryError, match=r"unknown method 'unifrom'; did you mean uniform\?"):
        reg.get("unifrom")
    with pytest.raises(RegistryError, match=r"known: i2e-proxy, oracle, uniform"):
        reg.get("zzz")


def test_lazy_entries_are_listed_without_import_and_imported_on_use(tmp_path, monkeypatch):
    pkg = tmp_path / "plugpkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "alpha.py").write_text(textwrap.dedent('''
        import plugpkg_sentinel  # would fail if this module were imported during listing
        from coplctl.core.registry import register_method

        @register_method("alpha")
        class Alpha:
            """Alpha method: first line only.

            More text that is not shown.
            """
    '''))
    (tmp_path / "plugpkg_sentinel.py").write_text("IMPORTED = True\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(METHODS, "_entries", dict(METHODS._entries))  # forget "alpha" after the test
    reg = Registry("method", discover=lambda: scan_package("plugpkg", "register_method"))
    assert reg.describe() == [("alpha", "Alpha method: first line only.")]
    assert "plugpkg_sentinel" not in sys.modules and "plugpkg.alpha" not in sys.modules

    # On use, the module is imported and registers itself (here into the global METHODS registry);
    # a lazy entry whose module registers elsewhere is reported, not silently returned as None.
    with pytest.raises(RegistryError, match="did not register method 'alpha'"):
        reg.get("alpha")
    assert METHODS.get("alpha").__name__ == "Alpha"


def test_same_name_in_two_modules_fails():
    reg = Registry("method")
    reg.add_lazy("dup", "pkg.one")
    with pytest.raises(RegistryError, match="defined twice"):
        reg.add_lazy("dup", "pkg.two")


def test_methods_command_imports_no_heavy_library():
    code = ("import sys; from coplctl.cli import main; main(['methods']); "
            "heavy = [m for m in ('torch', 'torch_geometric', 'peft', 'transformers') if m in sys.modules]; "
            "assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
