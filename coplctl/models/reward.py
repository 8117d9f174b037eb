"""The interface every reward method implements, and the Bradley-Terry pieces they share.

A method learns a scalar reward f(user, response) from pairwise annotations (paper Eq. 1):
P(a ≻ b | u) = σ(f(u, a) − f(u, b)). Accuracy on a pair = 1 if f(u, chosen) > f(u, rejected).
"""

from __future__ import annotations

import dataclasses
import json
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import pandas as pd

from coplctl.core.atomic import atomic_dir
from coplctl.core.errors import CoplError
from coplctl.core.optim import bt_loss

if TYPE_CHECKING:
    import torch

    from coplctl.core.tables import ReportPart
    from coplctl.data.dataset import PreferenceDataset

__all__ = ["METHOD_FILE", "ExperimentContext", "RewardMethod", "bt_loss", "load_method", "make_config", "pair_accuracy", "pair_scores"]

METHOD_FILE = "method.json"


@dataclass(frozen=True)
class ExperimentContext:
    """What a method's extra experiments (:meth:`RewardMethod.experiments`) get from a benchmark."""

    data: "PreferenceDataset"
    """The benchmark's dataset."""
    options: Any
    """The method's :attr:`RewardMethod.Experiments`, as the spec's ``experiments.<method>`` set them (its
    defaults where the spec has no such section)."""
    settings: dict
    """The job's resolved config, as a mapping (what the method was built from)."""
    seed: int
    run_dir: Path
    """Where the trained method was saved."""
    out_dir: Path
    """The benchmark's directory (``OUT/SPEC``): figures go under ``figures/``."""
    main_process: bool = True
    """False on the other processes of a distributed run: compute, but write no file."""
    stage: Callable[[str], None] = lambda name: None
    """Report progress: the experiment now running."""


class RewardMethod(ABC):
    """A personalized reward model: fit on seen users, adapt to unseen users, score (user, response).

    Subclasses set ``Config`` to a dataclass whose fields carry the paper's defaults, register
    themselves with ``@register_method("name")`` and implement the abstract methods. ``responses``
    arguments are DataFrames with the columns of ``responses.parquet`` (``response_id``, ``prompt``,
    ``text``), one row per score requested.
    """

    Config: ClassVar[type] = None  # type: ignore[assignment]
    registry_name: ClassVar[str] = ""
    Experiments: ClassVar[type | None] = None
    """The method's own benchmark experiments (e.g. CoPL's Tables 4-6): a dataclass whose fields a spec sets
    under ``experiments: {<method>: {...}}``, checked against it like every spec section; None: the
    method has none. :meth:`experiments` gets the checked instance (or its defaults) as ``ctx.options``."""

    def __init__(self, config: Any = None, **overrides: Any):
        if config is None:
            try:
                config = self.Config(**overrides)
            except TypeError as e:
                raise CoplError(f"bad option for method {self.registry_name or type(self).__name__}: {e}") from None
        elif overrides:
            config = dataclasses.replace(config, **overrides)
        self.config = config

    @abstractmethod
    def fit(self, data: "PreferenceDataset", backbone: Any = None, *, seed: int = 0,
            work_dir: Path | None = None, progress: bool = True) -> dict:
        """Train on the seen users' ``train`` pairs (``valid`` pairs for model selection); return metrics.

        ``backbone`` is a loaded :class:`coplctl.models.backbone.Backbone` to share between methods (None:
        load the configured one). ``work_dir`` keeps resumable intermediate work (e.g. CoPL's GCF).
        ``progress``: show training progress (a benchmark passes False and shows its own).
        """

    @abstractmethod
    def adapt(self, pairs: pd.DataFrame, responses: pd.DataFrame) -> dict:
        """Give each user of ``pairs`` (user_id, chosen_id, rejected_id) a state from those pairs only.

        ``responses`` resolves the ids. Returns a JSON-able report (users adapted, pairs used ...).
        """

    @abstractmethod
    def score(self, user_ids: Sequence[str], responses: pd.DataFrame) -> "torch.Tensor":
        """Reward of ``responses.iloc[i]`` for ``user_ids[i]``; a float tensor of ``len(user_ids)``."""

    @abstractmethod
    def save_state(self, directory: Path) -> None:
        """Write learned state (weights as safetensors, ids as JSON) into an empty directory."""

    @abstractmethod
    def load_state(self, directory: Path) -> None:
        """Restore what :meth:`save_state` wrote."""

    @classmethod
    def cannot_run(cls, data: "PreferenceDataset") -> str | None:
        """Why the method cannot run on ``data`` (e.g. it needs every user's group and some have none), or
        None. A benchmark skips such a method with this reason as a note instead of failing."""
        return None

    def experiments(self, ctx: ExperimentContext) -> dict[str, Any]:
        """Named extra evaluations a benchmark stores under its results' ``extra`` (default: none).

        Called after training and the standard evaluation of each of a spec's methods (not its
        ablations), with the spec's options for them in ``ctx.options``. Each value must be JSON-able.
        The method must come back in the state it was in.
        """
        return {}

    @classmethod
    def check_extra(cls, extra: dict, file: Path) -> None:
        """Check that the ``extra`` of a stored result has the shape :meth:`report` and
        :meth:`compared_metrics` read; raise :class:`coplctl.core.errors.DataError` naming the file and key."""

    @classmethod
    def report(cls, results: list[dict]) -> "ReportPart":
        """The method's own part of a report (tables after the standard ones, figures), built from stored
        results only: every result of the report is given, its own carry their ``extra``. Called when
        some result of the method holds an ``extra``."""
        from coplctl.core.tables import ReportPart

        return ReportPart()

    @classmethod
    def compared_metrics(cls, result: dict) -> dict[str, float]:
        """Metrics of its ``extra`` (points, 0-100) that `coplctl compare` checks for regressions, by name."""
        return {}

    def sizes(self) -> dict[str, int]:
        """Sizes of the learned state beyond the config (user rows, embedding widths ...), saved in
        ``method.json`` so that :meth:`load_state` builds the model from them (default: none)."""
        return {}

    def saved_config(self) -> dict:
        """The config as ``method.json`` records it (default: every field as set)."""
        return dataclasses.asdict(self.config)

    def save(self, directory: str | Path, *, overwrite: bool = True) -> Path:
        """Save atomically: ``method.json`` (name, config, sizes) and the method's state."""
        with atomic_dir(directory, overwrite=overwrite, marker=METHOD_FILE, kind="reward-model run") as tmp:
            self.save_state(tmp)
            info = {"method": self.registry_name, "config": self.saved_config(), "sizes": self.sizes()}
            (tmp / METHOD_FILE).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
        return Path(directory)


def make_config(config_cls: type, overrides: dict, *, owner: str = "method") -> Any:
    """Build a config dataclass from overrides, naming unknown keys (with close matches) clearly."""
    import difflib

    fields = {f.name for f in dataclasses.fields(config_cls)}
    for key in overrides:
        if key not in fields:
            close = difflib.get_close_matches(key, fields, n=1)
            hint = f"; did you mean {close[0]}?" if close else ""
            raise CoplError(f"{owner} has no option {key!r}{hint} (options: {', '.join(sorted(fields))})")
    try:
        return config_cls(**overrides)
    except TypeError as e:
        raise CoplError(f"bad option for {owner}: {e}") from None


def load_method(directory: str | Path) -> RewardMethod:
    """Rebuild a saved method in a new process (its class comes from the registry)."""
    from coplctl.core.files import field, read_json
    from coplctl.core.registry import METHODS

    directory = Path(directory)
    info_path = directory / METHOD_FILE
    if not directory.is_dir():
        raise CoplError(f"{directory} is not a run directory" + ("" if directory.exists() else " (it does not exist)"))
    if not info_path.is_file():
        raise CoplError(f"{directory} is not a saved method (no {METHOD_FILE})")
    info = read_json(info_path, what="method file")
    name = field(info, "method", str, info_path)
    try:
        cls = METHODS.get(name)
        config = make_config(cls.Config, field(info, "config", dict, info_path), owner=f"method {name}")
    except CoplError as e:
        raise CoplError(f"{info_path}: {e}") from None
    method = cls(config)
    try:
        method.load_state(directory)
    except CoplError:
        raise
    except Exception as e:  # damage the method's own checks did not name: still one line, naming the run
        raise CoplError(f"{directory} is a damaged {name} run ({type(e).__name__}: {str(e).strip()[:200]})") from e
    return method


SCORE_CHUNK = 16_384  # pairs scored per call (a progress step)


def pair_scores(method: RewardMethod, pairs: pd.DataFrame, responses: pd.DataFrame, *,
                progress: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Scores of the chosen and of the rejected response of every pair, for the pair's user, in chunks of
    :data:`SCORE_CHUNK` pairs; ``progress``: a label to show a progress bar under."""
    from coplctl.core.progress import Bar

    table = responses.set_index("response_id")
    users = pairs["user_id"].tolist()
    s_c, s_r = np.empty(len(pairs), np.float32), np.empty(len(pairs), np.float32)
    bar = Bar(progress is not None and len(pairs) > SCORE_CHUNK, len(pairs), progress or "")
    try:
        for s in range(0, len(pairs), SCORE_CHUNK):
            part = pairs.iloc[s:s + SCORE_CHUNK]
            for out, col in ((s_c, "chosen_id"), (s_r, "rejected_id")):
                rows = table.loc[part[col]].reset_index()
                out[s:s + len(part)] = method.score(users[s:s + len(part)], rows).detach().float().cpu().numpy()
            bar.update(advance=len(part))
    finally:
        bar.close()
    return s_c, s_r


def pair_accuracy(method: RewardMethod, pairs: pd.DataFrame, responses: pd.DataFrame) -> float:
    """Share of pairs where the chosen response scores strictly higher (ties count as wrong)."""
    if len(pairs) == 0:
        return float("nan")
    s_c, s_r = pair_scores(method, pairs, responses)
    return float((s_c > s_r).mean())
