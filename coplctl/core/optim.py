"""Training pieces shared by the GCF trainer and the reward-model trainer: the Bradley-Terry loss,
the warmup + cosine schedule and device resolution. torch is imported inside the functions, so
importing this module (e.g. through ``coplctl.models.reward``) stays cheap."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from coplctl.core.errors import CoplError

if TYPE_CHECKING:
    import torch


def bt_loss(chosen: "torch.Tensor", rejected: "torch.Tensor") -> "torch.Tensor":
    """Bradley-Terry negative log-likelihood, −log σ(r⁺ − r⁻), averaged (numerically stable)."""
    import torch.nn.functional as F

    return -F.logsigmoid(chosen - rejected).mean()


def cosine_with_warmup(optimizer, total_steps: int, warmup_ratio: float):
    """Linear warmup then cosine decay to zero, as a LambdaLR."""
    import torch

    warmup = int(total_steps * warmup_ratio)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def resolve_device(device: str | None = "auto") -> "torch.device":
    """``auto`` (a GPU when there is one) or a torch device name; an unknown or absent device is a CoplError."""
    import torch

    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise CoplError(f"device {device!r}: not a device name (auto, cpu, cuda, cuda:1 ...)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise CoplError(f"device {device!r}: no CUDA device is available here (use auto or cpu)")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise CoplError(f"device {device!r}: only {torch.cuda.device_count()} CUDA device(s) here")
    return dev
