"""A generic registry of named plugins (methods, benchmarks, metrics).

- ``@REGISTRY.register("name")`` registers a class or function; a duplicate name fails.
- Lazy entries point at a module; the module is imported only when the entry is used. Method
  modules are found by reading their source (``ast``), so ``coplctl methods`` lists every method
  with a one-line description without importing torch-geometric, peft or even torch.
- Unknown names fail with close matches suggested.

A new method is one module under ``baselines/`` (installed as ``coplctl.baselines``) whose class is decorated with
``@register_method("name")``; its docstring's first line is the description. Other packages can
add methods through the ``coplctl.methods`` entry-point group (``name = "module:Class"``).
"""

from __future__ import annotations

import ast
import difflib
import importlib
import importlib.util
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Generic, TypeVar

from coplctl.core.errors import CoplError

T = TypeVar("T")


class RegistryError(CoplError):
    """Duplicate or unknown registry name."""


@dataclass
class Entry:
    name: str
    description: str
    module: str
    obj: Any = None
    info: dict = field(default_factory=dict)
    """Constant keyword arguments of the registration (e.g. a method's ``label`` and paper ``order``)."""


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
                self.add_lazy(e.name, e.module, e.description, e.info)

    def add_lazy(self, name: str, module: str, description: str = "", info: dict | None = None) -> None:
        """Declare ``name`` as provided by ``module`` (imported on first use)."""
        old = self._entries.get(name)
        if old is not None and old.module != module:
            raise RegistryError(f"{self.kind} {name!r} is defined twice: in {old.module} and in {module}")
        if old is None:
            self._entries[name] = Entry(name, description, module, info=dict(info or {}))

    def register(self, name: str, description: str | None = None, **info: Any) -> Callable[[T], T]:
        """Decorator: register ``obj`` under ``name``; the description defaults to its docstring's first
        line; ``info`` (constants only, read without importing) is kept on the entry."""

        def deco(obj: T) -> T:
            module = getattr(obj, "__module__", "")
            old = self._entries.get(name)
            if old is not None and (old.obj is not None or old.module != module):
                where = old.module if old.obj is None else f"{old.module}.{getattr(old.obj, '__qualname__', old.obj)}"
                raise RegistryError(f"{self.kind} {name!r} is already registered (by {where})")
            desc = description if description is not None else _first_line(getattr(obj, "__doc__", None))
            self._entries[name] = Entry(name, desc, module, obj, dict(info))
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

    def info(self, name: str) -> dict:
        """The registration's keyword constants of ``name`` ({} for an unknown name), without importing it."""
        self._ensure()
        entry = self._entries.get(name)
        return entry.info if entry is not None else {}

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
                consts = {kw.arg: kw.value.value for kw in dec.keywords
                          if kw.arg and isinstance(kw.value, ast.Constant)}
                desc = consts.pop("description", None)
                found.append(Entry(dec.args[0].value, desc or _first_line(ast.get_docstring(node)), module,
                                   info=consts))
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


#: Where built-in methods live: CoPL in ``coplctl.copl``, the baselines in ``coplctl.baselines`` (the
#: top-level ``baselines/`` folder of a checkout, installed under that name).
METHOD_SOURCES = ("coplctl.copl", "coplctl.baselines")


def _discover_methods() -> list[Entry]:
    entries = []
    for source in METHOD_SOURCES:
        entries += scan_package(source, "register_method")
    from importlib.metadata import entry_points

    for ep in entry_points(group="coplctl.methods"):
        entries.append(Entry(ep.name, f"(plugin {ep.value})", ep.value.split(":")[0]))
    return entries


METHODS: Registry = Registry("method", discover=_discover_methods)


def register_method(name: str, description: str | None = None, *, label: str | None = None,
                    order: int | None = None, upper_bound: bool = False):
    """Class decorator registering a :class:`coplctl.models.reward.RewardMethod` under ``name``.

    ``label``: its name in tables (default: ``name``). ``order``: its place among the paper's methods
    (Table 1's rows, a spec's default ``methods``); methods without one come after, by name.
    ``upper_bound``: the method knows what the others must learn (the paper's Oracle, given the true
    groups): tables never mark it best. All must be literal constants: they are read from the source
    without importing the method.
    """
    info = {k: v for k, v in (("label", label), ("order", order), ("upper_bound", upper_bound or None))
            if v is not None}
    return METHODS.register(name, description, **info)


def method_label(name: str) -> str:
    """A method's name in tables (its registered ``label``, else its name)."""
    return METHODS.info(name).get("label", name)


def method_sort_key(name: str) -> tuple:
    """Paper order first (registered ``order``), then other methods and ablations by name."""
    order = METHODS.info(name).get("order")
    return (0, order, name) if isinstance(order, int) else (1, 0, name)


def paper_methods() -> list[str]:
    """The registered methods that have a paper ``order``, in that order (Table 1's rows)."""
    return sorted((n for n in METHODS.names() if isinstance(METHODS.info(n).get("order"), int)),
                  key=method_sort_key)
