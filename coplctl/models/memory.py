"""Peak accelerator memory of one ``lora``-mode training process, estimated from the backbone's config
before any weight is loaded (``coplctl benchmark SPEC --dry-run``).

The backbone is built on the meta device (accelerate's ``init_empty_weights``: shapes, no memory), so the
parameter count and the adapted layers' shapes are exact for any architecture. With ``b`` the batch size in
pairs, ``L`` the tokens per text, ``N = 2·b·L`` (a pair's two texts, each padded up to the limit: an upper
bound), ``w`` bytes per backbone weight and activation (2 in bf16/fp16, 4 in fp32), ``h`` hidden size,
``ℓ`` layers, ``I`` MLP width, ``q``/``k`` query and key-value heads of width ``d``:

    weights      = P · w                               P: the backbone's parameters (no LM head)
    trainable    = T · 16                              fp32 parameter, gradient, AdamW's two moments
    T            = Σ over adapted linears (in → out) of the method's ``adapter_parameters``, + the head h + 1:
                   plain LoRA of rank r: r·(in + out); CoPL's MoLE: (M + 1)·n·(in + out) + its gate
    activations  = N · ℓ · a · w                       kept for the backward pass, per token and layer:
    a            = Σ norms 2·(their width) + (q + 2k)·d + (q + k)·d + q·d + c·I + s
                   each norm keeps its input and its (fp32) normalised output (h for a layer norm, q·d / k·d for
                   Gemma 3's per-head q/k norms); q/k/v; their rotary copies (rotary models); the attention
                   output; c = 4 for gated MLPs (gate, up, activation, product), 2 otherwise; s = 2·q·L for the
                   score and probability matrices attention keeps on a CPU (its math path), 0 on a GPU (fused
                   SDPA / flash attention keep none)
    checkpointed = N · ℓ · h · w + N · a · w           only each layer's input, one layer recomputed
    total        = weights + trainable + activations (+ N · h · w for the last hidden states)

``benchmarks/perf/memory_estimate.py`` measures it against peak RSS on a CPU (gemma-3-270m, fp32, 128 tokens):
the activations' growth from batch 2 to 8 within 5% for plain LoRA and CoPL, and the whole peak at batch 8
within 5%; with gradient checkpointing the measured peak is 0.6-1.4 GB higher than estimated (the
interpreter and libraries, 0.4 GB, and the recomputation's transients are not in the formula). On MiniLM
(BERT: dropout on attention probabilities and hidden states, whose kept copies and masks are not counted)
the measured growth is 1.7-2x the estimate: read encoder figures as a lower bound. Not counted:
per-user tables (I2E's user tokens: users × h), transient buffers of single operations, the CUDA context and
the allocator's fragmentation (a few hundred MB to a few GB in practice).
"""

from __future__ import annotations

import functools
import re

ADAM_BYTES = 16
"""Bytes per trained (fp32) parameter: the value, its gradient and AdamW's two moments."""
PAPER_CONFIGS = {
    "google/gemma-2b-it": {"model_type": "gemma", "hidden_size": 2048, "intermediate_size": 16384,
                           "num_hidden_layers": 18, "num_attention_heads": 8, "num_key_value_heads": 1,
                           "head_dim": 256, "vocab_size": 256000, "max_position_embeddings": 8192},
    "google/gemma-7b-it": {"model_type": "gemma", "hidden_size": 3072, "intermediate_size": 24576,
                           "num_hidden_layers": 28, "num_attention_heads": 16, "num_key_value_heads": 16,
                           "head_dim": 256, "vocab_size": 256000, "max_position_embeddings": 8192},
}
"""The architecture numbers of the paper's two backbones (their hub ``config.json``), used when the hub and
its cache are out of reach, so that the plan of the headline command can be read before any download."""


def backbone_config(name: str):
    """(config, where it came from) of backbone ``name``: its own config when it is embedded, local or in the hub
    cache; else the paper's numbers for gemma-2b-it / gemma-7b-it; else the hub's (online). (None, None) when
    none is available."""
    from transformers import AutoConfig

    from coplctl.models.backbone import resolve

    source, _ = resolve(name)
    try:  # JSON config only (no remote code)
        return AutoConfig.from_pretrained(source, local_files_only=True), source
    except (OSError, ValueError):
        pass
    if source in PAPER_CONFIGS:
        values = dict(PAPER_CONFIGS[source])
        return AutoConfig.for_model(values.pop("model_type"), **values), f"the paper's {source} (config.json values)"
    try:
        return AutoConfig.from_pretrained(source), source
    except (OSError, ValueError):
        return None, None


@functools.cache
def architecture(name: str) -> dict | None:
    """Backbone ``name`` built on the meta device: its config and source, parameter count, every linear
    layer's (in, out), and whether its MLP is gated; None without a config."""
    import torch
    from accelerate import init_empty_weights
    from transformers import AutoModel

    from coplctl.models.backbone import resolve
    from coplctl.models.tokens import FALLBACK_MAX_LENGTH, own_max_length

    config, source = backbone_config(name)
    if config is None:
        return None
    known = source == resolve(name)[0]  # its own config (not the paper's numbers): its own length limit too
    length = own_max_length(source, config, None) if known else min(FALLBACK_MAX_LENGTH, config.max_position_embeddings)
    with init_empty_weights():
        model = AutoModel.from_config(config)
    shapes = {n: (m.in_features, m.out_features) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    first = [(n, m) for n, m in model.named_modules() if re.search(r"(^|\.)(layers|layer|h|blocks)\.0\.", n)]
    norms = [n.rsplit(".", 1)[-1] for n, m in first if type(m).__name__.endswith("Norm")]
    return {"config": config, "source": source, "parameters": sum(p.numel() for p in model.parameters()),
            "linears": shapes, "gated": any(n.endswith("gate_proj") for n in shapes), "norms": norms,
            "rotary": any("rotary" in n for n, _ in model.named_modules()), "max_length": length}


def kept_per_token(arch: dict, length: int, fused_attention: bool) -> int:
    """Elements one decoder or encoder layer keeps per token for the backward pass (``a`` above)."""
    c = arch["config"]
    h, q, width = c.hidden_size, c.num_attention_heads, c.intermediate_size
    k = getattr(c, "num_key_value_heads", None) or q
    d = getattr(c, "head_dim", None) or h // q
    norms = sum(2 * (q * d if n.startswith("q_") else k * d if n.startswith("k_") else h) for n in arch["norms"])
    rotary = (q + k) * d if arch["rotary"] else 0
    scores = 0 if fused_attention else 2 * q * length
    return norms + (q + 2 * k) * d + rotary + q * d + (4 if arch["gated"] else 2) * width + scores


def estimate(method, settings, *, dtype_bytes: int, fused_attention: bool = True) -> dict:
    """The formula of the module docstring for registered ``method`` (its class) with its config ``settings``
    (backbone, batch size, length limit, checkpointing; the method's ``adapter_targets`` and
    ``adapter_parameters`` say what it trains in each adapted layer); sizes in bytes, with the counts they
    come from. Without ``max_length``: the backbone's own limit, as training reads it.
    ``fused_attention``: a GPU's (no score matrices kept); False: a CPU's."""
    from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as DEFAULTS

    from coplctl.models.train_config import MODE_DEFAULTS

    backbone = settings.backbone
    arch = architecture(backbone)
    if arch is None:
        return {"available": False, "why": f"no config for {backbone!r} here (not embedded, not a local model, not in "
                                           f"the hub cache, and the hub did not answer with one)"}
    config, source, params, shapes = (arch[k] for k in ("config", "source", "parameters", "linears"))
    h, layers = config.hidden_size, config.num_hidden_layers
    targets = list(method.adapter_targets(settings) or DEFAULTS.get(config.model_type, []))
    adapted = [s for n, s in shapes.items() if any(n == t or n.endswith("." + t) for t in targets)]
    trainable = sum(method.adapter_parameters(settings, i, o) for i, o in adapted) + h + 1
    length = settings.max_length or arch["max_length"]
    batch_size = settings.batch_size or MODE_DEFAULTS["lora"]["batch_size"]
    tokens = 2 * batch_size * length
    a = kept_per_token(arch, length, fused_attention)
    kept = {False: layers * a + h, True: layers * h + a + h}  # per token: all activations, or checkpointed
    checkpointing = bool(settings.gradient_checkpointing)
    parts = {"weights": params * dtype_bytes, "trainable": trainable * ADAM_BYTES,
             "activations": tokens * kept[checkpointing] * dtype_bytes}
    other = parts["weights"] + parts["trainable"] + tokens * kept[not checkpointing] * dtype_bytes
    return {"available": True, "config": source, "parameters": params, "trainable_parameters": trainable,
            "adapted_linears": len(adapted), "targets": targets, "tokens": tokens, "max_length": length,
            "batch_size": batch_size, "dtype_bytes": dtype_bytes, "gradient_checkpointing": checkpointing, **parts,
            "total": sum(parts.values()), "total_other_checkpointing": other}
