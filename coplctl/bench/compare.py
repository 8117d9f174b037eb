"""Regression comparison of two results stores, for CI: a metric fails when it drops by more than
the tolerance or the baseline seeds' spread, whichever is larger; a result that disappeared fails too."""

from __future__ import annotations

import math
import statistics

from coplctl.bench.results import Result, load_results
from coplctl.core.registry import METHODS

ROLES = ("seen", "unseen")
KEYS = ("accuracy", "common", "controversial")


def flatten(result: Result) -> dict[str, float]:
    """Comparable metrics of one result, in points (0-100): test accuracy by role, then what the method
    watches in its own experiments' ``extra`` (:meth:`coplctl.models.reward.RewardMethod.compared_metrics`)."""
    out = {}
    for role in ROLES:
        for key in KEYS:
            v = (result["metrics"].get(role) or {}).get(key)
            if v is not None:
                out[f"{role}.{key}"] = 100 * v
    method = result.get("method") or result["name"]
    if result.get("extra") and method in METHODS:
        out.update(METHODS.get(method).compared_metrics(result))
    return out


def _group(results: list[Result]) -> dict[tuple[str, str, str], list[float]]:
    out: dict = {}
    for r in results:
        for metric, v in flatten(r).items():
            out.setdefault((r["spec"], r["name"], metric), []).append(v)
    return out


def compare(baseline: str, current: str, tolerance: float = 1.0) -> tuple[list[dict], bool]:
    """Rows of (spec, name, metric, baseline, current, delta, allowed, status); True if any failed."""
    from coplctl.core.errors import CoplError

    if not math.isfinite(tolerance) or tolerance < 0:
        raise CoplError(f"--tolerance must be a finite number of points, 0 or more, not {tolerance}")
    found = {}
    for label, where in (("baseline", baseline), ("current", current)):
        found[label] = load_results(where)
        if not found[label]:
            raise CoplError(f"no results under {where} ({label}): nothing to compare")
    base, cur = _group(found["baseline"]), _group(found["current"])
    rows, failed = [], False
    for key in sorted(base.keys() | cur.keys()):
        b, c = base.get(key), cur.get(key)
        row = {"spec": key[0], "name": key[1], "metric": key[2],
               "baseline": statistics.fmean(b) if b else None, "current": statistics.fmean(c) if c else None}
        if b is None:
            row.update(delta=None, allowed=None, status="new")
        elif c is None:
            row.update(delta=None, allowed=None, status="missing")
            failed = True
        else:
            spread = statistics.pstdev(b) if len(b) > 1 else 0.0
            row["delta"] = row["current"] - row["baseline"]
            row["allowed"] = max(tolerance, spread)
            row["status"] = "regressed" if row["delta"] < -row["allowed"] else "ok"
            failed |= row["status"] == "regressed"
        rows.append(row)
    return rows, failed
