"""What a training run is configured with and where it runs: the settings every neural method shares
(:class:`TrainConfig`, paper Appendix C.2 defaults), and accelerate's process state, accelerator, mixed
precision and gradient accumulation derived from them (or from ``accelerate launch``)."""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Annotated

import torch
from torch import nn

from coplctl.core.config import AT_LEAST_1, FRACTION, NON_NEGATIVE, OneOf, check_fields
from coplctl.core.errors import CoplError
from coplctl.models.encoders import MODES

#: Defaults that depend on the mode: the paper's LLM settings for ``lora``, a small trunk's for ``frozen``.
MODE_DEFAULTS = {
    "lora": {"lr": 5e-5, "epochs": 1, "batch_size": 32},
    "frozen": {"lr": 1e-3, "epochs": 8, "batch_size": 128},
}


@dataclass
class TrainConfig:
    """Settings shared by every neural method. ``None`` means the mode's default (``MODE_DEFAULTS``)."""

    mode: Annotated[str, OneOf(*MODES)] = "frozen"
    """``frozen`` (cached backbone features + trained trunk; CPU-friendly) or ``lora`` (adapters in the LM)."""
    backbone: str = "minilm"
    """Embedded name (minilm, gemma-3-270m), gemma-2b-it / gemma-7b-it, or any hub id / local path."""
    max_length: Annotated[int, AT_LEAST_1] | None = None
    """Tokens per formatted text (prompt + response), cut from the start of the prompt first; None: the model's
    own limit (its ``max_seq_length``: 256 for minilm; else at most 512)."""
    text_format: str | None = None
    """How the backbone reads a (prompt, response) pair, with ``{prompt}`` and ``{response}``; None: the training
    dataset's (its meta.json ``text_format``, else ``Human: {prompt}\\n\\nAssistant: {response}``). The run
    records the format it used, and scores, serves and exports with it."""
    lr: Annotated[float, NON_NEGATIVE] | None = None
    """AdamW learning rate (paper: 5e-5 for CoPL; baselines searched in 1e-4, 5e-5, 1e-5, 5e-6)."""
    epochs: Annotated[int, AT_LEAST_1] | None = None
    """Passes over the training pairs (not reported in the paper)."""
    batch_size: Annotated[int, AT_LEAST_1] | None = None
    """Pairs per step and process (paper: 32 per GPU for gemma-2b-it, 16 for gemma-7b-it)."""
    warmup_ratio: Annotated[float, FRACTION] = 0.03
    """Linear warmup share of the steps before the cosine decay (paper: 0.03)."""
    weight_decay: Annotated[float, NON_NEGATIVE] = 0.0
    """AdamW weight decay."""
    grad_clip: Annotated[float, NON_NEGATIVE] = 1.0
    """Gradient-norm clipping (0 = off)."""
    trunk_width: Annotated[int, AT_LEAST_1] = 256
    """Width of the ``frozen``-mode trunk MLP."""
    trunk_layers: Annotated[int, AT_LEAST_1] = 2
    """Layers of the ``frozen``-mode trunk MLP."""
    eval_pairs: Annotated[int, AT_LEAST_1] = 2000
    """Validation pairs scored after each epoch to keep the best epoch (a fixed random subset)."""
    dtype: Annotated[str, OneOf("auto", "float32", "bfloat16", "float16")] = "auto"
    """Backbone weights: ``auto`` (bf16 on GPU, fp32 on CPU, as the paper trains in bf16), ``float32``,
    ``bfloat16``; trained parameters (adapters, gates, heads) stay fp32."""
    feature_precision: Annotated[str, OneOf("auto", "float32", "bfloat16")] = "auto"
    """Frozen features: ``auto`` (bf16 autocast on GPUs and on CPUs with native bf16, else fp32), ``float32``,
    ``bfloat16`` (autocast; fp32 weights)."""
    mixed_precision: Annotated[str, OneOf("auto", "no", "bf16", "fp16")] = "auto"
    """``auto``: the launcher's (``accelerate launch --mixed_precision``) when set, else autocast to the
    backbone's dtype when it is not fp32; ``no``; ``bf16``; ``fp16`` (with a gradient scaler)."""
    grad_accum: Annotated[int, AT_LEAST_1] | None = None
    """Batches whose gradients are summed before each optimizer step (None: 1, or the accumulation steps a DeepSpeed
    launch passes on; accelerate forwards ``--gradient_accumulation_steps`` only with DeepSpeed). The effective
    batch is ``batch_size × grad_accum × processes``."""
    device: Annotated[str, OneOf("auto", "cpu", "cuda")] = "auto"
    """``auto``, ``cpu`` or ``cuda``; under ``accelerate launch`` the launcher decides."""
    gradient_checkpointing: bool = False
    """``lora`` mode: recompute the LM's activations in the backward pass instead of keeping them (much less
    memory for about one more forward pass a step, the same numbers; transformers' non-reentrant
    checkpointing). Refused in ``frozen`` mode, which runs no LM while training."""
    checkpoint_every: Annotated[int, NON_NEGATIVE] = 0
    """When training has a work directory (``coplctl train``, benchmarks): save the training state every
    this many optimizer steps, besides each epoch's end (0 = at epoch ends only), so that a killed run
    resumes there when started again (the paper's single lora-mode epoch has no other boundary)."""

    def __post_init__(self):
        check_fields(self, type(self).__name__.removesuffix("Config") or "method")  # types, ranges, choices
        if self.gradient_checkpointing and self.mode != "lora":
            raise CoplError(f"gradient_checkpointing needs mode lora: {self.mode} mode trains small nets on cached "
                            f"features and runs no language model while training")

    def get(self, key: str):
        value = getattr(self, key)
        return MODE_DEFAULTS[self.mode][key] if value is None else value


def use_cpu(cfg: TrainConfig) -> bool:
    return cfg.device == "cpu" or not torch.cuda.is_available()


def distributed_state(cfg: TrainConfig):
    """accelerate's process state; the first call decides the backend (gloo across CPU processes)."""
    from accelerate import PartialState

    state = PartialState(cpu=use_cpu(cfg))
    _warn_single_process_launch(state.num_processes)
    return state


_WARNED: list[bool] = []


def _warn_single_process_launch(processes: int) -> None:
    """`accelerate launch --cpu --num_processes N` runs one process (accelerate's --cpu picks its simple launcher,
    which sets MASTER_ADDR for N > 1 but starts one process): say so once rather than train on one silently."""
    if _WARNED or processes > 1 or "WORLD_SIZE" in os.environ:
        return
    if os.environ.get("ACCELERATE_USE_CPU", "").lower() == "true" and "MASTER_ADDR" in os.environ:
        import warnings

        _WARNED.append(True)
        warnings.warn("this launch asked accelerate for several processes, but `accelerate launch --cpu` runs one: "
                      "on CPUs, launch with `--multi_gpu --num_processes N` (gloo) instead; training on 1 process",
                      stacklevel=3)


def make_accelerator(cfg: TrainConfig, *, find_unused: bool = False, log_with: str = "none", log_dir=None):
    """The Accelerator of one training run. ``find_unused``: some trained parameters may get no gradient in
    a step (a net says so with a true ``unused_parameters`` attribute), so DDP must look for them; asking
    for it otherwise costs a graph walk per step and makes torch warn. ``log_with``: a tracker
    (:mod:`coplctl.models.tracking`) writing under ``log_dir``."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, GradientAccumulationPlugin

    # Precision (`autocast` below) and gradient accumulation (`train_pairs`) are done here, from the
    # config or the launcher's settings (:func:`launcher_precision`, :func:`grad_accum_steps`), not by
    # accelerate, whose process-wide state cannot change them between two methods trained in one process
    # (a benchmark); the plugin stops it from also dividing the loss by the launcher's accumulation steps.
    # MoLE's top-k routing needs no find_unused: it gathers experts by a one-hot product, so every expert
    # is in the graph (with a zero gradient when no sample picked it).
    tracking = {} if log_with == "none" else {"log_with": log_with, "project_dir": str(log_dir)}
    return Accelerator(mixed_precision="no", cpu=use_cpu(cfg),
                       gradient_accumulation_plugin=GradientAccumulationPlugin(num_steps=1),
                       kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=find_unused)],
                       **tracking)


def launcher_precision(mode: str) -> str:
    """``mode`` with ``auto`` resolved to ``accelerate launch --mixed_precision`` when the launcher set one."""
    launched = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    return launched if mode == "auto" and launched in ("bf16", "fp16") else mode


def grad_accum_steps(cfg: TrainConfig) -> int:
    """``cfg.grad_accum``, else ``accelerate launch --gradient_accumulation_steps``, else 1."""
    if cfg.grad_accum is not None:
        return cfg.grad_accum
    launched = os.environ.get("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "1")
    return int(launched) if launched.isdigit() and int(launched) > 0 else 1


def autocast(net: nn.Module, mode: str = "auto"):
    """Autocast for a low-precision backbone: ``auto`` follows the launcher's mixed precision, else its
    weights' dtype; ``bf16`` / ``fp16`` force it, ``no`` disables it. Training and scoring use the same rule."""
    mode = launcher_precision(mode)
    if mode == "no":
        return contextlib.nullcontext()
    low = next((p for p in net.parameters() if p.is_floating_point() and p.dtype in (torch.bfloat16, torch.float16)),
               None)
    forced = {"bf16": torch.bfloat16, "fp16": torch.float16}
    dtype = forced[mode] if mode in forced else (low.dtype if low is not None else None)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(next(net.parameters()).device.type, dtype=dtype)


def fp32_trainable(net: nn.Module) -> nn.Module:
    """Keep every trained parameter in fp32 (a low-precision backbone's adapters would otherwise follow it)."""
    for p in net.parameters():
        if p.requires_grad and p.is_floating_point() and p.dtype != torch.float32:
            p.data = p.data.float()
    return net
