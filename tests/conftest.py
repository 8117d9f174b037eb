"""Shared fixtures: small simulated datasets built once per session, on disk like a user's."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pytest

# No test touches the network: model hub lookups fail fast instead of retrying for half a minute.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Caches (frozen-mode features, dequantised backbones) go to a private directory per test session.
os.environ["COPLCTL_CACHE"] = tempfile.mkdtemp(prefix="coplctl-test-cache-")
atexit.register(shutil.rmtree, os.environ["COPLCTL_CACHE"], ignore_errors=True)

from coplctl.data.protocol import ProtocolConfig
from coplctl.data.simulate import SimConfig, simulate


def small_protocol(variant: str = "uf-p-2", annotations: str = "all", **kw) -> ProtocolConfig:
    """A protocol small enough for unit tests (seconds), same rules as paper scale."""
    base = dict(variant=variant, annotations=annotations, users=120, unseen_users=8, survey_pairs=600)
    return ProtocolConfig(**{**base, **kw})


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    """A small simulated UF-P-2-ALL dataset directory (read-only: copy it before changing it)."""
    path = tmp_path_factory.mktemp("data") / "tiny"
    simulate(SimConfig(protocol=small_protocol(), seed=7)).save(path)
    return path


@pytest.fixture
def tiny_copy(tiny_dir, tmp_path) -> Path:
    """A private, writable copy of the tiny dataset."""
    dest = tmp_path / "copy"
    shutil.copytree(tiny_dir, dest)
    return dest


@pytest.fixture(scope="session")
def micro_dir(tmp_path_factory) -> Path:
    """A very small UF-P-2-ALL dataset for language-model (lora-mode) tests."""
    path = tmp_path_factory.mktemp("data") / "micro"
    proto = small_protocol(users=16, unseen_users=2, survey_pairs=60, test_pairs=2, unseen_test_pairs=4,
                           valid_pairs=1, unseen_valid_pairs=1)
    simulate(SimConfig(protocol=proto, seed=3)).save(path)
    return path
