"""Benchmark specs: versioned YAML files validated into dataclasses that reject unknown keys.

A spec may ``include:`` another (a path relative to its own file) and override a few keys; mappings
merge recursively, everything else is replaced. A spec named on the command line is looked up in
``./benchmarks/`` and then among the specs shipped with coplctl (:func:`search_dirs`).
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

from coplctl.core.config import AT_LEAST_1
from coplctl.core.errors import CoplError, DataError
from coplctl.core.files import read_yaml
from coplctl.core.registry import paper_methods
from coplctl.data.protocol import ProtocolConfig

SPEC_VERSION = 1
BUILDERS = ("tldr", "personalllm")
"""Builders a ``directory`` source may name (``data.build``); ``ultrafeedback`` sources build UF-P."""
SAFE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]*")
"""A name that becomes one path component under ``--out``: no separators, no ``..``, no leading dot."""


class SpecError(CoplError):
    """An invalid benchmark spec; the message names the file and the key."""


@dataclass
class DataSpec(ProtocolConfig):
    """Where the data comes from; simulated data is generated (deterministically) on first use, with the
    user protocol of the fields it shares with :class:`coplctl.data.protocol.ProtocolConfig` (``variant``,
    ``annotations``, ``users``, ``unseen_users``, ``survey_pairs``, ``fewshot_pairs`` ..., same defaults:
    the paper's). Real data has the protocol it was built with; ``variant`` and ``annotations`` say which."""

    source: str = "simulated"
    """``simulated`` (coplctl data simulate), ``ultrafeedback`` (coplctl data build-ufp; built on first use)
    or ``directory`` (any valid dataset directory, e.g. your own data: groups and controversial flags are
    taken from it; a method that cannot run on it, e.g. one that needs every user's group, is skipped with a
    note)."""
    seed: int = 0
    """Seed of the data (simulation and user protocol), distinct from the methods' seeds."""
    path: str | None = None
    """``ultrafeedback`` / ``directory``: the dataset directory (relative to the working directory)."""
    build: str | None = None
    """``directory`` sources: the builder that makes ``path`` on first use when it is missing (``tldr``,
    ``personalllm``; ``ultrafeedback`` sources always build UF-P); None: the directory must exist. Ignored by
    simulated data (a twin may inherit it)."""
    tokenizer: str | None = None
    """Builders' length filter on first use: the tokenizer that counts a formatted text's tokens ..."""
    max_tokens: Annotated[int, AT_LEAST_1] | None = None
    """... and the most tokens a kept response may have (the paper's specs: gemma-2b-it, 1024; None: no filter)."""

    def protocol(self) -> ProtocolConfig:
        """The user protocol of simulated data."""
        return ProtocolConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(ProtocolConfig)})


@dataclass
class Ablation:
    """A named variant of a method (Table 3): the method with a few config fields changed."""

    name: str
    """Its name in results and tables."""
    method: str
    """The registered method it varies."""
    overrides: dict = field(default_factory=dict)
    """Config fields that make it the variant."""


@dataclass
class BenchmarkSpec:
    """One benchmark: data, methods, backbone and mode, seeds, ablations, and the methods' own experiments."""

    version: int
    """Spec format version (1)."""
    name: str
    """Benchmark id: results go to RESULTS/<name>/."""
    description: str = ""
    """One line shown by `coplctl benchmark --list`."""
    data: DataSpec = field(default_factory=DataSpec)
    """Where the data comes from."""
    methods: list[str] = field(default_factory=paper_methods)
    """Registered methods to run (paper: the seven of Table 1)."""
    backbone: str = "minilm"
    """Backbone of every method (paper: gemma-2b-it and gemma-7b-it)."""
    mode: str = "frozen"
    """``frozen`` or ``lora`` (the paper's)."""
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    """Training seeds (paper: three)."""
    common: dict = field(default_factory=dict)
    """Config overrides for every method."""
    overrides: dict = field(default_factory=dict)
    """Per-method config overrides: {method: {field: value}}."""
    lr_grid: list[float] = field(default_factory=list)
    """Learning rates to search for every method whose own overrides (or ``common``, or ``--set``) do not set
    ``lr`` (paper: 1e-4, 5e-5, 1e-5, 5e-6 for each baseline): each is trained at each value and the best
    validation accuracy is kept per (method, seed). A list as a method's ``lr`` override searches that method
    alone."""
    ablations: list[Ablation] = field(default_factory=list)
    """Table 3: named variants of methods."""
    experiments: dict = field(default_factory=dict)
    """Methods' own experiments, ``{method: {option: value}}``: each method's section is checked against its
    :attr:`~coplctl.models.reward.RewardMethod.Experiments` dataclass (its defaults apply where a method has
    no section), and the method runs them after its standard evaluation. The README lists each method's."""
    path: str | None = None
    """The file the spec was read from (set by the loader)."""

    def jobs(self) -> list[tuple[str, str, dict]]:
        """(result name, method, overrides) of every model to train, ablations included."""
        grid = {"lr": list(self.lr_grid)} if self.lr_grid else {}  # common (and --set) lr replaces the grid
        out = [(m, m, {**grid, **self.common, **self.overrides.get(m, {})}) for m in self.methods]
        for a in self.ablations:
            out.append((a.name, a.method, {**grid, **self.common, **self.overrides.get(a.method, {}), **a.overrides}))
        return out


def _check(cls, data, file: Path, where: str):
    """Build dataclass ``cls`` from a mapping, rejecting unknown keys and wrong types."""
    if not isinstance(data, dict):
        raise SpecError(f"{file}: {where or 'the spec'} must be a mapping, got {type(data).__name__}")
    internal = ("path",) if cls is BenchmarkSpec else ()  # set by the loader, not by spec files
    fields = {f.name: f for f in dataclasses.fields(cls) if f.name not in internal}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in data.items():
        if key not in fields:
            close = difflib.get_close_matches(str(key), fields, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise SpecError(f"{file}: unknown key {where + '.' if where else ''}{key}{hint}; "
                            f"known keys: {', '.join(fields)}")
        kwargs[key] = _value(hints[key], value, file, f"{where + '.' if where else ''}{key}")
    missing = [n for n, f in fields.items()
               if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING and n not in kwargs]
    if missing:
        raise SpecError(f"{file}: missing key {', '.join(missing)}")
    try:
        return cls(**kwargs)
    except SpecError:
        raise
    except CoplError as e:  # a value the section's own checks reject (e.g. the data protocol's)
        raise SpecError(f"{file}: {where or 'the spec'}: {e}") from None


def _value(hint, value, file: Path, key: str):
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        hint = next(a for a in args if a is not type(None))
        origin, args = typing.get_origin(hint), typing.get_args(hint)
    if dataclasses.is_dataclass(hint):
        return _check(hint, value if value is not None else {}, file, key)
    if origin is list:
        if not isinstance(value, list):
            raise SpecError(f"{file}: {key} must be a list, got {value!r}")
        return [_value(args[0], v, file, f"{key}[{i}]") for i, v in enumerate(value)]
    if hint is dict or origin is dict:
        if not isinstance(value, dict):
            raise SpecError(f"{file}: {key} must be a mapping, got {value!r}")
        return value
    expected = {int: int, str: str, bool: bool, float: (int, float)}.get(hint)
    if expected is not None and (not isinstance(value, expected) or (hint is int and isinstance(value, bool))):
        raise SpecError(f"{file}: {key} must be {hint.__name__}, got {value!r}")
    return value


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _read(file: Path, seen: tuple[Path, ...] = ()) -> dict:
    if file in seen:
        raise SpecError(f"{file}: include cycle ({' -> '.join(str(p) for p in (*seen, file))})")
    try:
        data = read_yaml(file, what="spec file")
    except DataError as e:  # not UTF-8, invalid YAML, nested too deeply ...
        raise SpecError(str(e)) from None
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise SpecError(f"{file}: a spec must be a mapping of keys")
    include = data.pop("include", None)
    if include is None:
        return data
    if not isinstance(include, str):
        raise SpecError(f"{file}: include must be a file name")
    return _merge(_read((file.parent / include).resolve(), (*seen, file)), data)


def search_dirs() -> list[Path]:
    """Where a spec named on the command line is looked up: ``./benchmarks/`` (your own specs, first), then
    the specs shipped with coplctl: ``coplctl/specs/`` in an installed wheel (the repository's
    ``benchmarks/*.yaml``, mapped in as package data when the wheel is built), else the ``benchmarks/``
    folder of the checkout this package runs from."""
    package = Path(__file__).resolve().parents[1]
    shipped = package / "specs"
    if not shipped.is_dir():
        shipped = package.parent / "benchmarks"
    return list(dict.fromkeys([Path.cwd() / "benchmarks", shipped]))


def find_spec(name_or_path: str) -> Path:
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") or p.exists():
        return p
    for d in search_dirs():
        if (d / f"{name_or_path}.yaml").is_file():
            return d / f"{name_or_path}.yaml"
    known = sorted({f.stem for d in search_dirs() if d.is_dir() for f in d.glob("*.yaml")})
    close = difflib.get_close_matches(name_or_path, known, n=2)
    hint = f"; did you mean {' or '.join(close)}?" if close else ""
    raise SpecError(f"unknown benchmark {name_or_path!r}{hint} (known: {', '.join(known) or 'none'})")


def load_spec(name_or_path: str) -> BenchmarkSpec:
    """Read, merge includes, validate. Method names are checked against the registry, and each method's
    experiments against its own dataclass."""
    from coplctl.core.registry import METHODS

    file = find_spec(name_or_path).resolve()
    raw = _read(file)
    _moved_keys(raw, file)
    spec = _check(BenchmarkSpec, raw, file, "")
    if spec.version != SPEC_VERSION:
        raise SpecError(f"{file}: version is {spec.version}; this coplctl reads spec version {SPEC_VERSION}")
    _check_names(spec, file)
    for m in spec.methods + [a.method for a in spec.ablations] + list(spec.overrides) + list(spec.experiments):
        if m not in METHODS:
            close = difflib.get_close_matches(str(m), METHODS.names(), n=1)
            raise SpecError(f"{file}: unknown method {m!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    spec.experiments = {m: _experiments(m, block, file) for m, block in spec.experiments.items()}
    if spec.data.source not in ("simulated", "ultrafeedback", "directory"):
        raise SpecError(f"{file}: data.source must be simulated, ultrafeedback or directory")
    if spec.data.source != "simulated" and not spec.data.path:
        raise SpecError(f"{file}: data.path is required when data.source is {spec.data.source}")
    if spec.data.build not in (None, *BUILDERS):
        raise SpecError(f"{file}: data.build must be one of {', '.join(BUILDERS)}, not {spec.data.build!r}")
    if spec.data.build and spec.data.source == "ultrafeedback":
        raise SpecError(f"{file}: data.build is for directory sources; an ultrafeedback source always builds UF-P")
    if spec.data.max_tokens is not None and not spec.data.tokenizer:
        raise SpecError(f"{file}: data.max_tokens needs data.tokenizer (the tokenizer that counts the tokens)")
    spec.path = str(file)
    return spec


def _experiments(method: str, block, file: Path):
    """A method's ``experiments`` section, checked against its own dataclass."""
    from coplctl.core.registry import METHODS

    options = METHODS.get(method).Experiments
    if options is None:
        raise SpecError(f"{file}: experiments.{method}: method {method} has no experiments of its own")
    return _check(options, block if block is not None else {}, file, f"experiments.{method}")


def experiment_options(spec: BenchmarkSpec, method: str):
    """The options of ``method``'s own experiments in ``spec``: its checked section, else its defaults
    (None for a method without experiments)."""
    from coplctl.core.registry import METHODS

    if method in spec.experiments:
        return spec.experiments[method]
    options = METHODS.get(method).Experiments
    return options() if options is not None else None


def _moved_keys(raw: dict, file: Path) -> None:
    """Spec files from before methods owned their experiments set them at the top level: such a key is one
    error saying where it goes now (found among every registered method's experiment options)."""
    from coplctl.core.registry import METHODS

    known = {f.name for f in dataclasses.fields(BenchmarkSpec)}
    for key in [k for k in raw if k not in known and isinstance(k, str)]:
        for method in METHODS.names():
            options = METHODS.get(method).Experiments
            names = [f.name for f in dataclasses.fields(options)] if options is not None else []
            match = key if key in names else next(iter(difflib.get_close_matches(key, names, n=1)), None)
            if match:
                raise SpecError(f"{file}: {key} is one of method {method}'s experiments now: write it as "
                                f"experiments: {{{method}: {{{match}: ...}}}}")


def _check_names(spec: BenchmarkSpec, file: Path) -> None:
    """Names that become directories under ``--out`` are safe path components, and jobs do not collide."""
    named = [("name", spec.name)] + [(f"ablations[{i}].name", a.name) for i, a in enumerate(spec.ablations)]
    for key, value in named:
        if not SAFE_NAME.fullmatch(value):
            raise SpecError(f"{file}: {key} {value!r} is not a safe name: use letters, digits, '.', '_' and '-' "
                            f"(not starting with '.' or '-'); it becomes a directory name under --out")
    if len(set(spec.seeds)) < len(spec.seeds):
        raise SpecError(f"{file}: seeds repeats a seed ({spec.seeds})")
    seen: dict[str, str] = {}
    for key, value in [(f"methods[{i}]", m) for i, m in enumerate(spec.methods)] + named[1:]:
        if value in seen:
            raise SpecError(f"{file}: {key} {value!r} repeats {seen[value]}: each method and ablation needs its "
                            f"own name (results are stored under it)")
        seen[value] = key
    for where, mapping in [("common", spec.common)] + [(f"overrides.{m}", v) for m, v in spec.overrides.items()] \
            + [(f"ablations[{i}].overrides", a.overrides) for i, a in enumerate(spec.ablations)]:
        if not isinstance(mapping, dict):
            raise SpecError(f"{file}: {where} must be a mapping of option: value, got {mapping!r}")
        for k in mapping:
            if not isinstance(k, str):
                raise SpecError(f"{file}: {where} has the key {k!r}; option names are text")


def list_specs() -> list[Path]:
    seen, out = set(), []
    for d in search_dirs():
        for f in sorted(d.glob("*.yaml")) if d.is_dir() else []:
            if f.stem not in seen:
                seen.add(f.stem)
                out.append(f)
    return out
