"""`coplctl data import`: a flat preference table (one row per judgement) into a dataset directory.

Input: read by :mod:`coplctl.data.flat` (JSONL, JSON, CSV, Parquet or a hub dataset; text or chat-format
cells). Columns are named by options (defaults ``user``, ``prompt``, ``chosen``, ``rejected``; optional
``group``, ``split``, ``controversial``).

Steps:
- every row is checked (empty user/prompt/text, a text that is neither a string nor chat messages, chosen
  equal to rejected, a user given two groups, an unknown split) and the first bad row is one error naming
  the file and its line (JSONL) or row (other formats), with the number of other rows like it;
- responses are deduplicated by (prompt, text); a user's repeated judgement of the same two responses
  keeps the first and is counted (``dropped_repeated_judgements``; ``dropped_contradicting_judgements``
  when it points the other way);
- splits come from the ``split`` column (``train``/``valid``/``test``/``fewshot``; users with ``fewshot``
  rows are unseen) or from the protocol options, as UF-P's: ``test_prompt_fraction`` of the prompts are
  held out and every judgement on them is a test pair; ``unseen_users`` users (drawn among those with
  enough judgements) give ``fewshot_pairs`` few-shot pairs and keep the rest of their survey judgements as
  valid pairs; every seen user holds out ``valid_pairs`` judgements for validation when one train pair is
  left (or, with ``valid_prompt_fraction`` > 0, every judgement on held-out validation prompts is a
  valid pair); a seen user left without train pairs is dropped and counted;
- a pair is ``controversial`` from the column when there is one; else, with groups, when two groups'
  majority judgements of it point opposite ways (pairs one group alone judged are not); else never.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from coplctl.core.errors import CoplError, DataError
from coplctl.data.dataset import SPLITS, PreferenceDataset
from coplctl.data.flat import Columns, flags, ids, prompts_of, read_table, texts_of
from coplctl.data.ultrafeedback import sha256


@dataclass
class ImportConfig(Columns):
    """Column names (:class:`coplctl.data.flat.Columns`) and the split protocol of ``coplctl data import``
    (defaults as UF-P's, paper §5.1)."""

    test_prompt_fraction: float = 0.1
    """Share of prompts held out; all judgements on them are test pairs (paper: 10%)."""
    valid_prompt_fraction: float = 0.0
    """Share of prompts held out for validation (0: ``valid_pairs`` per user, as the authors)."""
    valid_pairs: int = 1
    """Judgements of each seen user held out for validation, when a train pair is left (authors: 1)."""
    unseen_users: int = 0
    """Users held out as unseen (adapted from few-shot pairs; paper: 100 of 10,100)."""
    fewshot_pairs: int = 8
    """Few-shot pairs of each unseen user (paper: 8 for two groups, 16 for four)."""
    seed: int = 0

    def __post_init__(self):
        if not 0 < self.test_prompt_fraction < 1 or not 0 <= self.valid_prompt_fraction < 1 \
                or self.test_prompt_fraction + self.valid_prompt_fraction >= 1:
            raise CoplError("test_prompt_fraction (--test-prompt-fraction) must lie in (0, 1), valid_prompt_fraction "
                            "(--valid-prompt-fraction) in [0, 1), and their sum below 1")
        if self.valid_pairs < 0 or self.unseen_users < 0 or self.fewshot_pairs < 1:
            raise CoplError("valid_pairs and unseen_users must be at least 0, fewshot_pairs at least 1 "
                            "(--valid-pairs, --unseen-users, --fewshot-pairs)")


_PROTOCOL_OPTIONS = ("test_prompt_fraction", "valid_prompt_fraction", "valid_pairs", "unseen_users", "fewshot_pairs")
_DEFAULTS = {f: ImportConfig.__dataclass_fields__[f].default for f in _PROTOCOL_OPTIONS}


# ---- the dataset ---------------------------------------------------------------------------------------

def import_table(source: str, cfg: ImportConfig) -> PreferenceDataset:
    """Read, check and split a flat preference table (see the module docstring)."""
    t = read_table(source, cfg)
    user, chosen, rejected, prompt, group = _checked_rows(t, cfg)
    j = _Judgements(user, chosen, rejected, prompt)
    split, proto_stats = _splits(t, cfg, j)
    keep, unseen, dropped = _kept(t, cfg, j, split)
    controversial = (flags(t, cfg.controversial_column) if cfg.controversial_column in t.columns
                     else _disputed(j.lo, j.hi, j.c == j.lo, group.to_numpy(), keep))
    used_users = np.unique(j.ucode[keep])
    used = np.unique(np.concatenate([j.c[keep], j.r[keep]]))
    width = len(str(len(used) - 1))
    rid = np.empty(len(j.keys), dtype=object)
    rid[used] = [f"r{i:0{width}d}" for i in range(len(used))]
    responses = pd.DataFrame({"response_id": rid[used], "prompt": j.prompts[j.keys[used] // len(j.texts)],
                              "text": j.texts[j.keys[used] % len(j.texts)]})
    groups_of = group.groupby(user).transform("first").groupby(j.ucode).first().reindex(used_users)
    users = pd.DataFrame({"user_id": j.user_ids[used_users], "group": groups_of.to_numpy(dtype=object),
                          "role": np.where(unseen[used_users], "unseen", "seen")})
    users["group"] = users["group"].where(users["group"].notna(), None)
    pairs = pd.DataFrame({"user_id": j.user_ids[j.ucode[keep]], "chosen_id": rid[j.c[keep]],
                          "rejected_id": rid[j.r[keep]], "split": split[keep].astype(str),
                          "controversial": controversial[keep]})
    local = Path(source).expanduser()
    meta = {
        "source": "import",
        "groups": sorted(users["group"].dropna().unique().tolist()),
        "seed": cfg.seed,
        "inputs": {"table": source, "sha256": sha256(local) if local.exists() else None},
        "protocol": {k: v for k, v in asdict(cfg).items()
                     if k != "required" and not (k in _PROTOCOL_OPTIONS and cfg.split_column in t.columns)},
        "protocol_stats": proto_stats,
        "filter_stats": {"rows": len(t), **j.stats, "dropped_users_without_train_pairs": dropped},
    }
    return PreferenceDataset(responses, users, pairs, meta)


def _checked_rows(t, cfg: ImportConfig):
    """User, chosen, rejected, prompt (texts) and group of every row; the first bad row is one error."""
    n = len(t)
    if n == 0:
        raise DataError(t.file, "holds no rows")
    user = ids(t, cfg.user_column, "user")
    chosen, chosen_before = texts_of(t, cfg.chosen_column, "chosen")
    rejected, rejected_before = texts_of(t, cfg.rejected_column, "rejected")
    t.fail(f"the conversation before the response differs between {cfg.chosen_column} and {cfg.rejected_column} "
           f"(both must answer the same prompt)",
           [b is not None and a is not None and a != b for a, b in zip(chosen_before, rejected_before)])
    prompt = prompts_of(t, cfg, chosen_before)
    t.fail("chosen and rejected are the same text", chosen == rejected)
    group = pd.Series(ids(t, cfg.group_column, "group", nullable=True) if cfg.group_column in t.columns
                      else np.full(n, None, dtype=object), dtype=object)
    first_group = group.groupby(user).transform("first")  # per user, the first non-null group
    t.fail("this user was given another group on an earlier row (one group per user)",
           group.notna() & (group != first_group))
    return user, chosen, rejected, prompt, group


class _Judgements:
    """The rows as codes: responses deduplicated by (prompt, text), users, and repeated judgements."""

    def __init__(self, user, chosen, rejected, prompt):
        n = len(user)
        pcode, self.prompts = pd.factorize(np.concatenate([prompt, prompt]))
        tcode, self.texts = pd.factorize(np.concatenate([chosen, rejected]))
        rcode, self.keys = pd.factorize(pcode.astype(np.int64) * len(self.texts) + tcode)
        self.c, self.r, self.pcode = rcode[:n], rcode[n:], pcode[:n]
        self.lo, self.hi = np.minimum(self.c, self.r), np.maximum(self.c, self.r)
        self.ucode, self.user_ids = pd.factorize(user)
        judged = pd.DataFrame({"u": self.ucode, "lo": self.lo, "hi": self.hi, "lo_won": self.c == self.lo})
        self.repeated = judged[["u", "lo", "hi"]].duplicated().to_numpy()
        first_won = judged.groupby(["u", "lo", "hi"])["lo_won"].transform("first").to_numpy()
        contradicting = self.repeated & (first_won != judged["lo_won"].to_numpy())
        self.stats = {"dropped_repeated_judgements": int((self.repeated & ~contradicting).sum()),
                      "dropped_contradicting_judgements": int(contradicting.sum())}


def _splits(t, cfg: ImportConfig, j: _Judgements):
    """Each row's split: from the split column, or by the protocol's options (never both)."""
    if cfg.split_column not in t.columns:
        return _protocol_splits(j.ucode, j.pcode, ~j.repeated, cfg)
    ignored = [f"--{f.replace('_', '-')}" for f in _PROTOCOL_OPTIONS if getattr(cfg, f) != _DEFAULTS[f]]
    if ignored:
        raise CoplError(f"{t.file}: the table's column {cfg.split_column} gives the splits, so "
                        f"{', '.join(ignored)} would be ignored; drop the option(s), or remove the column to split "
                        f"by the protocol")
    split = np.asarray([s.strip().lower() if isinstance(s, str) else s for s in t.columns[cfg.split_column]],
                       dtype=object)
    t.fail(f"split (column {cfg.split_column}) must be one of " + ", ".join(SPLITS), ~pd.Series(split).isin(SPLITS))
    return split, {"splits": "from column " + cfg.split_column}


def _kept(t, cfg: ImportConfig, j: _Judgements, split: np.ndarray):
    """Rows kept (not repeated, of a user with train or few-shot pairs), unseen users, and the number of
    seen users dropped for want of a train pair."""
    keep = ~j.repeated
    n_users = len(j.user_ids)
    unseen = np.zeros(n_users, dtype=bool)
    unseen[j.ucode[keep & (split == "fewshot")]] = True
    t.fail("a user with fewshot pairs (unseen) also has train pairs here (seen): a user is one or the other",
           keep & unseen[j.ucode] & (split == "train"))
    has_train = np.zeros(n_users, dtype=bool)
    has_train[j.ucode[keep & (split == "train")]] = True
    orphan = ~unseen & ~has_train
    if cfg.split_column in t.columns:
        t.fail(f"this user has no train pair (split column {cfg.split_column}): a seen user needs train pairs, "
               f"an unseen user fewshot pairs", keep & orphan[j.ucode])
    dropped = int((orphan & np.isin(np.arange(n_users), j.ucode[keep])).sum())
    keep &= ~orphan[j.ucode]
    if not (keep & (split == "train")).any():
        raise CoplError(f"{t.file}: no train pair is left; use more rows or a lower --test-prompt-fraction")
    return keep, unseen, dropped


def _protocol_splits(ucode: np.ndarray, pcode: np.ndarray, keep: np.ndarray, cfg: ImportConfig):
    """Splits by UF-P's protocol (module docstring): held-out test (and validation) prompts, unseen users."""
    rng = np.random.default_rng(cfg.seed)
    n_prompts = int(pcode.max()) + 1
    if n_prompts < 2:
        raise CoplError("the table has one prompt: splitting needs at least two (test prompts are held out)")
    n_test = min(n_prompts - 1, max(1, round(cfg.test_prompt_fraction * n_prompts)))
    test_prompts = rng.choice(n_prompts, size=n_test, replace=False)
    is_test = np.isin(pcode, test_prompts)
    is_vp = np.zeros_like(is_test)
    if cfg.valid_prompt_fraction:
        rest = np.setdiff1d(np.arange(n_prompts), test_prompts)
        n_valid = min(len(rest) - 1, max(1, round(cfg.valid_prompt_fraction * n_prompts)))
        if n_valid < 1:
            raise CoplError("too few prompts to hold some out for validation; lower --valid-prompt-fraction")
        is_vp = np.isin(pcode, rng.choice(rest, size=n_valid, replace=False))
    survey = keep & ~is_test & ~is_vp
    n_users = int(ucode.max()) + 1
    n_survey = np.bincount(ucode[survey], minlength=n_users)
    n_tested = np.bincount(ucode[keep & is_test], minlength=n_users)
    eligible = np.flatnonzero((n_survey >= cfg.fewshot_pairs) & (n_tested >= 1))
    if cfg.unseen_users > len(eligible):
        raise CoplError(f"only {len(eligible)} users have {cfg.fewshot_pairs} judgements outside the test prompts "
                        f"and one on them, fewer than --unseen-users {cfg.unseen_users}; lower --unseen-users or "
                        f"--fewshot-pairs")
    unseen = np.zeros(n_users, dtype=bool)
    unseen[rng.choice(eligible, size=cfg.unseen_users, replace=False)] = True
    # each user's survey judgements in a random order: the first ones are held out (valid / few-shot)
    order = pd.DataFrame({"u": ucode, "r": rng.random(len(ucode))})[survey].sort_values(["u", "r"])
    rank = np.full(len(ucode), -1)
    rank[order.index.to_numpy()] = order.groupby("u").cumcount().to_numpy()
    is_unseen = unseen[ucode]
    held_valid = (~is_unseen & (cfg.valid_prompt_fraction == 0) & (rank >= 0) & (rank < cfg.valid_pairs)
                  & (n_survey[ucode] > cfg.valid_pairs))
    split = np.full(len(ucode), "train", dtype=object)
    split[survey & is_unseen] = "valid"
    split[survey & is_unseen & (rank < cfg.fewshot_pairs)] = "fewshot"
    split[held_valid] = "valid"
    split[is_vp] = "valid"
    split[is_test] = "test"
    stats = {"prompts": n_prompts, "test_prompts": int(n_test), "valid_prompts": int(is_vp.any() and
             len(np.unique(pcode[is_vp]))), "unseen_users": int(cfg.unseen_users)}
    return split, stats


def _disputed(lo, hi, chose_lo, group: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """True for pairs two groups judge opposite ways by majority (pairs of one group: False)."""
    known = keep & pd.notna(group)
    if not known.any():
        return np.zeros(len(lo), dtype=bool)
    df = pd.DataFrame({"lo": lo[known], "hi": hi[known], "g": group[known], "s": np.where(chose_lo[known], 1.0, -1.0)})
    majority = df.groupby(["lo", "hi", "g"])["s"].mean()
    span = majority.groupby(level=["lo", "hi"]).agg(["min", "max"])
    disputed = span[(span["min"] < 0) & (span["max"] > 0)].index
    return pd.MultiIndex.from_arrays([lo, hi]).isin(disputed)
