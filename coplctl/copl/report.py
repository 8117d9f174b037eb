"""CoPL's part of a report, from what its benchmark experiments (:mod:`coplctl.copl.experiments`) stored
under each result's ``extra``: Table 4 (adaptation variants), Table 5 (the GCF's accuracy and probes),
Table 6 (pseudo-labels), Figure 2 (the few-shot curve) and links to the figures each run drew; the
shape check of that ``extra`` and the metrics `coplctl compare` watches. Reads JSON only: no torch here."""

from __future__ import annotations

import math
import statistics
from pathlib import Path

from coplctl.core.errors import DataError
from coplctl.core.files import check_numbers, check_type
from coplctl.core.registry import method_label
from coplctl.core.tables import SCORES, Figure, ReportPart, collect, grid, metric, spec_key, upper_bounds

VARIANTS = {"weighted": "CoPL", "average": "Naive Avg.", "optimize": "User Opt."}
"""Table 4's rows: adaptation method -> the paper's row name."""

def _need(value, types: tuple, f: Path, key: str):
    return check_type(value, types, f, key, nullable=True)


def check_extra(extra: dict, f: Path) -> None:
    """``extra`` has the shape this module reads; else one DataError naming the file and the key."""
    gcf = _need(extra.get("gcf"), (dict,), f, "extra.gcf")
    check_numbers(gcf, f, "extra.gcf", ("valid_accuracy", "train_accuracy", "group_probe", "weight_probe"))
    for variant, block in (_need(extra.get("adaptation"), (dict,), f, "extra.adaptation") or {}).items():
        check_numbers(block, f, f"extra.adaptation.{variant}", SCORES)
    for hops, points in (_need(extra.get("fewshot_curve"), (dict,), f, "extra.fewshot_curve") or {}).items():
        for shots, v in (_need(points, (dict,), f, f"extra.fewshot_curve.{hops}") or {}).items():
            if not (hops.isdigit() and shots.isdigit()):
                raise DataError(f, f"key 'extra.fewshot_curve.{hops}.{shots}': hops and shots must be whole numbers")
            _need(v, (int, float), f, f"extra.fewshot_curve.{hops}.{shots}")
    pseudo = _need(extra.get("pseudo_labels"), (dict,), f, "extra.pseudo_labels")
    for k in ("pseudo_label", "user_specific"):
        check_numbers((pseudo or {}).get(k), f, f"extra.pseudo_labels.{k}", ("accuracy",))
    for kind, path in (_need(extra.get("figures"), (dict,), f, "extra.figures") or {}).items():
        _need(path, (str,), f, f"extra.figures.{kind}")


def compared_metrics(result: dict) -> dict[str, float]:
    """What `coplctl compare` watches besides test accuracy, in points: the GCF's validation accuracy and
    each adaptation variant's unseen accuracy."""
    extra, out = result.get("extra") or {}, {}
    if (extra.get("gcf") or {}).get("valid_accuracy") is not None:
        out["gcf.valid_accuracy"] = 100 * extra["gcf"]["valid_accuracy"]
    for variant, m in (extra.get("adaptation") or {}).items():
        if m and m.get("accuracy") is not None:
            out[f"adaptation.{variant}"] = 100 * m["accuracy"]
    return out


def report(name: str, results: list[dict]) -> ReportPart:
    """Tables 4-6, Figure 2 and the runs' figure links from the results of method ``name`` (CoPL)."""
    mine = [r for r in results if r["name"] == name and r.get("extra")]
    part = ReportPart(tables=[_table4(mine), _table5(mine), _table6(mine, results)])
    curves = fewshot_curves(mine)
    if curves:
        part.figures.append(Figure("figure2.png", "Figure 2", lambda out: plot_fewshot(curves, out)))
    for r in mine:
        for kind, path in (r["extra"].get("figures") or {}).items():
            part.links.append(f"- {r['spec']} seed {r['seed']} {kind}: {path}")
    return part


def _table4(mine: list[dict]):
    data = {}
    for v, label in VARIANTS.items():
        for (s, _), vals in collect(mine, lambda r, v=v: ((r["extra"].get("adaptation") or {}).get(v) or {})
                                    .get("accuracy")).items():
            data[(s, label)] = vals
    return grid("table4", "Table 4: unseen-user adaptation (unseen users)", data, names=list(VARIANTS.values()),
                bold_excluding=())


def _table5(mine: list[dict]):
    data = {}
    for label, key in (("GCF valid", "valid_accuracy"), ("GCF train", "train_accuracy"),
                       ("Group probe", "group_probe"), ("Weight probe", "weight_probe")):
        def gcf(r, k=key):  # NaN: no valid pair inside the graph (valid_prompt_fraction > 0)
            v = (r["extra"].get("gcf") or {}).get(k)
            return None if isinstance(v, float) and math.isnan(v) else v

        for (s, _), vals in collect(mine, gcf).items():
            data[(s, label)] = vals
    probes = ["Group probe"] + (["Weight probe"] if any(label == "Weight probe" for _, label in data) else [])
    return grid("table5", "Table 5: GCF accuracy on held-out pairs of seen users; group probe: "
                "5-fold logistic-regression accuracy of the group from the user embeddings"
                + ("; weight probe: 5-fold ridge R² (×100) of mixture users' attribute weights from the "
                   "embeddings" if len(probes) > 1 else ""),
                data, names=["GCF valid", "GCF train", *probes], bold_excluding=("GCF valid", "GCF train", *probes))


def _table6(mine: list[dict], results: list[dict]):
    """CoPL against its pseudo-label variants and the upper bound (the paper's Oracle) of the same benchmarks."""
    pseudo = [r for r in mine if r["extra"].get("pseudo_labels")]
    if not pseudo:
        return None
    specs, bounds = {r["spec"] for r in pseudo}, upper_bounds()
    data = {}
    rows = {"CoPL": metric("seen"),
            "Pseudo label": lambda r: (r["extra"]["pseudo_labels"].get("pseudo_label") or {}).get("accuracy"),
            "User-specific": lambda r: (r["extra"]["pseudo_labels"].get("user_specific") or {}).get("accuracy")}
    for label, fn in rows.items():
        for (s, _), vals in collect(pseudo, fn).items():
            data[(s, label)] = vals
    names = ["CoPL", "Pseudo label"]
    for bound in sorted(bounds):
        for (s, _), vals in collect([r for r in results if r["name"] == bound and r["spec"] in specs],
                                    metric("seen")).items():
            data[(s, method_label(bound))] = vals
        names.append(method_label(bound))
    return grid("table6", "Table 6: reward models trained on GCF pseudo-labels (seen users)", data,
                names=names + ["User-specific"], bold_excluding=())


def fewshot_curves(results: list[dict]) -> dict:
    """{spec: {hops: {shots: (mean, std)}}} of CoPL's unseen accuracy (Figure 2)."""
    acc: dict = {}
    for r in results:
        for hops, points in ((r.get("extra") or {}).get("fewshot_curve") or {}).items():
            for shots, v in points.items():
                if v is not None:
                    acc.setdefault(r["spec"], {}).setdefault(int(hops), {}).setdefault(int(shots), []).append(100 * v)
    return {s: {h: {k: (statistics.fmean(v), statistics.pstdev(v) if len(v) > 1 else 0.0)
                    for k, v in sorted(pts.items())} for h, pts in hs.items()} for s, hs in acc.items()}


def plot_fewshot(curves: dict, out) -> str:
    """Figure 2 as a PNG: one panel per benchmark, one line per hop count."""
    from coplctl.copl.figures import _pyplot, savefig

    plt = _pyplot()
    specs = sorted(curves, key=spec_key)
    fig, axes = plt.subplots(1, len(specs), figsize=(4.2 * len(specs), 3.4), dpi=120, squeeze=False)
    for ax, spec in zip(axes[0], specs):
        for hops, pts in sorted(curves[spec].items()):
            xs = list(pts)
            ax.errorbar(xs, [pts[x][0] for x in xs], yerr=[pts[x][1] for x in xs], marker="o", capsize=3,
                        label=f"{hops}-hop")
        ax.set_title(spec)
        ax.set_xlabel("few-shot annotations")
        ax.set_ylabel("unseen accuracy (%)")
        ax.set_xscale("log", base=2)
        ax.legend()
    fig.tight_layout()
    savefig(fig, out)
    return str(out)
