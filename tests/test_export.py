"""`coplctl export --format peft`: adapters that peft loads with the run's exact rewards; CoPL's experts
through a registered peft custom module, refused by a plain peft load; the model card; hub push errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from coplctl.data import load
from coplctl.models.evaluate import score_frame
from coplctl.models.reward import load_method

pytest.importorskip("peft")
# the tiny runs' gates may route every user to one expert (the weights still differ per user)
pytestmark = pytest.mark.filterwarnings("ignore:MoLE layer .* routes:UserWarning")


@pytest.fixture(scope="module")
def tiny_lm(micro_dir, tmp_path_factory):
    from tiny_models import build_tiny_gemma

    ds = load(micro_dir)
    return build_tiny_gemma(tmp_path_factory.mktemp("lm") / "tiny-gemma",
                            [f"{p} {t}" for p, t in zip(ds.responses.prompt, ds.responses.text)])


def _train(method, micro_dir, tiny_lm, tmp_path_factory, **options):
    from coplctl.core.registry import METHODS

    run = tmp_path_factory.mktemp("runs") / method
    m = METHODS.get(method)(mode="lora", backbone=str(tiny_lm), max_length=64, batch_size=8, epochs=1, **options)
    m.fit(load(micro_dir), seed=0, progress=False)
    m.save(run)
    return run


@pytest.fixture(scope="module")
def uniform_run(micro_dir, tiny_lm, tmp_path_factory):
    return _train("uniform", micro_dir, tiny_lm, tmp_path_factory, lora_rank=4)


@pytest.fixture(scope="module")
def copl_run(micro_dir, tiny_lm, tmp_path_factory):
    return _train("copl", micro_dir, tiny_lm, tmp_path_factory, gcf_overrides={"dim": 8, "epochs": 20}, experts=3,
                  rank=4)


def _requests(ds, users):
    rows = ds.responses.head(len(users))
    return [{"user": u, "prompt": p, "response": t} for u, p, t in zip(users, rows.prompt, rows.text)]


def _peft_rewards(model, export, tiny_lm, requests, *, user_table=None, users=None):
    """The reward as the model card says: head(pool(hidden)), text formatted, last real token pooled."""
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    from coplctl.copl.mole import Routing, mole_routing
    from coplctl.copl.peft_mole import mole_layers

    side = json.loads((export / "coplctl_reward.json").read_text())
    head = load_file(str(export / "coplctl_reward.safetensors"))
    tok = AutoTokenizer.from_pretrained(tiny_lm)
    tok.padding_side = "right"
    from coplctl.models.tokens import encode

    assert side["backbone"]["truncation"] == "prompt_start"
    ids, _ = encode(tok, side["backbone"]["max_length"], [r["prompt"] for r in requests],
                    [r["response"] for r in requests])
    enc = tok.pad({"input_ids": ids}, return_tensors="pt")
    texts = ids
    with torch.no_grad():
        if user_table is None:
            hidden = model(**enc).last_hidden_state
        else:
            rows = torch.tensor([side["users"].index(r["user"]) for r in requests])
            with mole_routing(mole_layers(model), Routing(head[user_table][rows], torch.arange(len(rows)))):
                hidden = model(**enc).last_hidden_state
        pooled = hidden[torch.arange(len(texts)), enc["attention_mask"].sum(1) - 1]
        return (pooled.float() @ head["head.weight"].T + head["head.bias"]).squeeze(-1)


def _cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "coplctl", *args], capture_output=True, text=True, env=env)


def test_a_baseline_loads_with_plain_peft_and_gives_the_runs_rewards(uniform_run, micro_dir, tiny_lm, tmp_path):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModel

    from coplctl.serving.export import export_peft

    out = tmp_path / "export"
    summary = export_peft(uniform_run, out)
    assert summary["peft_type"] == "LORA" and summary["sidecar_tensors"] == 2  # head weight and bias
    model = PeftModel.from_pretrained(AutoModel.from_pretrained(tiny_lm), str(out)).eval()
    method = load_method(uniform_run)
    ours = {n: p for n, p in method.net.named_parameters() if "lora_" in n}
    theirs = {n: p for n, p in model.named_parameters() if "lora_" in n}
    assert len(ours) == len(theirs) == len(load_file(str(out / "adapter_model.safetensors")))
    for name, p in ours.items():  # encoder.lm.X.lora_A.default.weight == base_model.model.X.lora_A.default.weight
        assert torch.equal(theirs["base_model.model." + name.removeprefix("encoder.lm.")], p)
    ds = load(micro_dir)
    req = _requests(ds, ds.user_ids("seen")[:4])
    expected = method.score([r["user"] for r in req], score_frame(req))
    torch.testing.assert_close(_peft_rewards(model, out, tiny_lm, req), expected, rtol=1e-5, atol=1e-6)


def test_copl_experts_load_as_a_peft_custom_module_and_a_plain_load_refuses(copl_run, micro_dir, tiny_lm, tmp_path):
    from peft import PeftModel
    from transformers import AutoModel

    from coplctl.copl.peft_mole import mole_layers
    from coplctl.serving.export import export_peft, load_peft

    out = tmp_path / "export"
    summary = export_peft(copl_run, out)
    assert summary["peft_type"].startswith("COPL_MOLE")
    with pytest.raises(KeyError, match="load it with coplctl.serving.export.load_peft"):  # never a silent load
        # without the experts, and the error names the loader
        PeftModel.from_pretrained(AutoModel.from_pretrained(tiny_lm), str(out))
    model = load_peft(out, AutoModel.from_pretrained(tiny_lm))
    assert len(mole_layers(model)) == 4  # q_proj and v_proj of the tiny Gemma's two layers
    with pytest.raises(RuntimeError, match="without a user"):
        model(input_ids=torch.tensor([[2, 5, 6]]))
    method = load_method(copl_run)
    ds = load(micro_dir)
    users = ds.user_ids("seen")
    req = _requests(ds, [users[0], users[-1], users[1], users[0]])
    req += [{**req[0], "user": u} for u in users[1:4]]  # one response, three users: the gates tell them apart
    expected = method.score([r["user"] for r in req], score_frame(req))
    got = _peft_rewards(model, out, tiny_lm, req, user_table="user_table")
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert len(set(got[-3:].tolist())) == 3


def test_export_cli_writes_a_model_card_and_refuses_what_it_cannot_do(copl_run, micro_dir, tmp_path):
    out = tmp_path / "export"
    res = _cli("export", str(copl_run), "--format", "peft", "--out", str(out), "--json")
    assert res.returncode == 0, res.stderr[-2000:]
    summary = json.loads(res.stdout)
    assert summary["method"] == "copl" and summary["users"] == len(load(micro_dir).user_ids("seen"))
    card = (out / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: peft") and "coplctl.serving.export.load_peft" in card
    assert str(json.loads((out / "coplctl_reward.json").read_text())["backbone"]["base_model_name_or_path"]) in card
    again = _cli("export", str(copl_run), "--out", str(out))
    assert again.returncode == 1 and "already exists" in again.stderr and "Traceback" not in again.stderr
    bad = _cli("export", str(copl_run), "--out", str(tmp_path / "x"), "--format", "gguf")
    assert bad.returncode == 1 and "peft" in bad.stderr and not (tmp_path / "x").exists()
    env = {k: v for k, v in os.environ.items() if k != "HF_TOKEN"} | {"HF_HOME": str(tmp_path / "hf")}
    push = _cli("export", str(copl_run), "--out", str(tmp_path / "p"), "--push-to-hub", "me/x", env=env)
    assert push.returncode == 1 and "token" in push.stderr and "Traceback" not in push.stderr
    assert (tmp_path / "p" / "adapter_config.json").exists()  # the export itself is kept
    inside = _cli("export", str(copl_run), "--out", str(copl_run / "export"))
    assert inside.returncode == 1 and "Traceback" not in inside.stderr


def test_a_frozen_mode_run_is_refused_with_the_reason(micro_dir, tiny_lm, tmp_path):
    from coplctl.core.registry import METHODS

    run = tmp_path / "run"
    m = METHODS.get("uniform")(mode="frozen", backbone=str(tiny_lm), max_length=64, epochs=1)
    m.fit(load(micro_dir), seed=0, progress=False)
    m.save(run)
    res = _cli("export", str(run), "--out", str(tmp_path / "out"))
    assert res.returncode == 1 and "lora-mode" in res.stderr and "Traceback" not in res.stderr


@pytest.fixture(scope="module")
def oracle_run(micro_dir, tiny_lm, tmp_path_factory):
    return _train("oracle", micro_dir, tiny_lm, tmp_path_factory, lora_rank=2)  # one adapter per true group


def test_a_run_with_several_adapters_is_refused(oracle_run, tmp_path):
    res = _cli("export", str(oracle_run), "--out", str(tmp_path / "out"))
    assert res.returncode == 1 and "group0" in res.stderr and "Traceback" not in res.stderr


def test_an_export_has_usual_permissions_the_values_used_and_a_license(uniform_run, tmp_path):
    import os

    from coplctl.serving.export import export_peft

    out = tmp_path / "export"
    export_peft(uniform_run, out)
    mask = os.umask(0)
    os.umask(mask)
    assert {p.name: oct(p.stat().st_mode & 0o777) for p in out.iterdir()} == \
        {p.name: oct(0o666 & ~mask) for p in out.iterdir()}  # safetensors alone would write 0600
    side = json.loads((out / "coplctl_reward.json").read_text())
    assert all(side["config"][k] is not None for k in ("lr", "epochs", "batch_size"))  # the values used
    assert side["config"]["lr"] == 5e-5 and side["config"]["epochs"] == 1  # lora mode's defaults, as trained
    card = (out / "README.md").read_text()
    assert "\nlicense: other\n" in card.split("---")[1] + "\n"  # a local tiny model: license unknown


# What a user without coplctl runs on an hf export: transformers only (coplctl imports are blocked).
PLAIN_LOAD = """
import json, sys
sys.modules["coplctl"] = None  # any import of coplctl fails
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

out = {}
for folder, requests in json.loads(sys.stdin.read()).items():
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    chats = [[{"role": "user", "content": p}, {"role": "assistant", "content": r}] for p, r in requests]
    texts = [tok.apply_chat_template(c, tokenize=False) for c in chats]
    with torch.no_grad():
        one = [model(**tok(t, return_tensors="pt", truncation=True)).logits[0, 0].item() for t in texts]
        batch = model(**tok(texts, return_tensors="pt", padding=True, truncation=True)).logits[:, 0].tolist()
    offset = json.loads(open(folder + "/config.json").read())["coplctl"]["reward_offset"]
    out[folder] = {"one": [x + offset for x in one], "batch": [x + offset for x in batch], "texts": texts}
print(json.dumps(out))
"""


def test_hf_export_gives_the_runs_rewards_with_plain_transformers(copl_run, uniform_run, oracle_run, micro_dir,
                                                                  tmp_path):
    """One user's CoPL reward (their experts merged), Uniform's, and an Oracle group's: each loads as a standard
    AutoModelForSequenceClassification with no coplctl, and gives the run's rewards for that user."""
    ds = load(micro_dir)
    seen = ds.user_ids("seen")
    group = ds.users.set_index("user_id")["group"]
    rows = ds.responses.head(6).assign(prompt=lambda f: f.prompt.str[:20], text=lambda f: f.text.str[:20])  # within
    # max_length: a longer text loses its prompt's start in the run, its start (the template's "Human:") here
    cases = {"copl": (copl_run, ["--user", seen[1]], seen[1]), "uniform": (uniform_run, [], seen[0]),
             "oracle": (oracle_run, ["--group", str(group[seen[2]])], seen[2])}
    folders, expected = {}, {}
    for name, (run, who, user) in cases.items():
        out = tmp_path / name
        res = _cli("export", str(run), "--format", "hf", *who, "--out", str(out))
        assert res.returncode == 0, res.stderr[-2000:]
        assert "ForSequenceClassification" in res.stdout
        req = [{"user": user, "prompt": p, "response": t} for p, t in zip(rows.prompt, rows.text)]
        expected[str(out)] = load_method(run).score([user] * len(req), score_frame(req))
        folders[str(out)] = [[p, t] for p, t in zip(rows.prompt, rows.text)]
        assert not list(out.glob("*.bin")) and (out / "model.safetensors").is_file()
    res = subprocess.run([sys.executable, "-c", PLAIN_LOAD], input=json.dumps(folders), capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    got = json.loads(res.stdout)
    for folder, want in expected.items():
        assert got[folder]["texts"] == [f"Human: {p}\n\nAssistant: {t}" for p, t in folders[folder]]  # the run's format
        torch.testing.assert_close(torch.tensor(got[folder]["one"]), want, rtol=0, atol=1e-4)
        torch.testing.assert_close(torch.tensor(got[folder]["batch"]), want, rtol=0, atol=1e-4)  # padded batch too
    config = json.loads((tmp_path / "copl" / "config.json").read_text())
    assert config["coplctl"]["user"] == seen[1] and len(config["coplctl"]["experts"]) == 4  # routing recorded
    card = (tmp_path / "copl" / "README.md").read_text()
    assert "library_name: transformers" in card and "--reward_pretrain" in card and "## Routing" in card


def test_copl_users_get_their_own_hf_export(copl_run, micro_dir, tmp_path):
    """Two users routed apart give two different models; the merged weights differ exactly in the adapted layers."""
    from safetensors.torch import load_file

    from coplctl.serving.hf_export import export_hf

    seen = load(micro_dir).user_ids("seen")
    a, b = (load_file(str(export_hf(copl_run, tmp_path / u, user=u)["out"] + "/model.safetensors")) for u in seen[:2])
    differ = sorted(k for k in a if not torch.equal(a[k], b[k]))
    assert differ and all(k.endswith(("q_proj.weight", "v_proj.weight")) for k in differ)


@pytest.mark.parametrize("args, message", [
    (["--group", "g"], "per user"),  # CoPL has no group model
    ([], "--user"),  # a personalized reward needs its user
    (["--user", "nobody"], "unknown user"),
])
def test_hf_export_refuses_what_no_standard_model_holds(copl_run, args, message, tmp_path):
    res = _cli("export", str(copl_run), "--format", "hf", *args, "--out", str(tmp_path / "out"))
    assert res.returncode == 1 and message in res.stderr and "Traceback" not in res.stderr, res.stderr
    assert not (tmp_path / "out").exists()


def test_hf_export_of_a_frozen_run_or_a_user_token_method_says_why_not(micro_dir, tiny_lm, tmp_path_factory, tmp_path):
    from coplctl.core.registry import METHODS

    run = tmp_path / "frozen"
    m = METHODS.get("uniform")(mode="frozen", backbone=str(tiny_lm), max_length=64, epochs=1)
    m.fit(load(micro_dir), seed=0, progress=False)
    m.save(run)
    res = _cli("export", str(run), "--format", "hf", "--out", str(tmp_path / "a"))
    assert res.returncode == 1 and "MLP over pooled" in res.stderr and "coplctl serve" in res.stderr
    i2e = _train("i2e", micro_dir, tiny_lm, tmp_path_factory, lora_rank=2)
    user = load(micro_dir).user_ids("seen")[0]
    res = _cli("export", str(i2e), "--format", "hf", "--user", user, "--out", str(tmp_path / "b"))
    assert res.returncode == 1 and "user token" in res.stderr and "Traceback" not in res.stderr
    res = _cli("export", str(i2e), "--format", "peft", "--user", user, "--out", str(tmp_path / "c"))
    assert res.returncode == 1 and "--format hf" in res.stderr


@pytest.mark.parametrize("name", ["uniform", "copl"])
def test_the_model_cards_loading_snippet_runs_and_gives_the_runs_rewards(name, uniform_run, copl_run, tmp_path):
    """The card's python block, run as written (folder filled in): rewards equal the run's for its first user."""
    import re

    from coplctl.serving.export import export_peft

    run = {"uniform": uniform_run, "copl": copl_run}[name]
    out = tmp_path / "export"
    export_peft(run, out)
    card = (out / "README.md").read_text()
    (code,) = re.findall(r"```python\n(.*?)```", card, flags=re.S)
    scope: dict = {}
    exec(code.replace("THIS_FOLDER", str(out)), scope)  # noqa: S102  (the card's own snippet)
    method = load_method(run)
    user = method.user_ids[0]
    expected = method.score([user], score_frame([{"user": user, "prompt": "Hi?", "response": "Hello!"}]))
    torch.testing.assert_close(scope["rewards"], expected, rtol=1e-5, atol=1e-5)
    if name == "copl":
        assert "## Routing" in card and "| layer |" in card  # the gates' diagnostics from training.json
        assert "test pairs" in card or "none recorded" in card


@pytest.mark.parametrize("name", ["uniform", "copl"])
def test_coplctl_loads_an_export_folder_and_a_hub_id_with_the_runs_rewards(name, uniform_run, copl_run, micro_dir,
                                                                          tmp_path):
    """coplctl.load of a peft export, and of the same export as a hub repo read from a cache laid out as a
    download leaves it (offline): every exported user scores as in the run."""
    import numpy as np
    from tiny_models import install_in_hub_cache

    import coplctl
    from coplctl.serving.export import export_peft

    run = {"uniform": uniform_run, "copl": copl_run}[name]
    out = tmp_path / "export"
    export_peft(run, out)
    ds = load(micro_dir)
    users = load_method(run).user_ids[:4]
    rows = ds.responses.head(4)
    want = coplctl.load(run).reward(users, rows.prompt.tolist(), rows.text.tolist())
    rm = coplctl.load(out)
    assert rm.name == name and rm.users == load_method(run).user_ids
    np.testing.assert_allclose(rm.reward(users, rows.prompt.tolist(), rows.text.tolist()), want, atol=1e-6)
    install_in_hub_cache(out, tmp_path / "hf", "me/reward")
    code = ("import json, sys, coplctl; a = json.loads(sys.argv[1]); "
            "print(json.dumps(coplctl.load('me/reward').reward(*a).tolist()))")
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    res = subprocess.run([sys.executable, "-c", code, json.dumps([users, rows.prompt.tolist(), rows.text.tolist()])],
                         capture_output=True, text=True, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    np.testing.assert_allclose(json.loads(res.stdout), want, atol=1e-6)


def test_loading_what_is_no_run_says_what_it_is(copl_run, micro_dir, tmp_path, monkeypatch):
    import coplctl
    from coplctl.core.errors import CoplError
    from coplctl.serving.hf_export import export_hf

    user = load(micro_dir).user_ids("seen")[0]
    export_hf(copl_run, tmp_path / "hf", user=user)
    with pytest.raises(CoplError, match="AutoModelForSequenceClassification"):
        coplctl.load(tmp_path / "hf")
    with pytest.raises(CoplError, match="me/nothing is no local directory, and the Hugging Face hub did not give it"):
        coplctl.load("me/nothing")  # offline (the tests' HF_HUB_OFFLINE): one line at once
    (tmp_path / "runs").mkdir()
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CoplError, match="does not exist"):
        coplctl.load("runs/mistyped")  # a local folder's typo is not sent to the hub


@pytest.mark.parametrize("fmt", ["Human: {prompt}\n\nAssistant: {response}", "Human: {prompt} Assistant: {response}",
                                 "{response}", "Q: {prompt} {{quoted}} A: {response}\n"])
def test_the_chat_template_renders_the_runs_text_format(fmt, tiny_lm):
    from transformers import AutoTokenizer

    from coplctl.serving.hf_export import chat_template

    tok = AutoTokenizer.from_pretrained(tiny_lm)
    tok.chat_template = chat_template(fmt)
    chat = [{"role": "user", "content": "Why \"x\"?\n"}, {"role": "assistant", "content": "Because {y}."}]
    assert tok.apply_chat_template(chat, tokenize=False) == fmt.format(prompt="Why \"x\"?\n", response="Because {y}.")
    with pytest.raises(Exception, match="user and assistant turns only"):
        tok.apply_chat_template([{"role": "tool", "content": "x"}], tokenize=False)


@pytest.mark.parametrize("run", ["uniform_run", "copl_run"])
def test_the_memory_estimate_counts_the_parameters_a_run_really_has(run, request):
    from coplctl.models.memory import estimate

    method = load_method(request.getfixturevalue(run))
    est = estimate(type(method), method.config, dtype_bytes=4)
    lm = method.net.encoder.lm
    adapters = sum(p.numel() for n, p in lm.named_parameters() if "lora_" in n or "expert" in n or "shared_" in n
                   or ".gate." in n)
    base = sum(p.numel() for n, p in lm.named_parameters()) - adapters
    assert est["parameters"] == base
    assert est["trainable_parameters"] == sum(p.numel() for p in method.net.parameters() if p.requires_grad)
    assert est["weights"] == 4 * base and est["trainable"] == 16 * est["trainable_parameters"]
