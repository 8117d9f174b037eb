"""How much of a dataset is personal: the share of each user's labels that go against what the other
users who labelled the same pair chose.

A training label is *personal* when the user's choice differs from the majority of the other seen users'
labels on that pair (the same two responses, either order). A label whose pair nobody else labelled, or
whose other labels tie, has no majority and is not counted. Personalization can only learn from the
personal labels: a dataset where a user has, say, 1.6 of them, leaves any method little to go on, whatever
its architecture. ``coplctl data inspect``, benchmark results (``data.personal_signal``) and Table 2's notes
report it.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from coplctl.data.dataset import unordered


def votes(pairs: pd.DataFrame) -> tuple[pd.MultiIndex, np.ndarray]:
    """Each label's pair (its two response ids, ordered) and its vote: +1 when the lower id was chosen, else -1."""
    lo, hi = unordered(pairs["chosen_id"], pairs["rejected_id"])
    vote = np.where(pairs["chosen_id"].to_numpy() == lo.to_numpy(), 1, -1)
    return pd.MultiIndex.from_arrays([lo.to_numpy(), hi.to_numpy()]), vote


def personal_signal(pairs: pd.DataFrame) -> dict:
    """Statistics of ``pairs`` (user_id, chosen_id, rejected_id; e.g. the seen users' train split).

    Returns ``labels`` (labels with a majority of others), ``without_majority`` (pair labelled by nobody
    else, or the others tie), ``users`` (users with at least one counted label), ``share`` (mean over those
    users of their personal share), ``share_of_labels`` (personal labels / counted labels, pooled),
    ``personal_per_user`` and ``labels_per_user`` (means over those users).
    """
    if pairs.empty:
        return {"labels": 0, "without_majority": 0, "users": 0, "share": None, "share_of_labels": None,
                "personal_per_user": None, "labels_per_user": None}
    key, vote = votes(pairs)
    codes, _ = pd.factorize(key)
    total = np.bincount(codes, weights=vote)[codes]
    others = total - vote  # the other labels' votes on this pair
    counted = others != 0
    personal = counted & (others * vote < 0)
    frame = pd.DataFrame({"user": pairs["user_id"].to_numpy(), "counted": counted, "personal": personal})
    per_user = frame.groupby("user", sort=False)[["counted", "personal"]].sum()
    per_user = per_user[per_user["counted"] > 0]
    n = int(counted.sum())
    return {"labels": n, "without_majority": int((~counted).sum()), "users": int(len(per_user)),
            "share": round(float((per_user["personal"] / per_user["counted"]).mean()), 4) if len(per_user) else None,
            "share_of_labels": round(float(personal.sum() / n), 4) if n else None,
            "personal_per_user": round(float(per_user["personal"].mean()), 3) if len(per_user) else None,
            "labels_per_user": round(float(per_user["counted"].mean()), 3) if len(per_user) else None}


def seen_train_signal(ds) -> dict:
    """:func:`personal_signal` of a dataset's seen users' training labels."""
    role = ds.pairs["user_id"].map(ds.users.set_index("user_id")["role"])
    return personal_signal(ds.pairs[(ds.pairs["split"] == "train") & (role == "seen")])


def describe(signal: dict) -> str:
    """One sentence for a person reading a report."""
    if not signal.get("labels"):
        return "no training label shares its pair with another user's, so no label can be told personal"
    return (f"{100 * signal['share']:.1f}% of a seen user's training labels differ from the other users' majority "
            f"on the same pair (mean over {signal['users']:,} users; {signal['personal_per_user']:.2f} personal "
            f"of {signal['labels_per_user']:.2f} comparable labels per user)")


def against_majority(pairs: pd.DataFrame, reference: pd.DataFrame) -> np.ndarray:
    """For each row of ``pairs``, whether its label goes against the majority of ``reference``'s labels on the
    same two responses (False where ``reference`` has no label there, or its labels tie)."""
    ref_key, ref_vote = votes(reference)
    key, mine = votes(pairs)
    theirs = pd.Series(ref_vote, index=ref_key).groupby(level=[0, 1]).sum().reindex(key).fillna(0).to_numpy()
    return mine * theirs < 0
