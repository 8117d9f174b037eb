"""Resumable reward-model training: what :func:`coplctl.models.trainer.train_pairs` holds between two optimizer
steps, saved in the run's work directory and restored exactly (bit-identical on CPU).

Why not accelerate's ``Accelerator.save_state`` / ``load_state``: it writes the optimizer, scheduler and
scaler states and every process's random states with ``torch.save`` (``optimizer.bin``, ``scheduler.bin``,
``scaler.pt``, ``random_states_0.pkl``: pickles) and reads them back with ``torch.load``; coplctl never
unpickles a file, not even through ``weights_only=True``'s allowlisting unpickler (which accelerate widens
with numpy's globals), so that a crafted work directory can at worst be rejected, never run code. It would
also save the whole model, frozen backbone included (gigabytes for gemma-7b), where only the trained
parameters change. Everything therefore goes through :mod:`coplctl.core.checkpoint`: one safetensors file,
tensors plus JSON metadata.

A fingerprint of the training data, the inputs, the starting weights, the config and the seed guards the
file: a checkpoint of other work is ignored (training starts over and overwrites it), never resumed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from coplctl.core.checkpoint import load_checkpoint, save_checkpoint
from coplctl.core.errors import CoplError

#: The training state in ``work_dir`` (one file; rewritten atomically at each checkpoint).
STATE_FILE = "train-state.safetensors"
#: Config fields that do not change the numbers a run computes, so they may differ on resume (a run that
#: ran out of memory resumes with gradient checkpointing on).
NOT_FINGERPRINTED = ("checkpoint_every", "gradient_checkpointing")


@dataclass
class Progress:
    """Where training stands: epochs and batches done, running loss, history and the best epoch so far."""

    epoch: int = 0
    """Epochs done."""
    batch: int = 0
    """Batches of epoch ``epoch + 1`` already trained (0 at an epoch boundary)."""
    steps: int = 0
    """Optimizer steps done."""
    total: float = 0.0
    n: int = 0
    """Sum and count of the batch losses of the epoch under way."""
    history: list = field(default_factory=list)
    best: dict | None = None
    best_acc: float = -1.0
    best_epoch: int = 0
    resumed_from: dict | None = None
    """``{"epoch", "batch", "steps"}`` where this run picked up an interrupted one; None when it started fresh."""


def _update(digest, t: torch.Tensor) -> None:
    t = t.detach().cpu().contiguous()
    digest.update(f"{t.dtype}{tuple(t.shape)}".encode())
    digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")


def fingerprint(start: dict[str, torch.Tensor], inputs, train: tuple, valid: tuple, cfg, **extra) -> str:
    """SHA-256 of what decides a run's numbers: the starting trained state (``start``), the response inputs,
    the training and validation tensors, the config (but :data:`NOT_FINGERPRINTED`) and ``extra``
    (seed, processes, accumulation ...)."""
    digest = hashlib.sha256()
    for name in sorted(start):
        digest.update(name.encode())
        _update(digest, start[name])
    if inputs.features is not None:
        _update(digest, inputs.features)
    for tokens in inputs.tokens or ():
        _update(digest, tokens)
    for t in (*train, *valid):
        _update(digest, t)
    settings = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in NOT_FINGERPRINTED}
    digest.update(json.dumps({"config": settings, **extra}, sort_keys=True, default=str).encode())
    return digest.hexdigest()


def _rng_state() -> dict:
    import numpy as np

    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, cached = random.getstate()  # (625 ints < 2**32 each as tensors: cheap to write)
    state = {"torch": torch.get_rng_state(), "python": [version, torch.tensor(internal, dtype=torch.int64), cached],
             "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict) -> None:
    """Set torch's (CPU and CUDA), Python's and numpy's global random streams to a saved :func:`_rng_state`."""
    import numpy as np

    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal.tolist()), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _extra_states(model: nn.Module) -> dict:
    """Non-tensor state of modules that keep some (torch's ``get_extra_state``, e.g. VPL's annealing step)."""
    return {name: m.get_extra_state() for name, m in model.named_modules()
            if type(m).get_extra_state is not nn.Module.get_extra_state}


def save(path: Path, stamp: str, progress: Progress, *, weights: dict, model: nn.Module, optimizer, scheduler,
         scaler, loader_rng: torch.Tensor) -> None:
    """Write the state after an optimizer step: the trained ``weights`` of ``model``, the rest of its state,
    the optimizer's, schedule's and scaler's, and ``loader_rng``, the shuffling generator's state at the
    start of the epoch under way (the start of the next one at an epoch boundary)."""
    save_checkpoint(path, {
        "fingerprint": stamp, "progress": dataclasses.asdict(progress), "model": weights,
        "extra_state": _extra_states(model), "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict() if scaler is not None else None,
        "loader_rng": loader_rng, "rng": _rng_state()})


def load(path: Path, stamp: str, *, restore_weights: Callable[[dict], None], model: nn.Module, optimizer,
         scheduler, scaler, generator: torch.Generator) -> tuple[Progress, dict] | None:
    """Restore a checkpoint of this very run into the objects given (the weights through ``restore_weights``);
    returns its progress and the global random states to set where it was taken (see :func:`restore_rng`),
    or None (no checkpoint, or one of other work, which is left to be overwritten)."""
    if not path.exists():
        return None
    saved = load_checkpoint(path)
    if not isinstance(saved, dict) or saved.get("fingerprint") != stamp:
        return None
    try:
        restore_weights(saved["model"])
        modules = dict(model.named_modules())
        for name, value in saved["extra_state"].items():
            modules[name].set_extra_state(value)
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        if scaler is not None:
            scaler.load_state_dict(saved["scaler"])
        generator.set_state(saved["loader_rng"])
        progress = Progress(**saved["progress"])
    except (CoplError, KeyError, TypeError, ValueError, RuntimeError) as e:
        raise CoplError(f"{path} does not fit this run ({type(e).__name__}: {str(e).strip()[:200]}); delete it "
                        f"(or pass --force) to start over") from None
    progress.resumed_from = {"epoch": progress.epoch, "batch": progress.batch, "steps": progress.steps}
    return progress, saved["rng"]
