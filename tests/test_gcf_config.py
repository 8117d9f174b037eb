"""GCF settings: options override every preset, bad values are one clear error, and the group measures
(probe, spectral split) read planted groups and only them."""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import pytest

from coplctl.core.errors import CoplError
from coplctl.data import load
from coplctl.graph.config import PRESETS, GCFConfig, preset_config
from coplctl.graph.probe import group_probe, spectral_split

#: A valid value, different from every preset's, for each GCF field.
OTHER = {"dim": 8, "layers": 2, "variant": "lightgcn", "epochs": 3, "lr": 3e-3, "batch_size": 64, "l2": 0.5,
         "weight_decay": 0.01, "grad_clip": 2.0, "warmup_ratio": 0.2, "negative_slope": 0.1, "signed_init": False,
         "init_std": 0.3, "edge_dropout": 0.2, "holdout": 0.3, "sampler": "full", "fanouts": (3, 3),
         "patience": 7, "min_epochs": 2, "dtype": "float32", "select_on": "personal"}


def test_every_field_has_a_test_value():
    assert set(OTHER) == {f.name for f in dataclasses.fields(GCFConfig)}


@pytest.mark.parametrize("preset", sorted(PRESETS))
@pytest.mark.parametrize("field", sorted(OTHER))
def test_an_option_overrides_the_preset(preset, field):
    cfg = preset_config(preset, **{field: OTHER[field]})
    assert getattr(cfg, field) == OTHER[field]
    for other, value in PRESETS[preset].items():  # the preset's other values stay
        if other != field:
            assert getattr(cfg, other) == value


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_graph_train_options_and_sets_with_every_preset(preset, tiny_dir, tmp_path, capsys):
    from coplctl.cli import main

    argv = ["graph", "train", "--data", str(tiny_dir), "--out", str(tmp_path / "run"), "--preset", preset,
            "--dim", "8", "--layers", "2", "--epochs", "2", "--lr", "0.01", "--batch-size", "0",
            "--set", "edge_dropout=0.05", "--set", "patience=0"]
    assert main(argv) == 0, capsys.readouterr().err
    import json

    cfg = json.loads((tmp_path / "run" / "config.json").read_text())["gcf"]
    assert (cfg["dim"], cfg["epochs"], cfg["lr"], cfg["edge_dropout"], cfg["batch_size"]) == (8, 2, 0.01, 0.05, 0)


@pytest.mark.parametrize("setting, words", [
    ("epochs=abc", "epochs: expected a whole number"), ("epochs=0", "epochs: 0 is out of range; it must be at least 1"),
    ("lr=nan", "lr: expected a number"), ("lr=.nan", "lr: expected a finite number"), ("lr=-1", "lr: -1.0 is out of range; it must be above 0"), ("l2=abc", "l2: expected a number"),
    ("fanouts=5", "fanouts: expected a list"), ("variant=gat", "variant: unknown 'gat'"),
    ("holdout=1", "below 1"), ("signed_init=maybe", "signed_init: expected true or false"),
    ("dimm=3", "no option 'dimm'"), ("epochs=", "--set epochs: empty value"),
    ("dim={a: 1", "--set dim: invalid value"),
])
def test_a_bad_value_is_one_clear_error(setting, words, tiny_dir, tmp_path, capsys):
    from coplctl.cli import main

    assert main(["graph", "train", "--data", str(tiny_dir), "--out", str(tmp_path / "r"), "--set", setting]) == 1
    err = capsys.readouterr().err
    assert words in " ".join(err.split()) and "Traceback" not in err
    assert not (tmp_path / "r").exists()  # refused before any work


def test_bad_value_in_python_is_a_copl_error():
    with pytest.raises(CoplError, match="dim: expected a whole number"):
        preset_config("cpu", dim="8")


def test_probe_reads_planted_groups_and_not_random_ones():
    rng = np.random.default_rng(0)
    groups = np.repeat(["a", "b", "c"], 60)
    centers = rng.standard_normal((3, 16))
    emb = centers[np.repeat([0, 1, 2], 60)] + 0.8 * rng.standard_normal((180, 16))
    assert group_probe(emb, groups) > 0.95
    assert group_probe(emb, rng.permutation(groups)) < 0.55  # chance: 1/3
    with_missing = pd.Series(groups, dtype=object)
    with_missing[:10] = None  # users without a group are left out, not counted wrong
    assert group_probe(emb, with_missing.to_numpy()) > 0.95
    assert group_probe(emb, [None] * 180) is None and group_probe(emb[:6], ["a"] * 3 + ["b"] * 3) is None


def test_spectral_split_finds_the_groups_of_simulated_users(tiny_dir):
    ds = load(tiny_dir)
    seen = ds.users[ds.users["role"] == "seen"]
    acc = spectral_split(ds.split("train"), list(seen["user_id"]), seen["group"].to_numpy())
    assert acc > 0.8
    shuffled = seen["group"].sample(frac=1.0, random_state=1).to_numpy()
    assert spectral_split(ds.split("train"), list(seen["user_id"]), shuffled) < 0.7


def test_exports_are_unit_vectors_and_older_runs_keep_theirs(tiny_dir, tmp_path):
    import json

    import torch

    from coplctl.graph.run import GCFRun
    from coplctl.graph.train import train_gcf

    train_gcf(load(tiny_dir), tmp_path / "run", preset_config("cpu", dim=8, layers=2, epochs=2), progress=False)
    run = GCFRun(tmp_path / "run")
    assert torch.allclose(run.exported_user_emb.norm(dim=-1), torch.ones(run.graph.num_users))
    info = json.loads((tmp_path / "run" / "config.json").read_text())
    del info["export"]  # as written before every variant's exports were normalised
    (tmp_path / "run" / "config.json").write_text(json.dumps(info))
    assert torch.equal(GCFRun(tmp_path / "run").exported_user_emb, run.user_emb)


def test_graph_train_refuses_to_write_into_its_dataset_and_plot_needs_a_run(tiny_copy, tmp_path, capsys):
    from coplctl.cli import main

    before = sorted(p.name for p in tiny_copy.iterdir())
    assert main(["graph", "train", "--data", str(tiny_copy), "--out", str(tiny_copy)]) == 1
    assert "the dataset" in capsys.readouterr().err
    assert sorted(p.name for p in tiny_copy.iterdir()) == before
    assert main(["plot", "experts", str(tmp_path / "missing")]) == 1
    err = capsys.readouterr().err
    assert "is not a saved reward-model run" in err and "Traceback" not in err


@pytest.mark.parametrize("args, code, words", [
    (["--device", "banana"], 1, "device 'banana': not a device name"),
    (["--device", "cuda"], 1, "device 'cuda': no CUDA device is available here"),
    (["--seed", "-1"], 2, "Invalid value for '--seed'"),
])
def test_bad_device_or_seed_is_one_line(tiny_dir, tmp_path, capsys, args, code, words):
    from coplctl.cli import main

    if args[-1] == "cuda" and __import__("torch").cuda.is_available():
        pytest.skip("a GPU is present")
    assert main(["graph", "train", "--data", str(tiny_dir), "--out", str(tmp_path / "r"), *args]) == code
    err = " ".join(capsys.readouterr().err.split())
    assert words in err and "Traceback" not in err, err


def test_auto_trains_on_the_full_graph_while_it_fits_and_samples_neighbours_beyond(tiny_dir, tmp_path, monkeypatch):
    import json

    import torch

    import coplctl.graph.config as gc
    from coplctl.graph.train import train_gcf

    cfg = preset_config("cpu", dim=8, layers=2, epochs=2, patience=0)
    assert cfg.sampler == "auto"
    nodes, edges = 6_200_000, 31_000_000  # a million users of UF-P-4-AVG: about 11.5 GB at d = 32
    assert 11e9 < gc.full_graph_bytes(nodes, edges, preset_config("cpu")) < 12e9
    assert gc.resolve_sampler(cfg, 100, 400, torch.device("cpu")).sampler == "full"
    monkeypatch.setattr(gc, "memory_budget", lambda device: 1000)  # a graph that does not fit
    picked = gc.resolve_sampler(cfg, 100, 400, torch.device("cpu"))
    assert (picked.sampler, picked.batch_size) == ("neighbor", gc.NEIGHBOR_BATCH)
    train_gcf(load(tiny_dir), tmp_path / "run", cfg, progress=False)
    config = json.loads((tmp_path / "run" / "config.json").read_text())["gcf"]
    assert (config["sampler"], config["batch_size"]) == ("neighbor", gc.NEIGHBOR_BATCH)
