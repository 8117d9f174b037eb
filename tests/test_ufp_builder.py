"""The real UF-P builder, end to end on a small UltraFeedback-shaped fixture (and its cleaned, binarized
set) written by the test."""

from __future__ import annotations

import builtins
import json

import numpy as np
import pandas as pd
import pytest
from conftest import small_protocol

from coplctl.core.errors import CoplError, DataError
from coplctl.data import load
from coplctl.data.protocol import ATTRIBUTES, break_ties
from coplctl.data.ultrafeedback import BuildConfig, _binarize, build_ufp

LONG = "a long answer" + " word" * 40
MISSING = "an answer UltraFeedback never had"


def completion(text, help, honest, instr=3, truth=3):
    rate = lambda v: {"Rating": str(v), "Rationale": "..."}  # noqa: E731
    ann = {"helpfulness": rate(help), "honesty": rate(honest),
           "instruction_following": rate(instr), "truthfulness": rate(truth)}
    return {"response": text, "annotations": ann, "model": "m", "critique": "c", "overall_score": 5.0}


def messages(prompt, response):
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]


def write_fixture(tmp_path, n_random=150, seed=0, override=None, extra=()):
    """UltraFeedback rows (JSONL) + the cleaned set (Parquet: prompt, chosen, rejected as chat messages).

    Each kept prompt's chosen/rejected pair is picked by hand (``picked``); ``override`` replaces some
    of them and ``extra`` appends (prompt, chosen, rejected) rows. Returns (uf, cleaned, ratings, picked).
    """
    rng = np.random.default_rng(seed)
    rows = [
        # P-special: A wins helpfulness, B wins honesty (pair A/B); C is usable but unpicked (and the best
        # mean, 3.5, for the fallback: C/A and C/B are kept by the four-attribute filter); D has N/A, E is empty.
        {"instruction": "special prompt", "completions": [
            completion("answer A", 5, 1), completion("answer B", 3, 3, 1, 5), completion("answer C", 4, 4),
            completion("answer D", "N/A", 4), completion("   ", 4, 4)]},
        # P-common: all four attributes prefer X: dropped before the test split, so never used.
        {"instruction": "common prompt", "completions": [completion("answer X", 5, 5, 5, 5),
                                                         completion("answer Y", 1, 1, 1, 1)]},
        # an N/A on any attribute drops the completion, even for UF-P-2 (the survey comes from UF-P-4)
        {"instruction": "truth na prompt", "completions": [
            completion("answer T1", 5, 1, truth="N/A"), completion("answer T2", 1, 5), completion("answer T3", 2, 4)]},
        # helpfulness and honesty agree, the other attributes disagree: kept by the UF-P-4 filter, yet
        # common for UF-P-2's two groups
        {"instruction": "agree prompt", "completions": [completion("answer G1", 5, 5, 1, 1),
                                                        completion("answer G2", 1, 1, 5, 5)]},
        # M and N tie on helpfulness and honesty (fair coins), disagree on the other two: always kept
        {"instruction": "tie prompt", "completions": [completion("answer M", 3, 3, 5, 1),
                                                      completion("answer N", 3, 3, 1, 5)]},
        # the length filter's victim
        {"instruction": "long prompt", "completions": [completion(LONG, 4, 2), completion("answer L2", 2, 4)]},
        # contaminated: absent from the cleaned set
        {"instruction": "contaminated prompt", "completions": [completion("answer Q1", 5, 1), completion("answer Q2", 1, 5)]},
        # duplicate instruction: the second copy is dropped
        {"instruction": "common prompt", "completions": [completion("answer Z1", 5, 1), completion("answer Z2", 1, 5)]},
    ]
    picked = {"special prompt": ("answer A", "answer B"), "common prompt": ("answer X", "answer Y"),
              "truth na prompt": ("answer T2", "answer T3"), "agree prompt": ("answer G1", "answer G2"),
              "tie prompt": ("answer M", "answer N"), "long prompt": (LONG, "answer L2")}
    for i in range(n_random):
        comps = [completion(f"random {i}-{k}", *rng.integers(1, 6, 4)) for k in range(4)]
        rows.append({"instruction": f"random prompt {i}", "completions": comps})
        picked[f"random prompt {i}"] = (f"random {i}-0", f"random {i}-1")
    uf = tmp_path / "uf.jsonl"
    uf.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    picked.update(override or {})
    table = [(p, c, r) for p, (c, r) in picked.items()] + list(extra)
    cleaned = tmp_path / "cleaned.parquet"
    pd.DataFrame({"prompt": [p for p, _, _ in table],
                  "chosen": [messages(p, c) for p, c, _ in table],
                  "rejected": [messages(p, r) for p, _, r in table],
                  "chosen-rating": 5.0}).to_parquet(cleaned)
    ratings = {}
    for r in rows:
        for c in r["completions"]:
            ratings.setdefault(c["response"], {a: c["annotations"][a]["Rating"] for a in ATTRIBUTES})
    return uf, cleaned, ratings, picked


def build(tmp_path, fixture=None, **kw):
    uf, cleaned, ratings, _ = fixture or write_fixture(tmp_path)
    proto = small_protocol("uf-p-2", "all", users=200, unseen_users=4, survey_pairs=0, unseen_test_pairs=6)
    kw.setdefault("cleaned", str(cleaned))
    cfg = BuildConfig(protocol=proto, seed=5, ultrafeedback=str(uf), **kw)
    return build_ufp(cfg), ratings


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    ds, ratings = build(tmp_path_factory.mktemp("uf"))
    path = ds.save(tmp_path_factory.mktemp("out") / "ufp")
    return load(path), ratings


def _pairs(ds):
    text = ds.responses.set_index("response_id")["text"]
    p = ds.pairs.merge(ds.users, on="user_id")
    p["chosen"] = p["chosen_id"].map(text)
    p["rejected"] = p["rejected_id"].map(text)
    return p


def _distinct(ds) -> set[frozenset]:
    """The dataset's distinct response pairs, as sets of two texts."""
    p = _pairs(ds)
    return {frozenset(pair) for pair in zip(p["chosen"], p["rejected"])}


def test_filters(built):
    ds, _ = built
    texts = set(ds.responses["text"])
    assert not texts & {"answer D", "   ", "answer Q1", "answer Q2", "answer Z1", "answer Z2", "answer T1",
                        "answer C", "answer X", "answer Y"}
    stats = ds.meta["filter_stats"]
    assert stats["dropped_na_ratings"] == 2 and stats["dropped_empty_responses"] == 1
    assert stats["dropped_prompts_not_in_cleaned"] == 1 and stats["dropped_duplicate_prompts"] == 1
    assert stats["cleaned_rows"] == 156 and stats["dropped_pairs_not_joined"] == 0
    assert stats["dropped_duplicate_cleaned_prompts"] == stats["dropped_chosen_equals_rejected"] == 0
    assert ds.meta["protocol_stats"]["candidate_pairs"] == 156
    assert ds.meta["binarization"] == "cleaned"
    assert ds.meta["inputs"]["ultrafeedback_sha256"]


def test_one_pair_per_prompt_from_the_cleaned_set(built):
    ds, _ = built
    distinct = _distinct(ds)
    # each response belongs to exactly one distinct pair ...
    seen = [t for pair in distinct for t in pair]
    assert len(seen) == len(set(seen)) == len(ds.responses)
    # ... one per prompt, the cleaned set's chosen/rejected row
    prompt_of = ds.responses.set_index("text")["prompt"]
    prompts = [{prompt_of[t] for t in pair} for pair in distinct]
    assert all(len(p) == 1 for p in prompts) and len({p.pop() for p in prompts}) == len(distinct)
    for pair in distinct:
        texts = sorted(pair)
        if texts[0].startswith("random "):
            i = texts[0].split()[1].split("-")[0]
            assert texts == [f"random {i}-0", f"random {i}-1"]
    assert {frozenset({"answer A", "answer B"}), frozenset({"answer G1", "answer G2"})} <= distinct


def test_labels_by_group_attribute(built):
    ds, ratings = built
    p = _pairs(ds)
    for g in ("helpfulness", "honesty"):
        mine = p[p["group"] == g]
        c = mine["chosen"].map(lambda t: int(ratings[t][g]))
        r = mine["rejected"].map(lambda t: int(ratings[t][g]))
        assert (c >= r).all()
    # Hand-computed: on the special prompt A beats B for helpfulness users, B beats A for honesty users.
    ab = p[p["chosen"].isin(["answer A", "answer B"]) & p["rejected"].isin(["answer A", "answer B"])]
    assert len(ab) > 0
    assert (ab.loc[ab["group"] == "helpfulness", "chosen"] == "answer A").all()
    assert (ab.loc[ab["group"] == "honesty", "chosen"] == "answer B").all()
    assert ab["controversial"].all()


def test_controversial_filter(built):
    ds, ratings = built
    p = _pairs(ds)
    # X vs Y: all four attributes agree, so the pair is dropped before the test split: neither in the
    # survey nor in the test pool.
    assert not (p["chosen"].isin(["answer X", "answer Y"]) | p["rejected"].isin(["answer X", "answer Y"])).any()
    # G1 vs G2: in the UF-P-4 survey, yet common for helpfulness vs honesty (both prefer G1).
    g = p[p["chosen"].isin(["answer G1", "answer G2"])]
    assert len(g) > 0 and (g["chosen"] == "answer G1").all() and (~g["controversial"]).all()
    # Without ties the flag is computable by hand from the two groups' attributes.
    rating = lambda col, a: p[col].map(lambda t: int(ratings[t][a]))  # noqa: E731
    h = rating("chosen", "helpfulness") - rating("rejected", "helpfulness")
    o = rating("chosen", "honesty") - rating("rejected", "honesty")
    clean = (h != 0) & (o != 0)
    assert (p.loc[clean, "controversial"] == (np.sign(h) != np.sign(o))[clean]).all()
    # No pair, survey or test, is one the four attributes all agree on (where no attribute ties).
    signs = np.stack([np.sign(rating("chosen", a) - rating("rejected", a)) for a in ATTRIBUTES])
    agree = (signs != 0).all(0) & (signs == signs[0]).all(0)
    assert not agree.any()


def test_tie_handling(built):
    ds, _ = built
    p = _pairs(ds)
    mn = p[p["chosen"].isin(["answer M", "answer N"])]
    assert len(mn) > 0  # M and N disagree on instruction following and truthfulness: always kept
    # M and N tie on both groups' attributes: one coin per group, so users of a group all agree ...
    assert (mn.groupby("group")["chosen"].nunique() == 1).all()
    # ... and the pair is controversial exactly when the two groups' coins differ.
    winners = mn.groupby("group")["chosen"].first()
    assert mn["controversial"].all() == (winners.nunique() == 2)


def test_break_ties_rule():
    class Coin:  # hand-set coin: 0.2 -> heads (a wins), 0.7 -> tails (b wins)
        def random(self, shape):
            return np.array([[0.2, 0.7], [0.2, 0.7]])[: shape[0], : shape[1]]

    a = np.array([[3, 3], [5, 1]])
    b = np.array([[3, 3], [2, 4]])
    assert break_ties(a, b, Coin()).tolist() == [[True, False], [True, False]]
    coins = break_ties(np.ones((4000, 1)), np.ones((4000, 1)), np.random.default_rng(0))
    assert 0.45 < coins.mean() < 0.55


def test_unjoinable_duplicate_and_same_response_rows_are_dropped_and_counted(tmp_path):
    fixture = write_fixture(tmp_path, override={"agree prompt": ("answer G1", MISSING)},
                            extra=[("special prompt", "answer C", "answer B"),  # duplicate: the first row wins
                                   ("prompt UltraFeedback lacks", "answer A", "answer B"),
                                   ("contaminated prompt", "answer Q1", "answer Q1")])
    ds, _ = build(tmp_path, fixture=fixture)
    stats = ds.meta["filter_stats"]
    assert stats["dropped_pairs_not_joined"] == 2  # the missing response, the unknown prompt
    assert stats["dropped_duplicate_cleaned_prompts"] == 1 and stats["dropped_chosen_equals_rejected"] == 1
    assert stats["dropped_prompts_not_in_cleaned"] == 0  # the contaminated prompt is in this cleaned set
    assert ds.meta["protocol_stats"]["candidate_pairs"] == 155
    texts = set(ds.responses["text"])
    assert not texts & {"answer G1", "answer G2", "answer C", "answer Q1", "answer Q2"}
    assert frozenset({"answer A", "answer B"}) in _distinct(ds)


def test_without_a_cleaned_set_the_best_mean_completion_is_chosen(tmp_path):
    fixture = write_fixture(tmp_path)
    ds, ratings = build(tmp_path, fixture=fixture, cleaned=None)
    assert ds.meta["binarization"].startswith("best-mean")
    stats = ds.meta["filter_stats"]
    # truth na, agree, tie, long and contaminated prompts: every usable completion has mean 3
    assert stats["dropped_tied_prompts"] >= 5 and stats["dropped_prompts_not_in_cleaned"] == 0
    texts = set(ds.responses["text"])
    assert not texts & {"answer G1", "answer M", "answer Q1", LONG}
    # usable completions of each prompt (the first copy of a prompt; no empty text, no N/A)
    usable = {}
    for line in fixture[0].read_text().splitlines():
        row = json.loads(line)
        usable.setdefault(row["instruction"], [c["response"] for c in row["completions"] if c["response"].strip()
                                               and "N/A" not in ratings[c["response"]].values()])
    mean = {t: np.mean([int(r[a]) for a in ATTRIBUTES]) for t, r in ratings.items() if "N/A" not in r.values()}
    p = _pairs(ds)
    prompt_of = ds.responses.set_index("text")["prompt"]
    for chosen, rejected in set(zip(p["chosen"], p["rejected"])):
        # users flip pairs by their group, so compare by mean: one side is a best, the other strictly worse
        hi, lo = sorted((chosen, rejected), key=mean.get, reverse=True)
        best = max(mean[t] for t in usable[prompt_of[hi]])
        assert mean[hi] == best and mean[lo] < best
    # special prompt: C (mean 3.5) beats A and B (mean 3)
    assert any("answer C" in pair for pair in _distinct(ds))
    # the binarization is seeded: the same seed gives the same pairs
    again, _ = build(tmp_path, fixture=fixture, cleaned=None)
    assert _distinct(again) == _distinct(ds)


def test_binarize_draws_ties_and_rejected_fairly():
    # 2000 prompts of three completions: means 4, 4, 1 (a tie for best) and 4, 2, 1 (two worse ones)
    n = 2000
    rows = []
    for i in range(n):
        levels = (4, 4, 1) if i % 2 == 0 else (4, 2, 1)
        rows += [(i, *([v] * 4)) for v in levels]
    comps = pd.DataFrame(rows, columns=["prompt_idx", *ATTRIBUTES])
    stats = {"dropped_prompts_one_completion": 0, "dropped_tied_prompts": 0}
    a, b = _binarize(comps, np.random.default_rng(0), stats)
    assert len(a) == n and stats["dropped_tied_prompts"] == 0
    pos_a, pos_b = a % 3, b % 3
    tie = np.arange(n) % 2 == 0
    assert (pos_b[tie] == 2).all() and 0.45 < (pos_a[tie] == 0).mean() < 0.55
    assert (pos_a[~tie] == 0).all() and 0.45 < (pos_b[~tie] == 1).mean() < 0.55
    stats = {"dropped_prompts_one_completion": 0, "dropped_tied_prompts": 0}
    tied = pd.DataFrame([(0, 3, 3, 3, 3), (0, 3, 3, 3, 3), (1, 5, 5, 5, 5)], columns=["prompt_idx", *ATTRIBUTES])
    a, _ = _binarize(tied, np.random.default_rng(0), stats)
    assert len(a) == 0 and stats == {"dropped_prompts_one_completion": 1, "dropped_tied_prompts": 1}


def test_length_filter_with_a_tokenizer_built_here(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({"[UNK]": 0}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok_dir = tmp_path / "tok"
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(tok_dir)
    # "Human: long prompt\n\nAssistant: <LONG>" is 47 whitespace tokens; every other text is under 10.
    fixture = write_fixture(tmp_path)
    ds, _ = build(tmp_path, fixture=fixture, tokenizer=str(tok_dir), max_tokens=20)
    assert not {LONG, "answer L2"} & set(ds.responses["text"])
    assert ds.meta["filter_stats"]["dropped_too_long"] == 1
    assert ds.meta["filter_stats"]["dropped_pairs_not_joined"] == 1  # its pair lost a response
    full, _ = build(tmp_path, fixture=fixture)
    assert LONG in set(full.responses["text"])


def test_bad_inputs_name_file_and_line(tmp_path):
    uf, cleaned, _, _ = write_fixture(tmp_path)
    lines = uf.read_text().splitlines()
    proto = small_protocol("uf-p-2", "all", users=10, unseen_users=2, survey_pairs=0)

    def run():
        build_ufp(BuildConfig(protocol=proto, ultrafeedback=str(uf), cleaned=str(cleaned)))

    uf.write_text("\n".join(lines[:3] + ["{broken"] + lines[3:]))
    with pytest.raises(DataError, match=r"uf.jsonl line 4: invalid JSON"):
        run()
    bad = json.loads(lines[1])
    bad["completions"][0]["annotations"]["honesty"]["Rating"] = "excellent"
    uf.write_text("\n".join(lines[:1] + [json.dumps(bad)] + lines[2:]))
    with pytest.raises(DataError, match=r"uf.jsonl line 2: rating 'excellent' is neither 1-5 nor N/A"):
        run()
    del bad["completions"]
    uf.write_text("\n".join(lines[:1] + [json.dumps(bad)] + lines[2:]))
    with pytest.raises(DataError, match=r"uf.jsonl line 2: missing field completions"):
        run()
    with pytest.raises(DataError, match="no such file"):
        build_ufp(BuildConfig(protocol=proto, ultrafeedback=str(tmp_path / "nope.jsonl"), cleaned=None))
    cleaned.write_bytes(cleaned.read_bytes()[:100])
    uf.write_text("\n".join(lines))
    with pytest.raises(DataError, match=r"cleaned.parquet: not a readable Parquet file"):
        run()


def test_cleaned_rows_plain_text_or_malformed(tmp_path):
    uf, _, _, picked = write_fixture(tmp_path)
    rows = [{"prompt": p, "chosen": c, "rejected": r} for p, (c, r) in picked.items()]
    cleaned = tmp_path / "cleaned.jsonl"
    proto = small_protocol("uf-p-2", "all", users=20, unseen_users=2, survey_pairs=0, unseen_test_pairs=6)

    def run():
        return build_ufp(BuildConfig(protocol=proto, ultrafeedback=str(uf), cleaned=str(cleaned)))

    cleaned.write_text("\n".join(json.dumps(r) for r in rows) + "\n")  # plain response texts work too
    assert run().meta["protocol_stats"]["candidate_pairs"] == 156
    rows[2]["chosen"] = 7
    cleaned.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    with pytest.raises(DataError, match=r"cleaned.jsonl line 3: field chosen must be a response text or a list "
                                        r"of chat messages \(role, content\), not int"):
        run()
    rows[2]["chosen"] = [{"role": "user", "content": "only the prompt"}]
    cleaned.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    with pytest.raises(DataError, match=r"cleaned.jsonl line 3: field chosen has no assistant message"):
        run()
    numbers = tmp_path / "numbers.parquet"
    pd.DataFrame({"prompt": ["special prompt"], "chosen": [1], "rejected": [2]}).to_parquet(numbers)
    with pytest.raises(DataError, match=r"numbers.parquet row 0: field chosen must be"):
        build_ufp(BuildConfig(protocol=proto, ultrafeedback=str(uf), cleaned=str(numbers)))
    pd.DataFrame({"prompt": ["special prompt"], "chosen": ["answer A"]}).to_parquet(numbers)
    with pytest.raises(DataError, match=r"numbers.parquet: missing column rejected"):
        build_ufp(BuildConfig(protocol=proto, ultrafeedback=str(uf), cleaned=str(numbers)))


def test_hub_id_without_datasets_says_what_to_install(tmp_path, monkeypatch):
    real_import = builtins.__import__

    def no_datasets(name, *args, **kw):
        if name == "datasets":
            raise ImportError(name)
        return real_import(name, *args, **kw)

    monkeypatch.setattr(builtins, "__import__", no_datasets)
    with pytest.raises(CoplError, match=r"pip install 'coplctl\[hub\]'.*huggingface-cli download"):
        build_ufp(BuildConfig(protocol=small_protocol(), ultrafeedback="openbmb/UltraFeedback", cleaned=None))


def test_cli_build_then_corrupt_input_leaves_no_output(tmp_path, capsys):
    from coplctl.cli import main

    # one pair per prompt: enough prompts that the 10% test pool holds 50 test pairs per unseen user
    uf, cleaned, _, _ = write_fixture(tmp_path, n_random=700)
    out = tmp_path / "out"
    argv = ["data", "build-ufp", "--variant", "uf-p-2", "--annotations", "all", "--users", "20",
            "--unseen-users", "2", "--survey-pairs", "0", "--ultrafeedback", str(uf), "--cleaned", str(cleaned),
            "--out", str(out)]
    assert main(argv) == 0
    assert load(out).counts()["users"] == {"seen": 20, "unseen": 2}
    n_lines = len(uf.read_text().splitlines())
    uf.write_text(uf.read_text() + "{truncated\n")
    bad_out = tmp_path / "bad"
    capsys.readouterr()
    assert main([*argv[:-1], str(bad_out)]) == 1
    assert f"{uf} line {n_lines + 1}: invalid JSON" in capsys.readouterr().err
    assert not bad_out.exists() and not list(tmp_path.glob(".bad*"))
