"""A generic registry of named plugins (methods, benchmarks, metrics).

- ``@REGISTRY.register("name")`` registers a class or function; a duplicate name fails.
- Lazy entries point at a module; the module is imported only when the entry is used. Method
  modules are found by reading their source (``ast``), so ``coplctl methods`` lists every method
  with a one-line description without importing torch-geometric, peft or even torch.
- Unknown names fail with close matches suggested.

A new method is one module under ``baselines/`` whose class is decorated with
``@register_method("name")``; its docstring's first line is the description. Other packages can
add methods through the ``coplctl.methods`` entry-point group (``name = "module:Class"``).
"""

from __future__ import annotations

import ast
import difflib
import importlib
import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Generic, TypeVar

from coplctl.errors import CoplError

T = TypeVar("T")


class RegistryError(CoplError):
    """Duplicate or unknown registry name."""


@dataclass
class Entry:
    name: str
    description: str
    module: str
    obj: Any = None


class Registry(Generic[T]):
    """Named plugins of one kind; see the module docstring."""

    def __init__(self, kind: str, discover: Callable[[], list[Entry]] | None = None):
        self.kind = kind
        self._entries: dict[str, Entry] = {}
        self._discover = discover
        self._discovered = False

    def _ensure(self) -> None:
        if not self._discovered and self._discover is not None:
            self._discovered = True
            for e in self._discover():
                self.add_lazy(e.name, e.module, e.description)

    def add_lazy(self, name: str, module: str, description: str = "") -> None:
        """Declare ``name`` as provided by ``module`` (imported on first use)."""
        old = self._entries.get(name)
        if old is not None and old.module != module:
            raise RegistryError(f"{self.kind} {name!r} is defined twice: in {old.module} and in {module}")
        if old is None:
            self._entries[name] = Entry(name, description, module)

    def register(self, name: str, description: str | None = None) -> Callable[[T], T]:
        """Decorator: register ``obj`` under ``name``; the description defaults to its docstring's first line."""

        def deco(obj: T) -> T:
            module = getattr(obj, "__module__", "")
            old = self._entries.get(name)
            if old is not None and (old.obj is not None or old.module != module):
                where = old.module if old.obj is None else f"{old.module}.{getattr(old.obj, '__qualname__', old.obj)}"
                raise RegistryError(f"{self.kind} {name!r} is already registered (by {where})")
            desc = description if description is not None else _first_line(getattr(obj, "__doc__", None))
            self._entries[name] = Entry(name, desc, module, obj)
            try:
                obj.registry_name = name  # type: ignore[attr-defined]
            except (AttributeError, TypeError):
                pass
            return obj

        return deco

    def names(self) -> list[str]:
        self._ensure()
        return sorted(self._entries)

    def describe(self) -> list[tuple[str, str]]:
        """(name, one-line description) pairs, without importing lazy entries."""
        self._ensure()
        return [(n, self._entries[n].description) for n in sorted(self._entries)]

    def entries(self) -> list[Entry]:
        """Every entry (name, description, providing module), without importing lazy ones."""
        self._ensure()
        return [self._entries[n] for n in sorted(self._entries)]

    def __contains__(self, name: str) -> bool:
        self._ensure()
        return name in self._entries

    def get(self, name: str) -> T:
        """The registered object; imports its module if needed."""
        self._ensure()
        entry = self._entries.get(name)
        if entry is None:
            close = difflib.get_close_matches(name, list(self._entries), n=3, cutoff=0.5)
            hint = f"; did you mean {' or '.join(close)}?" if close else ""
            known = ", ".join(sorted(self._entries)) or "none"
            raise RegistryError(f"unknown {self.kind} {name!r}{hint} (known: {known})")
        if entry.obj is None:
            importlib.import_module(entry.module)
            entry = self._entries[name]
            if entry.obj is None:
                raise RegistryError(f"module {entry.module} did not register {self.kind} {name!r}")
        return entry.obj


def _first_line(doc: str | None) -> str:
    return (doc or "").strip().split("\n", 1)[0].strip()


def scan_module_source(path: Path, module: str, decorator: str) -> list[Entry]:
    """Entries declared in a source file by ``@<decorator>("name")`` on a class or function."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, (ast.ClassDef, ast.FunctionDef)):
            continue
        for dec in node.decorator_list:
            if (isinstance(dec, ast.Call) and dec.args and isinstance(dec.args[0], ast.Constant)
                    and (getattr(dec.func, "id", None) == decorator or getattr(dec.func, "attr", None) == decorator)):
                desc = next((kw.value.value for kw in dec.keywords
                             if kw.arg == "description" and isinstance(kw.value, ast.Constant)), None)
                found.append(Entry(dec.args[0].value, desc or _first_line(ast.get_docstring(node)), module))
    return found


def scan_package(package: str, decorator: str) -> list[Entry]:
    """Scan every module of ``package`` (or the single module ``package``) without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None and not spec.submodule_search_locations:
        return []
    if spec.submodule_search_locations:
        entries = []
        for loc in spec.submodule_search_locations:
            for path in sorted(Path(loc).rglob("*.py")):
                rel = path.relative_to(loc).with_suffix("")
                parts = [p for p in rel.parts if p != "__init__"]
                entries += scan_module_source(path, ".".join([package, *parts]), decorator)
        return entries
    return scan_module_source(Path(spec.origin), package, decorator)


#: Where built-in methods live: CoPL in ``coplctl.copl``, the baselines in ``baselines``.
METHOD_SOURCES = ("coplctl.copl", "baselines")


def _discover_methods() -> list[Entry]:
    entries = []
    for source in METHOD_SOURCES:
        entries += scan_package(source, "register_method")
    from importlib.metadata import entry_points

    for ep in entry_points(group="coplctl.methods"):
        entries.append(Entry(ep.name, f"(plugin {ep.value})", ep.value.split(":")[0]))
    return entries


METHODS: Registry = Registry("method", discover=_discover_methods)


def register_method(name: str, description: str | None = None):
    """Class decorator registering a :class:`coplctl.reward.RewardMethod` under ``name``."""
    return METHODS.register(name, description)
