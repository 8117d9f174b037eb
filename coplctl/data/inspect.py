"""Summary of a preference dataset: what `coplctl data inspect` prints."""

from __future__ import annotations

import pandas as pd

from coplctl.data.dataset import ROLES, SPLITS, PreferenceDataset, unordered
from coplctl.data.signal import describe, seen_train_signal

#: Building stages in pipeline order (meta.json stores its keys sorted); unknown keys follow.
STAGES = ("rows", "dropped_repeated_judgements", "dropped_contradicting_judgements",
          "prompts_read", "dropped_empty_or_duplicate_responses",
          "comparisons_read", "dropped_not_supervised_policies", "workers", "dropped_other_workers",
          "dropped_missing_post_or_text", "dropped_identical_summaries", "dropped_train_pairs_on_validation_posts",
          "dropped_pairs_with_long_responses", "dropped_repeated_pairs", "ultrafeedback_prompts", "dropped_prompts_not_in_cleaned", "dropped_duplicate_prompts",
          "dropped_empty_responses", "dropped_duplicate_responses", "dropped_na_ratings", "dropped_too_long",
          "cleaned_rows", "dropped_duplicate_cleaned_prompts", "dropped_chosen_equals_rejected",
          "dropped_pairs_not_joined", "dropped_prompts_one_completion", "generated_prompts", "dropped_tied_prompts",
          "candidate_pairs", "kept_pairs", "four_attributes_disagree", "prompts", "test_prompts", "survey_pairs_available",
          "survey_pairs", "survey_controversial_share", "test_pool_pairs", "test_pool_controversial_share",
          "valid_pool_pairs", "seen_annotations", "seen_valid_pairs", "valid_prompts", "unseen_users",
          "dropped_users_without_train_pairs")


def _stages(meta: dict) -> dict:
    found = {**(meta.get("filter_stats") or {}), **(meta.get("protocol_stats") or {})}
    order = {k: i for i, k in enumerate(STAGES)}
    return dict(sorted(found.items(), key=lambda kv: order.get(kv[0], len(order))))


def _spread(counts: pd.Series) -> dict:
    if counts.empty:
        return {"min": 0, "max": 0, "mean": 0.0}
    return {"min": int(counts.min()), "max": int(counts.max()), "mean": round(float(counts.mean()), 2)}


def summarize(ds: PreferenceDataset) -> dict:
    """Counts a user checks first on new data, as plain JSON-able values."""
    users, pairs = ds.users, ds.pairs
    groups = users["group"].fillna("(none)")
    by_group = {g: {r: int(((groups == g) & (users["role"] == r)).sum()) for r in ROLES}
                for g in sorted(groups.unique())}
    role_of = pairs["user_id"].map(users.set_index("user_id")["role"])
    split_rows = []
    for split in SPLITS:
        for role in ROLES:
            sp = pairs[(pairs["split"] == split) & (role_of == role)]
            if sp.empty:
                continue
            per_user = sp.groupby("user_id").size()
            split_rows.append({
                "split": split, "role": role, "pairs": int(len(sp)), "users": int(per_user.size),
                "per_user": _spread(per_user), "controversial_share": round(float(sp["controversial"].mean()), 4),
            })
    seen = users.loc[users["role"] == "seen", "user_id"]
    train_counts = pairs[pairs["split"] == "train"].groupby("user_id").size().reindex(seen, fill_value=0)
    histogram = {int(k): int(v) for k, v in train_counts.value_counts().sort_index().items()}
    survey = pairs[pairs["split"].isin(["train", "valid", "fewshot"])]
    lo, hi = unordered(survey["chosen_id"], survey["rejected_id"])
    keys = pd.DataFrame({"lo": lo, "hi": hi, "contr": survey["controversial"]})
    distinct = keys.drop_duplicates(["lo", "hi"])
    return {
        "path": str(ds.path) if ds.path else None,
        "source": ds.meta.get("source"),
        "variant": ds.meta.get("variant"),
        "annotations": ds.meta.get("annotations"),
        "preferences": ("mixture (alpha {})".format((ds.meta.get("protocol") or {}).get("alpha"))
                        if (ds.meta.get("protocol") or {}).get("preferences") == "mixture" else None),
        "seed": ds.meta.get("seed"),
        "responses": int(len(ds.responses)),
        "prompts": int(ds.responses["prompt"].nunique()),
        "users_by_group": by_group,
        "users": {r: int((users["role"] == r).sum()) for r in ROLES},
        "annotations_per_seen_user": {**_spread(train_counts), "histogram": histogram},
        "splits": split_rows,
        "filtering": _stages(ds.meta),
        "survey": {"pairs": int(len(distinct)),
                   "controversial_share": round(float(distinct["contr"].mean()), 4) if len(distinct) else None},
        "personal_signal": seen_train_signal(ds),
    }


def render(summary: dict, console) -> None:
    """Print the summary as rich tables."""
    from rich.table import Table

    head = ", ".join(f"{k} {summary[k]}" for k in ("source", "variant", "annotations", "preferences", "seed")
                     if summary[k] is not None)
    console.print(f"[bold]{summary['path'] or 'dataset'}[/bold]  {head}")
    console.print(f"{summary['responses']:,} responses to {summary['prompts']:,} prompts; "
                  f"{summary['users']['seen']:,} seen and {summary['users']['unseen']:,} unseen users")

    t = Table(title="Users per group and role")
    t.add_column("group")
    for r in ROLES:
        t.add_column(r, justify="right")
    for g, row in summary["users_by_group"].items():
        t.add_row(g, *(f"{row[r]:,}" for r in ROLES))
    console.print(t)

    t = Table(title="Pairs per split")
    for col in ("split", "users", "pairs", "per user (min-max, mean)", "controversial"):
        t.add_column(col, justify="left" if col in ("split", "users") else "right")
    for row in summary["splits"]:
        pu = row["per_user"]
        t.add_row(row["split"], f"{row['users']:,} {row['role']}", f"{row['pairs']:,}",
                  f"{pu['min']}-{pu['max']}, {pu['mean']}", f"{100 * row['controversial_share']:.1f}%")
    console.print(t)

    a = summary["annotations_per_seen_user"]
    t = Table(title="Train annotations per seen user", caption=f"min {a['min']}, max {a['max']}, mean {a['mean']}")
    t.add_column("annotations", justify="right")
    t.add_column("users", justify="right")
    t.add_column("")
    top = max(a["histogram"].values(), default=1)
    for k, v in a["histogram"].items():
        t.add_row(str(k), f"{v:,}", "█" * max(1, round(30 * v / top)))
    console.print(t)
    s = summary["survey"]
    share = "-" if s["controversial_share"] is None else f"{100 * s['controversial_share']:.1f}%"
    console.print(f"Survey set (distinct train/valid/fewshot pairs): {s['pairs']:,}, controversial: {share}")
    console.print(f"Personal signal: {describe(summary['personal_signal'])}", highlight=False)
    if summary.get("truncation"):
        c = summary["truncation"]
        console.print(f"Cut to {c['backbone']}'s {c['max_length']} tokens: {c['prompt']:,} of {c['texts']:,} texts "
                      f"lose the start of their prompt, {c['response']:,} part of their response")
    if summary["filtering"]:
        t = Table(title="Building: counts after each stage")
        t.add_column("stage")
        t.add_column("count", justify="right")
        for k, v in summary["filtering"].items():
            if isinstance(v, float) and k.endswith("share"):
                v = f"{100 * v:.1f}%"
            if isinstance(v, list):  # e.g. TL;DR's labellers and their comparisons: meta.json has them
                v = f"{len(v)} (listed in meta.json)"
            t.add_row(k.replace("_", " "), f"{v:,}" if isinstance(v, int) else str(v))
        console.print(t)
