"""Users a server learns (``POST /users``), kept beside the run without rewriting it.

An overlay is a directory (default ``RUN/served-users``) of JSON Lines files, one per accepted request,
each holding that request's annotation records as a user file holds them (``user``, ``chosen``,
``rejected`` and optionally ``prompt``; responses by id or by text). A request is adapted in memory and its
file then renamed into place (written to a temporary name first), so a file exists only for users the
model took, and a crash leaves no partial file. Loading replays the files in order through
:meth:`coplctl.serving.api.RewardModel.adapt`, request by request as they were made; adaptation is
deterministic, so a restarted server scores those users as before. The trained files of the run are never
touched. One server holds an overlay at a time (a lock, released however the server exits).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from coplctl.core.atomic import atomic_write_text, locked
from coplctl.core.errors import CoplError, DataError
from coplctl.core.files import parse_json

OVERLAY = "served-users"
LOCK = ".lock"


def overlay_dir(run: Path, directory: Path | None = None) -> Path:
    """The overlay of ``run``: ``directory``, else ``RUN/served-users``."""
    return Path(directory) if directory is not None else Path(run) / OVERLAY


def _files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.glob("*.jsonl") if not p.name.startswith("."))


def read_request(path: Path) -> list[dict]:
    """The records of one overlay file (one JSON object per line)."""
    records = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if line.strip():
            rec = parse_json(line, path, line=i)
            if not isinstance(rec, dict):
                raise DataError(path, "each line must be a JSON object (a user's annotation)", line=i)
            records.append(rec)
    return records


def replay(rm, directory: Path) -> int:
    """Adapt ``rm`` to every request stored in ``directory`` (in the order they were accepted); returns the
    number of users added."""
    if not directory.is_dir():
        return 0
    before = len(rm.users)
    for path in _files(directory):
        try:
            rm.adapt(read_request(path))
        except CoplError as e:
            raise CoplError(f"the served users' overlay {path} no longer adapts ({e}); move it aside to serve "
                            f"without it") from None
    return len(rm.users) - before


class Overlay:
    """The overlay of a served run, locked while the server lives (:meth:`open`)."""

    def __init__(self, directory: Path):
        self.directory = Path(directory)

    @contextmanager
    def open(self, rm) -> Iterator[int]:
        """Lock the overlay, replay it into ``rm``; yields the number of users it added."""
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise CoplError(f"cannot keep served users in {self.directory} ({e.strerror or e}): give --users-dir DIR, "
                            f"or --read-only") from None
        with locked(self.directory / LOCK, f"the served users' overlay {self.directory}", by="coplctl serve",
                    advice="serve this run's overlay from one server, or give this one --users-dir"):
            yield replay(rm, self.directory)

    def add(self, rm, records: list[dict]) -> dict:
        """Adapt ``rm`` to ``records`` and store them; the file appears only once the users were taken."""
        name = f"{time.time_ns():020d}-{os.getpid()}.jsonl"
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
        report = rm.adapt(records)  # a bad record raises here, before anything is written
        atomic_write_text(self.directory / name, text)
        return report
