"""The ceiling of mixture data: each user's weights inferred from its own labels under the Dirichlet prior."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import small_protocol

from coplctl.data import load
from coplctl.data.simulate import SimConfig, simulate
from coplctl.models.evaluate import evaluate
from coplctl.models.reward import load_method


@pytest.fixture(scope="module")
def mixture_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "mixture"
    proto = small_protocol("uf-p-4", users=150, preferences="mixture", alpha=0.1)
    simulate(SimConfig(protocol=proto, seed=5)).save(path)
    return path


def test_the_ceiling_recovers_the_users_weights_from_their_labels(mixture_dir, tmp_path):
    from coplctl.baselines.ceiling import Ceiling

    ds = load(mixture_dir)
    m = Ceiling()
    m.fit(ds, seed=0)
    truth = ds.users.set_index("user_id").loc[m.user_ids, [c for c in ds.users.columns if c.startswith("weight_")]]
    dominant = (m.weights.argmax(1) == truth.to_numpy().argmax(1)).mean()
    assert dominant > 0.6  # chance: 0.25
    got = evaluate(m, ds)["metrics"]
    assert got["seen"]["accuracy"] > 0.7 and got["unseen"]["accuracy"] > 0.6
    m.save(tmp_path / "run")
    again = load_method(tmp_path / "run")
    users, rows = m.user_ids[:5], ds.responses.head(5)
    np.testing.assert_allclose(again.score(users, rows).numpy(), m.score(users, rows).numpy())


def test_the_ceiling_cannot_run_on_group_data(tiny_dir):
    from coplctl.baselines.ceiling import Ceiling

    assert "mixture users" in Ceiling.cannot_run(load(tiny_dir))
