"""Frozen features across processes: `coplctl data embed` under accelerate launch (2 CPU processes, gloo)
fills the cache each process's share at a time, with the features one process computes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import torch

from coplctl.data.protocol import ProtocolConfig
from coplctl.data.simulate import SimConfig, simulate


def _embed(data, cache, processes: int) -> subprocess.CompletedProcess:
    args = ["-m", "coplctl", "data", "embed", str(data), "--precision", "float32", "--json"]
    if processes > 1:
        args = ["-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", *args]
    env = {**os.environ, "COPLCTL_CACHE": str(cache), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=600, env=env)


def test_two_processes_fill_the_cache_one_process_fills(tmp_path):
    from coplctl.models.features import FeatureCache

    data = tmp_path / "data"
    simulate(SimConfig(ProtocolConfig("uf-p-2", "all", users=20, unseen_users=2, survey_pairs=120))).save(data)
    one, two = _embed(data, tmp_path / "one", 1), _embed(data, tmp_path / "two", 2)
    assert one.returncode == 0, one.stderr[-3000:]
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = json.loads(one.stdout), json.loads(two.stdout)  # the main process alone prints
    assert (a["processes"], b["processes"]) == (1, 2)
    assert a["texts"] == b["texts"] == a["embedded"] == b["embedded"] > 0
    assert a["truncated"] == b["truncated"] == {"prompt": 0, "response": 0}
    key = a["backbone"]
    assert b["backbone"] == key and "float32" in key and "bf16" not in key
    c1, c2 = FeatureCache(key, tmp_path / "one" / "features"), FeatureCache(key, tmp_path / "two" / "features")
    assert len(c1.shards) == 1 and len(c2.shards) == 2  # each process wrote its share
    digests = sorted(c1.index)
    assert sorted(c2.index) == digests
    torch.testing.assert_close(c2.lookup(digests), c1.lookup(digests), atol=1e-6, rtol=0)
    again = _embed(data, tmp_path / "two", 2)  # everything cached: nothing to embed
    assert again.returncode == 0 and json.loads(again.stdout)["embedded"] == 0


def test_inspect_counts_the_texts_a_backbone_would_cut(tmp_path, capsys):
    from coplctl.cli import main

    data = tmp_path / "data"
    ds = simulate(SimConfig(ProtocolConfig("uf-p-2", "all", users=20, unseen_users=2, survey_pairs=120)))
    ds.save(data)
    assert main(["data", "inspect", str(data), "--backbone", "minilm", "--json"]) == 0
    whole = json.loads(capsys.readouterr().out)["truncation"]
    assert whole == {"backbone": "minilm", "max_length": 256, "texts": len(ds.responses), "prompt": 0, "response": 0}
    assert main(["data", "inspect", str(data), "--backbone", "minilm", "--max-length", "40", "--json"]) == 0
    cut = json.loads(capsys.readouterr().out)["truncation"]
    assert cut["max_length"] == 40 and cut["response"] == len(ds.responses)  # short prompts, long responses
    assert main(["data", "inspect", str(data), "--backbone", "minilm", "--max-length", "40"]) == 0
    assert f"Cut to minilm's 40 tokens: 0 of {len(ds.responses):,} texts" in " ".join(capsys.readouterr().out.split())
