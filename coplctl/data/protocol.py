"""The UF-P user protocol (paper §5.1 and Appendix C.1), shared by the simulator and the real builder.

Input: candidate pairs of responses to the same prompt, labelled on each of the four UltraFeedback
attributes (``labels[c, k]`` is True when attribute ``k`` prefers response ``a[c]`` over ``b[c]``; ties
are already broken by a fair coin, once per pair and attribute, so all users of a group agree).

Protocol (the authors' and VPL's UF-P code; paper §5.1, Appendix C.1):
- Candidate pairs come **one per prompt** (the binarized chosen/rejected row of
  argilla/ultrafeedback-binarized-preferences-cleaned, joined to the four ratings), so every response
  belongs to exactly one pair; the builders (real and simulated) make them.
- The whole table is filtered first: a pair is kept when the four attributes do not all agree. Both
  variants filter this way (the paper builds its data from UF-P-4), so a UF-P-2 pair may still be one
  both of its groups agree on. A pair's ``controversial`` flag is about the variant's own groups.
- Then 10% of the kept pairs' prompts are held out: their pairs are the *test pool*, so test pairs pass
  the same filter as the survey set. The other kept pairs are the *survey set*, subsampled to
  ``survey_pairs`` (paper: 25,993).
- Seen users (paper: 10,000) are split evenly across groups. ALL: each annotates exactly ``per_user``
  survey pairs (8 for UF-P-2, 16 for UF-P-4); AVG: a uniform count in 1..2*per_user-1 (1-15 / 1-31).
  These counts include validation: ``valid_pairs`` (authors: 1) of a user's annotations are held out,
  always in ALL (n-1 train + 1 valid) and in AVG only when the drawn count is at least ``per_user``
  (the authors' ``context_unseen``). Each seen user also gets ``test_pairs`` pairs of the test pool
  (paper: 10), all labelled by the user's **own** group.
- ``preferences: mixture`` replaces the groups by per-user Dirichlet(α) weights over the attributes
  (PersonalLLM's users, over reward models there): a user prefers the response with the higher weighted
  rating. Everything else is as above, except ``controversial``: a pair on which at least one user in
  ``len(attributes)`` (a quarter for four) prefers the other response than most seen users do, the
  share one group of UF-P-4 makes on its controversial pairs (the filter's "attributes disagree" holds
  for every kept pair, so it would mark them all).
- Unseen users (paper: 100, evenly across groups) get ``fewshot_pairs`` survey pairs (8 / 16) and
  ``unseen_test_pairs`` test-pool pairs (paper: 50), plus ``unseen_valid_pairs`` other survey pairs:
  their responses are graph nodes, so adaptation can be checked at the graph level (Table 5 style)
  without a reward model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

import numpy as np
import pandas as pd

from coplctl.core.config import AT_LEAST_1, NON_NEGATIVE, POSITIVE, OneOf, Range, check_fields
from coplctl.core.errors import CoplError
from coplctl.data.dataset import WEIGHT_PREFIX, numbered, strings

#: Preference groups = UltraFeedback attributes, in the order UF-P uses them.
ATTRIBUTES = ("helpfulness", "honesty", "instruction_following", "truthfulness")
#: TL;DR's two groups (PAL / Li et al. 2024 and the CoPL authors): the shorter or the longer summary.
LENGTH_GROUPS = ("shorter", "longer")
VARIANT_GROUPS = {"uf-p-2": ATTRIBUTES[:2], "uf-p-4": ATTRIBUTES, "tldr": LENGTH_GROUPS}
#: Annotations per user in the ALL setting (and mean count in AVG).
VARIANT_PER_USER = {"uf-p-2": 8, "uf-p-4": 16, "tldr": 8}
PAPER_SURVEY_PAIRS = 25_993


@dataclass
class ProtocolConfig:
    """User protocol of UF-P; every default is the paper's (§5.1, Appendix C.1)."""

    variant: Annotated[str, OneOf(*VARIANT_GROUPS)] = "uf-p-4"
    """``uf-p-2`` (helpfulness vs honesty), ``uf-p-4`` (all four attributes) or ``tldr`` (shorter vs longer
    summary; 8 annotations per user as UF-P-2)."""
    annotations: Annotated[str, OneOf("all", "avg")] = "avg"
    """``all``: exactly 8 / 16 annotations per seen user; ``avg``: uniform 1-15 / 1-31."""
    users: Annotated[int, AT_LEAST_1] = 10_000
    """Seen users, split evenly across groups (paper: 10,000)."""
    unseen_users: Annotated[int, NON_NEGATIVE] = 100
    """Unseen users, split evenly across groups (paper: 100)."""
    survey_pairs: Annotated[int, NON_NEGATIVE] = PAPER_SURVEY_PAIRS
    """Size of the survey set (pairs the four attributes disagree on; paper: 25,993); 0 keeps every candidate."""
    test_prompt_fraction: Annotated[float, Range(min=0, max=1, min_open=True, max_open=True)] = 0.1
    """Share of prompts held out as the test pool (paper: 10%)."""
    test_pairs: Annotated[int, NON_NEGATIVE] = 10
    """Test pairs per seen user (paper: 10)."""
    valid_pairs: Annotated[int, NON_NEGATIVE] = 1
    """Of a seen user's annotations, this many are held out for validation (authors: 1). ALL: always
    (n-1 train + valid); AVG: only when the drawn count is at least n (their code); 0: none."""
    fewshot_pairs: Annotated[int, AT_LEAST_1] | None = None
    """Few-shot pairs per unseen user; None = 8 (UF-P-2) / 16 (UF-P-4) as in the paper."""
    unseen_test_pairs: Annotated[int, NON_NEGATIVE] = 50
    """Test pairs per unseen user (paper: 50)."""
    unseen_valid_pairs: Annotated[int, NON_NEGATIVE] = 10
    """Held-out survey pairs per unseen user (not in the paper: graph-level check of adaptation)."""
    valid_prompt_fraction: Annotated[float, Range(min=0, max=1, max_open=True)] = 0.0
    """Share of prompts held out for validation (not in the paper). 0, the authors' protocol: valid pairs
    come from the survey pool, so other users annotate the very same pairs in training, and validation
    rewards memorising them (Oracle at lr 1e-2: 90% valid, 74% test), which misleads a learning-rate
    search. Above 0: every valid pair comes from these prompts, which nothing trains on, as the test pairs
    come from the test prompts. CoPL's GCF then has no valid pair inside its graph and keeps its last epoch."""

    preferences: Annotated[str, OneOf("groups", "mixture")] = "groups"
    """``groups`` (the paper's UF-P): each user belongs to one group and labels every pair by its attribute.
    ``mixture`` (PersonalLLM-style, the authors' camera-ready): each user has Dirichlet(``alpha``) weights
    over the variant's attributes, stored in users.parquet as ``weight_<attribute>``, and prefers the
    response with the higher weighted rating (attribute ties broken by their fair coins); users have no
    group."""
    alpha: Annotated[float, POSITIVE] = 0.1
    """Dirichlet concentration of the ``mixture`` users' weights (PersonalLLM: 0.1; small = near one attribute)."""

    def __post_init__(self):
        check_fields(self, "protocol")  # types, ranges, choices
        if self.fewshot_pairs is None:
            self.fewshot_pairs = self.per_user
        if not self.test_prompt_fraction + self.valid_prompt_fraction < 1:
            raise CoplError(f"test_prompt_fraction + valid_prompt_fraction must stay below 1 (got "
                            f"{self.test_prompt_fraction} + {self.valid_prompt_fraction}): survey prompts are needed")
        if not self.valid_pairs < self.per_user:
            raise CoplError(f"valid_pairs must lie in 0..{self.per_user - 1}: they are held out of a "
                            f"user's {self.per_user} annotations")

    @property
    def groups(self) -> tuple[str, ...]:
        return VARIANT_GROUPS[self.variant]

    @property
    def per_user(self) -> int:
        return VARIANT_PER_USER[self.variant]

    @property
    def max_annotations(self) -> int:
        return self.per_user if self.annotations == "all" else 2 * self.per_user - 1


def break_ties(ratings_a: np.ndarray, ratings_b: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Group labels of candidate pairs: True where ``a`` is preferred, ties broken by a fair coin.

    ``ratings_*`` have shape (pairs, groups); one coin is drawn per (pair, group).
    """
    coin = rng.random(ratings_a.shape) < 0.5
    return np.where(ratings_a == ratings_b, coin, ratings_a > ratings_b)


def controversial(labels: np.ndarray) -> np.ndarray:
    """A pair is controversial when its groups do not all give the same label."""
    return labels.any(axis=1) & ~labels.all(axis=1)


def split_by_users(weights: np.ndarray, margins: np.ndarray, sign: np.ndarray, minority: float,
                   chunk: int = 2048) -> np.ndarray:
    """Mixture users' ``controversial``: pairs on which at least ``minority`` of the users (rows of
    ``weights``) prefer the other response than the majority, as one group of the variant's does on a
    controversial UF-P pair (1/4 for four attributes). Labels as the users': weighted margin, coins at 0."""
    out = np.zeros(len(margins), dtype=bool)
    for start in range(0, len(margins), chunk):
        m, s = margins[start:start + chunk], sign[start:start + chunk]
        score = weights @ m.T  # (users, pairs)
        prefers_a = np.where(score != 0, score > 0, weights @ s.T > 0)
        share = prefers_a.mean(0)
        out[start:start + chunk] = np.minimum(share, 1 - share) >= minority
    return out


def _even_groups(n: int, n_groups: int, rng: np.random.Generator) -> np.ndarray:
    groups = np.arange(n) % n_groups  # exactly even when n divides; otherwise off by at most one
    return rng.permutation(groups)


def assign_users(prompt: np.ndarray, a: np.ndarray, b: np.ndarray, labels: np.ndarray,
                 cfg: ProtocolConfig, rng: np.random.Generator, margins: np.ndarray | None = None, *,
                 attributes: tuple[str, ...] | None = None, kept: np.ndarray | None = None,
                 test_prompts: np.ndarray | None = None) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    """Apply the protocol to candidate pairs.

    ``margins`` (pairs, attributes): rating of ``a`` minus rating of ``b`` per attribute, which ``mixture``
    users weigh (None: ±1 from ``labels``). Other sources than UltraFeedback name their own ``attributes``
    (PersonalLLM's reward models, all mixed; TL;DR's ``shorter``/``longer``, the ``tldr`` variant's groups),
    may pass the ``kept`` mask of their own filter
    (default: the attributes do not all agree) and the ``test_prompts`` of their own test split (default:
    ``test_prompt_fraction`` of the prompts, drawn). Returns ``users`` (user_id, group, role; ``weight_*``
    for mixture users), ``pairs`` (user_id, chosen, rejected, split, controversial) where chosen/rejected
    are response *indices*, and a dict of statistics.
    """
    names = ATTRIBUTES if attributes is None else tuple(attributes)
    if cfg.preferences == "groups" and not set(cfg.groups) <= set(names):
        raise CoplError(f"the {cfg.variant} groups ({', '.join(cfg.groups)}) are not among the labelled "
                        f"attributes ({', '.join(names)})")
    if labels.shape != (len(a), len(names)):
        raise ValueError(f"labels must have shape ({len(a)}, {len(names)}), got {labels.shape}")
    groups = cfg.groups if cfg.preferences == "groups" or attributes is None else names
    group_cols = [names.index(g) for g in groups]
    kept = np.flatnonzero(controversial(labels) if kept is None else kept)  # the filter, before splitting
    is_contr = controversial(labels[:, group_cols])  # the variant's own groups disagree
    sign = np.where(labels[:, group_cols], 1.0, -1.0)
    margins = sign if margins is None else np.asarray(margins, dtype=np.float64)[:, group_cols]
    labels = labels[:, group_cols]

    pools = _Pools(prompt, kept, cfg, rng, test_prompts)
    draw = _Draw(cfg, pools, len(groups), rng)
    if cfg.preferences == "mixture":  # the weighted margin; the coins decide where it is exactly zero
        weights = np.random.default_rng(rng.integers(2**63)).dirichlet(np.full(len(groups), cfg.alpha), draw.n_users)
        w = weights[draw.user_idx]
        score = (w * margins[draw.cand_idx]).sum(1)
        prefers_a = np.where(score != 0, score > 0, (w * sign[draw.cand_idx]).sum(1) > 0)
        is_contr = np.zeros(len(a), dtype=bool)
        is_contr[kept] = split_by_users(weights[:cfg.users], margins[kept], sign[kept], 1 / len(groups))
    else:
        weights = None
        prefers_a = labels[draw.cand_idx, draw.group_of_user[draw.user_idx]]
    users, pairs = _frames(cfg, groups, draw, weights, prefers_a, a, b, is_contr)
    return users, pairs, pools.stats(len(a), is_contr, draw)


class _Pools:
    """The kept pairs split into the survey (subsampled to ``survey_pairs``), the test pool and, with
    ``valid_prompt_fraction``, the validation pool: by prompt, drawn from ``rng``; too small a pool for one
    user is one error."""

    def __init__(self, prompt: np.ndarray, kept: np.ndarray, cfg: ProtocolConfig, rng: np.random.Generator,
                 test_prompts: np.ndarray | None):
        self.kept = kept
        self.prompts = np.unique(prompt[kept])
        if len(self.prompts) < 2:
            raise CoplError(f"only {len(self.prompts)} prompts have a pair on which the four attributes disagree; "
                            f"use more prompts")
        if test_prompts is None:
            n_test = min(len(self.prompts) - 1, max(1, int(round(cfg.test_prompt_fraction * len(self.prompts)))))
            test_prompts = rng.choice(self.prompts, size=n_test, replace=False)
        else:
            test_prompts = np.intersect1d(self.prompts, test_prompts)
        self.n_test_prompts = len(test_prompts)
        in_test = np.isin(prompt[kept], test_prompts)
        in_valid = np.zeros_like(in_test)
        if cfg.valid_prompt_fraction:
            rest = np.setdiff1d(self.prompts, test_prompts)
            n_valid = min(len(rest) - 1, max(1, int(round(cfg.valid_prompt_fraction * len(self.prompts)))))
            in_valid = np.isin(prompt[kept], rng.choice(rest, size=n_valid, replace=False))
        survey = kept[~in_test & ~in_valid]
        self.available = len(survey)
        if cfg.survey_pairs and self.available > cfg.survey_pairs:
            survey = np.sort(rng.choice(survey, size=cfg.survey_pairs, replace=False))
        self.survey, self.test = survey, kept[in_test]
        self.valid = kept[in_valid] if cfg.valid_prompt_fraction else None
        self._check(cfg)

    def _check(self, cfg: ProtocolConfig) -> None:
        need_survey = max(cfg.max_annotations, cfg.fewshot_pairs + cfg.unseen_valid_pairs)
        if len(self.survey) < need_survey:
            raise CoplError(f"only {len(self.survey)} survey pairs are available, fewer than the "
                            f"{need_survey} one user needs; use more prompts")
        if len(self.test) < max(cfg.test_pairs, cfg.unseen_test_pairs if cfg.unseen_users else 0):
            raise CoplError(f"only {len(self.test)} test-pool pairs are available, fewer than one user needs "
                            f"(test_pairs {cfg.test_pairs}, unseen_test_pairs {cfg.unseen_test_pairs}); lower them "
                            f"(--test-pairs, --unseen-test-pairs) or use more test prompts")
        valid_need = max(cfg.valid_pairs, cfg.unseen_valid_pairs if cfg.unseen_users else 0)
        if self.valid is not None and len(self.valid) < valid_need:
            raise CoplError(f"only {len(self.valid)} pairs lie on the validation prompts, fewer than one user needs; "
                            f"raise valid_prompt_fraction or use more prompts")

    def stats(self, candidates: int, is_contr: np.ndarray, draw: "_Draw") -> dict:
        out = {
            "candidate_pairs": int(candidates),
            "kept_pairs": int(len(self.kept)),  # by the filter: the attributes disagree, or the source's own
            "prompts": int(len(self.prompts)),
            "test_prompts": int(self.n_test_prompts),
            "survey_pairs_available": int(self.available),
            "survey_pairs": int(len(self.survey)),
            "survey_controversial_share": round(float(is_contr[self.survey].mean()), 4),
            "test_pool_pairs": int(len(self.test)),
            "test_pool_controversial_share": round(float(is_contr[self.test].mean()), 4),
            "seen_annotations": int(draw.counts.sum()),
            "seen_valid_pairs": int(draw.held_out.sum()),
        }
        if self.valid is not None:
            out["valid_pool_pairs"] = int(len(self.valid))
        return out


class _Draw:
    """Every user's group and pairs, drawn from the pools: seen users annotate ``counts`` survey pairs (one
    held out for validation when they have enough) and get test pairs; unseen users get few-shot,
    validation and test pairs. ``user_idx``, ``cand_idx`` and ``split_code`` (0 train, 1 valid, 2 test,
    3 fewshot) list the annotations, user by user (survey pairs, then validation-pool pairs, then test
    pairs). Every user's draws from one pool are distinct and uniform (:func:`distinct_draws`), all users
    at once: no Python loop over users."""

    def __init__(self, cfg: ProtocolConfig, pools: _Pools, n_groups: int, rng: np.random.Generator):
        n_seen, n_unseen = cfg.users, cfg.unseen_users
        self.n_users = n_seen + n_unseen
        self.group_of_user = np.concatenate([_even_groups(n_seen, n_groups, rng), _even_groups(n_unseen, n_groups, rng)])
        if cfg.annotations == "all":
            self.counts = np.full(n_seen, cfg.per_user)
        else:
            self.counts = rng.integers(1, 2 * cfg.per_user, size=n_seen)  # 1 .. 2n-1 inclusive, mean n
        self.held_out = np.where(self.counts >= cfg.per_user, cfg.valid_pairs, 0)
        own = np.concatenate([self.counts - self.held_out, np.full(n_unseen, cfg.fewshot_pairs)])
        valid = np.concatenate([self.held_out, np.full(n_unseen, cfg.unseen_valid_pairs)])
        own_code = np.repeat([0, 3], [n_seen, n_unseen])  # train for seen users, fewshot for unseen ones
        tests = np.concatenate([np.full(n_seen, cfg.test_pairs), np.full(n_unseen, cfg.unseen_test_pairs)])
        blocks = []
        if pools.valid is None:  # the authors': validation pairs from the survey, with the user's own pairs
            user, item, rank = distinct_draws(own + valid, len(pools.survey), rng)
            blocks.append((user, pools.survey[item], np.where(rank < own[user], own_code[user], 1)))
        else:
            user, item, _ = distinct_draws(own, len(pools.survey), rng)
            blocks.append((user, pools.survey[item], own_code[user]))
            user, item, _ = distinct_draws(valid, len(pools.valid), rng)
            blocks.append((user, pools.valid[item], np.ones_like(user)))
        user, item, _ = distinct_draws(tests, len(pools.test), rng)
        blocks.append((user, pools.test[item], np.full_like(user, 2)))
        user, cand, code = (np.concatenate(part) for part in zip(*blocks))
        order = np.argsort(user, kind="stable")  # user by user, each user's blocks in the order above
        self.user_idx, self.cand_idx, self.split_code = user[order], cand[order], code[order]


def distinct_draws(sizes: np.ndarray, pool: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For every owner i, ``sizes[i]`` distinct items of ``range(pool)``, each ordered tuple equally likely:
    (owner, item, rank within the owner), owners in order. Items are drawn with replacement and repeats
    drawn again until none is left (the law is the same under any relabelling of the pool, hence uniform);
    owners who take most of the pool draw a random permutation instead."""
    sizes = np.asarray(sizes, dtype=np.int64)
    if (sizes > pool).any():
        raise CoplError(f"cannot draw {int(sizes.max())} distinct pairs from a pool of {pool}")
    owner = np.repeat(np.arange(len(sizes)), sizes)
    rank = np.arange(len(owner)) - np.repeat(np.cumsum(sizes) - sizes, sizes)
    item = rng.integers(0, max(pool, 1), len(owner))
    dense = sizes * 2 > pool  # repeats would be common: a permutation's first k items
    if dense.any():
        take = np.repeat(dense, sizes)
        keys = rng.random((int(dense.sum()), pool)).argsort(axis=1)
        item[take] = keys[np.repeat(np.arange(len(keys)), sizes[dense]), rank[take]]
    while True:
        again = pd.DataFrame({"o": owner, "i": item}).duplicated().to_numpy()
        if not again.any():
            return owner, item, rank
        item[again] = rng.integers(0, pool, int(again.sum()))


def _frames(cfg: ProtocolConfig, groups, draw: _Draw, weights, prefers_a, a, b, is_contr):
    """The users and pairs tables of the drawn annotations (chosen/rejected as response indices)."""
    import pyarrow as pa

    user_ids = numbered("u", draw.n_users)
    users = pd.DataFrame({
        "user_id": strings(user_ids),
        "group": np.asarray(groups, dtype=object)[draw.group_of_user],
        "role": strings(pa.array(["seen", "unseen"]).take(pa.array(np.arange(draw.n_users) >= cfg.users, pa.int8()))),
    })
    if weights is not None:
        users["group"] = None
        for k, g in enumerate(groups):
            users[f"{WEIGHT_PREFIX}{g}"] = weights[:, k]
    pairs = pd.DataFrame({
        "user_id": strings(user_ids.take(pa.array(draw.user_idx))),
        "chosen": np.where(prefers_a, a[draw.cand_idx], b[draw.cand_idx]),
        "rejected": np.where(prefers_a, b[draw.cand_idx], a[draw.cand_idx]),
        "split": strings(pa.array(["train", "valid", "test", "fewshot"]).take(pa.array(draw.split_code))),
        "controversial": is_contr[draw.cand_idx],
    })
    return users, pairs
