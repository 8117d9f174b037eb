"""The simulated UF-P generator follows the UF-P protocol and is deterministic."""

from __future__ import annotations

import hashlib

import numpy as np
import pandas as pd
import pytest
from conftest import small_protocol

from coplctl.data import load
from coplctl.data.protocol import ATTRIBUTES
from coplctl.data.simulate import CUES, SimConfig, simulate


def _digest(path):
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(path.iterdir())}


@pytest.fixture(scope="module")
def avg4():
    return simulate(SimConfig(protocol=small_protocol("uf-p-4", "avg", users=200, unseen_users=12), seed=3))


def _with_ratings(ds, split=None):
    pairs = ds.pairs if split is None else ds.split(split)
    r = ds.responses.set_index("response_id")
    out = pairs.merge(ds.users, on="user_id")
    for attr in ATTRIBUTES:
        out[f"c_{attr}"] = out["chosen_id"].map(r[attr]).to_numpy()
        out[f"r_{attr}"] = out["rejected_id"].map(r[attr]).to_numpy()
    out["prompt"] = out["chosen_id"].map(r["prompt"])
    return out


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path):
    cfg = dict(protocol=small_protocol(users=40, unseen_users=4, survey_pairs=200))
    a = simulate(SimConfig(**cfg, seed=11)).save(tmp_path / "a")
    b = simulate(SimConfig(**cfg, seed=11)).save(tmp_path / "b")
    c = simulate(SimConfig(**cfg, seed=12)).save(tmp_path / "c")
    assert _digest(a) == _digest(b)
    assert _digest(a)["pairs.parquet"] != _digest(c)["pairs.parquet"]


def test_groups_even_and_roles(avg4):
    users = avg4.users
    counts = users.groupby(["role", "group"]).size()
    assert set(counts["seen"]) == {50} and len(counts["seen"]) == 4
    assert set(counts["unseen"]) == {3}


def test_all_gives_exact_counts_avg_spans_range(tiny_dir, avg4):
    all2 = load(tiny_dir)
    per_user = all2.split("train").groupby("user_id").size()
    assert set(per_user) == {7}  # 8 annotations in all: 7 train + 1 valid, as the authors hold one out
    seen = avg4.pairs[avg4.pairs["split"].isin(["train", "valid"])]
    per_user = seen.groupby("user_id").size()
    assert per_user.min() >= 1 and per_user.max() <= 31
    assert per_user.max() - per_user.min() > 15  # uniform 1..31 actually spreads
    assert set(avg4.split("fewshot").groupby("user_id").size()) == {16}
    assert set(all2.split("fewshot").groupby("user_id").size()) == {8}


def test_test_pairs_per_user_and_held_out_prompts(avg4):
    role = avg4.pairs["user_id"].map(avg4.users.set_index("user_id")["role"])
    test = avg4.pairs[avg4.pairs["split"] == "test"]
    sizes = test.groupby(role[test.index]).apply(lambda d: set(d.groupby("user_id").size()))
    assert sizes["seen"] == {10} and sizes["unseen"] == {50}
    prompts = _with_ratings(avg4).groupby("split")["prompt"].apply(set)
    assert not prompts["test"] & (prompts["train"] | prompts["valid"] | prompts["fewshot"])


def test_labels_follow_the_users_own_group(avg4):
    pairs = _with_ratings(avg4)
    for g in ATTRIBUTES:
        mine = pairs[pairs["group"] == g]
        diff = mine[f"c_{g}"] - mine[f"r_{g}"]
        assert (diff >= 0).all(), f"{g}: a pair labelled against the group's own attribute"
        assert (diff > 0).mean() > 0.5  # ties exist but are a minority


def test_ties_are_one_coin_per_pair_and_group(avg4):
    pairs = _with_ratings(avg4)
    pairs["key"] = [tuple(sorted(p)) for p in zip(pairs["chosen_id"], pairs["rejected_id"])]
    for g in ATTRIBUTES:
        tied = pairs[(pairs["group"] == g) & (pairs[f"c_{g}"] == pairs[f"r_{g}"])]
        assert len(tied) > 20
        winners = tied.groupby("key")["chosen_id"].nunique()
        assert (winners == 1).all()  # every user of the group sees the same coin
        first = tied.drop_duplicates("key")
        share = (first["chosen_id"] < first["rejected_id"]).mean()
        assert 0.25 < share < 0.75  # a fair coin, not a fixed orientation


def test_survey_is_the_uf_p4_set_and_flag_is_about_the_variant_groups(tiny_dir):
    ds = load(tiny_dir)  # UF-P-2
    pairs = _with_ratings(ds)
    sign = {a: np.sign(pairs[f"c_{a}"] - pairs[f"r_{a}"]) for a in ATTRIBUTES}
    no_ties = np.all([sign[a] != 0 for a in ATTRIBUTES], axis=0)
    all_agree = np.all([sign[a] == sign[ATTRIBUTES[0]] for a in ATTRIBUTES], axis=0)
    # every pair, test pairs included, passed the filter: the four attributes do not all agree
    assert not (no_ties & all_agree).any()
    # The flag is about helpfulness vs honesty only; where neither ties it is computable by hand.
    h, o = sign["helpfulness"], sign["honesty"]
    clean = (h != 0) & (o != 0)
    assert (pairs.loc[clean, "controversial"] == (h != o)[clean]).all()
    for split in ("train", "test"):  # both hold common and controversial pairs in UF-P-2
        assert 0 < pairs.loc[pairs["split"] == split, "controversial"].mean() < 1


def test_uf_p4_pairs_are_all_controversial(avg4):
    assert avg4.pairs["controversial"].all()  # the filter applies to the test pool too


def test_one_candidate_pair_per_prompt(avg4, tiny_dir):
    """As UF-P's binarized pairs: every prompt has one pair, and every response is in exactly one pair."""
    for ds in (avg4, load(tiny_dir)):
        p = _with_ratings(ds)
        key = pd.DataFrame({"lo": p[["chosen_id", "rejected_id"]].min(axis=1),
                            "hi": p[["chosen_id", "rejected_id"]].max(axis=1), "prompt": p["prompt"]})
        distinct = key.drop_duplicates(["lo", "hi"])
        assert distinct["prompt"].is_unique
        assert pd.concat([distinct["lo"], distinct["hi"]]).is_unique
        assert set(ds.responses["response_id"]) == set(distinct["lo"]) | set(distinct["hi"])
        # binarized: the chosen side of the candidate is the best-rated completion by mean rating
        r = ds.responses.set_index("response_id")[list(ATTRIBUTES)].mean(axis=1)
        assert ((r[distinct["lo"]].to_numpy() != r[distinct["hi"]].to_numpy())).all()


def test_stage_counts_and_test_share_in_meta(tiny_dir):
    stats = load(tiny_dir).meta["protocol_stats"]
    assert stats["candidate_pairs"] >= stats["kept_pairs"] >= stats["survey_pairs"]
    assert stats["kept_pairs"] == stats["survey_pairs_available"] + stats["test_pool_pairs"]
    assert 0.3 < stats["test_pool_controversial_share"] < 0.8  # the test pool passed the same filter
    assert stats["seen_valid_pairs"] == 120  # one held out per seen user (ALL)


def test_attributes_positively_correlated(avg4):
    corr = avg4.responses[list(ATTRIBUTES)].corr().to_numpy()
    off = corr[~np.eye(4, dtype=bool)]
    assert (off > 0.2).all() and (off < 0.9).all()


def test_text_cues_reveal_levels_noisily(avg4):
    """Most cue sentences show the true level, but not all (fidelity 0.75 by default)."""
    hits = total = 0
    for _, row in avg4.responses.head(300).iterrows():
        for attr in ATTRIBUTES:
            for level, phrases in enumerate(CUES[attr], 1):
                for p in phrases:
                    if "{s}" not in p and p in row["text"]:  # subject-free phrases are enough here
                        total += 1
                        hits += level == row[attr]
    assert total > 300
    assert 0.6 < hits / total < 0.95


def test_validation_pairs_are_unannotated_survey_pairs(avg4):
    p = _with_ratings(avg4)
    lo = p[["chosen_id", "rejected_id"]].min(axis=1)
    hi = p[["chosen_id", "rejected_id"]].max(axis=1)
    assert not pd.DataFrame({"u": p["user_id"], "lo": lo, "hi": hi}).duplicated().any()
    valid = p[p["split"] == "valid"]
    # AVG: one of a user's annotations is held out when it drew at least 16 (the authors' code)
    seen_counts = p[p["role"] == "seen"].groupby("user_id")["split"].agg(lambda s: ((s == "train").sum(), (s == "valid").sum()))
    for train, held in seen_counts:
        assert held == (1 if train + held >= 16 else 0)
    assert set(valid[valid["role"] == "unseen"].groupby("user_id").size()) == {10}
    assert valid["controversial"].all()
    assert not set(valid["prompt"]) & set(p.loc[p["split"] == "test", "prompt"])


def test_validation_prompts_hold_the_valid_pairs_apart_from_everything_trained_on():
    """valid_prompt_fraction > 0: every valid pair lies on prompts no train, few-shot or test pair uses, as
    the test pairs lie on prompts nothing trains on; at 0 (the authors') valid pairs share the survey."""
    ds = simulate(SimConfig(protocol=small_protocol(valid_prompt_fraction=0.2), seed=7))
    prompt = ds.responses.set_index("response_id")["prompt"]
    pairs = ds.pairs.assign(prompt=prompt.loc[ds.pairs["chosen_id"]].to_numpy())
    by_split = {s: set(g["prompt"]) for s, g in pairs.groupby("split")}
    trained_or_tested = by_split["train"] | by_split["fewshot"] | by_split["test"]
    assert by_split["valid"] and not by_split["valid"] & trained_or_tested
    counts = pairs[pairs["split"] == "valid"].merge(ds.users, on="user_id")["role"].value_counts()
    assert counts["seen"] == 120 and counts["unseen"] == 8 * 10  # one per seen user (ALL), ten per unseen
    stats = ds.meta["protocol_stats"]
    assert stats["kept_pairs"] == (stats["survey_pairs_available"] + stats["test_pool_pairs"]
                                                 + stats["valid_pool_pairs"])
    assert 0.15 < stats["valid_pool_pairs"] / stats["kept_pairs"] < 0.25
    default = simulate(SimConfig(protocol=small_protocol(), seed=7))
    shared = default.pairs.assign(prompt=default.responses.set_index("response_id")["prompt"]
                                  .loc[default.pairs["chosen_id"]].to_numpy())
    valid, train = (set(shared[shared["split"] == s]["prompt"]) for s in ("valid", "train"))
    assert len(valid & train) > len(valid) / 2  # the authors': most valid pairs are someone's train pair
    assert "valid_pool_pairs" not in default.meta["protocol_stats"]


def test_mixture_users_label_by_their_weighted_ratings_and_have_no_group(tmp_path):
    from coplctl.cli import main
    from coplctl.data.dataset import weight_columns

    path = tmp_path / "mix"
    assert main(["data", "simulate", "--variant", "uf-p-4", "--annotations", "all", "--preferences", "mixture",
                 "--alpha", "0.1", "--users", "200", "--unseen-users", "8", "--survey-pairs", "600",
                 "--out", str(path)]) == 0
    ds = load(path)
    cols = weight_columns(ds.users)
    assert cols == [f"weight_{a}" for a in ATTRIBUTES] and ds.users["group"].isna().all() and ds.meta["groups"] == []
    w = ds.users.set_index("user_id")[cols]
    assert np.allclose(w.sum(axis=1), 1) and (w.max(axis=1) > 0.9).mean() > 0.3  # α = 0.1: most users lean on one attribute
    r = ds.responses.set_index("response_id")[list(ATTRIBUTES)].astype(float)
    margin = (r.loc[ds.pairs["chosen_id"]].to_numpy() - r.loc[ds.pairs["rejected_id"]].to_numpy())
    score = (w.loc[ds.pairs["user_id"]].to_numpy() * margin).sum(1)
    assert (score >= 0).all() and (score > 0).mean() > 0.95  # zero only where the coins decided
    # two users on the same pair can disagree: preferences differ without groups
    key = ds.pairs.assign(lo=np.minimum(ds.pairs["chosen_id"], ds.pairs["rejected_id"]))
    assert (key.groupby("lo")["chosen_id"].nunique() > 1).any()
    # controversial: at least a quarter of the seen users prefer the other response than most do
    seen = w.loc[ds.user_ids("seen")].to_numpy()
    share = ((margin @ seen.T) > 0).mean(1)  # of seen users preferring this pair's chosen response
    split = np.minimum(share, 1 - share) >= 0.25
    decided = (np.abs(margin @ seen.T) > 0).all(1)  # no user's coin involved
    assert (ds.pairs["controversial"].to_numpy()[decided] == split[decided]).all()
    assert 0.2 < ds.pairs["controversial"].mean() < 0.9  # both kinds of pairs, for Table 2


def test_groups_mode_is_unchanged_by_the_mixture_option():
    base = small_protocol()
    assert base.preferences == "groups"
    a = simulate(SimConfig(protocol=base, seed=5))
    b = simulate(SimConfig(protocol=small_protocol(alpha=3.0), seed=5))  # alpha only matters for mixtures
    assert a.pairs.equals(b.pairs) and a.users.equals(b.users) and "weight_helpfulness" not in a.users


def test_weight_probe_recovers_planted_weights_and_not_noise():
    from coplctl.graph.probe import weight_probe

    rng = np.random.default_rng(0)
    w = rng.dirichlet(np.full(4, 0.3), 300)
    planted = np.hstack([w @ rng.standard_normal((4, 16)), rng.standard_normal((300, 4))]) + 0.05 * rng.standard_normal((300, 20))
    assert weight_probe(planted, w) > 0.9
    assert weight_probe(rng.standard_normal((300, 20)), w) < 0.1
    assert weight_probe(planted[:5], w[:5]) is None
