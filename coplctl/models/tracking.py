"""Optional experiment trackers for reward-model training (``coplctl train --report-to``), through
accelerate's tracking API (``Accelerator(log_with=...)``, ``init_trackers``, ``log``).

What is logged: per optimizer step ``train/loss`` (the step's mean batch loss) and ``lr``; per epoch
``train/epoch_loss``, ``valid/accuracy`` and ``epoch`` (the values of the metrics' history), at the step
count reached. Local files (TensorBoard event files, wandb's run directory) go to ``work_dir/logs`` while
training runs, so that a resumed run adds to them (its own event file; the steps between the last checkpoint
and the interruption are logged twice); ``coplctl train`` moves them to ``RUN/logs`` at the end.
"""

from __future__ import annotations

import dataclasses
import json
from importlib.util import find_spec

from coplctl.core.errors import CoplError

#: ``--report-to`` choices and the packages each needs (any one of them).
TRACKERS = {"none": (), "tensorboard": ("tensorboard", "tensorboardX"), "wandb": ("wandb",)}
#: The tracker project (wandb's project; TensorBoard's folder under the logging directory).
PROJECT = "coplctl"


def check_tracker(name: str) -> None:
    """One clear CoplError for an unknown tracker or one whose package is missing (call before training)."""
    if name not in TRACKERS:
        raise CoplError(f"unknown tracker {name!r}: use one of {', '.join(TRACKERS)}")
    packages = TRACKERS[name]
    if packages and not any(find_spec(p) is not None for p in packages):
        raise CoplError(f"--report-to {name} needs the {packages[0]} package: pip install 'coplctl[{name}]' "
                        f"(or pip install {packages[0]})")


def tracker_config(cfg, **extra) -> dict:
    """The run's settings as a flat mapping of numbers, text and booleans (what trackers store as hparams)."""
    flat = {}
    for key, value in {**dataclasses.asdict(cfg), **extra}.items():
        flat[key] = value if isinstance(value, (bool, int, float, str)) else json.dumps(value, default=str)
    return flat


def init_kwargs(name: str, log_dir, label: str) -> dict:
    """Per-tracker ``init_trackers`` options: wandb writes its run directory under ``log_dir``."""
    return {"wandb": {"dir": str(log_dir), "name": label}} if name == "wandb" else {}


def finish(acc) -> None:
    """Close the trackers. Not ``Accelerator.end_training``: it also destroys the process group, which the
    work after training (evaluation, a benchmark's next method) still needs under several processes."""
    for tracker in acc.trackers:
        tracker.finish()
    acc.trackers = []
