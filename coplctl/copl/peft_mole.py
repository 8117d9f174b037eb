"""CoPL's mixture of LoRA experts as a peft custom LoRA module (``LoraConfig._register_custom_module``).

An exported CoPL run (``coplctl export --format peft``) is loaded into a plain transformers model
with peft's own machinery: each target ``nn.Linear`` becomes a :class:`peft.tuners.lora.Linear` whose
standard ``lora_A`` / ``lora_B`` are CoPL's shared expert (same scaling, alpha / rank), plus
``lora_mole``, the gate and the M experts (:class:`PeftExperts`), computed by the same code as
:class:`coplctl.copl.mole.MoLELinear`. As there, the user embedding reaches the layers as the forward
argument ``routing`` (:func:`coplctl.copl.mole.mole_routing`); a layer called without it refuses.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from coplctl.copl.mole import ExpertGate, Routing, make_gate

#: the ``peft_type`` of a CoPL export: peft knows no such type, so ``PeftModel.from_pretrained`` stops with
#: ``KeyError: '<this text>'``, which names the loader to use (a plain LoRA load would drop the experts);
#: :func:`mole_lora_config` turns it back into a LoRA config with the custom module registered
MOLE_PEFT_TYPE = "COPL_MOLE: CoPL's mixture of LoRA experts; load it with coplctl.serving.export.load_peft"
OLD_MOLE_PEFT_TYPES = ("COPL_MOLE",)  # exports written before the type named its loader


class PeftExperts(ExpertGate, nn.Module):
    """The gate and experts of one exported MoLE layer (parameter names as in ``MoLELinear``)."""

    def __init__(self, d_in: int, d_out: int, *, user_dim: int, experts: int, rank: int, alpha: float,
                 gate_hidden: int, temperature: float, top_k: int, name: str = ""):
        super().__init__()
        self.name, self.scale, self.temperature, self.top_k = name, alpha / rank, temperature, top_k
        self.expert_a = nn.Parameter(torch.empty(experts, rank, d_in))  # initialised as MoLELinear's
        self.expert_b = nn.Parameter(torch.zeros(experts, d_out, rank))
        for a in self.expert_a.data:
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        self.gate = make_gate(user_dim, gate_hidden, experts)

    def forward(self, h, routing: Routing):
        return self.mix(h, routing)


def mole_layer_class(spec: dict) -> type:
    """A peft LoRA layer class with CoPL's experts of ``spec`` (user_dim, experts, rank, alpha, gate_hidden,
    temperature, top_k): the value to register for ``nn.Linear``."""
    from peft.tuners.lora.layer import Linear

    class MoLELoraLinear(Linear):
        adapter_layer_names = Linear.adapter_layer_names + ("lora_mole",)

        def update_layer(self, adapter_name: str, *args, **kwargs):
            if "lora_mole" not in self._modules:  # peft calls this from __init__, before any attribute of ours
                self.lora_mole = nn.ModuleDict()
            self.lora_mole[adapter_name] = PeftExperts(self.in_features, self.out_features, **spec)
            return super().update_layer(adapter_name, *args, **kwargs)  # also moves it to the base's device

        def forward(self, x, *args, routing: Routing | None = None, **kwargs):
            if routing is None:
                raise RuntimeError("a CoPL MoLE layer was called without a user: wrap the call in "
                                   "coplctl.copl.mole.mole_routing(mole_layers(model), Routing(user_embeddings, rows))")
            out = super().forward(x, *args, **kwargs)  # base layer + shared expert (standard LoRA)
            for name in self.active_adapters:
                if name in self.lora_mole and not self.disable_adapters:
                    out = out + self.lora_mole[name](self.lora_dropout[name](x), routing).to(out.dtype)
            return out

    return MoLELoraLinear


def mole_lora_config(saved: dict, spec: dict):
    """A ``LoraConfig`` from an exported MoLE ``adapter_config.json`` (as a dict), with the custom module."""
    from peft import LoraConfig

    fields = {k: v for k, v in saved.items() if k != "peft_type"}
    config = LoraConfig(**{k: v for k, v in fields.items() if k in LoraConfig.__dataclass_fields__})
    config._register_custom_module({nn.Linear: mole_layer_class(spec)})
    return config


def mole_layers(model: nn.Module) -> list[nn.Module]:
    """The MoLE layers of a model loaded from an exported CoPL adapter, for :func:`coplctl.copl.mole.mole_routing`."""
    return [m for m in model.modules() if hasattr(m, "lora_mole")]


#: a MoLE layer's tensor (run name suffix) → its name in the peft layer (shared expert = standard LoRA)
_PEFT_NAMES = {"shared_a.weight": "lora_A.default.weight", "shared_b.weight": "lora_B.default.weight",
               "expert_a": "lora_mole.default.expert_a", "expert_b": "lora_mole.default.expert_b"}


def mole_adapters(method, tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict]:
    """A lora-mode CoPL run's tensors inside the backbone (``base_model.model.<module path>`` names) as this
    custom module's (gate, experts; the shared expert as standard LoRA, zeros without one), and the
    module's settings (for :func:`mole_lora_config`)."""
    from coplctl.core.errors import CoplError

    adapters = {}
    for path, value in tensors.items():
        head, gate, tail = path.rpartition(".gate.")
        if gate:
            adapters[f"{head}.lora_mole.default.gate.{tail}"] = value
            continue
        renamed = next((path[: -len(old)] + new for old, new in _PEFT_NAMES.items() if path.endswith("." + old)), None)
        if renamed is None:
            raise CoplError(f"cannot export tensor {path}: not part of a MoLE layer")
        adapters[renamed] = value
    c, layers = method.config, method.net.layers
    spec = {"user_dim": int(method.net.user_table.shape[1]), "experts": c.experts, "rank": c.rank,
            "alpha": layers[0].scale * c.rank, "gate_hidden": c.gate_hidden, "temperature": c.gate_temperature,
            "top_k": c.top_k}
    if not c.shared_expert:  # the peft layer always has the standard LoRA pair: a zero one adds nothing
        for layer in layers:
            base = "base_model.model." + layer.name.removeprefix("lm.")
            adapters[f"{base}.lora_A.default.weight"] = torch.zeros(c.rank, layer.base.in_features)
            adapters[f"{base}.lora_B.default.weight"] = torch.zeros(layer.base.out_features, c.rank)
    return adapters, spec


def mole_export_config(method, spec: dict):
    """The ``LoraConfig`` an exported CoPL run's ``adapter_config.json`` is written from (its ``peft_type``
    then becomes :data:`MOLE_PEFT_TYPE`)."""
    from peft import LoraConfig

    targets = [layer.name.rsplit(".", 1)[-1] for layer in method.net.layers]
    return LoraConfig(r=method.config.rank, lora_alpha=spec["alpha"], target_modules=targets)


def load_mole(model: nn.Module, saved: dict, spec: dict, weights) -> nn.Module:
    """``model`` (the base transformers model) with an exported CoPL adapter: built from its LoRA config
    (``saved``, the adapter_config.json) with this custom module registered, weights loaded with peft's
    ``set_peft_model_state_dict``; any tensor not taken is an error, never a silent drop."""
    from peft import PeftModel, set_peft_model_state_dict
    from safetensors.torch import load_file

    from coplctl.core.errors import CoplError

    peft_model = PeftModel(model, mole_lora_config(saved, spec))
    result = set_peft_model_state_dict(peft_model, load_file(str(weights)))
    missing = [k for k in result.missing_keys if "lora_" in k]
    if result.unexpected_keys or missing:
        raise CoplError(f"{weights} does not match its MoLE layers (unexpected {result.unexpected_keys[:3]}, "
                        f"missing {missing[:3]})")
    return peft_model.eval()
