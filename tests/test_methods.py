"""Every registered method, CoPL and the baselines alike, through fit → adapt → score → save → load,
in both modes (generated from the registry: a new method is tested without touching this file)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import coplctl.models.neural
import coplctl.models.trainer
from coplctl.core.registry import METHODS
from coplctl.data import load
from coplctl.models.reward import load_method, make_config, pair_scores
from coplctl.models.trainer import trainable_state

# the built-in learned methods (the ceiling is a reference for mixture data: tests/test_ceiling.py)
BUILTIN = [e.name for e in METHODS.entries() if e.module.startswith("coplctl.") and e.name != "ceiling"]
SMALL = {
    "frozen": {"epochs": 2, "batch_size": 32},
    "lora": {"epochs": 1, "batch_size": 16, "max_length": 32, "lora_rank": 4, "adapt_steps": 5},
}


def test_the_seven_methods_are_registered():
    assert {"copl", "i2e", "i2e-proxy", "oracle", "pal", "uniform", "vpl"} <= set(BUILTIN)
    assert all(e.description for e in METHODS.entries())


@pytest.mark.parametrize("mode", ["frozen", "lora"])
@pytest.mark.parametrize("name", BUILTIN)
def test_fit_adapt_score_save_load(name, mode, micro_dir, tmp_path, monkeypatch):
    ds = load(micro_dir)
    cls = METHODS.get(name)
    fields = {f.name for f in dataclasses.fields(cls.Config)}
    overrides = {"mode": mode, **SMALL[mode], "gcf_overrides": {"dim": 8, "epochs": 20}}
    method = cls(make_config(cls.Config, {k: v for k, v in overrides.items() if k in fields}))

    snapshots = []
    real_train = coplctl.models.neural.train_pairs

    def train_and_watch(net, *args, **kw):
        snapshots.append(trainable_state(net))
        return real_train(net, *args, **kw)

    monkeypatch.setattr(coplctl.models.neural, "train_pairs", train_and_watch)
    metrics = method.fit(ds, work_dir=tmp_path / "work", progress=False)
    after = trainable_state(method.net)
    assert len(metrics["history"]) == method.config.get("epochs")
    assert any(not torch.equal(v, after[k]) for k, v in snapshots[0].items() if k in after), "nothing trained"

    report = method.adapt(ds.split("fewshot"), ds.responses)
    assert isinstance(report, dict) and report.get("users") == 2
    test = ds.split("test")
    s_c, s_r = pair_scores(method, test, ds.responses)
    assert s_c.shape == s_r.shape == (len(test),)
    assert torch.isfinite(torch.tensor(s_c)).all() and torch.isfinite(torch.tensor(s_r)).all()

    method.save(tmp_path / "run")
    again = load_method(tmp_path / "run")
    r_c, r_r = pair_scores(again, test, ds.responses)
    assert (r_c == s_c).all() and (r_r == s_r).all()


def test_the_readme_example_method_trains_saves_and_loads(micro_dir, tmp_path, monkeypatch):
    """README's "Adding a method" example, run as written (it must stay accurate)."""
    import re
    import sys
    import types
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    source = re.search(r"```python\n# baselines/user_vector.py\n(.*?)```", readme, re.S).group(1)
    monkeypatch.setattr(METHODS, "_entries", dict(METHODS._entries))  # the registration ends with the test
    module = types.ModuleType("readme_user_vector")
    monkeypatch.setitem(sys.modules, module.__name__, module)
    exec(compile(source, "README.md", "exec"), module.__dict__)
    cls = METHODS.get("user-vector")
    ds = load(micro_dir)
    method = cls(make_config(cls.Config, SMALL["frozen"]))
    method.fit(ds, progress=False)
    assert method.adapt(ds.split("fewshot"), ds.responses)["users"] == 2
    method.save(tmp_path / "run")
    assert '"width": ' in (tmp_path / "run" / "method.json").read_text()
    test = ds.split("test")
    assert (pair_scores(load_method(tmp_path / "run"), test, ds.responses)[0] == pair_scores(method, test, ds.responses)[0]).all()


@pytest.mark.parametrize("name, overrides, own", [
    ("i2e", {"user_lr": 0.03}, {"user_vector.table": 0.03}),
    ("i2e-proxy", {"user_lr": 0.03}, {"user_vector.logits": 0.03}),
    ("pal", {"user_lr": 0.03, "scale_lr": 0.2}, {"weights": 0.03, "prototypes": 0.03, "log_scale": 0.2}),
    ("copl", {"user_embeddings": "learned", "user_lr": 0.03}, {"user_table": 0.03}),
])
def test_per_user_parameters_train_at_their_own_rate(name, overrides, own, micro_dir, monkeypatch):
    """The optimizer's groups: a method's per-user parameters at their rate, everything else at lr;
    unseen users' rows are fitted at adapt_lr."""
    cls = METHODS.get(name)
    method = cls(make_config(cls.Config, {**SMALL["frozen"], "epochs": 1, "lr": 1e-3, "adapt_lr": 0.02, **overrides}))
    seen = []
    real = coplctl.models.trainer.param_groups

    def watch(net, lr, rates=None):
        groups = real(net, lr, rates)
        seen.append({id(p): g["lr"] for g in groups for p in g["params"]})
        return groups

    monkeypatch.setattr(coplctl.models.trainer, "param_groups", watch)
    metrics = method.fit(load(micro_dir), progress=False)
    rate = seen[0]
    named = dict(method.net.named_parameters())
    for key, value in own.items():
        assert rate[id(named[key])] == value, key
    others = [n for n, p in named.items() if p.requires_grad and n not in own]
    assert others and all(rate[id(named[n])] == 1e-3 for n in others)
    assert metrics["lr_groups"] == own
    real_rows, adapt_rates = coplctl.models.neural.optimize_rows, []

    def watch_rows(params, loss, n, **kw):
        adapt_rates.append(kw["lr"])
        return real_rows(params, loss, n, **kw)

    monkeypatch.setattr(coplctl.models.neural, "optimize_rows", watch_rows)
    assert method.adapt(load(micro_dir).split("fewshot"), load(micro_dir).responses)["users"] == 2
    assert adapt_rates == [0.02]


def test_param_groups_match_whole_name_parts():
    from coplctl.models.trainer import param_groups

    net = torch.nn.ModuleDict({"table": torch.nn.Linear(2, 2), "table2": torch.nn.Linear(2, 2)})
    groups = param_groups(net, 1e-3, {"table": 0.1})
    assert [g["lr"] for g in groups] == [1e-3, 0.1]
    assert len(groups[0]["params"]) == 2 and len(groups[1]["params"]) == 2  # table2.* is not table.*


def test_oracle_scores_mixture_users_by_their_true_weights(tmp_path):
    """Users without groups but with true mixture weights: one model per attribute, a user's reward is its
    weights times theirs; unseen users come with their weights; the runner no longer skips the oracle."""
    from conftest import small_protocol

    from coplctl.data.simulate import SimConfig, simulate

    ds = simulate(SimConfig(protocol=small_protocol(variant="uf-p-4", preferences="mixture", users=60,
                                                    unseen_users=4, survey_pairs=300), seed=2))
    ds.save(tmp_path / "mix")
    ds = load(tmp_path / "mix")
    cls = METHODS.get("oracle")
    assert cls.cannot_run(ds) is None
    unweighted = ds.users.drop(columns=[c for c in ds.users if c.startswith("weight_")])
    assert "preference group" in cls.cannot_run(type(ds)(ds.responses, unweighted, ds.pairs, ds.meta))
    method = cls(make_config(cls.Config, {**SMALL["frozen"], "epochs": 1}))
    method.fit(ds, progress=False)
    assert method.groups == ["helpfulness", "honesty", "instruction_following", "truthfulness"]
    assert method.adapt(ds.split("fewshot"), ds.responses)["users"] == 4
    w = ds.users.set_index("user_id").loc[method.user_ids, [f"weight_{g}" for g in method.groups]].to_numpy()
    assert torch.allclose(method.net.weight_of_row.double(), torch.tensor(w), atol=1e-6)
    test = ds.split("test")
    method.save(tmp_path / "run")
    assert (pair_scores(load_method(tmp_path / "run"), test, ds.responses)[0] == pair_scores(method, test, ds.responses)[0]).all()
    # the reward is the weighted sum of the attribute models' rewards
    users = torch.tensor([0, len(method.user_ids) - 1])
    batch = method.inputs(ds.responses).batch(torch.tensor([0, 1]), torch.device("cpu"))
    method.net.eval()
    with torch.no_grad():
        got = method.net.score(users, batch)
        parts = torch.stack([method.net._group_reward(k, batch) for k in range(4)], 1)
    assert torch.allclose(got, (method.net.weight_of_row[users].float() * parts).sum(1), atol=1e-5)
