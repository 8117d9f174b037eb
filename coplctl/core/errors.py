"""Known errors: the CLI turns each into one red line and exit code 1."""

from __future__ import annotations

from pathlib import Path


class CoplError(Exception):
    """An error the user can fix; its message says what to do next."""


class Diverged(CoplError):
    """Training produced a non-finite loss (usually: the learning rate is too high)."""


class DataError(CoplError):
    """Bad input data, located by file and (when known) row or line.

    ``row`` is the 0-based row index of a table (as ``pandas.read_parquet(f).iloc[row]``);
    ``line`` is the 1-based line number of a text file (JSONL), as editors count.
    """

    def __init__(self, file: str | Path, problem: str, *, row: int | None = None,
                 line: int | None = None, more: int = 0):
        self.file, self.problem, self.row, self.line, self.more = str(file), problem, row, line, more
        where = self.file
        if row is not None:
            where += f" row {row}"
        if line is not None:
            where += f" line {line}"
        tail = f" (and {more} more row{'s' if more != 1 else ''} with the same problem)" if more else ""
        super().__init__(f"{where}: {problem}{tail}")
