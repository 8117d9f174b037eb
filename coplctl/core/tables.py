"""Tables and figures of stored benchmark results, format-neutral: a cell is one metric over seeds (mean ±
std, in points), the best value of each column in bold. The benchmark's standard tables (Tables 1-3,
:mod:`coplctl.bench.tables`) and each method's own part of a report
(:meth:`coplctl.models.reward.RewardMethod.report`) are built from these pieces."""

from __future__ import annotations

import statistics
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from pathlib import Path

from coplctl.core.registry import METHODS, method_label, method_sort_key

SCORES = ("accuracy", "common", "controversial", "controversial_pairs", "ties")
"""The numbers of a stored metrics block (one set of test pairs) that tables and comparisons read."""

SPEC_ORDER = ["uf-p-2-all", "uf-p-2-avg", "uf-p-4-all", "uf-p-4-avg"]
"""The paper's benchmarks, in its column order; simulated twins (``sim-``) follow, then any other spec."""


@dataclass
class Cell:
    """One table cell: a metric over seeds (points), and whether it is the column's best."""

    values: list[float]
    bold: bool = False

    @property
    def mean(self) -> float:
        return statistics.fmean(self.values)

    @property
    def std(self) -> float:
        return statistics.pstdev(self.values) if len(self.values) > 1 else 0.0


@dataclass
class Table:
    """A rendered-format-neutral table: rows of cells under column names."""

    key: str
    title: str
    columns: list[str]
    rows: list[tuple[str, list[Cell | None]]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


@dataclass
class Figure:
    """A figure a report draws into its directory (``coplctl report --out``)."""

    name: str
    """Its file name in the report directory, e.g. ``figure2.png``."""
    title: str
    """Its caption in the report's ``figures.md``."""
    draw: Callable[[Path], object]
    """Draws it into the path given (written atomically)."""


@dataclass
class ReportPart:
    """What a method adds to a report of stored results: tables after the standard ones, figures to draw,
    and Markdown lines for ``figures.md`` (e.g. links to figures its runs drew)."""

    tables: list[Table] = field(default_factory=list)
    figures: list[Figure] = field(default_factory=list)
    links: list[str] = field(default_factory=list)


def spec_key(name: str) -> tuple:
    """Sort key of a benchmark's column: the paper's order, simulated twins after, then by name."""
    base = name.removeprefix("sim-")
    return (name.startswith("sim-"), SPEC_ORDER.index(base) if base in SPEC_ORDER else 99, name)


def upper_bounds() -> set[str]:
    """Methods registered as upper bounds (``upper_bound=True``, e.g. one given the true groups): never bold."""
    return {n for n in METHODS.names() if METHODS.info(n).get("upper_bound")}


def collect(results, value) -> dict[tuple[str, str], list[float]]:
    """{(spec, name): [value per seed, in points]} for results where ``value(result)`` is not None."""
    out: dict = {}
    for r in results:
        v = value(r)
        if v is not None:
            out.setdefault((r["spec"], r["name"]), []).append(100 * v)
    return out


def metric(role: str, key: str = "accuracy"):
    """Reads ``metrics[role][key]`` of a result (None where absent)."""
    return lambda r: (r["metrics"].get(role) or {}).get(key)


def grid(key: str, title: str, data: dict, names: list[str] | None = None, specs: list[str] | None = None,
         bold_excluding: Collection[str] | None = None) -> Table | None:
    """A table of ``data`` ({(column, row name): values}) with a row per name (default: every row name, in
    the paper's method order, labelled as registered) and a column per spec; the best mean of each column
    is bold, except rows in ``bold_excluding`` (default: the registered upper bounds)."""
    specs = specs or sorted({s for s, _ in data}, key=spec_key)
    names = names or sorted({n for _, n in data}, key=method_sort_key)
    excluded = upper_bounds() if bold_excluding is None else set(bold_excluding)
    if not data:
        return None
    t = Table(key, title, specs)
    for n in names:
        t.rows.append((method_label(n), [Cell(data[(s, n)]) if (s, n) in data else None for s in specs]))
    for j in range(len(specs)):
        cand = [row[1][j] for row, n in zip(t.rows, names) if row[1][j] is not None and n not in excluded]
        if cand:
            max(cand, key=lambda c: c.mean).bold = True
    return t
