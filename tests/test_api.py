"""The Python API, `coplctl.load(run)`: rewards as the run's own scores, new users, no side effects."""

from __future__ import annotations

import dataclasses
import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch

import coplctl
from coplctl.core.errors import CoplError
from coplctl.core.registry import METHODS
from coplctl.data import load as load_data
from coplctl.models.reward import make_config, pair_scores

# the built-in learned methods (the ceiling is a reference for mixture data: tests/test_ceiling.py)
BUILTIN = [e.name for e in METHODS.entries() if e.module.startswith("coplctl.") and e.name != "ceiling"]


def train(name: str, data: Path, out: Path) -> Path:
    cls = METHODS.get(name)
    fields = {f.name for f in dataclasses.fields(cls.Config)}
    overrides = {"mode": "frozen", "epochs": 1, "batch_size": 32, "gcf_overrides": {"dim": 8, "epochs": 10}}
    method = cls(make_config(cls.Config, {k: v for k, v in overrides.items() if k in fields}))
    method.fit(load_data(data), work_dir=out.parent / f"work-{name}", progress=False)
    return method.save(out)


@pytest.mark.parametrize("name", BUILTIN)
def test_rewards_are_the_runs_own_scores_and_leave_the_callers_rng_alone(name, micro_dir, tmp_path):
    ds = load_data(micro_dir)
    run = train(name, micro_dir, tmp_path / "run")
    seeded = lambda: (torch.manual_seed(5), np.random.seed(5), random.seed(5))  # noqa: E731
    seeded()
    expected = (torch.rand(3), np.random.rand(3), random.random())
    seeded()
    rm = coplctl.load(run)
    few = ds.split("fewshot").rename(columns={"user_id": "user", "chosen_id": "chosen", "rejected_id": "rejected"})
    assert rm.adapt(few[["user", "chosen", "rejected"]]).get("users") == 2  # unseen users, by response id
    test = ds.split("test")
    responses = ds.responses.set_index("response_id")
    chosen = responses.loc[test["chosen_id"]]
    got = rm.reward(test["user_id"].tolist(), chosen["prompt"].tolist(), chosen["text"].tolist(), batch_size=3)
    after = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(after[0], expected[0]) and np.array_equal(after[1], expected[1]) and after[2] == expected[2]
    s_c, _ = pair_scores(rm.method, test, ds.responses)
    assert got.dtype == np.float32 and np.allclose(got, s_c, atol=1e-5)
    assert rm.name == name


def test_new_users_from_texts_and_a_bounded_memory_for_unseen_texts(micro_dir, tmp_path):
    ds = load_data(micro_dir)
    run = train("i2e", micro_dir, tmp_path / "run")
    rm = coplctl.load(run, cache_texts=8)
    r = ds.responses
    by_prompt = r.groupby("prompt")["text"].apply(list)
    prompt, texts = next((p, t) for p, t in by_prompt.items() if len(t) >= 2)
    report = rm.adapt([{"user": "alice", "chosen": texts[0], "rejected": texts[1], "prompt": prompt}])
    assert report.get("users") == 1 and "alice" in rm.users
    one = rm.reward("alice", prompt, [texts[0], texts[1]])
    assert one.shape == (2,) and np.isfinite(one).all()

    shards = Path(os.environ["COPLCTL_CACHE"]) / "features"
    before = sorted(shards.rglob("shard-*"))
    fresh = [f"a reply never seen before, number {i}" for i in range(30)]
    first = rm.reward("alice", "a new question?", fresh)
    for k in range(5):  # an RL loop: new texts every call, nothing written, the store stays bounded
        rm.reward("alice", "a new question?", [f"round {k}, reply {i}" for i in range(10)])
    assert sorted(shards.rglob("shard-*")) == before
    assert len(rm._memory.rows) <= 8
    assert np.allclose(rm.reward("alice", "a new question?", fresh), first, atol=1e-6)  # recomputed, same

    with pytest.raises(CoplError, match="unknown user 'bob'"):
        rm.reward(["alice", "bob"], prompt, texts[:2])
    with pytest.raises(CoplError, match="differ in length"):
        rm.reward(["alice"] * 3, [prompt] * 2, texts[:2])
    with pytest.raises(CoplError, match=r"pairs row 0: chosen is neither the id nor the exact text"):
        rm.adapt([{"user": "carol", "chosen": "no such reply", "rejected": texts[1]}])
    with pytest.raises(CoplError, match="seen user"):
        rm.adapt([{"user": "alice", "chosen": texts[0], "rejected": texts[1], "prompt": prompt}])
