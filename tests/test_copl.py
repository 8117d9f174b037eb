"""CoPL end to end in both modes, its ablations, save/load, the CLI, and two processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from coplctl.copl.method import CoPL
from coplctl.core.errors import CoplError
from coplctl.data import load
from coplctl.models.evaluate import evaluate
from coplctl.models.reward import load_method, pair_scores

SMALL_GCF = {"dim": 8, "epochs": 20}


def _all_test_scores(method, ds):
    return pair_scores(method, ds.split("test"), ds.responses)


def _trained(method) -> bool:
    """LoRA 'B' factors start at zero: any non-zero one shows training moved the adapters."""
    return any(p.abs().sum() > 0 for n, p in method.net.named_parameters() if n.endswith(("expert_b", "shared_b.weight")))


@pytest.fixture(scope="module")
def frozen_copl(tiny_dir, tmp_path_factory):
    ds = load(tiny_dir)
    method = CoPL(gcf_overrides=SMALL_GCF, epochs=3)
    metrics = method.fit(ds, work_dir=tmp_path_factory.mktemp("work"), progress=False)
    return method, metrics, ds


def test_frozen_mode_fit_adapt_score_save_load(frozen_copl, tmp_path):
    method, metrics, ds = frozen_copl
    assert len(metrics["history"]) == 3 and 0 <= metrics["valid_accuracy"] <= 1
    assert _trained(method)
    result = evaluate(method, ds)
    assert result["adaptation"]["users"] == 8 and set(result["metrics"]) == {"seen", "unseen"}
    for m in result["metrics"].values():
        assert 0 <= m["accuracy"] <= 1 and m["pairs"] > 0
    before = _all_test_scores(method, ds)
    assert all(torch.isfinite(torch.tensor(s)).all() for s in before)
    method.save(tmp_path / "run")
    assert (tmp_path / "run" / "gcf" / "graph.safetensors").exists()
    again = load_method(tmp_path / "run")
    assert again.user_ids == method.user_ids  # adapted unseen users are part of the saved state
    after = _all_test_scores(again, ds)
    assert all((a == b).all() for a, b in zip(before, after))


def test_a_fitted_copl_reads_its_gcf_run_once(frozen_copl, monkeypatch):
    import coplctl.graph.run as gcf_run

    method, _, ds = frozen_copl
    reads = []
    real = gcf_run.GCFRun.__init__
    monkeypatch.setattr(gcf_run.GCFRun, "__init__", lambda self, d: reads.append(d) or real(self, d))
    for variant in ("weighted", "average", "weighted"):  # as a benchmark's adaptation experiments do
        with method.variant(adaptation=variant) as m:
            evaluate(m, ds, roles=("unseen",))
    assert reads == []  # read when the model was fitted, not again per adaptation
    method.gcf_dir = type(method.gcf_dir)(str(method.gcf_dir))  # the same place: still no read
    with method.variant() as m:
        m.adapt(ds.split("fewshot"), ds.responses)
    assert reads == []


def test_unknown_user_is_a_clear_error(frozen_copl):
    method, _, ds = frozen_copl
    with pytest.raises(CoplError, match="unknown user 'nobody'.*coplctl adapt"):
        method.score(["nobody"], ds.responses.head(1))


def test_adapt_command_adds_users_to_a_model_run_and_score_reads_them(frozen_copl, tmp_path, capsys):
    from coplctl.cli import main

    method, _, ds = frozen_copl
    method.save(tmp_path / "run")
    fs = ds.split("fewshot").head(4)
    lines = [{"user": "alice", "chosen": c, "rejected": r} for c, r in zip(fs.chosen_id, fs.rejected_id)]
    f = tmp_path / "alice.jsonl"
    f.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    args = ["--user", "alice", "--prompt", ds.responses.prompt[0], "--response", ds.responses.text[0]]
    assert main(["score", str(tmp_path / "run"), *args]) == 1  # not known yet
    assert "unknown user 'alice'" in capsys.readouterr().err
    assert main(["adapt", "--model", str(tmp_path / "run"), "--user-file", str(f), "--out", str(tmp_path / "plus")]) == 0
    capsys.readouterr()
    assert main(["score", str(tmp_path / "plus"), *args]) == 0
    assert float(capsys.readouterr().out) == pytest.approx(
        float(load_method(tmp_path / "plus").score(["alice"], ds.responses.head(1))[0]), abs=1e-6)
    assert json.loads((tmp_path / "plus" / "summary.json").read_text())["users"] == 1


def test_gcf_work_is_not_reused_for_other_data(tiny_dir, micro_dir, tmp_path):
    first = CoPL(gcf_overrides=SMALL_GCF, epochs=1)
    first.fit(load(tiny_dir), work_dir=tmp_path / "work", progress=False)
    second = CoPL(gcf_overrides=SMALL_GCF, epochs=1)
    second.fit(load(micro_dir), work_dir=tmp_path / "work", progress=False)  # same work dir, other data
    assert second.user_ids == load(micro_dir).user_ids("seen") != first.user_ids


def test_experts_figure(frozen_copl, tmp_path):
    from PIL import Image

    from coplctl.cli import main
    from coplctl.copl.figures import expert_allocation

    method, _, _ = frozen_copl
    method.save(tmp_path / "run")
    alloc = expert_allocation(tmp_path / "run")
    assert list(alloc["layers"]) == ["trunk.0", "trunk.2"] and alloc["experts"] == 8
    assert all(0 <= e < 8 for e in alloc["layers"]["trunk.0"]) and len(alloc["groups"]) == len(alloc["users"])
    assert main(["plot", "experts", str(tmp_path / "run"), "--out", str(tmp_path / "e.png")]) == 0
    with Image.open(tmp_path / "e.png") as im:
        assert im.format == "PNG"
    assert main(["plot", "experts", str(tmp_path / "run"), "--layer", "7"]) == 1


def test_bf16_backbone_trains_and_scores_with_fp32_adapters(micro_dir, tmp_path):
    ds = load(micro_dir)
    method = CoPL(mode="lora", dtype="bfloat16", max_length=32, batch_size=16, gcf_overrides=SMALL_GCF)
    method.fit(ds, work_dir=tmp_path / "work", progress=False)
    assert method.backbone.model.dtype == torch.bfloat16
    trained = [p for p in method.net.parameters() if p.requires_grad]
    assert trained and all(p.dtype == torch.float32 for p in trained)
    evaluate(method, ds)
    method.save(tmp_path / "run")
    again = load_method(tmp_path / "run")
    before, after = _all_test_scores(method, ds), _all_test_scores(again, ds)
    assert all(torch.isfinite(torch.tensor(s)).all() for s in before)
    assert all((a == b).all() for a, b in zip(before, after))


@pytest.mark.parametrize("overrides", [{"mole": False}, {"user_embeddings": "learned", "adapt_steps": 5}])
def test_table3_ablations_train_adapt_and_round_trip(tiny_dir, tmp_path, overrides):
    ds = load(tiny_dir)
    method = CoPL(gcf_overrides=SMALL_GCF, epochs=1, **overrides)
    method.fit(ds, work_dir=tmp_path / "work", progress=False)
    table_before = method.net.user_table.detach().clone()
    report = evaluate(method, ds)["adaptation"]
    assert report["users"] == 8 and len(method.user_ids) == 128
    torch.testing.assert_close(method.net.user_table[:120], table_before)  # seen users untouched
    method.save(tmp_path / "run")
    again = load_method(tmp_path / "run")
    assert all((a == b).all() for a, b in zip(_all_test_scores(method, ds), _all_test_scores(again, ds)))


def test_lora_mode_with_minilm(micro_dir, tmp_path):
    ds = load(micro_dir)
    method = CoPL(mode="lora", max_length=64, batch_size=16, gcf_overrides=SMALL_GCF)
    method.fit(ds, work_dir=tmp_path / "work", progress=False)
    assert _trained(method)
    names = [layer.name for layer in method.net.layers]
    assert names and all(n.endswith(("query", "value")) for n in names)  # peft's defaults for BERT-like models
    evaluate(method, ds)
    method.save(tmp_path / "run")
    again = load_method(tmp_path / "run")
    assert all((a == b).all() for a, b in zip(_all_test_scores(method, ds), _all_test_scores(again, ds)))


def _cli(*args, env=None):
    res = subprocess.run([sys.executable, "-m", "coplctl", *args], capture_output=True, text=True, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    return res.stdout


def _requests(ds, path):
    seen = ds.user_ids("seen")[:3]
    rows = [{"user": u, "prompt": p, "response": t}
            for u, (p, t) in zip(seen, zip(ds.responses.prompt[:3], ds.responses.text[:3]))]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def test_lora_mode_with_a_tiny_gemma_from_the_hub_cache(micro_dir, tmp_path):
    """A hub id (here a tiny Gemma built from a config, in an offline hub cache) trains and scores."""
    from tiny_models import REPO_ID, REVISION, build_tiny_gemma, install_in_hub_cache

    ds = load(micro_dir)
    model_dir = build_tiny_gemma(tmp_path / "tiny", [f"{p} {t}" for p, t in zip(ds.responses.prompt, ds.responses.text)])
    install_in_hub_cache(model_dir, tmp_path / "hf")
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    run = tmp_path / "run"
    _cli("train", "copl", "--data", str(micro_dir), "--out", str(run), "--backbone", REPO_ID, "--mode", "lora",
         "--batch-size", "8", "--set", "gcf_overrides={dim: 8, epochs: 20}", "--set", "max_length=96", env=env)
    assert json.loads((run / "method.json").read_text())["config"]["backbone"] == REPO_ID
    req = _requests(ds, tmp_path / "req.jsonl")
    first = _cli("score", str(run), "--input", str(req), env=env)
    assert first == _cli("score", str(run), "--input", str(req), env=env)
    assert all(isinstance(json.loads(line)["reward"], float) for line in first.splitlines())
    table = _cli("evaluate", str(run), "--data", str(micro_dir), env=env)
    assert "seen" in table and "unseen" in table
    _cli("export", str(run), "--out", str(tmp_path / "export"), env=env)  # records the hub revision it used
    config = json.loads((tmp_path / "export" / "adapter_config.json").read_text())
    assert (config["base_model_name_or_path"], config["revision"]) == (REPO_ID, REVISION)
    assert f"base_model: {REPO_ID}" in (tmp_path / "export" / "README.md").read_text()


def test_train_evaluate_score_commands_and_two_processes(micro_dir, tmp_path):
    """`accelerate launch` with two CPU processes trains a run that scores identically when reloaded."""
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "-m", "coplctl", "train", "copl", "--data", str(micro_dir), "--out", str(run), "--epochs", "2",
           "--set", "gcf_overrides={dim: 8, epochs: 20}"]
    res = subprocess.run(cmd, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    from test_accelerate import WARNING

    assert not WARNING.findall(res.stderr), res.stderr[-3000:]  # e.g. DDP's find_unused_parameters notice
    assert json.loads((run / "training.json").read_text())["metrics"]["processes"] == 2
    ds = load(micro_dir)
    req = _requests(ds, tmp_path / "req.jsonl")
    from_cli = [json.loads(line)["reward"] for line in _cli("score", str(run), "--input", str(req)).splitlines()]
    method = load_method(run)
    rows = [json.loads(line) for line in req.read_text().splitlines()]
    from coplctl.models.evaluate import score_frame

    in_process = method.score([r["user"] for r in rows], score_frame(rows)).tolist()
    assert from_cli == in_process
    one = _cli("score", str(run), "--user", rows[0]["user"], "--prompt", rows[0]["prompt"], "--response",
               rows[0]["response"])
    assert float(one) == pytest.approx(from_cli[0], abs=1e-6)
    out = _cli("evaluate", str(run), "--data", str(micro_dir), "--json")
    assert set(json.loads(out)["metrics"]) == {"seen", "unseen"}
