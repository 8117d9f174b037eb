"""Learning-rate search (paper Appendix C.2: each baseline's rate is searched over 1e-4, 5e-5, 1e-5 and
5e-6). A job whose ``lr`` is a list (a spec's ``lr_grid:``, a list in ``common`` / ``overrides``, or
``--set lr=[...]``) is trained once per value; the value with the best validation accuracy is kept per
(job, seed). Each candidate's result is stored on its own under ``OUT/SPEC/search/`` (so an interrupted
search resumes per candidate), and the kept one becomes the job's result with an ``lr_search`` record:
the grid, every candidate's validation accuracy, and the value chosen. A candidate whose training
diverges (a non-finite loss) is recorded as such and never chosen.
"""

from __future__ import annotations

import math
from pathlib import Path

from coplctl.bench.results import Result
from coplctl.core.errors import CoplError


def lr_grid(overrides: dict) -> list[float] | None:
    """The candidate learning rates of a job (its ``lr`` is a list), or None."""
    lr = overrides.get("lr")
    return list(lr) if isinstance(lr, list) else None


def check_grid(grid: list, where: str) -> None:
    if not grid:
        raise CoplError(f"{where}: an lr grid needs at least one value")
    bad = next((v for v in grid if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0), None)
    if bad is not None:
        raise CoplError(f"{where}: lr grid values must be positive numbers, not {bad!r}")
    if len(set(grid)) < len(grid):
        raise CoplError(f"{where}: the lr grid {grid} repeats a value")


def tag(lr: float) -> str:
    """The suffix of a candidate's run and work directories."""
    return f"-lr{lr:g}"


def candidate_path(out: Path, spec: str, name: str, seed: int, lr: float) -> Path:
    return Path(out) / spec / "search" / name / f"seed{seed}" / f"lr{lr:g}.json"


def diverged(job: Result, why: str) -> Result:
    """The stored result of a candidate whose training diverged: no metrics, the reason."""
    return {**job, "metrics": {}, "diverged": why}  # type: ignore[return-value]


def choose(grid: list[float], candidates: dict[float, Result]) -> Result:
    """The job's result: the candidate with the best validation accuracy (the first in grid order on a
    tie), with an ``lr_search`` record of the whole search; its config's ``lr`` holds the grid.
    Candidates whose training diverged are recorded and never chosen."""
    scores, failed = {}, {}
    for lr in grid:
        if candidates[lr].get("diverged"):
            failed[lr] = candidates[lr]["diverged"]
            continue
        valid = (candidates[lr].get("training") or {}).get("valid_accuracy")
        if not isinstance(valid, (int, float)) or math.isnan(valid):
            raise CoplError(f"{candidates[lr]['name']} at lr {lr:g} reports no validation accuracy: the search "
                            f"has nothing to choose by (does the dataset have valid pairs?)")
        scores[lr] = float(valid)
    if not scores:
        raise CoplError(f"{candidates[grid[0]]['name']}: training diverged at every learning rate of the grid "
                        f"{', '.join(f'{v:g}' for v in grid)}; search lower rates")
    best = max(scores, key=lambda lr: (scores[lr], -grid.index(lr)))
    chosen = dict(candidates[best])
    chosen["config"] = {**chosen["config"], "lr": list(grid)}
    chosen["lr_search"] = {"grid": list(grid), "chosen": best, "candidates": [
        {"lr": lr, "valid_accuracy": scores[lr]} if lr in scores else {"lr": lr, "valid_accuracy": None,
                                                                       "diverged": failed[lr]} for lr in grid]}
    return chosen  # type: ignore[return-value]
