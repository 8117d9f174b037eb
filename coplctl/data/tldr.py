"""Reddit TL;DR preference data as the CoPL authors build it, and its simulated twin.

Input: ``openai/summarize_from_feedback``, configuration ``comparisons``: one row per comparison with
``info.post`` (the Reddit post; null for the CNN/DM rows), two ``summaries`` (``text``, ``policy``), the
labeller ``worker`` and ``split``. A local copy is a directory of Parquet / JSONL / JSON files named
``train*`` or ``valid*`` (the hub's layout), or OpenAI's original batch files whose rows carry ``split``
(``train``, ``valid1``, ``valid2``); or the hub id read through ``datasets`` (the ``hub`` extra).

Steps, as the authors' generator (which follows PAL and Li et al. 2024):
- comparisons between two supervised-policy summaries (both policies contain ``sup``, neither ``ppo``);
- the ``workers`` (10) labellers with the most such comparisons in the train split (ties by worker id),
  and only their comparisons, train and validation; rows without a post or a summary text are dropped;
- a response is a (post, summary); a pair of two summaries of a post is kept once; train pairs on posts
  the validation split also holds are dropped (counted) so that test posts stay unseen; optionally
  responses over ``max_tokens`` (the authors: 1024) are dropped;
- two groups: ``shorter`` prefers the summary with fewer characters, ``longer`` the other (equal lengths:
  one fair coin per pair, the groups still opposite), so every pair is controversial;
- users: the shared protocol (:mod:`coplctl.data.protocol`, variant ``tldr``): train pairs form the
  survey, validation pairs the test pool; 10,000 users in two even groups, ALL = 8 annotations (7 train
  + 1 valid), AVG = 1-15; 100 test pairs per seen user (as the authors' generator draws them; their
  reward-model script evaluates about 10 of them); 100 unseen users with 8 few-shot pairs (as UF-P-2; the
  authors' generator has none).
- text format: ``Human: {prompt} Assistant: {response}``, the authors' (``--text-format``).

The twin (:func:`simulate_tldr`, ``coplctl data simulate --variant tldr``) has the same protocol on
generated posts of a few sentences with four summaries each, three compared pairs per post and summary
lengths spread as TL;DR's (about 10-70 words, pairs whose lengths differ by a few characters included).
The real data's pool sizes are not checked against it (no network here): the twin's defaults are guesses.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from coplctl.core.errors import CoplError, DataError
from coplctl.data.dataset import PreferenceDataset, TLDR_FORMAT, check_text_format
from coplctl.data.protocol import LENGTH_GROUPS, ProtocolConfig, assign_users
from coplctl.data.ultrafeedback import assemble, hub_dataset, input_files, length_filter, location, read_records, sha256

TLDR_HUB_ID = "openai/summarize_from_feedback"
_SPLITS = {"train": "train", "valid1": "validation", "valid2": "validation", "validation": "validation"}


def tldr_protocol(**kw) -> ProtocolConfig:
    """The authors' TL;DR protocol: two length groups, 8 annotations, every survey pair, 100 test pairs."""
    return ProtocolConfig(**{"variant": "tldr", "annotations": "all", "survey_pairs": 0, "test_pairs": 100, **kw})


@dataclass
class TldrConfig:
    """TL;DR builder; the defaults are the authors' generator's."""

    protocol: ProtocolConfig = field(default_factory=tldr_protocol)
    """The user protocol (variant ``tldr``; see :func:`tldr_protocol`)."""
    seed: int = 0
    source: str = TLDR_HUB_ID
    """A local copy (directory of train*/valid* files, or files whose rows carry ``split``) or the hub id."""
    workers: int = 10
    """Labellers kept: those with the most supervised-vs-supervised comparisons (the authors: 10)."""
    tokenizer: str | None = None
    max_tokens: int | None = None
    text_format: str = TLDR_FORMAT
    """How backbones read a (post, summary) pair: the authors' ``Human: {prompt} Assistant: {response}``
    (datagen_tldr.py; stored in meta.json)."""

    def __post_init__(self):
        check_text_format(self.text_format)
        if self.protocol.variant != "tldr" or self.protocol.preferences != "groups":
            raise CoplError("TL;DR users are in two length groups: the protocol needs variant: tldr, preferences: groups")
        if self.workers < 1:
            raise CoplError("workers (--workers): at least 1")


def _rows(cfg: TldrConfig):
    """(split, file, row-or-line, record) of every comparison, from local files or the hub."""
    path = Path(cfg.source).expanduser()
    if path.exists():
        for f in input_files(path):
            name = f.name.lower()
            by_name = "train" if name.startswith("train") else "validation" if name.startswith("valid") else None
            for _, n, rec in read_records(f, ("info", "summaries", "worker", "split")):
                split = by_name or (_SPLITS.get(rec.get("split")) if isinstance(rec, dict) else None)
                if split is None:
                    raise DataError(f, "the file's name does not start with train or valid, and the row's split is "
                                       "not train, valid1, valid2 or validation", **location(f, n))
                yield split, f, n, rec
        return
    ds = hub_dataset(cfg.source, "comparisons")
    for split in ("train", "validation"):
        for n, rec in enumerate(ds[split].select_columns(["info", "summaries", "worker"])):
            yield split, Path(cfg.source), n, rec


def _comparison(f: Path, n: int, rec) -> tuple[str, str | None, str | None, str | None, bool]:
    """(worker, post, text 0, text 1, both summaries supervised-policy) of one row, checked."""
    loc = location(f, n)
    if not isinstance(rec, dict):
        raise DataError(f, f"each record must be a JSON object, not {type(rec).__name__}", **loc)
    summaries, info, worker = rec.get("summaries"), rec.get("info"), rec.get("worker")
    if not isinstance(worker, str) or not worker:
        raise DataError(f, "field worker must be a non-empty text (the labeller's id)", **loc)
    if not isinstance(info, dict):
        raise DataError(f, "field info must be an object with the post", **loc)
    if not (isinstance(summaries, (list, tuple)) and len(summaries) == 2 and all(isinstance(s, dict) for s in summaries)):
        raise DataError(f, "field summaries must be a list of two objects with text and policy", **loc)
    for key, want in (("text", (str, type(None))), ("policy", str)):
        for s in summaries:
            if not isinstance(s.get(key), want):
                raise DataError(f, f"every summary needs a {key} (text)", **loc)
    post = info.get("post")
    if post is not None and not isinstance(post, str):
        raise DataError(f, "field info.post must be a text or null", **loc)
    sup = all("sup" in s["policy"] and "ppo" not in s["policy"] for s in summaries)
    return worker, post, summaries[0]["text"], summaries[1]["text"], sup


def _read(cfg: TldrConfig, stats: dict) -> pd.DataFrame:
    """The kept comparisons: split, worker, post, text_a, text_b."""
    rows = []
    for split, f, n, rec in _rows(cfg):
        stats["comparisons_read"] += 1
        worker, post, ta, tb, sup = _comparison(f, n, rec)
        if not sup:
            stats["dropped_not_supervised_policies"] += 1
            continue
        rows.append((split, worker, post, ta, tb))
    df = pd.DataFrame(rows, columns=["split", "worker", "post", "text_a", "text_b"])
    df = df.sort_values("split", kind="stable", ignore_index=True)  # train first, as the hub's splits
    counts = df.loc[df["split"] == "train", "worker"].value_counts()
    if counts.empty:
        raise CoplError(f"{cfg.source}: no train comparison between two supervised-policy summaries")
    order = sorted(counts.index, key=lambda w: (-counts[w], w))  # the most comparisons first; ties by id
    top = order[:cfg.workers]
    stats["workers"] = [[w, int(counts[w])] for w in top]  # a list: meta.json sorts an object's keys
    mine = df["worker"].isin(top)
    stats["dropped_other_workers"] = int((~mine).sum())
    df = df[mine]
    blank = lambda col: df[col].fillna("").str.strip() == ""  # noqa: E731
    missing = blank("post") | blank("text_a") | blank("text_b")
    stats["dropped_missing_post_or_text"] = int(missing.sum())
    df = df[~missing]
    same = df["text_a"] == df["text_b"]
    stats["dropped_identical_summaries"] = int(same.sum())
    df = df[~same]
    leak = (df["split"] == "train") & df["post"].isin(set(df.loc[df["split"] == "validation", "post"]))
    stats["dropped_train_pairs_on_validation_posts"] = int(leak.sum())
    return df[~leak].reset_index(drop=True)


def _label(comps: pd.DataFrame, a: np.ndarray, b: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """(pairs, 2) labels of the groups shorter / longer: True where ``a`` is preferred; one coin per tie."""
    la, lb = comps["length"].to_numpy()[a], comps["length"].to_numpy()[b]
    shorter_a = np.where(la == lb, rng.random(len(a)) < 0.5, la < lb)
    return np.stack([shorter_a, ~shorter_a], axis=1)


def _dataset(comps: pd.DataFrame, a, b, is_test: np.ndarray, p: ProtocolConfig, rng_label, rng_proto, meta: dict):
    """Candidate pairs (a[c], b[c]) of ``comps`` through the protocol; pairs ``is_test`` form the test pool."""
    prompt = pd.factorize(comps["prompt"])[0]
    users, pairs, proto_stats = assign_users(prompt[a], a, b, _label(comps, a, b, rng_label), p, rng_proto,
                                             attributes=LENGTH_GROUPS, kept=np.ones(len(a), dtype=bool),
                                             test_prompts=np.unique(prompt[a[is_test]]))
    responses, out_pairs = assemble(comps, pairs, ["length"])
    meta = {**meta, "variant": "tldr", "annotations": p.annotations, "groups": list(LENGTH_GROUPS),
            "protocol": asdict(p), "protocol_stats": proto_stats}
    return PreferenceDataset(responses, users, out_pairs, meta)


def build_tldr(cfg: TldrConfig) -> PreferenceDataset:
    """Build TL;DR preference data (see the module docstring)."""
    stats = {"comparisons_read": 0, "dropped_not_supervised_policies": 0}
    rng_label, rng_proto = (np.random.default_rng(s) for s in np.random.SeedSequence(cfg.seed).spawn(2))
    df = _read(cfg, stats)
    items = pd.DataFrame({"prompt": np.concatenate([df["post"], df["post"]]),
                          "text": np.concatenate([df["text_a"], df["text_b"]])})
    code, uniq = pd.factorize(pd.MultiIndex.from_frame(items))
    comps = pd.DataFrame(list(uniq), columns=["prompt", "text"])
    comps["orig"] = np.arange(len(comps))
    comps = length_filter(comps, cfg, stats)
    keep_item = np.zeros(len(uniq), dtype=bool)
    keep_item[comps["orig"].to_numpy()] = True
    new_index = np.full(len(uniq), -1)
    new_index[comps["orig"].to_numpy()] = np.arange(len(comps))
    comps = comps.drop(columns="orig")
    comps["length"] = comps["text"].str.len()
    n = len(df)
    a, b = code[:n], code[n:]
    ok = keep_item[a] & keep_item[b]
    stats["dropped_pairs_with_long_responses"] = int((~ok).sum()) if cfg.max_tokens is not None else 0
    lo, hi = np.minimum(a, b), np.maximum(a, b)
    first = ~pd.DataFrame({"lo": lo, "hi": hi}).duplicated().to_numpy()
    stats["dropped_repeated_pairs"] = int((ok & ~first).sum())
    keep = ok & first
    a, b = new_index[lo[keep]], new_index[hi[keep]]
    is_test = df["split"].to_numpy()[keep] == "validation"
    if not is_test.any() or is_test.all():
        raise CoplError(f"{cfg.source}: the kept comparisons need both splits (train for the survey, validation "
                        f"for the test pool); found only {'validation' if is_test.all() else 'train'}")
    local = Path(cfg.source).expanduser()
    meta = {"source": "tldr", "seed": cfg.seed, "filter_stats": stats, "text_format": cfg.text_format,
            "inputs": {"tldr": cfg.source, "tldr_sha256": sha256(local) if local.exists() else None,
                       "workers": cfg.workers, "tokenizer": cfg.tokenizer, "max_tokens": cfg.max_tokens}}
    return _dataset(comps, a, b, is_test, cfg.protocol, rng_label, rng_proto, meta)


# ---- the simulated twin --------------------------------------------------------------------------------

_PEOPLE = ("my girlfriend", "my boyfriend", "my roommate", "my boss", "my sister", "my best friend", "my landlord",
           "my dad", "a coworker", "my neighbour", "my ex", "my mom", "my teammate", "my brother-in-law")
_TROUBLES = ("keeps borrowing money and never pays it back", "wants to move across the country",
             "read my messages without asking", "forgot my birthday again", "takes credit for my work",
             "wants us to adopt a second dog", "stopped talking to me after an argument",
             "keeps inviting people over late at night", "asked me to lie for them",
             "wants to quit a stable job to start a band", "is planning a wedding I cannot afford to attend",
             "complains about everything I cook", "keeps cancelling plans at the last minute")
_FEELINGS = ("I feel hurt", "I am confused", "I am angry but trying to stay calm", "I feel guilty",
             "I do not know what to do", "I am worried about our friendship", "I feel taken for granted")
_DETAILS = ("We have known each other for {n} years.", "This has happened {n} times this year.",
            "I am {n}0 and they are a bit older.", "We share an apartment and split the rent.",
            "I already tried talking about it once.", "Everyone else thinks I am overreacting.",
            "It started after a stressful month at work.", "Money has been tight for both of us.",
            "Our families know each other well.", "I do not want to ruin the relationship.")
_CLAUSES = ("{p} {t}", "{f}", "I tried to talk about it", "it has happened before", "we live together",
            "I do not want to lose {p}", "others say I overreact", "should I confront {p} or let it go",
            "what should I do", "money is tight", "it has been going on for months", "I feel stuck",
            "I need advice on how to bring it up without a fight", "we have known each other for years")


def _twin_texts(n_posts: int, per_post: int, rng: np.random.Generator) -> tuple[list[str], list[str]]:
    """Posts of four to eight sentences and ``per_post`` summaries of each, of spread lengths."""
    posts, summaries = [], []
    for i in range(n_posts):
        p, t, f = (_PEOPLE[rng.integers(len(_PEOPLE))], _TROUBLES[rng.integers(len(_TROUBLES))],
                   _FEELINGS[rng.integers(len(_FEELINGS))])
        details = [_DETAILS[j].format(n=rng.integers(2, 9)) for j in rng.permutation(len(_DETAILS))[:rng.integers(2, 6)]]
        posts.append(f"Post {i}: {p[0].upper() + p[1:]} {t}. {f}. " + " ".join(details) + " What should I do?")
        for _ in range(per_post):  # one to five clauses, first the gist: lengths of about 10-70 words
            k = int(rng.integers(1, 6))
            rest = [_CLAUSES[j].format(p=p, t=t, f=f) for j in rng.permutation(np.arange(1, len(_CLAUSES)))[:k - 1]]
            text = ", ".join([_CLAUSES[0].format(p=p, t=t, f=f), *rest])
            summaries.append(text[0].upper() + text[1:] + ".")
    return posts, summaries


def simulate_tldr(protocol: ProtocolConfig, seed: int = 0, posts: int = 4000, summaries_per_post: int = 4,
                  pairs_per_post: int = 3) -> PreferenceDataset:
    """The TL;DR twin (module docstring): the same groups and protocol on generated posts and summaries.

    With ``survey_pairs`` set, enough posts are generated to give that many survey pairs; else ``posts``.
    Deterministic: the same protocol and seed give the same files."""
    p = protocol
    if p.preferences != "groups":
        raise CoplError("the TL;DR twin has users in two length groups: preferences: groups")
    ss = np.random.SeedSequence(seed)
    rng_text, rng_pairs, rng_label, rng_proto, rng_test = (np.random.default_rng(s) for s in ss.spawn(5))
    need_test = max(p.test_pairs, p.unseen_test_pairs if p.unseen_users else 0)
    if p.survey_pairs:
        posts = int(np.ceil(p.survey_pairs / pairs_per_post / (1 - p.test_prompt_fraction) * 1.05)) + 10  # a margin
        # for posts whose summaries repeat (fewer pairs) and the drawn share of test posts
    posts = max(posts, int(np.ceil(need_test / pairs_per_post / p.test_prompt_fraction)) + 2)
    texts, summaries = _twin_texts(posts, summaries_per_post, rng_text)
    comps = pd.DataFrame({"prompt": np.repeat(texts, summaries_per_post), "text": summaries})
    dup = comps.duplicated().to_numpy()  # a post's summaries may repeat: keep the first
    a, b = [], []
    for i in range(posts):
        idx = [j for j in range(i * summaries_per_post, (i + 1) * summaries_per_post) if not dup[j]]
        cand = [(x, y) for k, x in enumerate(idx) for y in idx[k + 1:]]
        for c in rng_pairs.permutation(len(cand))[:pairs_per_post]:
            a.append(cand[c][0])
            b.append(cand[c][1])
    keep_rows = np.flatnonzero(~dup)
    new_index = np.full(len(comps), -1)
    new_index[keep_rows] = np.arange(len(keep_rows))
    comps = comps.iloc[keep_rows].reset_index(drop=True)
    comps["length"] = comps["text"].str.len()
    a, b = new_index[np.asarray(a)], new_index[np.asarray(b)]
    post_of = pd.factorize(comps["prompt"])[0]
    test_posts = rng_test.choice(posts, size=max(1, round(p.test_prompt_fraction * posts)), replace=False)
    meta = {"source": "simulated", "seed": seed,
            "generator": {"twin": "tldr", "posts": posts, "summaries_per_post": summaries_per_post,
                          "pairs_per_post": pairs_per_post}}
    return _dataset(comps, a, b, np.isin(post_of[a], test_posts), p, rng_label, rng_proto, meta)
