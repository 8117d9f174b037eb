"""The results store: one JSON per (benchmark, method, seed) with resolved config, metrics and
provenance; tables and comparisons are built from these files only."""

from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

from coplctl.atomic import atomic_write_text

PACKAGES = ("coplctl", "torch", "transformers", "peft", "accelerate", "torch_geometric", "pandas", "numpy")


def result_path(root: Path, spec: str, name: str, seed: int) -> Path:
    return Path(root) / spec / "results" / name / f"seed{seed}.json"


def write_result(path: Path, result: dict) -> None:
    atomic_write_text(path, json.dumps(result, indent=2, sort_keys=True, default=str) + "\n")


def load_results(root: str | Path) -> list[dict]:
    """Every result file under ``root`` (a results directory, a benchmark's directory, or one file)."""
    root = Path(root)
    files = [root] if root.is_file() else sorted(root.rglob("seed*.json"))
    out = []
    for f in files:
        try:
            data = json.loads(f.read_text())
        except json.JSONDecodeError as e:
            from coplctl.errors import DataError

            raise DataError(f, f"not valid JSON ({e.msg})", line=e.lineno) from None
        if isinstance(data, dict) and {"spec", "name", "seed", "metrics"} <= set(data):
            data["_file"] = str(f)
            out.append(data)
    return out


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
