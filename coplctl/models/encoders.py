"""Response encoders for the two modes every method supports.

- ``frozen``: the backbone embeds each unique response text once (cached on disk, see
  :mod:`coplctl.models.features`); a small trunk (MLP) trained on top maps features to a hidden vector.
- ``lora``: the backbone reads the tokens with trainable adapters inside (the paper's setting).

Either way an encoder maps a batch of responses (plus, optionally, one extra vector per sample:
a user token in ``lora`` mode, concatenated features in ``frozen`` mode) to hidden vectors that a
method's head turns into rewards.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass

import pandas as pd
import torch
from torch import nn

from coplctl.models.backbone import Backbone

MODES = ("frozen", "lora")


@dataclass
class ResponseInputs:
    """Model inputs for a table of responses, one row per response: features or token ids."""

    mode: str
    features: torch.Tensor | None = None  # (N, F) for frozen mode
    tokens: list[torch.Tensor] | None = None  # token ids per response for lora mode
    pad_id: int = 0
    truncated: dict | None = None  # texts whose prompt / response was cut ({"prompt": n, "response": n})

    def __len__(self) -> int:
        return len(self.features) if self.mode == "frozen" else len(self.tokens)

    def batch(self, idx: torch.Tensor, device=None) -> dict[str, torch.Tensor]:
        if self.mode == "frozen":
            return {"features": self.features[idx.cpu()].to(device)}
        seqs = [self.tokens[i] for i in idx.tolist()]
        ids = nn.utils.rnn.pad_sequence(seqs, batch_first=True, padding_value=self.pad_id)
        mask = nn.utils.rnn.pad_sequence([torch.ones(len(s), dtype=torch.long) for s in seqs], batch_first=True)
        return {"input_ids": ids.to(device), "attention_mask": mask.to(device)}


def concat_batches(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """One batch holding ``a``'s rows then ``b``'s (token batches padded to a common length)."""
    if "features" in a:
        return {"features": torch.cat([a["features"], b["features"]])}
    width = max(a["input_ids"].shape[1], b["input_ids"].shape[1])
    pad = lambda t: nn.functional.pad(t, (0, width - t.shape[1]))  # noqa: E731  (masked positions: any id)
    return {k: torch.cat([pad(a[k]), pad(b[k])]) for k in ("input_ids", "attention_mask")}


def build_inputs(backbone: Backbone, responses: pd.DataFrame, mode: str, *, progress=None,
                 batch_size: int = 64) -> ResponseInputs:
    """Inputs for ``responses`` (prompt, text): cached frozen features, or token ids."""
    if mode == "frozen":
        from coplctl.models.features import features

        cuts: dict = {}
        feats = features(backbone, responses["prompt"], responses["text"], batch_size=batch_size, progress=progress,
                         cuts=cuts)
        return ResponseInputs("frozen", features=feats, truncated=cuts or None)
    from coplctl.models.tokens import cut_counts

    ids, codes = backbone.encode(responses["prompt"], responses["text"])
    return ResponseInputs("lora", tokens=[torch.tensor(t) for t in ids], pad_id=backbone.tokenizer.pad_token_id,
                          truncated=cut_counts(codes))


def mlp(d_in: int, width: int, layers: int) -> nn.Sequential:
    mods: list[nn.Module] = []
    for i in range(layers):
        mods += [nn.Linear(d_in if i == 0 else width, width), nn.GELU()]
    return nn.Sequential(*mods)


class ResponseEncoder(nn.Module):
    """Hidden vector per response, in either mode.

    Args:
        mode: ``frozen`` or ``lora``.
        backbone: the loaded backbone (its model is used in ``lora`` mode).
        trunk_width, trunk_layers: the trunk MLP of ``frozen`` mode.
        extra_dim: width of the per-sample extra vector (``frozen``: concatenated to the features);
            in ``lora`` mode extra vectors must have the backbone's hidden size and become one token
            right after the first (BOS / CLS) token.
    """

    def __init__(self, mode: str, backbone: Backbone, *, trunk_width: int = 256, trunk_layers: int = 2,
                 extra_dim: int = 0):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}")
        self.mode, self.kind = mode, backbone.kind
        if mode == "frozen":
            self.trunk = mlp(backbone.hidden_size + extra_dim, trunk_width, trunk_layers)
            self.out_dim = trunk_width
        else:
            self.lm = backbone.model
            self.out_dim = backbone.hidden_size
            self._pool = backbone.pool

    def forward(self, batch: dict[str, torch.Tensor], extra: torch.Tensor | None = None) -> torch.Tensor:
        if self.mode == "frozen":
            x = batch["features"]
            if extra is not None:
                x = torch.cat([x, extra.to(x.dtype)], dim=-1)
            return self.trunk(x)
        ids, mask = batch["input_ids"], batch["attention_mask"]
        if extra is None:
            hidden = self.lm(input_ids=ids, attention_mask=mask).last_hidden_state
            return self._pool(hidden, mask)
        emb = self.lm.get_input_embeddings()(ids)
        tok = extra.to(emb.dtype).unsqueeze(1)
        emb = torch.cat([emb[:, :1], tok, emb[:, 1:]], dim=1)  # right after BOS / CLS
        mask = torch.cat([mask[:, :1], torch.ones_like(mask[:, :1]), mask[:, 1:]], dim=1)
        hidden = self.lm(inputs_embeds=emb, attention_mask=mask).last_hidden_state
        return self._pool(hidden, mask)

    def enable_checkpointing(self) -> None:
        """Gradient (activation) checkpointing in the LM (``lora`` mode): each layer's activations are
        recomputed in the backward pass instead of kept, trading compute for memory; the numbers stay the
        same. Non-reentrant (``use_reentrant=False``), so gradients reach adapters in a frozen LM; the forward
        pre-hooks active when a layer ran (MoLE's per-call user routing) are active again when it is recomputed."""
        if self.mode != "lora":
            raise ValueError("gradient checkpointing needs lora mode (frozen mode runs no language model in training)")
        kwargs = {"use_reentrant": False, "context_fn": functools.partial(_replay_pre_hooks, self.lm)}
        if getattr(self.lm.config, "use_cache", False):  # no KV cache is read here; transformers would warn
            self.lm.config.use_cache = False
        try:
            if hasattr(self.lm, "activation_checkpointing_enable"):  # transformers 5 (the old name warns there)
                self.lm.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
            else:
                self.lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        except ValueError as e:  # "X does not support gradient checkpointing"
            from coplctl.core.errors import CoplError

            raise CoplError(f"gradient_checkpointing: {e}") from None


def checkpointing_enabled(lm: nn.Module) -> bool:
    """Whether a transformers model has gradient (activation) checkpointing on."""
    flag = getattr(type(lm), "is_activation_checkpointing", None)
    return bool(lm.is_activation_checkpointing if flag is not None else getattr(lm, "is_gradient_checkpointing", False))


def _replay_pre_hooks(model: nn.Module):
    """``context_fn`` of :func:`torch.utils.checkpoint.checkpoint`: a checkpointed layer is recomputed during
    the backward pass, after the forward's per-call hooks were removed (:func:`coplctl.copl.mole.mole_routing`
    passes the user routing to MoLE layers for one forward call only). The recompute context puts the
    forward pre-hooks that were registered when the layer first ran back for its duration."""
    active = [(m, list(m._forward_pre_hooks.items()), set(m._forward_pre_hooks_with_kwargs))
              for m in model.modules() if m._forward_pre_hooks]

    @contextlib.contextmanager
    def recompute():
        handles = [m.register_forward_pre_hook(hook, with_kwargs=key in kw) for m, hooks, kw in active
                   for key, hook in hooks if key not in m._forward_pre_hooks]
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    return contextlib.nullcontext(), recompute()


class RewardHead(nn.Linear):
    """The linear layer that outputs rewards, computed in fp32 even under bf16 autocast: bf16 rewards of
    close responses tie (8 bits of mantissa), and a tie counts as a wrong pair."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):
            return super().forward(x.float())


def lora_alpha(alpha: float | None, rank: int) -> float:
    """LoRA alpha: the configured one, else 2 · rank (the paper does not give it)."""
    return alpha if alpha is not None else 2 * rank


def add_lora(encoder: ResponseEncoder, rank: int, alpha: float, targets: list[str] | None = None,
             dropout: float = 0.0) -> None:
    """Plain LoRA adapters (peft) inside the backbone of a ``lora``-mode encoder."""
    from peft import LoraConfig, inject_adapter_in_model

    targets = targets or default_targets(encoder.lm)
    cfg = LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, lora_dropout=dropout)
    inject_adapter_in_model(cfg, encoder.lm)


def default_targets(model: nn.Module) -> list[str]:
    """peft's default LoRA targets for this architecture (q_proj/v_proj for Gemma, query/value for BERT)."""
    from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as DEFAULTS

    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in DEFAULTS:
        raise ValueError(f"no default LoRA target modules for model type {model_type!r}; set target_modules")
    return list(DEFAULTS[model_type])


@contextlib.contextmanager
def adapters_disabled(model: nn.Module):
    """Run ``model`` as the plain frozen backbone: peft adapters injected into it are switched off."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    for m in layers:
        m.enable_adapters(False)
    try:
        yield model
    finally:
        for m in layers:
            m.enable_adapters(True)
