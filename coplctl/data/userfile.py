"""User files: new users' annotations as JSONL, one pair per line.

    {"user": "alice", "chosen": "<response id or exact text>", "rejected": "<...>", "prompt": "<optional>"}

A response given as text is matched to a known response by exact text (the optional prompt
disambiguates texts shared by several prompts); the two responses of a pair must answer the same
prompt. With ``new_responses`` (reward-model runs, which score any text with their backbone), a text
that matches no known response of the line's ``"prompt"`` becomes a new response of that prompt, with
the id ``new-<digest of prompt and text>``; without a prompt such a text is an error, and so is a value
shaped like the run's response ids (e.g. ``r00042``) that names none of them. Every problem names the
file and the line; with ``skip_invalid`` problems are collected and reported instead of raised (a file
that is not UTF-8 text is always an error).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from coplctl.core.errors import DataError
from coplctl.core.files import parse_json, read_text

NEW_COLUMNS = ["response_id", "prompt", "text"]


@dataclass
class UserFile:
    pairs: pd.DataFrame  # user_id, chosen_id, rejected_id, line
    skipped_lines: list[dict] = field(default_factory=list)  # {"line", "user", "reason"}
    skipped_users: list[dict] = field(default_factory=list)  # {"user", "lines", "reason"}
    #: responses the pairs name that the run does not know (response_id, prompt, text); ``new_responses`` only
    new_responses: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=NEW_COLUMNS))

    def with_new_responses(self, responses: pd.DataFrame) -> pd.DataFrame:
        """``responses`` (response_id, prompt, text) and, after them, the new responses the pairs name."""
        if not len(self.new_responses):
            return responses
        return pd.concat([responses[NEW_COLUMNS], self.new_responses], ignore_index=True)


def _shape(value: str) -> str:
    """A response id's shape: its digit runs replaced by one ``0`` (``r00042`` -> ``r0``)."""
    return re.sub(r"[0-9]+", "0", value)


class _Resolver:
    def __init__(self, responses: pd.DataFrame, new_responses: bool = False):
        self.prompt_of = dict(zip(responses["response_id"].tolist(), responses["prompt"].tolist()))
        self.responses = responses
        self._by_text: dict[str, list[tuple[str, str]]] | None = None
        self.allow_new = new_responses
        self.new: dict[tuple[str, str], str] = {}  # (prompt, text) -> id of a new response
        self._id_shapes: set[str] | None = None

    def looks_like_id(self, value: str) -> bool:
        """A single token with the shape of one of the run's response ids (digit runs aside)."""
        if self._id_shapes is None:
            self._id_shapes = {_shape(r) for r in self.prompt_of}
        return not any(ch.isspace() for ch in value) and _shape(value) in self._id_shapes

    def new_id(self, prompt: str, text: str) -> str:
        """The id of the new response (prompt, text): ``new-`` and a digest, unique among the run's ids."""
        key = (prompt, text)
        if key not in self.new:
            digest = hashlib.sha1(f"{prompt}\0{text}".encode("utf-8", "surrogatepass")).hexdigest()
            width = 12
            while f"new-{digest[:width]}" in self.prompt_of:
                width += 4
            self.new[key] = f"new-{digest[:width]}"
        return self.new[key]

    @property
    def by_text(self) -> dict[str, list[tuple[str, str]]]:
        if self._by_text is None:  # built on the first response given as text
            self._by_text = {}
            r = self.responses
            for rid, prompt, text in zip(r["response_id"].tolist(), r["prompt"].tolist(), r["text"].tolist()):
                self._by_text.setdefault(text, []).append((rid, prompt))
        return self._by_text

    def __call__(self, value: str, prompt: str | None) -> tuple[str | None, str | None]:
        """(response id, None) or (None, reason)."""
        if value in self.prompt_of:
            if prompt is not None and self.prompt_of[value] != prompt:
                return None, "is the id of a response to another prompt than the line's \"prompt\""
            return value, None
        found = self.by_text.get(value, [])
        if prompt is not None:
            found = [f for f in found if f[1] == prompt]
        if len(found) == 1:
            return found[0][0], None
        if found:
            return None, f"matches {len(found)} responses by text; add the \"prompt\" field to choose one"
        why = "is neither the id nor the exact text of a response of this run"
        if not self.allow_new:
            return None, why
        if prompt is None:
            return None, why + "; to give a new response by its text, add the line's \"prompt\""
        if self.looks_like_id(value):
            return None, why + " (it is shaped like the run's response ids, so it is not taken as a new text)"
        return self.new_id(prompt, value), None


def seen_user_problem(user: str) -> str:
    return f"user {user!r} is a seen user of the run; adapt gives new users only, pick another id"


def _resolve_pair(rec: dict, prompt: str | None, resolve: _Resolver) -> tuple[str, str | None]:
    """(chosen id, rejected id), or (reason, None)."""
    ids = []
    for key in ("chosen", "rejected"):
        value = rec[key]
        if type(value) is not str or not value:
            return f"{key} must be a non-empty string (a response id or text)", None
        rid, why = resolve(value, prompt)
        if rid is None:
            return f"{key} {why}", None
        ids.append(rid)
    return ids[0], ids[1]


def read_user_file(path: str | Path, responses: pd.DataFrame, *, skip_invalid: bool = False,
                   seen_users: Collection[str] = (), new_responses: bool = False) -> UserFile:
    """Parse and resolve a user file against ``responses`` (response_id, prompt, text).

    A line naming one of ``seen_users`` (the run's own users) is a problem like any other: adapting
    gives new users, it never replaces a trained one. ``new_responses``: texts the run does not know,
    with the line's prompt, become new responses (see the module's docstring).
    """
    path = Path(path)
    text = read_text(path, "user file")  # missing, a directory, not UTF-8: one error naming the file

    def records():
        for n, raw in enumerate(text.split("\n"), 1):
            if not raw or raw.isspace():
                continue
            try:
                yield n, parse_json(raw, path, line=n)
            except DataError as e:  # invalid JSON, nesting too deep, an integer too long ...
                yield n, e

    return user_pairs(records(), responses, source=path, skip_invalid=skip_invalid, seen_users=seen_users,
                      new_responses=new_responses)


def user_pairs(records, responses: pd.DataFrame, *, source: str | Path, unit: str = "line",
               skip_invalid: bool = False, seen_users: Collection[str] = (), new_responses: bool = False) -> UserFile:
    """Resolve new users' annotations ``records`` ((number, record or DataError) per line or row) against
    ``responses``; problems name ``source`` and the ``unit`` (``line`` of a file, ``row`` of a list).
    ``new_responses``: as :func:`read_user_file`."""
    resolve = _Resolver(responses, new_responses)
    seen_users = seen_users if isinstance(seen_users, (set, frozenset, dict)) else set(seen_users)
    rows, skipped, seen_pairs, lines_of = [], [], {}, {}

    def problem(line: int, user, reason: str) -> None:
        if not skip_invalid:
            raise DataError(source, reason, **{unit: line})
        skipped.append({unit: line, "user": user, "reason": reason})

    prompt_of = resolve.prompt_of
    for n, rec in records:
        if isinstance(rec, DataError):
            problem(n, None, rec.problem)
            continue
        if type(rec) is not dict:
            problem(n, None, "each line must be a JSON object with user, chosen and rejected")
            continue
        user = rec.get("user")
        if type(user) is not str:
            user = str(user) if isinstance(user, int) and not isinstance(user, bool) else ""
        if "chosen" not in rec or "rejected" not in rec or "user" not in rec:
            missing = [k for k in ("user", "chosen", "rejected") if k not in rec]
            problem(n, user or None, f"missing field {', '.join(missing)}")
            continue
        if not user:
            problem(n, None, "user must be a non-empty string")
            continue
        if user in seen_users:
            problem(n, user, seen_user_problem(user))
            continue
        lines_of.setdefault(user, []).append(n)
        prompt = rec.get("prompt")
        if prompt is not None and type(prompt) is not str:
            problem(n, user, "prompt must be a string")
            continue
        chosen, rejected = rec["chosen"], rec["rejected"]
        if type(chosen) is not str or chosen not in prompt_of or type(rejected) is not str \
                or rejected not in prompt_of or prompt is not None:  # not two plain response ids
            chosen, rejected = _resolve_pair(rec, prompt, resolve)
            if rejected is None:
                problem(n, user, chosen)
                continue
        if chosen == rejected:
            problem(n, user, "chosen and rejected are the same response")
            continue
        if chosen in prompt_of and rejected in prompt_of and prompt_of[chosen] != prompt_of[rejected]:
            problem(n, user, "chosen and rejected answer different prompts")
            continue
        key = (user, chosen, rejected) if chosen < rejected else (user, rejected, chosen)
        first = seen_pairs.setdefault(key, n)
        if first != n:
            problem(n, user, f"repeats the pair of line {first}")
            continue
        rows.append((user, chosen, rejected, n))

    pairs = pd.DataFrame(rows, columns=["user_id", "chosen_id", "rejected_id", "line"])
    named = set(pairs["chosen_id"]) | set(pairs["rejected_id"])
    new = pd.DataFrame([(rid, p, t) for (p, t), rid in resolve.new.items() if rid in named], columns=NEW_COLUMNS)
    with_pairs = set(pairs["user_id"])
    skipped_users = []
    for user, lines in lines_of.items():
        if user not in with_pairs:
            if not skip_invalid:
                raise DataError(source, f"user {user!r} has no usable pair ({unit}s {', '.join(map(str, lines))})",
                                **{unit: lines[0]})
            skipped_users.append({"user": user, "lines": lines, "reason": "no usable pair"})
    if pairs.empty:
        raise DataError(source, "holds no usable annotation")
    return UserFile(pairs, skipped, skipped_users, new)
