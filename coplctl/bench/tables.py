"""The report of stored results: the benchmark's standard tables (Table 1, seen and unseen users; Table 2,
common vs controversial pairs; Table 3, ablations), then each method's own part (its tables and figures,
:meth:`coplctl.models.reward.RewardMethod.report`), rendered as Markdown, CSV or LaTeX. Mean ± std over
seeds; the best value of each column in bold (upper bounds and ablations excluded, as in the paper)."""

from __future__ import annotations

import statistics

from coplctl.bench.results import Result
from coplctl.core.registry import METHODS, method_label, method_sort_key
from coplctl.core.tables import Cell, ReportPart, Table, collect, grid, metric, spec_key


def _is_method(r: Result) -> bool:
    """A method's own result (Table 1), not an ablation's (which carries its own name)."""
    return r["name"] in METHODS


def build_report(results: list[Result]) -> tuple[list[Table], ReportPart]:
    """The standard tables, then every method's own tables; and the methods' figures and links. A method
    contributes when some result of its own holds what its benchmark experiments stored (``extra``)."""
    tables = _standard_tables(results)
    own = ReportPart()
    for name in sorted({r["name"] for r in results if _is_method(r) and r.get("extra")}, key=method_sort_key):
        part = METHODS.get(name).report(results)
        tables += part.tables
        own.figures += part.figures
        own.links += part.links
    return [t for t in tables if t is not None and t.rows], own


def _standard_tables(results: list[Result]) -> list[Table | None]:
    main = [r for r in results if _is_method(r)]
    tables = []
    for role in ("seen", "unseen"):
        table = grid(f"table1-{role}", f"Table 1 ({role} users): accuracy on held-out pairs",
                     collect(main, metric(role)))
        if table is not None:
            table.notes = (_skip_notes(results) + _search_notes(main) + _tie_notes(main, role)
                           + _size_notes(main, role, (("pairs", "test pairs"),)))
        tables.append(table)
    # The paper shows Table 2 for UF-P-2 only; it is rendered for every spec whose test pairs include
    # controversial ones (with 4 groups: pairs on which the groups do not all agree).
    contested = {r["spec"] for r in main if (r["metrics"].get("seen") or {}).get("controversial_pairs")}
    if tables and tables[0] is not None:
        tables[0].notes += [f"No Table 2 for {spec}: none of its seen users' test pairs is marked controversial"
                            for spec in sorted({r["spec"] for r in main if r["metrics"]} - contested, key=spec_key)]
    for spec in sorted(contested, key=spec_key):
        mine = [r for r in main if r["spec"] == spec]
        data = {}
        for label, key in (("common", "common"), ("controversial", "controversial"), ("total", "accuracy")):
            for (s, n), v in collect(mine, metric("seen", key)).items():
                data[(label, n)] = v
        table2 = grid(f"table2-{spec}", f"Table 2 ({spec}, seen users): common vs controversial pairs",
                      data, specs=["common", "controversial", "total"])
        if table2 is not None:
            table2.notes = _signal_notes(mine) + _size_notes(mine, "seen", (("controversial_pairs",
                                                                               "controversial test pairs"),
                                                                              ("pairs", "test pairs in all")))
        tables.append(table2)
    ablations = [r for r in results if not _is_method(r)]
    varied = {(r["spec"], r.get("method")) for r in ablations}  # each ablation's row next to its method's own
    abl = ablations + [r for r in main if (r["spec"], r["name"]) in varied]
    if ablations:
        title = " / ".join(method_label(m) for m in sorted({m for _, m in varied if m}, key=method_sort_key))
        tables.append(grid("table3", f"Table 3: {title} ablations (seen users)", collect(abl, metric("seen")),
                           bold_excluding=()))
    return tables


def _skip_notes(results: list[Result]) -> list[str]:
    """One note per (method, benchmark) that did not run on its dataset, with the reason."""
    skipped = {(method_sort_key(r["name"]), r["name"], r["spec"]): r["skipped"] for r in results if r.get("skipped")}
    return [f"{method_label(name)} skipped on {spec}: {why}" for (_, name, spec), why in sorted(skipped.items())]


def _search_notes(results: list[Result]) -> list[str]:
    """One note per searched (method, benchmark): the grid and the learning rate kept for each seed."""
    found: dict = {}
    for r in results:
        if r.get("lr_search"):
            key = (method_sort_key(r["name"]), r["name"], r["spec"], tuple(r["lr_search"]["grid"]))
            failed = [c["lr"] for c in r["lr_search"].get("candidates", []) if c.get("diverged")]
            found.setdefault(key, []).append((r["seed"], r["lr_search"]["chosen"], failed))
    leaky = sorted({r["spec"] for r in results
                    if r.get("lr_search") and (r.get("data") or {}).get("valid_prompt_fraction") == 0})
    notes = [f"{spec}: its valid pairs come from the survey that other users train on (valid_prompt_fraction 0), "
             f"so a search by validation accuracy favours rates that memorise pairs; hold validation prompts out "
             f"with data.valid_prompt_fraction" for spec in leaky]
    for (_, name, spec, values), chosen in sorted(found.items()):
        diverged = sorted({lr for *_, failed in chosen for lr in failed})
        notes.append(f"{method_label(name)} on {spec}: learning rate searched over "
                     f"{', '.join(f'{v:g}' for v in values)} by validation accuracy; kept "
                     f"{', '.join(f'{lr:g} (seed {seed})' for seed, lr, _ in sorted(chosen))}"
                     + (f"; training diverged at {', '.join(f'{v:g}' for v in diverged)}" if diverged else ""))
    return notes


def _tie_notes(results: list[Result], role: str) -> list[str]:
    """One note per method whose test pairs had exact ties (both responses the same reward)."""
    ties: dict = {}
    for r in results:
        m = r["metrics"].get(role) or {}
        if m.get("ties"):
            key = (method_sort_key(r["name"]), r["name"], r["spec"])
            ties.setdefault(key, []).append(m["ties"])
    return [f"{method_label(name)} on {spec}: {statistics.fmean(v):g} tied pairs per seed (scored as wrong)"
            for (_, name, spec), v in sorted(ties.items())]


def _signal_notes(results: list[Result]) -> list[str]:
    """The benchmark's personal signal (:mod:`coplctl.data.signal`), as its results recorded it."""
    from coplctl.data.signal import describe

    found = {r["spec"]: (r.get("data") or {}).get("personal_signal") for r in results}
    return [f"{spec}: {describe(sig)}" for spec, sig in sorted(found.items(), key=lambda kv: spec_key(kv[0])) if sig]


#: below this many test pairs behind a cell, a note gives the count (one pair moves the accuracy by 100/n points)
FEW_PAIRS = 100


def _size_notes(results: list[Result], role: str, counts: tuple[tuple[str, str], ...]) -> list[str]:
    """One note per benchmark whose ``role`` accuracies rest on fewer than :data:`FEW_PAIRS` pairs of a kind."""
    notes = []
    for spec in sorted({r["spec"] for r in results}, key=spec_key):
        for key, what in counts:
            n = max(((r["metrics"].get(role) or {}).get(key) or 0 for r in results if r["spec"] == spec), default=0)
            if 0 < n < FEW_PAIRS:
                notes.append(f"{spec}: the {role} users' cells rest on {n} {what} per seed (one pair is "
                             f"{100 / n:.1f} points)")
    return notes


def _fmt(c: Cell | None, latex: bool = False) -> str:
    if c is None:
        return "-"
    text = f"{c.mean:.2f}" + (f" ± {c.std:.2f}" if len(c.values) > 1 else "")
    if latex:
        text = text.replace("±", "$\\pm$")
        return f"\\textbf{{{text}}}" if c.bold else text
    return f"**{text}**" if c.bold else text


def to_markdown(t: Table) -> str:
    head = f"| | {' | '.join(t.columns)} |\n|---|{'---|' * len(t.columns)}\n"
    notes = "".join(f"\n_Note: {n}._\n" for n in t.notes)
    return f"**{t.title}**\n\n" + head + "\n".join(f"| {label} | {' | '.join(_fmt(c) for c in cells)} |"
                                                 for label, cells in t.rows) + "\n" + notes


def to_csv(t: Table) -> str:
    import csv
    import io

    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["table", "row", "column", "mean", "std", "seeds"])
    for label, cells in t.rows:
        for col, c in zip(t.columns, cells):
            if c is not None:
                w.writerow([t.key, label, col, f"{c.mean:.4f}", f"{c.std:.4f}", len(c.values)])
    return buf.getvalue()


def to_latex(t: Table) -> str:
    lines = [f"% {t.title}", "\\begin{tabular}{l" + "c" * len(t.columns) + "}", "\\toprule",
             " & " + " & ".join(t.columns) + " \\\\", "\\midrule"]
    lines += [f"{label} & " + " & ".join(_fmt(c, latex=True) for c in cells) + " \\\\" for label, cells in t.rows]
    return "\n".join(lines + ["\\bottomrule", "\\end{tabular}"] + [f"% Note: {n}." for n in t.notes]) + "\n"
