"""Reading a flat preference table (one row per judgement) for `coplctl data import`.

A JSONL, JSON (a list of records), CSV or Parquet file, or a Hugging Face dataset id (read through
``datasets``, the ``hub`` extra): only the columns the import names are kept. A text cell is a string, or a
list of chat messages ``{role, content}`` as TRL's preference datasets hold them: a response is the last
assistant message; a prompt of several messages is rendered as a transcript; without a prompt column the
prompt is the conversation before ``chosen``'s last assistant message (TRL's implicit-prompt format).
Every check names the file and the line (JSONL; CSV when no cell spans lines) or the 0-based row.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from coplctl.core.errors import CoplError, DataError

SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")


@dataclass
class Columns:
    """Which columns of the table hold what (defaults as ``coplctl data import``'s options)."""

    user_column: str = "user"
    prompt_column: str = "prompt"
    chosen_column: str = "chosen"
    rejected_column: str = "rejected"
    group_column: str = "group"
    """Optional: read when the table has it (an explicitly named column must exist)."""
    split_column: str = "split"
    """Optional: when present, the splits are taken from it instead of the import's protocol."""
    controversial_column: str = "controversial"
    """Optional: true/false per row; else derived from the groups."""
    hub_split: str = "train"
    """Split of a hub dataset to read."""
    required: tuple[str, ...] = ()
    """Optional columns the user named explicitly (then they must exist)."""


# ---- reading -------------------------------------------------------------------------------------------

class _Table:
    """Columns of the input as Python lists or arrays, and how to name a row of it in an error."""

    def __init__(self, file: Path, columns: dict, lines=None):
        self.file, self.columns, self._lines = file, columns, lines  # lines: None (rows), array, or a callable

    def __len__(self) -> int:
        return len(next(iter(self.columns.values())))

    def where(self, row: int) -> dict:
        while callable(self._lines):
            self._lines = self._lines()
        return {"line": int(self._lines[row])} if self._lines is not None else {"row": int(row)}

    def fail(self, problem: str, bad) -> None:
        bad = np.asarray(bad, dtype=bool)
        if bad.any():
            rows = np.flatnonzero(bad)
            raise DataError(self.file, problem, more=len(rows) - 1, **self.where(rows[0]))


def _jsonl(path: Path, wanted: list[str]) -> tuple[dict, np.ndarray, list[str]]:
    """Line by line with Python's parser: exact line numbers, strings kept as written (Arrow's reader
    turns date-like strings into timestamps, big integers into floats and crashes on some lines)."""
    from coplctl.core.files import jsonl_records

    cols: dict[str, list] = {c: [] for c in dict.fromkeys(wanted)}
    lines, available = [], {}
    for n, rec in jsonl_records(path, "JSONL table"):
        if not isinstance(rec, dict):
            raise DataError(path, "each line must hold a JSON object (one record per line)", line=n)
        for c, values in cols.items():
            values.append(rec.get(c, _MISSING))
        available.update(dict.fromkeys(rec))
        lines.append(n)
    return cols, np.asarray(lines, dtype=np.int64), list(available)


_MISSING = object()


def _nonblank_lines(path: Path) -> np.ndarray:
    with open(path, "rb") as fh:
        return np.asarray([n for n, line in enumerate(fh, 1) if line.strip()])


def read_table(source: str, cfg: Columns) -> _Table:
    """The columns the import uses, from a local file or a hub dataset."""
    if not source.strip():
        raise CoplError("FILE_OR_HUB_ID is empty: name a .jsonl, .json, .csv or .parquet file or a hub dataset id")
    path = Path(source).expanduser()
    names = [cfg.user_column, cfg.prompt_column, cfg.chosen_column, cfg.rejected_column,
             cfg.group_column, cfg.split_column, cfg.controversial_column]
    if not path.exists():
        from coplctl.data.ultrafeedback import looks_like_hub_id

        if looks_like_hub_id(source):
            return _hub_table(source, cfg, names)
        raise DataError(path, "no such file (a .jsonl, .json, .csv or .parquet table, or a hub dataset id)")
    if path.is_dir() or path.suffix not in SUFFIXES:
        raise DataError(path, "not a table file: use a .jsonl, .json, .csv or .parquet file")
    try:
        if path.suffix == ".jsonl":
            cols, lines, available = _jsonl(path, names)
            if not len(lines):
                raise DataError(path, "holds no rows (one JSON object per line)")
            return _Table(path, _present(path, cols, cfg, available), lines)
        if path.suffix == ".json":
            from coplctl.core.files import read_json

            data = read_json(path, what="JSON table", expect=list)
            if not data:
                raise DataError(path, "holds no rows (a list of JSON objects)")
            bad = [i for i, r in enumerate(data) if not isinstance(r, dict)]
            if bad:
                raise DataError(path, "each record must be a JSON object", row=bad[0], more=len(bad) - 1)
            cols = {c: [r.get(c, _MISSING) for r in data] for c in names}
            available = list(dict.fromkeys(k for r in data for k in r))
            return _Table(path, _present(path, cols, cfg, available), None)
        if path.suffix == ".csv":
            import pyarrow as pa
            import pyarrow.csv as pc

            arrow = pc.read_csv(path, convert_options=pc.ConvertOptions(
                column_types={c: pa.string() for c in names if c != cfg.controversial_column}))
        else:
            import pyarrow.parquet as pq

            arrow = pq.read_table(path)
    except DataError:
        raise
    except UnicodeDecodeError as e:
        raise DataError(path, f"is not UTF-8 text (byte {e.start})") from None
    except Exception as e:
        raise DataError(path, f"cannot be read as {path.suffix[1:].upper()} ({str(e).splitlines()[0][:200]})") from None
    lines = None
    if path.suffix == ".csv":  # the non-blank lines after the header, unless a quoted cell spans lines
        lines = lambda: (lambda nb: nb[1:] if len(nb) == arrow.num_rows + 1 else None)(_nonblank_lines(path))
    return _Table(path, _present(path, _arrow_columns(arrow, names), cfg, arrow.column_names), lines)


def _arrow_columns(arrow, names: list[str]) -> dict:
    return {c: arrow.column(c).to_pylist() for c in dict.fromkeys(names) if c in arrow.column_names}


def _present(path: Path, cols: dict, cfg: Columns, available: list[str]) -> dict:
    """Drop absent optional columns; a missing required one is an error listing the table's columns."""
    required = [cfg.user_column, cfg.chosen_column, cfg.rejected_column, *cfg.required]
    found = {c: v for c, v in cols.items() if c in available}
    missing = [c for c in required if c not in found]
    if missing:
        raise DataError(path, f"missing column {', '.join(dict.fromkeys(missing))} (found: "
                              f"{', '.join(available) or 'none'}; name columns with --user-column, "
                              f"--prompt-column, --chosen-column, --rejected-column)")
    return found


def _hub_table(repo_id: str, cfg: Columns, names: list[str]) -> _Table:
    from coplctl.data.ultrafeedback import hub_dataset

    arrow = hub_dataset(repo_id, split=cfg.hub_split).data.table
    return _Table(Path(repo_id), _present(Path(repo_id), _arrow_columns(arrow, names), cfg, arrow.column_names), None)


# ---- cells ---------------------------------------------------------------------------------------------

def _is_chat(v) -> bool:
    return isinstance(v, (list, tuple)) and len(v) > 0 and all(isinstance(m, dict) for m in v)


def render_messages(messages) -> str | None:
    """A prompt of chat messages as one text: a lone message is its content; several form a transcript in
    the backbone's "Human:/Assistant:" format (the first user turn is the reader's "Human:" line)."""
    parts = []
    for m in messages:
        content, role = m.get("content"), m.get("role")
        if not isinstance(content, str):
            return None
        if not parts:
            parts.append(content)
        else:
            parts.append(("\n\nAssistant: " if role == "assistant" else "\n\nHuman: ") + content)
    return "".join(parts)


def _split_response(messages) -> tuple[list, str | None]:
    """(the messages before the response, its content): the response is the last message, an assistant's."""
    last = messages[-1]
    content = last.get("content") if last.get("role") == "assistant" else None
    return list(messages[:-1]), content if isinstance(content, str) else None


def texts_of(t: _Table, column: str, what: str) -> tuple[np.ndarray, list]:
    """A response column as texts (chat cells: the last assistant message), and each row's preceding
    messages (None for plain text cells)."""
    values = t.columns[column]
    t.fail(f"this row has no field {column}", [v is _MISSING for v in values])
    texts = np.empty(len(values), dtype=object)
    before = [None] * len(values)
    bad = np.zeros(len(values), dtype=bool)
    for i, v in enumerate(values):
        if isinstance(v, str):
            texts[i] = v
        elif _is_chat(v):
            before[i], texts[i] = _split_response(v)
            bad[i] = texts[i] is None
        else:
            bad[i] = True
    t.fail(f"{what} (column {column}) must be a text, or chat messages whose last one is the assistant's response",
           bad)
    t.fail(f"{what} (column {column}) is empty", [not s.strip() for s in texts])
    return texts, before


def prompts_of(t: _Table, cfg: Columns, chosen_before: list) -> np.ndarray:
    if cfg.prompt_column in t.columns:
        values = t.columns[cfg.prompt_column]
        t.fail(f"this row has no field {cfg.prompt_column}", [v is _MISSING for v in values])
        out = np.asarray([v if isinstance(v, str) else render_messages(v) if _is_chat(v) else None for v in values],
                         dtype=object)
        t.fail(f"prompt (column {cfg.prompt_column}) must be a text or chat messages",
               [p is None for p in out])
    else:
        if any(b is None for b in chosen_before):
            t.fail(f"missing column {cfg.prompt_column}: a row without it must hold chat messages in "
                   f"{cfg.chosen_column} (the conversation before the response is the prompt)",
                   [b is None for b in chosen_before])
        out = np.asarray([render_messages(b) if b else None for b in chosen_before], dtype=object)
        t.fail(f"{cfg.chosen_column} has no message before its response to serve as the prompt",
               [p is None for p in out])
    t.fail(f"prompt (column {cfg.prompt_column}) is empty", [not p.strip() for p in out])
    return out


def ids(t: _Table, column: str, what: str, nullable: bool = False) -> np.ndarray:
    """An id-like column as strings (numbers allowed: 7 and "7" are the same user); None where null."""
    values = t.columns[column]
    if not nullable:
        t.fail(f"this row has no field {column}", [v is _MISSING for v in values])
    out = np.asarray([None if v is None or v is _MISSING or (isinstance(v, float) and np.isnan(v))
                      else (str(int(v)) if isinstance(v, float) and v.is_integer() else str(v))
                      if isinstance(v, (str, int, float)) and not isinstance(v, bool) else _MISSING
                      for v in values], dtype=object)
    t.fail(f"{what} (column {column}) must be a text or a number", [v is _MISSING for v in out])
    if not nullable:
        t.fail(f"{what} (column {column}) is empty", [v is None or not v.strip() for v in out])
    return out


def flags(t: _Table, column: str) -> np.ndarray:
    truth = {True: True, False: False, 1: True, 0: False, "true": True, "false": False, "1": True, "0": False}
    values = [truth.get(v.strip().lower() if isinstance(v, str) else v) if not isinstance(v, float) else
              truth.get(int(v)) if v in (0.0, 1.0) else None for v in t.columns[column]]
    t.fail(f"controversial (column {column}) must be true or false", [v is None for v in values])
    return np.asarray(values, dtype=bool)
