"""The real UF-P builder, end to end on a small UltraFeedback-shaped fixture written by the test."""

from __future__ import annotations

import builtins
import json

import numpy as np
import pandas as pd
import pytest
from conftest import small_protocol

from coplctl.data import load
from coplctl.data.protocol import ATTRIBUTES, break_ties
from coplctl.data.ultrafeedback import BuildConfig, build_ufp
from coplctl.errors import CoplError, DataError


LONG = "a long answer" + " word" * 40


def completion(text, help, honest, instr=3, truth=3):
    rate = lambda v: {"Rating": str(v), "Rationale": "..."}  # noqa: E731
    ann = {"helpfulness": rate(help), "honesty": rate(honest),
           "instruction_following": rate(instr), "truthfulness": rate(truth)}
    return {"response": text, "annotations": ann, "model": "m", "critique": "c", "overall_score": 5.0}


def write_fixture(tmp_path, n_random=40, seed=0):
    """UltraFeedback rows (JSONL) + the cleaned prompt set (Parquet); returns paths and hand ratings."""
    rng = np.random.default_rng(seed)
    rows = [
        # P-special: A wins helpfulness, B/C win honesty, B and C tie on both; D has N/A, E is empty.
        {"instruction": "special prompt", "completions": [
            completion("answer A", 5, 1), completion("answer B", 3, 3), completion("answer C", 3, 3),
            completion("answer D", "N/A", 4), completion("   ", 4, 4), completion(LONG, 4, 2)]},
        # P-common: all four attributes prefer X: never a survey pair.
        {"instruction": "common prompt", "completions": [completion("answer X", 5, 5, 5, 5),
                                                         completion("answer Y", 1, 1, 1, 1)]},
        # an N/A on any attribute drops the completion, even for UF-P-2 (the survey comes from UF-P-4)
        {"instruction": "truth na prompt", "completions": [
            completion("answer T1", 5, 1, truth="N/A"), completion("answer T2", 1, 5), completion("answer T3", 2, 4)]},
        # helpfulness and honesty agree, the other attributes disagree: a UF-P-4 survey pair that is
        # common for UF-P-2's two groups
        {"instruction": "agree prompt", "completions": [completion("answer G1", 5, 5, 1, 1),
                                                        completion("answer G2", 1, 1, 5, 5)]},
        # contaminated: absent from the cleaned set
        {"instruction": "contaminated prompt", "completions": [completion("answer Q1", 5, 1), completion("answer Q2", 1, 5)]},
        # duplicate instruction: the second copy is dropped
        {"instruction": "common prompt", "completions": [completion("answer Z1", 5, 1), completion("answer Z2", 1, 5)]},
    ]
    for i in range(n_random):
        comps = [completion(f"random {i}-{k}", *rng.integers(1, 6, 4)) for k in range(4)]
        rows.append({"instruction": f"random prompt {i}", "completions": comps})
    uf = tmp_path / "uf.jsonl"
    uf.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    prompts = sorted({r["instruction"] for r in rows} - {"contaminated prompt"})
    cleaned = tmp_path / "cleaned.parquet"
    pd.DataFrame({"prompt": prompts, "chosen-rating": 5.0}).to_parquet(cleaned)
    ratings = {}
    for r in rows:
        for c in r["completions"]:
            ratings.setdefault(c["response"], {a: c["annotations"][a]["Rating"] for a in ATTRIBUTES})
    return uf, cleaned, ratings


def build(tmp_path, **kw):
    uf, cleaned, ratings = write_fixture(tmp_path)
    proto = small_protocol("uf-p-2", "all", users=200, unseen_users=4, survey_pairs=0, unseen_test_pairs=6)
    cfg = BuildConfig(protocol=proto, seed=5, ultrafeedback=str(uf), cleaned=str(cleaned), **kw)
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


def test_filters(built):
    ds, _ = built
    texts = set(ds.responses["text"])
    assert not texts & {"answer D", "   ", "answer Q1", "answer Q2", "answer Z1", "answer Z2", "answer T1"}
    stats = ds.meta["filter_stats"]
    assert stats["dropped_na_ratings"] == 2 and stats["dropped_empty_responses"] == 1
    assert stats["dropped_prompts_not_in_cleaned"] == 1 and stats["dropped_duplicate_prompts"] == 1
    assert ds.meta["inputs"]["ultrafeedback_sha256"]


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
    survey = p[p["split"] != "test"]
    # X vs Y: all four attributes agree, so never in the survey; common wherever it appears.
    assert not survey["chosen"].isin(["answer X", "answer Y"]).any()
    xy = p[p["chosen"].isin(["answer X", "answer Y"])]
    assert (~xy["controversial"]).all() and (xy["chosen"] == "answer X").all()
    # G1 vs G2: in the UF-P-4 survey, yet common for helpfulness vs honesty (both prefer G1).
    g = p[p["chosen"].isin(["answer G1", "answer G2"])]
    assert len(g) > 0 and (g["chosen"] == "answer G1").all() and (~g["controversial"]).all()
    # Without ties the flag is computable by hand from the two groups' attributes.
    rating = lambda col, a: p[col].map(lambda t: int(ratings[t][a]))  # noqa: E731
    h = rating("chosen", "helpfulness") - rating("rejected", "helpfulness")
    o = rating("chosen", "honesty") - rating("rejected", "honesty")
    clean = (h != 0) & (o != 0)
    assert (p.loc[clean, "controversial"] == (np.sign(h) != np.sign(o))[clean]).all()
    # Survey pairs: the four attributes never all agree (where no attribute ties).
    signs = np.stack([np.sign(rating("chosen", a) - rating("rejected", a)) for a in ATTRIBUTES])
    agree = (signs != 0).all(0) & (signs == signs[0]).all(0)
    assert not (agree & (p["split"] != "test")).any()


def test_tie_handling(built):
    ds, _ = built
    p = _pairs(ds)
    bc = p[p["chosen"].isin(["answer B", "answer C"]) & p["rejected"].isin(["answer B", "answer C"])]
    # B and C tie on both attributes: one coin per group, so users of a group all agree ...
    assert (bc.groupby("group")["chosen"].nunique() == 1).all()
    # ... and the pair is controversial exactly when the two groups' coins differ.
    if len(bc):
        winners = bc.groupby("group")["chosen"].first()
        assert bc["controversial"].all() == (winners.nunique() == 2)


def test_break_ties_rule():
    class Coin:  # hand-set coin: 0.2 -> heads (a wins), 0.7 -> tails (b wins)
        def random(self, shape):
            return np.array([[0.2, 0.7], [0.2, 0.7]])[: shape[0], : shape[1]]

    a = np.array([[3, 3], [5, 1]])
    b = np.array([[3, 3], [2, 4]])
    assert break_ties(a, b, Coin()).tolist() == [[True, False], [True, False]]
    coins = break_ties(np.ones((4000, 1)), np.ones((4000, 1)), np.random.default_rng(0))
    assert 0.45 < coins.mean() < 0.55


def test_length_filter_with_a_tokenizer_built_here(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({"[UNK]": 0}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok_dir = tmp_path / "tok"
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(tok_dir)
    # "Human: special prompt\n\nAssistant: <LONG>" is 46 whitespace tokens; every other text is under 10.
    ds, _ = build(tmp_path, tokenizer=str(tok_dir), max_tokens=20)
    assert LONG not in set(ds.responses["text"])
    assert ds.meta["filter_stats"]["dropped_too_long"] == 1
    (tmp_path / "full").mkdir()
    full, _ = build(tmp_path / "full")
    assert LONG in set(full.responses["text"])


def test_bad_inputs_name_file_and_line(tmp_path):
    uf, cleaned, _ = write_fixture(tmp_path)
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

    uf, cleaned, _ = write_fixture(tmp_path, n_random=100)  # enough prompts for 50 test pairs per unseen user
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
