"""Reading the project's own files (run directories, specs, results, user files) safely.

Every reader here turns a missing, unreadable, non-UTF-8, malformed or absurdly nested file into one
:class:`DataError` naming the file (and the line or key), never a traceback. Only data formats are
read: JSON, YAML through ``safe_load``, Parquet and safetensors; nothing executable.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from coplctl.core.errors import DataError

if TYPE_CHECKING:
    import torch

_TYPE_NAMES = {dict: "a JSON object", list: "a list", str: "text", int: "a whole number", float: "a number",
               bool: "true or false"}


def read_text(path: str | Path, what: str = "file") -> str:
    """The UTF-8 text of ``path``; a missing file, a directory or other bytes is one DataError."""
    path = Path(path)
    if path.is_dir():
        raise DataError(path, f"is a directory, not a {what}")
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise DataError(path, f"no such {what}") from None
    except OSError as e:
        raise DataError(path, f"cannot be read ({e.strerror or e})") from None
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(path, f"is not UTF-8 text (byte {e.start}); save it as UTF-8") from None


_ESCAPED_SURROGATE = re.compile(r"\\u[dD][89a-fA-F]")  # \ud800-\udfff: half of a UTF-16 pair


def not_unicode(text: str) -> str | None:
    """Why ``text`` is not Unicode text (a lone surrogate, from an unpaired ``\\udXXX`` JSON escape or from
    bytes that are not UTF-8 in a command-line argument), else None."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        return (f"holds a lone surrogate U+{ord(text[e.start]):04X} at character {e.start} (an unpaired \\ud800-"
                f"\\udfff escape, or bytes that are not UTF-8): not Unicode text")
    return None


def _unicode_problem(value: Any, where: str = "") -> str | None:
    """The first string (key or value) in a JSON value that is not Unicode text, described with its place."""
    if isinstance(value, str):
        problem = not_unicode(value)
        return f"{where or 'the value'} {problem}" if problem else None
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for k, v in items:
        here = f"{where}.{k}" if isinstance(k, str) and where else k if isinstance(k, str) else f"{where}[{k}]"
        found = (isinstance(k, str) and not_unicode(k) and f"a key {not_unicode(k)}") or _unicode_problem(v, here)
        if found:
            return found
    return None


def parse_json(text: str, path: str | Path, *, line: int | None = None) -> Any:
    """``json.loads`` whose errors name the file (and line): invalid JSON, nesting too deep to read, or a string
    that is not Unicode text (a lone surrogate escape, which every text consumer would fail on later)."""
    try:
        value = json.loads(text)
        if _ESCAPED_SURROGATE.search(text):
            problem = _unicode_problem(value)
            if problem:
                raise DataError(path, problem, line=line)
        return value
    except json.JSONDecodeError as e:
        where = f" at line {e.lineno} column {e.colno}" if line is None else f" at column {e.colno}"
        raise DataError(path, f"invalid JSON ({e.msg}{where})", line=line) from None
    except RecursionError:
        raise DataError(path, "JSON nested too deeply to read", line=line) from None
    except ValueError as e:  # valid syntax Python cannot hold, e.g. an integer of 5,000 digits
        raise DataError(path, f"invalid JSON ({str(e).split(';')[0][:120]})", line=line) from None


def jsonl_records(path: str | Path, what: str = "JSONL file") -> Iterator[tuple[int, Any]]:
    """(line number, value) of every non-blank line of a JSONL file, read as a stream; a missing file, a
    line that is not UTF-8 or not JSON is one DataError naming the file and the line."""
    path = Path(path)
    if path.is_dir():
        raise DataError(path, f"is a directory, not a {what}")
    try:
        fh = open(path, "rb")
    except FileNotFoundError:
        raise DataError(path, f"no such {what}") from None
    except OSError as e:
        raise DataError(path, f"cannot be read ({e.strerror or e})") from None
    with fh:
        for n, raw in enumerate(fh, 1):  # lines end at b"\n" only, never inside a string at U+2028
            if n == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
            if raw.isspace() or not raw:
                continue
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(path, f"is not UTF-8 text (byte {e.start} of the line); save it as UTF-8",
                                line=n) from None
            yield n, parse_json(line, path, line=n)


def read_json(path: str | Path, *, what: str = "JSON file", expect: type | None = dict) -> Any:
    """A JSON file's value, checked to be of type ``expect`` (None: any)."""
    value = parse_json(read_text(path, what), path)
    if expect is not None and not isinstance(value, expect):
        raise DataError(path, f"must hold {_TYPE_NAMES.get(expect, expect.__name__)}, not {_describe(value)}")
    return value


_EXPONENT_FLOAT = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def yaml_numbers(value: Any) -> Any:
    """``value`` with plain scalars such as ``1e-4`` read as numbers, as YAML 1.2 does (``yaml.safe_load``
    follows YAML 1.1, which wants ``1.0e-4`` and would hand learning rates over as text)."""
    if isinstance(value, str) and _EXPONENT_FLOAT.fullmatch(value):
        return float(value)
    if isinstance(value, list):
        return [yaml_numbers(v) for v in value]
    if isinstance(value, dict):
        return {k: yaml_numbers(v) for k, v in value.items()}
    return value


def load_yaml(text: str) -> Any:
    """YAML text through PyYAML's safe loader (no Python tags) without aliases: ``*name`` is refused where it
    is met, before anything is expanded (nested aliases can grow a few lines into gigabytes)."""
    import yaml

    class NoAliases(yaml.SafeLoader):
        def compose_node(self, parent, index):
            if self.check_event(yaml.AliasEvent):
                mark = self.peek_event().start_mark
                raise yaml.composer.ComposerError(None, None, "YAML aliases (*name) are not read: write the value "
                                                  "out where it is used", mark)
            return super().compose_node(parent, index)

    return yaml.load(text, Loader=NoAliases)  # noqa: S506 (a SafeLoader)


def read_yaml(path: str | Path, *, what: str = "YAML file") -> Any:
    """A YAML file through :func:`load_yaml` (safe, no aliases), errors located by line; ``1e-4`` is a number."""
    import yaml

    text = read_text(path, what)
    try:
        return yaml_numbers(load_yaml(text))
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line = mark.line + 1 if mark is not None else None
        raise DataError(path, f"invalid YAML ({e.problem or e.context})", line=line) from None
    except yaml.YAMLError as e:
        raise DataError(path, f"invalid YAML ({e})") from None
    except RecursionError:
        raise DataError(path, "YAML nested too deeply to read") from None


def field(mapping: dict, key: str, expect: type | tuple[type, ...], path: str | Path) -> Any:
    """``mapping[key]`` checked to exist and have type ``expect`` (bools are not numbers)."""
    if key not in mapping:
        raise DataError(path, f"missing key {key!r}")
    return check_type(mapping[key], expect, path, key)


def check_type(value: Any, expect: type | tuple[type, ...], path: str | Path, key: str, *,
               nullable: bool = False) -> Any:
    """``value``, the content of ``key`` in ``path``, checked to have type ``expect`` (bools are not
    numbers), or to be null when ``nullable``; else one DataError naming the file and the key."""
    types = expect if isinstance(expect, tuple) else (expect,)
    if value is None and nullable:
        return value
    if isinstance(value, bool) and bool not in types or not isinstance(value, types):
        want = "a number" if {int, float} <= set(types) else " or ".join(_TYPE_NAMES.get(t, t.__name__) for t in types)
        raise DataError(path, f"key {key!r} must be {want}{' or null' if nullable else ''}, not {_describe(value)}")
    return value


#: stored scores that are shares (accuracies): finite and within [0, 1]; every other number is a finite count
SHARES = ("accuracy", "common", "controversial", "valid_accuracy", "train_accuracy", "group_probe")


def check_numbers(block: Any, path: str | Path, key: str, keys: tuple[str, ...]) -> None:
    """``block``, the content of ``key``: null, or a JSON object whose entries ``keys`` are finite numbers or
    null (e.g. a stored metrics block), shares (:data:`SHARES`) within [0, 1] and counts not negative; else
    one DataError naming the file and the key."""
    if check_type(block, dict, path, key, nullable=True) is not None:
        for k in keys:
            v = check_type(block.get(k), (int, float), path, f"{key}.{k}", nullable=True)
            if v is None:
                continue
            if not math.isfinite(v):
                raise DataError(path, f"key '{key}.{k}' must be a finite number, not {v}")
            if k in SHARES and not 0 <= v <= 1:
                raise DataError(path, f"key '{key}.{k}' is a share and must lie in [0, 1], not {v}")
            if k not in SHARES and k != "weight_probe" and v < 0:
                raise DataError(path, f"key '{key}.{k}' is a count and cannot be negative ({v})")


def read_user_ids(path: str | Path) -> list[str]:
    """A JSON list of distinct, non-empty user ids (a run's ``users.json``)."""
    ids = read_json(path, what="user id list", expect=list)
    seen: set[str] = set()
    for i, uid in enumerate(ids):
        if not isinstance(uid, str) or not uid:
            raise DataError(path, f"item {i} must be a non-empty user id (text), not {uid!r:.60}")
        if uid in seen:
            raise DataError(path, f"item {i}: user id {uid!r:.60} appears twice")
        seen.add(uid)
    return ids


def read_safetensors(path: str | Path, what: str = "weights file") -> dict:
    """Tensors of a safetensors file; a missing, empty or truncated file is one DataError."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise DataError(path, f"no such {what}" if not path.exists() else f"is not a {what}")
    try:
        return load_file(str(path))
    except Exception as e:  # safetensors raises its own SafetensorError for every kind of damage
        raise DataError(path, f"is not a readable safetensors file ({_first_line(e)})") from None


def read_adapted(path: str | Path) -> tuple[list[str], "torch.Tensor"]:
    """User ids and embeddings of an ``embeddings.safetensors`` written by ``coplctl adapt``."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise DataError(path, "no such embeddings file (written by coplctl adapt)")
    try:
        with safe_open(str(path), "pt") as f:
            meta, keys = f.metadata() or {}, set(f.keys())
            emb = f.get_tensor("embeddings") if "embeddings" in keys else None
    except Exception as e:  # safetensors raises its own error type for every kind of damage
        raise DataError(path, f"is not a readable safetensors file ({_first_line(e)})") from None
    if emb is None or emb.dim() != 2 or "user_ids" not in meta:
        raise DataError(path, "is not an adapt output (needs an 'embeddings' matrix and user_ids metadata)")
    ids = parse_json(meta["user_ids"], path)
    if not isinstance(ids, list) or len(ids) != len(emb) or not all(isinstance(u, str) for u in ids):
        raise DataError(path, f"user_ids metadata must list one id per embedding row ({len(emb)})")
    return ids, emb


def read_parquet(path: str | Path, columns: tuple[str, ...] = (), what: str = "table", *,
                 only: tuple[str, ...] | None = None):
    """A Parquet table that must have ``columns`` (``only``: read just these); damage or a missing column
    is one DataError."""
    import pandas as pd

    path = Path(path)
    if not path.is_file():
        raise DataError(path, f"no such {what}" if not path.exists() else f"is not a {what}")
    try:
        if only is not None:
            import pyarrow.parquet as pq

            present = set(pq.read_schema(path).names)
            only = [c for c in only if c in present]  # an absent one is reported below, as a missing column
        df = pd.read_parquet(path, columns=list(only) if only is not None else None)
    except Exception as e:  # pyarrow raises ArrowInvalid, OSError ... for damaged files
        raise DataError(path, f"is not a readable Parquet file ({_first_line(e)})") from None
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise DataError(path, f"missing column {', '.join(missing)}")
    return df


def _describe(value: Any) -> str:
    if value is None:
        return "null"
    return _TYPE_NAMES.get(type(value), type(value).__name__)


def _first_line(e: Exception) -> str:
    line = (str(e).strip().splitlines() or [type(e).__name__])[0]
    return line if len(line) <= 160 else line[:159] + "…"
