"""``coplctl export RUN --format hf --user U``: one user's reward as a standard transformers model.

The folder is what ``AutoModelForSequenceClassification.from_pretrained`` and ``AutoTokenizer.from_pretrained``
load, with no coplctl installed: TRL's and OpenRLHF's reward-model paths (``--reward_pretrain``) and any
trainer that loads a reward model by path can use it.

How a lora-mode run becomes one: for the chosen user (or group), every adapted linear layer of the backbone
is an affine map ``x -> W0 x + b0 + delta(x)`` (plain LoRA: ``s·B A x``; CoPL: the shared expert plus the
experts the user's gate picks, with their weights). The map is read off the layer itself by feeding it the
identity matrix, in blocks (``W = layer(I) - b0``), so any adapter kind the method's :meth:`fixed_user` can
evaluate is merged the same way, with no formula repeated here. The merged weights replace the backbone's,
and the reward head becomes the ``score`` layer of the architecture's ``...ForSequenceClassification``, which
pools the last non-pad token as coplctl does for decoders.

What it cannot hold, and so refuses with the reason: frozen-mode runs (a trained MLP over pooled features),
encoder backbones (coplctl mean-pools them; BERT-style classifiers read the pooled first token), and per-user
input vectors (I2E, VPL, PAL, CoPL w/o MoLE). Those runs are served (``coplctl serve``) instead.

The head's bias is left out, since these decoders' ``score`` layers have none. It is the same constant for
every text and never trained (under Bradley-Terry it cancels in r⁺ − r⁻, so it keeps its initial value);
``config.json`` records it as ``coplctl.reward_offset``: the run's reward = the export's logit + that offset.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from coplctl.core.atomic import atomic_dir, refuse_overlap
from coplctl.core.errors import CoplError

def chat_template(text_format: str) -> str:
    """The run's text format as a chat template: a conversation's last user turn is the prompt, its last
    assistant turn the response, rendered exactly as coplctl formats (prompt, response); the tokenizer adds
    the BOS token itself (``tokenizer(text)``). Other roles are refused."""
    import string

    values = {"prompt": "ns.p", "response": "ns.r"}
    body = "".join((f"{{{{ {json.dumps(lit)} }}}}" if lit else "") + (f"{{{{ {values[f]} }}}}" if f else "")
                   for lit, f, _, _ in string.Formatter().parse(text_format))
    return ("{%- set ns = namespace(p='', r='') -%}"
            "{%- for m in messages -%}"
            "{%- if m['role'] == 'user' -%}{%- set ns.p = m['content'] -%}"
            "{%- elif m['role'] == 'assistant' -%}{%- set ns.r = m['content'] -%}"
            "{%- else -%}{{ raise_exception('this reward model reads user and assistant turns only, not ' + m['role']) }}"
            "{%- endif -%}{%- endfor -%}" + body)


BLOCK = 4096  # identity columns fed to a layer at once


def _adapted(lm: nn.Module) -> dict[str, tuple[nn.Module, nn.Linear]]:
    """{name: (adapted module, its base linear layer)} of every peft or MoLE layer inside ``lm``."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    from coplctl.copl.mole import MoLELinear

    found: dict[str, tuple[nn.Module, nn.Linear]] = {}
    for name, m in lm.named_modules():
        if any(name.startswith(k + ".") for k in found):
            continue
        base = m.get_base_layer() if isinstance(m, BaseTunerLayer) else m.base if isinstance(m, MoLELinear) else None
        if base is not None:
            if not isinstance(base, nn.Linear):
                raise CoplError(f"adapted layer {name} wraps a {type(base).__name__}, not a linear layer: not mergeable")
            found[name] = (m, base)
    return found


@torch.no_grad()
def merged_weight(module: nn.Module, base: nn.Linear, layer) -> torch.Tensor:
    """``W`` of the affine map ``x -> layer(module, x) = W x + b0`` (``b0`` the base layer's bias)."""
    d_in = base.in_features
    w = torch.empty(base.out_features, d_in, dtype=base.weight.dtype, device=base.weight.device)
    for s in range(0, d_in, BLOCK):
        e = min(s + BLOCK, d_in)
        eye = torch.zeros(1, e - s, d_in, dtype=base.weight.dtype, device=base.weight.device)
        eye[0, :, s:e] = torch.eye(e - s, dtype=base.weight.dtype, device=base.weight.device)
        y = layer(module, eye)[0]  # (e - s, d_out): row j = W[:, s + j] + b0
        if base.bias is not None:
            y = y - base.bias
        w[:, s:e] = y.T
    return w


def merged_state(lm: nn.Module, fixed, adapted: dict | None = None) -> dict[str, torch.Tensor]:
    """The backbone's state dict in its own names, every adapted layer (``adapted``, default: all found)
    merged for ``fixed``'s user."""
    adapted = _adapted(lm) if adapted is None else adapted
    if not adapted:
        raise CoplError("the run's backbone holds no adapters: nothing to merge")
    state = {k: v for k, v in lm.state_dict().items() if not any(k.startswith(n + ".") for n in adapted)}
    for name, (module, base) in adapted.items():
        state[f"{name}.weight"] = merged_weight(module, base, fixed.layer)
        if base.bias is not None:
            state[f"{name}.bias"] = base.bias.detach()
    return state


def _classifier(config) -> str:
    from transformers.models.auto.modeling_auto import MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES as NAMES

    name = NAMES.get(config.model_type)
    if name is None:
        raise CoplError(f"transformers has no sequence-classification model for {config.model_type!r}: an hf export "
                        f"needs one (serve the run instead, or export --format peft)")
    return name


def export_hf(run: str | Path, out: str | Path, *, user: str | None = None, group: str | None = None,
              force: bool = False) -> dict:
    """Write ``user``'s (or ``group``'s) reward of RUN as a standard ``AutoModelForSequenceClassification``
    folder at OUT; returns a summary."""
    import transformers
    from huggingface_hub import save_torch_state_dict

    from coplctl.models.reward import load_method
    from coplctl.serving.export import backbone_info

    run, out = Path(run), Path(out)
    refuse_overlap(out, {"the run": run})
    method = load_method(run)
    mode = getattr(method.config, "mode", None)
    if mode != "lora":
        raise CoplError(f"{run} is a {mode or 'non-neural'}-mode {method.registry_name} run: its reward is a trained "
                        f"MLP over pooled backbone features, which no standard transformers model computes; an hf "
                        f"export needs a lora-mode run (coplctl train ... --mode lora), or serve this one (coplctl serve)")
    if method.backbone.kind != "decoder":
        raise CoplError(f"{run}: backbone {method.config.backbone} is an encoder, which coplctl mean-pools; transformers' "
                        f"classifiers for it read the first token, so no standard model gives this run's rewards: "
                        f"serve the run instead (coplctl serve)")
    if user is None and group is None and method.personalized:
        raise CoplError(f"{method.registry_name} rewards each user differently: name whose reward to export "
                        f"(--user U{', or --group G' if method.registry_name == 'oracle' else ''})")
    lm = method.net.encoder.lm
    cls_name = _classifier(lm.config)
    method.net.eval()
    fixed = method.fixed_user(user=user, group=group)
    prefix = getattr(transformers, cls_name).base_model_prefix
    dtype = next(lm.parameters()).dtype
    adapted = _adapted(lm)
    state = {f"{prefix}.{k}": v.contiguous() for k, v in merged_state(lm, fixed, adapted).items()}
    state["score.weight"] = fixed.head.weight.detach().to(dtype).contiguous()
    offset = fixed.head.bias.item() if fixed.head.bias is not None else 0.0
    info = backbone_info(method)
    tok = method.backbone.tokenizer
    config = lm.config.__class__.from_dict(lm.config.to_dict())
    config.architectures, config.num_labels = [cls_name], 1
    config.id2label, config.label2id = {0: "reward"}, {"reward": 0}
    config.pad_token_id = tok.pad_token_id
    config.coplctl = {"method": method.registry_name, "run": str(run), "reward_of": fixed.label, "user": user,
                      "group": group, "reward_offset": offset, "base_model": info["base_model_name_or_path"],
                      "max_length": method.backbone.max_length,
                      "text_format": method.backbone.text_format, **fixed.details}
    with atomic_dir(out, overwrite=force, marker="config.json", kind="hf export") as tmp:
        save_torch_state_dict(state, str(tmp), max_shard_size="5GB")
        config.save_pretrained(tmp)
        _save_tokenizer(tok, tmp, method.backbone.max_length, method.backbone.text_format)
        from coplctl.serving.model_card import hf_card

        (tmp / "README.md").write_text(hf_card(config.coplctl, info, run))
    return {"run": str(run), "out": str(out), "format": "hf", "method": method.registry_name,
            "reward_of": fixed.label, "architecture": cls_name, "merged_layers": len(adapted),
            "reward_offset": offset, "backbone": info}


def _save_tokenizer(tok, directory: Path, max_length: int, text_format: str) -> None:
    """The run's tokenizer with its text format as chat template, its length limit and left truncation (the
    start of a long text goes first, as coplctl cuts the prompt's start first)."""
    from transformers import AutoTokenizer

    tok.save_pretrained(directory)
    saved = AutoTokenizer.from_pretrained(directory)
    saved.chat_template, saved.model_max_length, saved.truncation_side = chat_template(text_format), max_length, "left"
    saved.padding_side = "right"
    if saved.pad_token is None:
        saved.pad_token = tok.pad_token
    saved.save_pretrained(directory)

