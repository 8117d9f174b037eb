"""The results store: one JSON per (benchmark, method, seed) with resolved config, metrics and
provenance; tables and comparisons are built from these files only."""

from __future__ import annotations

import hashlib
import json
import re
import os
import platform
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any, TypedDict

from coplctl.core.atomic import atomic_write_text
from coplctl.core.errors import DataError
from coplctl.core.files import check_numbers, check_type, read_json
from coplctl.core.tables import SCORES

PACKAGES = ("coplctl", "torch", "transformers", "peft", "accelerate", "torch_geometric", "pandas", "numpy")


class Scores(TypedDict, total=False):
    """Accuracy on one set of test pairs (:func:`coplctl.models.evaluate.accuracy_table`); None where no pair."""

    accuracy: float | None
    common: float | None
    controversial: float | None
    pairs: int
    controversial_pairs: int
    ties: int
    """Pairs whose two responses got exactly the same reward (scored as wrong)."""


class Timing(TypedDict):
    fit_seconds: float
    evaluate_seconds: float


class Result(TypedDict, total=False):
    """One results file: a (benchmark, job, seed) trained, evaluated and described. ``spec``, ``name``,
    ``seed`` and ``metrics`` are always there (:func:`check_result`); the rest as the runner wrote it."""

    spec: str
    spec_version: int
    spec_file: str | None
    name: str
    """The job: a method of the spec, or an ablation's name."""
    method: str
    seed: int
    backbone: str
    mode: str
    data: dict[str, Any]
    config: dict[str, Any]
    metrics: dict[str, Scores]
    """By role of the users: ``seen``, ``unseen``."""
    adaptation: dict[str, Any] | None
    training: dict[str, Any]
    timing: Timing
    run_dir: str
    provenance: dict[str, Any]
    extra: dict[str, Any]
    """The method's extra experiments by name (:meth:`coplctl.models.reward.RewardMethod.experiments`)."""
    skipped: str
    """Why the job did not run on this dataset (then ``metrics`` is empty)."""
    diverged: str
    """A search candidate whose training diverged: the error (then ``metrics`` is empty)."""
    lr_search: dict[str, Any]
    """A searched job (:mod:`coplctl.bench.search`): ``grid``, ``chosen`` and each candidate's
    ``valid_accuracy``."""


def result_path(root: Path, spec: str, name: str, seed: int) -> Path:
    return Path(root) / spec / "results" / name / f"seed{seed}.json"


def write_result(path: Path, result: Result) -> None:
    atomic_write_text(path, json.dumps(result, indent=2, sort_keys=True, default=str) + "\n")


def load_results(root: str | Path) -> list[Result]:
    """Every result file under ``root`` (a results directory, a benchmark's directory, or one file).

    Each is checked to have the shape tables and comparisons read; a damaged one is one DataError
    naming the file and the key.
    """
    root = Path(root)
    if not root.exists():
        return []
    files = [root] if root.is_file() else result_files(root)
    out = []
    for f in files:
        data = check_result(read_json(f, what="results file"), f)
        named = RESULT_NAME.fullmatch(f.name)
        if named and int(named.group(1)) != data["seed"]:
            raise DataError(f, f"holds seed {data['seed']}, but its name says seed {named.group(1)}")
        data["_file"] = str(f)
        out.append(data)
    return out


RESULT_NAME = re.compile(r"seed(\d+)\.json")


def result_files(root: Path) -> list[Path]:
    """The result files under ``root``: exactly ``seed<N>.json``. Anything else named ``seed*.json`` (a copy such
    as ``seed0 copy.json``, or a directory) would be read as another seed or silently skip one: one DataError."""
    found = []
    for f in sorted(root.rglob("seed*.json")):
        if not RESULT_NAME.fullmatch(f.name):
            raise DataError(f, "is not a results file name (seed<N>.json): move it out of the results directory, "
                               "or it would count as another seed")
        if not f.is_file():
            raise DataError(f, "is not a file: a results file seed<N>.json must be one")
        found.append(f)
    return found


_NUMBER = (int, float)


def check_result(data: dict, f: Path) -> Result:
    """``data`` if it has the shape of a results file (what tables and comparisons read), else DataError.
    What a method's experiments stored under ``extra`` is checked by that method
    (:meth:`coplctl.models.reward.RewardMethod.check_extra`), when it is registered here."""
    from coplctl.core.registry import METHODS

    for key, types in (("spec", (str,)), ("name", (str,)), ("seed", (int,)), ("metrics", (dict,))):
        if key not in data:
            raise DataError(f, f"missing key {key!r}; not a coplctl results file")
        check_type(data[key], types, f, key)
    for role, block in data["metrics"].items():
        check_numbers(block, f, f"metrics.{role}", SCORES)
    for key in ("method", "skipped", "diverged"):
        check_type(data.get(key), str, f, key, nullable=True)
    search = check_type(data.get("lr_search"), dict, f, "lr_search", nullable=True)
    if search is not None:
        grid = search.get("grid")
        if not isinstance(grid, list) or not grid:
            raise DataError(f, "key 'lr_search.grid' must be a non-empty list of numbers")
        for i, v in enumerate(grid):
            check_type(v, _NUMBER, f, f"lr_search.grid[{i}]")
        check_type(search.get("chosen"), _NUMBER, f, "lr_search.chosen")
    extra = check_type(data.get("extra"), dict, f, "extra", nullable=True)
    method = data.get("method") or data["name"]
    if extra and method in METHODS:
        METHODS.get(method).check_extra(extra, f)
    return data


def data_hash(path: Path) -> str:
    """SHA-256 over a dataset directory's files (names and bytes)."""
    h = hashlib.sha256()
    for f in sorted(Path(path).iterdir()):
        if f.is_file():
            h.update(f.name.encode())
            h.update(f.read_bytes())
    return h.hexdigest()


def _git_commit() -> str | None:
    repo = Path(__file__).resolve().parents[2]
    try:
        head = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if head.returncode:
        return None
    return head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def provenance(data_dir: Path | None) -> dict:
    import torch

    versions = {}
    for p in PACKAGES:
        try:
            versions[p] = metadata.version(p.replace("_", "-") if p == "torch_geometric" else p)
        except metadata.PackageNotFoundError:
            versions[p] = None
    return {
        "packages": versions,
        "python": sys.version.split()[0],
        "git_commit": _git_commit(),
        "data_hash": data_hash(data_dir) if data_dir else None,
        "hardware": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                     "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]},
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": " ".join(sys.argv),
    }
