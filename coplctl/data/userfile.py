"""User files: new users' annotations as JSONL, one pair per line.

    {"user": "alice", "chosen": "<response id or exact text>", "rejected": "<...>", "prompt": "<optional>"}

A response given as text is matched to a known response by exact text (the optional prompt
disambiguates texts shared by several prompts). Every problem names the file and the line; with
``skip_invalid`` problems are collected and reported instead of raised.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from coplctl.errors import DataError


@dataclass
class UserFile:
    pairs: pd.DataFrame  # user_id, chosen_id, rejected_id, line
    skipped_lines: list[dict] = field(default_factory=list)  # {"line", "user", "reason"}
    skipped_users: list[dict] = field(default_factory=list)  # {"user", "lines", "reason"}


class _Resolver:
    def __init__(self, responses: pd.DataFrame):
        self.ids = set(responses["response_id"])
        self.by_text: dict[str, list[tuple[str, str]]] = {}
        for rid, prompt, text in zip(responses["response_id"], responses["prompt"], responses["text"]):
            self.by_text.setdefault(text, []).append((rid, prompt))

    def __call__(self, value: str, prompt: str | None) -> tuple[str | None, str | None]:
        """(response id, None) or (None, reason)."""
        if value in self.ids:
            return value, None
        found = self.by_text.get(value, [])
        if prompt is not None:
            found = [f for f in found if f[1] == prompt]
        if len(found) == 1:
            return found[0][0], None
        if not found:
            return None, "is neither a known response id nor the exact text of a known response"
        return None, f"matches {len(found)} responses by text; add the \"prompt\" field to choose one"


def read_user_file(path: str | Path, responses: pd.DataFrame, *, skip_invalid: bool = False) -> UserFile:
    """Parse and resolve a user file against ``responses`` (response_id, prompt, text)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(path, "no such user file")
    resolve = _Resolver(responses)
    rows, skipped, seen_pairs, lines_of = [], [], {}, {}

    def problem(line: int, user, reason: str) -> None:
        if not skip_invalid:
            raise DataError(path, reason, line=line)
        skipped.append({"line": line, "user": user, "reason": reason})

    with open(path, encoding="utf-8") as fh:
        for n, raw in enumerate(fh, 1):
            if not raw.strip():
                continue
            try:
                rec = json.loads(raw)
            except json.JSONDecodeError as e:
                problem(n, None, f"invalid JSON ({e.msg})")
                continue
            if not isinstance(rec, dict):
                problem(n, None, "each line must be a JSON object with user, chosen and rejected")
                continue
            missing = [k for k in ("user", "chosen", "rejected") if k not in rec]
            if missing:
                problem(n, rec.get("user"), f"missing field {', '.join(missing)}")
                continue
            user = rec["user"]
            if not isinstance(user, (str, int)) or isinstance(user, bool) or str(user) == "":
                problem(n, None, "user must be a non-empty string")
                continue
            user = str(user)
            lines_of.setdefault(user, []).append(n)
            prompt = rec.get("prompt")
            if prompt is not None and not isinstance(prompt, str):
                problem(n, user, "prompt must be a string")
                continue
            ids = []
            for key in ("chosen", "rejected"):
                if not isinstance(rec[key], str) or not rec[key]:
                    problem(n, user, f"{key} must be a non-empty string (a response id or text)")
                    break
                rid, why = resolve(rec[key], prompt)
                if rid is None:
                    problem(n, user, f"{key} {why}")
                    break
                ids.append(rid)
            if len(ids) < 2:
                continue
            if ids[0] == ids[1]:
                problem(n, user, "chosen and rejected are the same response")
                continue
            key = (user, min(ids), max(ids))
            if key in seen_pairs:
                problem(n, user, f"repeats the pair of line {seen_pairs[key]}")
                continue
            seen_pairs[key] = n
            rows.append((user, ids[0], ids[1], n))

    pairs = pd.DataFrame(rows, columns=["user_id", "chosen_id", "rejected_id", "line"])
    skipped_users = []
    for user, lines in lines_of.items():
        if user not in set(pairs["user_id"]):
            if not skip_invalid:
                raise DataError(path, f"user {user!r} has no usable pair (lines {', '.join(map(str, lines))})",
                                line=lines[0])
            skipped_users.append({"user": user, "lines": lines, "reason": "no usable pair"})
    if pairs.empty:
        raise DataError(path, "holds no usable annotation")
    return UserFile(pairs, skipped, skipped_users)
