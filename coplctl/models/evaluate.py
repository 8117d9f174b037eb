"""Evaluation of a trained method on a dataset (paper §5.1): seen and unseen users' test accuracy,
split into common and controversial pairs (Table 2), after adapting the unseen users from their
few-shot pairs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from coplctl.models.reward import RewardMethod, pair_scores


def accuracy_table(correct: np.ndarray, controversial: np.ndarray, ties: np.ndarray | None = None) -> dict:
    """Accuracy over all, common and controversial pairs; ``ties`` (chosen and rejected scored exactly
    equal, counted as wrong in ``correct``) are counted."""
    def mean(mask):
        return float(correct[mask].mean()) if mask.any() else None

    return {"accuracy": mean(np.ones_like(correct, dtype=bool)), "common": mean(~controversial),
            "controversial": mean(controversial), "pairs": int(len(correct)),
            "controversial_pairs": int(controversial.sum()), "ties": int(ties.sum()) if ties is not None else 0}


def evaluate(method: RewardMethod, ds, *, adapt: bool = True, fewshot: int | None = None,
             roles: tuple[str, ...] = ("seen", "unseen"), progress: bool = False) -> dict:
    """Adapt unseen users (optionally from only their first ``fewshot`` pairs), then score the test
    pairs of the users of ``roles`` (with a progress bar per role when ``progress``)."""
    out: dict = {}
    role = ds.pairs["user_id"].map(ds.users.set_index("user_id")["role"])
    shots = ds.pairs[(ds.pairs["split"] == "fewshot")]
    if fewshot is not None:
        shots = shots.groupby("user_id", sort=False).head(fewshot)
    if adapt and len(shots):
        out["adaptation"] = method.adapt(shots.reset_index(drop=True), ds.responses)
    metrics = {}
    for r in roles:
        test = ds.pairs[(ds.pairs["split"] == "test") & (role == r)]
        if test.empty or (r == "unseen" and not adapt):
            continue
        s_c, s_r = pair_scores(method, test, ds.responses, progress=f"scoring {r} users' test pairs" if progress else None)
        metrics[r] = accuracy_table(s_c > s_r, test["controversial"].to_numpy(), ties=s_c == s_r)
    out["metrics"] = metrics
    return out


def render(result: dict, console, title: str) -> None:
    from rich.table import Table

    t = Table(title=title)
    for col in ("users", "accuracy", "common", "controversial", "pairs"):
        t.add_column(col, justify="left" if col == "users" else "right")
    pct = lambda v: "-" if v is None else f"{100 * v:.2f}"  # noqa: E731
    for role, m in result["metrics"].items():
        t.add_row(role, pct(m["accuracy"]), pct(m["common"]), pct(m["controversial"]), f"{m['pairs']:,}")
    console.print(t)


def score_frame(rows: list[dict]) -> pd.DataFrame:
    """A responses frame (response_id, prompt, text) for ad-hoc texts to score."""
    return pd.DataFrame({"response_id": [f"adhoc-{i}" for i in range(len(rows))],
                         "prompt": [r["prompt"] for r in rows], "text": [r["response"] for r in rows]})


def read_score_requests(path: str | Path) -> tuple[list[dict], list[int]]:
    """Requests of a `score --input` JSONL file and their line numbers; any bad line is one DataError."""
    from coplctl.core.errors import DataError
    from coplctl.core.files import parse_json, read_text

    path = Path(path)
    rows, lines = [], []
    # JSONL lines end at "\n" only: str.splitlines() would also split inside strings at U+2028 and the like
    for n, line in enumerate(read_text(path, "request file").split("\n"), 1):
        if not line.strip():
            continue
        rec = parse_json(line, path, line=n)
        if not isinstance(rec, dict):
            raise DataError(path, 'each line must be a JSON object {"user", "prompt", "response"}', line=n)
        missing = [k for k in ("user", "prompt", "response") if not isinstance(rec.get(k), str)]
        if missing:
            raise DataError(path, f"missing or non-text field {', '.join(missing)}", line=n)
        rows.append(rec)
        lines.append(n)
    if not rows:
        raise DataError(path, "holds no request")
    return rows, lines
