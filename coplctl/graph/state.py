"""What a GCF training run holds between epochs, and its checkpoint: one safetensors file (tensors plus
JSON metadata, never unpickled) from which an interrupted run resumes exactly."""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from coplctl.core.checkpoint import load_checkpoint, save_checkpoint
from coplctl.core.errors import CoplError
from coplctl.graph.model import GCF

CHECKPOINT = "checkpoint.safetensors"  # tensors + JSON metadata: never unpickled
OLD_CHECKPOINT = "checkpoint.pt"  # written by coplctl before 0.2 (pickle): never loaded


@dataclass
class TrainState:
    """Progress: epochs done, the best validation accuracy so far and its weights, timings, history."""

    epoch: int = 0
    best_valid: float = -1.0
    best_epoch: int = -1
    best_state: dict | None = None
    since_best: int = 0
    seconds: float = 0.0
    seconds_to_best: float = 0.0
    history: list[dict] = field(default_factory=list)

    def record(self, metrics: dict, seconds: float, model: torch.nn.Module, has_valid: bool) -> None:
        """End an epoch that took ``seconds``: keep its metrics, and the model's weights when it is the best
        so far (without validation pairs, the last epoch is the best)."""
        self.seconds += seconds
        metrics["seconds"] = round(self.seconds, 3)
        self.history.append(metrics)
        self.epoch += 1
        improved = metrics["valid_accuracy"] > self.best_valid if has_valid else True
        if improved:
            self.best_valid, self.best_epoch = metrics["valid_accuracy"], self.epoch
            self.best_state = None  # the old copy goes before the new one is made (a million users: 0.8 GB)
            self.best_state = copy.deepcopy({k: v.cpu() for k, v in model.state_dict().items()})
            self.seconds_to_best, self.since_best = self.seconds, 0
        else:
            self.since_best += 1


@dataclass
class TrainingRun:
    """Everything a checkpoint holds: model, optimiser, schedule, the run's random stream and progress.

    ``config`` (the GCF options as a dict) and ``seed`` identify the run: a checkpoint of another
    configuration or seed is refused, not resumed.
    """

    model: GCF
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    generator: torch.Generator
    config: dict
    seed: int
    path: Path  # the checkpoint file
    state: TrainState = field(default_factory=TrainState)
    net: torch.nn.Module | None = None
    """What training steps call: the model, or its DDP wrapper across processes (:mod:`coplctl.graph.parallel`)."""
    procs: Any = None
    """The processes training runs on (:class:`coplctl.graph.parallel.Processes`); the main one writes."""

    def __post_init__(self):
        self.net = self.net if self.net is not None else self.model

    def save(self) -> None:
        """Write the checkpoint (atomically: an interrupted write leaves the previous one); on the main
        process only, when several train."""
        if self.procs is not None and not self.procs.main:
            return
        save_checkpoint(self.path, {"config": self.config, "seed": self.seed, "model": self.model.state_dict(),
                                    "optimizer": self.optimizer.state_dict(),
                                    "scheduler": self.scheduler.state_dict(),
                                    "generator": self.generator.get_state(),
                                    # not dataclasses.asdict: it would deep-copy the best weights first
                                    "state": {f.name: getattr(self.state, f.name) for f in fields(self.state)}})

    def resume(self) -> bool:
        """Load the checkpoint if there is one (True); a pickle left by an older coplctl is ignored, with a
        warning. A checkpoint of another run, or one that does not fit, is one CoplError."""
        old = self.path.with_name(OLD_CHECKPOINT)
        if old.exists():
            warnings.warn(f"{old} is ignored: a pickle (written by coplctl before 0.2) is never loaded"
                          + ("" if self.path.exists() else "; training starts from the beginning"))
        if not self.path.exists():
            return False
        saved = load_checkpoint(self.path)
        out = self.path.parent
        try:
            if saved["config"] != self.config or saved["seed"] != self.seed:
                raise CoplError(f"{out} holds a checkpoint of a different configuration or seed; "
                                f"pass --force to start over")
            self.model.load_state_dict(saved["model"])
            self.optimizer.load_state_dict(saved["optimizer"])
            self.scheduler.load_state_dict(saved["scheduler"])
            self.generator.set_state(saved["generator"])
            self.state = TrainState(**saved["state"])
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            raise CoplError(f"{self.path} does not fit this run ({type(e).__name__}: {str(e).strip()[:200]}); "
                            f"delete it or pass --force to start over") from None
        return True
