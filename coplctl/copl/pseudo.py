"""Table 6: reward models trained on GCF pseudo-labels.

- *Pseudo label*: CoPL's reward model trained on the training pairs plus, for every seen user,
  ``pairs_per_user`` survey pairs the user never annotated, labelled by the trained GCF (the response
  with the higher s_ur is "chosen").
- *User-specific*: for ``users_per_group`` seen users of each group, a Uniform (Bradley-Terry) model
  trained on that user's pseudo-labelled survey pairs only, evaluated on that user's test pairs.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from coplctl.data.dataset import PreferenceDataset, unordered, weight_columns


def _survey(ds) -> pd.DataFrame:
    """Distinct survey pairs (as annotated anywhere) with their controversial flag."""
    s = ds.pairs[ds.pairs["split"].isin(["train", "valid", "fewshot"])]
    a, b = unordered(s["chosen_id"], s["rejected_id"])
    pairs = pd.DataFrame({"a": a, "b": b, "controversial": s["controversial"]})
    return pairs.drop_duplicates(["a", "b"]).reset_index(drop=True)


def _label(run, users: np.ndarray, a: np.ndarray, b: np.ndarray) -> pd.DataFrame:
    """GCF-labelled pairs: chosen = the response the user's GCF score prefers."""
    g = run.graph
    ui, ai, bi = (torch.from_numpy(pd.Index(ids).get_indexer(x).astype("int64"))
                  for ids, x in ((g.user_ids, users), (g.response_ids, a), (g.response_ids, b)))
    prefer_a = ((run.user_emb[ui] * (run.response_emb[ai] - run.response_emb[bi])).sum(-1) > 0).numpy()
    return pd.DataFrame({"user_id": users, "chosen_id": np.where(prefer_a, a, b),
                         "rejected_id": np.where(prefer_a, b, a)})


def _sample(survey: pd.DataFrame, ds, users: list[str], k: int, rng) -> pd.DataFrame:
    """k survey pairs per user that the user has not annotated (fewer if the survey is small)."""
    own = ds.pairs[ds.pairs["user_id"].isin(set(users))]
    taken = set(zip(own["user_id"], *unordered(own["chosen_id"], own["rejected_id"])))
    rows = []
    for u in users:
        pick = rng.choice(len(survey), size=min(len(survey), k + 8), replace=False)
        chosen = [i for i in pick if (u, survey.a[i], survey.b[i]) not in taken][:k]
        rows += [(u, i) for i in chosen]
    users_col, idx = (np.asarray([x for x, _ in rows]), np.asarray([i for _, i in rows], dtype=int))
    return pd.DataFrame({"user_id": users_col, "a": survey.a.to_numpy()[idx], "b": survey.b.to_numpy()[idx],
                         "controversial": survey.controversial.to_numpy()[idx]})


def pseudo_label_experiments(copl, ctx) -> dict:
    """Table 6 for a trained CoPL model (``ctx``: a :class:`coplctl.models.reward.ExperimentContext` whose
    options have a ``pseudo_labels`` section)."""
    from coplctl.core.registry import METHODS
    from coplctl.models.evaluate import accuracy_table, evaluate
    from coplctl.models.reward import make_config, pair_scores

    ds, seed, settings, pl = ctx.data, ctx.seed, ctx.settings, ctx.options.pseudo_labels
    run = copl.gcf
    rng = np.random.default_rng(seed)
    survey = _survey(ds)
    survey = survey[survey.a.isin(run.graph.response_index) & survey.b.isin(run.graph.response_index)]
    survey = survey.reset_index(drop=True)
    seen = ds.user_ids("seen")

    picked = _sample(survey, ds, seen, pl.pairs_per_user, rng)
    labelled = _label(run, picked.user_id.to_numpy(), picked.a.to_numpy(), picked.b.to_numpy())
    extra = labelled.assign(split="train", controversial=picked.controversial.to_numpy())
    augmented = PreferenceDataset(ds.responses, ds.users, pd.concat([ds.pairs, extra], ignore_index=True), ds.meta,
                                  ds.path)
    shared = copl.backbone if settings["mode"] == "frozen" else None  # lora mode: copl's LM holds its adapters
    cls = type(copl)
    model = cls(make_config(cls.Config, {**settings, "gcf_run": str(copl.gcf_dir)}))  # the labels' own GCF
    model.fit(augmented, shared, seed=seed, progress=False)
    out = {"pseudo_label": evaluate(model, ds, roles=("seen",))["metrics"]["seen"], "pairs_added": int(len(extra))}

    uniform = METHODS.get("uniform")
    seen = ds.users[ds.users["role"] == "seen"]
    groups = seen.groupby("group")["user_id"].apply(list)
    if groups.empty:  # mixture users have no group: as many users at random as groups of attributes would give
        groups = [seen["user_id"].tolist()]
        size = pl.users_per_group * max(1, len(weight_columns(ds.users)))
    else:
        size = pl.users_per_group
    chosen_users = [u for g in groups for u in rng.choice(g, size=min(len(g), size), replace=False)]
    accuracies = []
    for u in chosen_users:
        mine = _sample(survey, ds, [u], pl.pairs_per_specific_user, rng)
        train = _label(run, mine.user_id.to_numpy(), mine.a.to_numpy(), mine.b.to_numpy())
        train = train.assign(split="train", controversial=mine.controversial.to_numpy())
        users = ds.users[ds.users["user_id"] == u]
        single = PreferenceDataset(ds.responses, users, train, ds.meta, ds.path)
        m = uniform(make_config(uniform.Config, {k: v for k, v in settings.items() if k in ("backbone", "mode")}))
        m.fit(single, shared, seed=seed, progress=False)
        test = ds.pairs[(ds.pairs["user_id"] == u) & (ds.pairs["split"] == "test")]
        s_c, s_r = pair_scores(m, test, ds.responses)
        accuracies.append(accuracy_table(s_c > s_r, test["controversial"].to_numpy())["accuracy"])
    out["user_specific"] = {"accuracy": float(np.mean(accuracies)) if accuracies else None,
                            "std": float(np.std(accuracies)) if accuracies else None, "users": len(chosen_users)}
    return out
