"""A coplctl run as a TRL reward function: the convention's calls, and a few real GRPO steps on CPU."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_api import train

import coplctl
from coplctl.core.errors import CoplError
from coplctl.data import load as load_data
from coplctl.serving.trl import reward_function


@pytest.fixture(scope="module")
def i2e_run(micro_dir, tmp_path_factory):
    return train("i2e", micro_dir, tmp_path_factory.mktemp("trl") / "run")


def test_plain_and_chat_rows_follow_the_reward_funcs_convention(i2e_run, micro_dir):
    ds = load_data(micro_dir)
    r = ds.responses.iloc[:3]
    users = ds.user_ids("seen")[:3]
    fn = reward_function(i2e_run, user_column="uid")
    assert fn.__name__ == "coplctl_i2e"
    plain = fn(prompts=r["prompt"].tolist(), completions=r["text"].tolist(), uid=users, other=[1, 2, 3])
    chat = fn(prompts=[[{"role": "user", "content": p}] for p in r["prompt"]],
              completions=[[{"role": "assistant", "content": t}] for t in r["text"]], uid=users)
    assert isinstance(plain, list) and all(isinstance(v, float) for v in plain)
    assert np.allclose(plain, chat, atol=1e-6)  # one user message is its content
    assert np.allclose(plain, coplctl.load(i2e_run).reward(users, r["prompt"].tolist(), r["text"].tolist()), atol=1e-6)
    with pytest.raises(CoplError, match="no column 'uid'"):
        fn(prompts=r["prompt"].tolist(), completions=r["text"].tolist(), user_id=users)


def test_a_few_grpo_steps_train_a_tiny_policy_against_a_coplctl_reward(i2e_run, micro_dir, tmp_path):
    trl = pytest.importorskip("trl", reason="TRL is not installed (pip install 'coplctl[trl]')")
    from datasets import Dataset
    from tiny_models import build_tiny_gemma
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ds = load_data(micro_dir)
    policy_dir = build_tiny_gemma(tmp_path / "policy", ds.responses["text"].tolist()[:200])
    tok = AutoTokenizer.from_pretrained(policy_dir)
    policy = AutoModelForCausalLM.from_pretrained(policy_dir)
    before = {k: v.clone() for k, v in policy.named_parameters()}
    users = ds.user_ids("seen")
    prompts = ds.responses["prompt"].drop_duplicates().tolist()[:4]
    train_set = Dataset.from_dict({"prompt": prompts, "user_id": users[:4]})
    calls = []
    fn = reward_function(i2e_run)

    def watched(prompts, completions, **kw):
        out = fn(prompts, completions, **kw)
        calls.append((list(kw["user_id"]), out))
        return out

    watched.__name__ = fn.__name__
    args = trl.GRPOConfig(output_dir=str(tmp_path / "grpo"), per_device_train_batch_size=4, num_generations=4,
                          max_completion_length=8, max_steps=2, use_cpu=True, report_to="none", logging_steps=1,
                          save_strategy="no", learning_rate=1e-2, seed=0, disable_tqdm=True)
    trainer = trl.GRPOTrainer(model=policy, reward_funcs=[watched], args=args, train_dataset=train_set,
                              processing_class=tok)
    trainer.train()
    assert calls and all(len(u) == len(r) for u, r in calls) and set(u for us, _ in calls for u in us) <= set(users)
    assert any(np.std(r) > 0 for _, r in calls)  # the reward tells completions apart: advantages are non-zero
    logged = [h for h in trainer.state.log_history if "reward" in h]
    assert logged and all(np.isfinite(h["reward"]) for h in logged)
    assert any(not torch.equal(before[k], v) for k, v in trainer.model.named_parameters())  # the policy moved
