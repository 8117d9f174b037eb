"""The preference dataset: a directory of three Parquet tables and ``meta.json``.

- ``responses.parquet``: ``response_id``, ``prompt``, ``text`` (+ optional attribute ratings)
- ``users.parquet``: ``user_id``, ``group`` (nullable), ``role`` (``seen`` | ``unseen``)
- ``pairs.parquet``: ``user_id``, ``chosen_id``, ``rejected_id``,
  ``split`` (``train`` | ``valid`` | ``test`` | ``fewshot``), ``controversial`` (bool)
- ``meta.json``: ``format_version``, source, variant, seed, counts, provenance

Loading validates everything and raises one :class:`DataError` naming the file, the row and the
problem. Saving validates first, then writes to a temporary directory renamed into place.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from coplctl.core.atomic import atomic_dir
from coplctl.core.errors import DataError
from coplctl.core.files import read_json, read_parquet

FORMAT_VERSION = 1
#: How a backbone reads a response by default (UF-P, as the authors' UltraFeedback generator writes it). A
#: dataset may carry its own (``meta.json`` ``text_format``, e.g. the authors' TL;DR and PersonalLLM formats);
#: every method and backbone trained on it reads that one, and the run records it.
TEXT_FORMAT = "Human: {prompt}\n\nAssistant: {response}"
#: The authors' formats of their other generators (ml-postech/CoPL data/datagen_tldr.py, datagen_plm.py).
TLDR_FORMAT = "Human: {prompt} Assistant: {response}"
RESPONSE_ONLY = "{response}"


def check_text_format(fmt, where: str = "text_format") -> str:
    """``fmt`` if it is a text holding ``{response}`` once, ``{prompt}`` at most once and no other field;
    else one CoplError naming ``where``."""
    import string

    from coplctl.core.errors import CoplError

    if not isinstance(fmt, str):
        raise CoplError(f"{where} must be a text such as {TEXT_FORMAT!r}, not {type(fmt).__name__}")
    try:
        fields = [f for _, f, spec, conv in string.Formatter().parse(fmt) if f is not None]
    except ValueError as e:
        raise CoplError(f"{where} {fmt!r} is not a format ({e}); write literal braces as {{{{ and }}}}") from None
    if fields.count("response") != 1 or fields.count("prompt") > 1 or set(fields) - {"prompt", "response"}:
        raise CoplError(f"{where} {fmt!r} must hold {{response}} once, {{prompt}} at most once, and no other field")
    return fmt
FILES = ("responses.parquet", "users.parquet", "pairs.parquet", "meta.json")
SPLITS = ("train", "valid", "test", "fewshot")
ROLES = ("seen", "unseen")
COLUMNS = {
    "responses.parquet": ("response_id", "prompt", "text"),
    "users.parquet": ("user_id", "group", "role"),
    "pairs.parquet": ("user_id", "chosen_id", "rejected_id", "split", "controversial"),
}
#: Splits a user of each role may have.
ROLE_SPLITS = {"seen": {"train", "valid", "test"}, "unseen": {"fewshot", "valid", "test"}}


@dataclass
class PreferenceDataset:
    """Responses shared across users, users with a role and an optional group, and their pairs."""

    responses: pd.DataFrame
    users: pd.DataFrame
    pairs: pd.DataFrame
    meta: dict = field(default_factory=dict)
    path: Path | None = None

    def split(self, name: str) -> pd.DataFrame:
        return self.pairs[self.pairs["split"] == name]

    def user_ids(self, role: str) -> list[str]:
        return self.users.loc[self.users["role"] == role, "user_id"].tolist()

    @property
    def text_format(self) -> str:
        """How backbones read this dataset's responses (``meta.json`` ``text_format``; :data:`TEXT_FORMAT`
        for datasets that do not say)."""
        return check_text_format(self.meta.get("text_format", TEXT_FORMAT), f"{self.path or 'dataset'} text_format")

    @property
    def groups(self) -> list[str]:
        return sorted(self.users["group"].dropna().unique().tolist())

    def counts(self) -> dict:
        return {
            "responses": int(len(self.responses)),
            "prompts": int(self.responses["prompt"].nunique()),
            "users": {role: int((self.users["role"] == role).sum()) for role in ROLES},
            "pairs": {s: int((self.pairs["split"] == s).sum()) for s in SPLITS},
        }

    def save(self, path: str | Path, *, overwrite: bool = False) -> Path:
        """Validate, then write atomically; returns the final path."""
        validate(self, Path(path))
        meta = {"format_version": FORMAT_VERSION, **self.meta, "counts": self.counts()}
        with atomic_dir(path, overwrite=overwrite, marker="meta.json", kind="dataset") as tmp:
            for name, df in (("responses", self.responses), ("users", self.users), ("pairs", self.pairs)):
                _write_parquet(df, tmp / f"{name}.parquet")
            (tmp / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        self.meta, self.path = meta, Path(path)
        return self.path


WEIGHT_PREFIX = "weight_"
"""Mixture users (``preferences: mixture``) have no group: users.parquet holds their weight over each
attribute in a column ``weight_<attribute>``."""


def weight_columns(users: pd.DataFrame) -> list[str]:
    """The ``weight_*`` columns of mixture users, in order; [] for group users."""
    return [c for c in users.columns if c.startswith(WEIGHT_PREFIX)]


def unordered(a: pd.Series, b: pd.Series) -> tuple[pd.Series, pd.Series]:
    """The two response ids of pairs in a fixed order, so that a ≻ b and b ≻ a share one key."""
    return a.where(a < b, b), b.where(a < b, a)


def _write_parquet(df: pd.DataFrame, path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pandas(df.reset_index(drop=True), preserve_index=False)
    pq.write_table(table, path, compression="zstd")


def load(path: str | Path, *, texts: bool = True) -> PreferenceDataset:
    """Read and validate a dataset directory. ``texts=False`` leaves the responses' texts (and ratings) on
    disk, for work on the graph alone (at a million users they are most of the dataset's memory)."""
    path = Path(path)
    if not path.exists():
        raise DataError(path, "no such dataset directory (create one with `coplctl data simulate` "
                              "or `coplctl data build-ufp`)")
    if not path.is_dir():
        raise DataError(path, "is a file; a dataset is a directory holding " + ", ".join(FILES))
    for name in FILES:
        if not (path / name).is_file():
            raise DataError(path / name, "missing; a dataset directory holds " + ", ".join(FILES))
    meta = read_json(path / "meta.json", what="dataset metadata file")
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise DataError(path / "meta.json", f"format_version is {version!r}; this coplctl reads version "
                                            f"{FORMAT_VERSION} (upgrade coplctl or rebuild the dataset)")
    tables = {name: read_parquet(path / name, only=None if texts or name != "responses.parquet" else
                                 ("response_id", "prompt")) for name in COLUMNS}
    ds = PreferenceDataset(tables["responses.parquet"], tables["users.parquet"],
                           tables["pairs.parquet"], meta, path)
    validate(ds, path, texts=texts)
    release_arrow_memory()
    return ds


def release_arrow_memory() -> None:
    """Hand Arrow's freed memory back to the system (its allocator keeps it for reuse otherwise)."""
    import pyarrow as pa

    pa.default_memory_pool().release_unused()


def _fail(file: Path, problem: str, bad) -> None:
    """Raise a DataError at the first True row of ``bad`` (if any), counting the others."""
    bad = np.asarray(bad, dtype=bool)
    if bad.any():
        rows = np.flatnonzero(bad)
        raise DataError(file, problem, row=int(rows[0]), more=len(rows) - 1)


def _check_columns(df: pd.DataFrame, file: Path, nullable: tuple[str, ...] = (), skip: tuple[str, ...] = ()) -> None:
    """Check required columns and nulls; make id and text columns strings in place."""
    columns = [c for c in COLUMNS[file.name] if c not in skip]
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise DataError(file, f"missing column{'s' if len(missing) > 1 else ''} {', '.join(missing)} "
                              f"(expected {', '.join(columns)})")
    for c in columns:
        if c == "controversial":
            continue
        null = df[c].isna().to_numpy()
        if c not in nullable:
            _fail(file, f"{c} is empty (null)", null)
        if not pd.api.types.is_string_dtype(df[c]):
            df[c] = df[c].map(str, na_action="ignore")


def numbered(prefix: str, n: int):
    """``prefix`` + 0 .. n-1, zero-padded to one width (``u0000`` ... ``u9999``): ids as an Arrow string array."""
    import pyarrow as pa
    import pyarrow.compute as pc

    width = len(str(max(n - 1, 0)))
    digits = pc.utf8_lpad(pc.cast(pa.array(np.arange(n, dtype=np.int64)), pa.large_string()), width, padding="0")
    return pc.binary_join_element_wise(pa.scalar(prefix, pa.large_string()), digits, pa.scalar("", pa.large_string()))


def strings(values) -> pd.Series:
    """A pandas column of this pandas' own string dtype (Arrow-backed ``str`` in pandas 3, objects before)
    from an Arrow string array, as reading Parquet gives: no Python object per row in pandas 3."""
    return values.to_pandas()


def positions(values, within) -> np.ndarray:
    """The position of each of ``values`` in ``within`` (ids; a Series, array or list), -1 where absent:
    one hash join in Arrow, linear in both lengths (no Python loop over rows)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    table = pa.array(within) if not isinstance(within, (pa.Array, pa.ChunkedArray)) else within
    table = table.combine_chunks() if isinstance(table, pa.ChunkedArray) else table
    found = pc.index_in(pa.array(values) if not isinstance(values, (pa.Array, pa.ChunkedArray)) else values,
                        value_set=table)
    return pc.fill_null(found, -1).to_numpy(zero_copy_only=False).astype(np.int64, copy=False)


def validate(ds: PreferenceDataset, root: Path, *, texts: bool = True) -> None:
    """Check every rule of the format; raise one DataError at the first violation found. Ids are joined
    as integer positions (:func:`positions`), so a check costs linear time in the table sizes. ``texts=False``:
    the responses were read without their texts, whose rules are then not checked."""
    rf, uf, pf = root / "responses.parquet", root / "users.parquet", root / "pairs.parquet"
    ds.responses, ds.users, ds.pairs = (df.reset_index(drop=True) for df in (ds.responses, ds.users, ds.pairs))
    responses, users, pairs = ds.responses, ds.users, ds.pairs

    _check_columns(responses, rf, skip=() if texts else ("text",))
    _fail(rf, "duplicate response_id", responses["response_id"].duplicated())
    if texts:
        _fail(rf, "empty text", responses["text"].str.strip().eq("").to_numpy())

    _check_columns(users, uf, nullable=("group",))
    _fail(uf, "duplicate user_id", users["user_id"].duplicated())
    role = positions(users["role"], list(ROLES))
    _fail(uf, "role must be 'seen' or 'unseen'", role < 0)

    _check_columns(pairs, pf)
    if not (role == 0).any():
        raise DataError(uf, "holds no seen user: a dataset needs seen users with train pairs")
    contr = pairs["controversial"]
    if contr.isna().any() or not contr.isin([True, False]).all():
        _fail(pf, "controversial must be true or false", contr.isna() | ~contr.isin([True, False]))
    pairs["controversial"] = contr.astype(bool)
    split = positions(pairs["split"], list(SPLITS))
    _fail(pf, "split must be one of " + ", ".join(SPLITS), split < 0)
    user = positions(pairs["user_id"], users["user_id"])
    _fail(pf, "unknown user_id (not in users.parquet)", user < 0)
    ids = {}
    for col in ("chosen_id", "rejected_id"):
        ids[col] = positions(pairs[col], responses["response_id"])
        _fail(pf, f"unknown {col} (not a response_id of responses.parquet)", ids[col] < 0)
    chosen, rejected = ids["chosen_id"], ids["rejected_id"]
    _fail(pf, "chosen_id equals rejected_id", chosen == rejected)

    prompt = pd.factorize(responses["prompt"])[0]
    _fail(pf, "chosen and rejected responses answer different prompts", prompt[chosen] != prompt[rejected])

    pair = np.minimum(chosen, rejected) * max(len(responses), 1) + np.maximum(chosen, rejected)
    _fail(pf, "duplicate pair (the same user already annotated these two responses)",
          pd.DataFrame({"u": user, "pair": pair}).duplicated())

    pair_role = role[user]
    for r, allowed in ROLE_SPLITS.items():
        for name in sorted(set(SPLITS) - allowed):
            _fail(pf, f"split {name} for a {r} user ({r} users have only "
                      + "/".join(sorted(allowed)) + " pairs)", (pair_role == ROLES.index(r)) & (split == SPLITS.index(name)))

    for r, name in (("seen", "train"), ("unseen", "fewshot")):
        has = np.bincount(user[split == SPLITS.index(name)], minlength=len(users)) > 0
        _fail(uf, f"{r} user has no {name} pairs", (role == ROLES.index(r)) & ~has)
