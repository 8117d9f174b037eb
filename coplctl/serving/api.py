"""The Python API: a trained run as a reward function.

    import coplctl
    rm = coplctl.load("runs/copl")                      # any registered method's run
    rm.reward(["u0001", "u0002"], ["How do I ...?"] * 2, ["First answer", "Second answer"])
    rm.adapt([{"user": "alice", "chosen": "<response text or id>", "rejected": "<...>"}])
    rm.reward("alice", "How do I ...?", "Third answer")

Calls leave the caller's random state (torch, numpy, random) as it was. In frozen mode, texts the
feature cache lacks are embedded into a bounded in-memory store (``cache_texts``), never written to disk,
so scoring inside a training loop neither grows the cache nor slows down.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pandas as pd

from coplctl.core.errors import CoplError
from coplctl.core.files import not_unicode


@contextmanager
def _own_rng() -> Iterator[None]:
    """Run the block with the caller's torch, numpy and ``random`` states saved and restored."""
    import torch

    py, npy = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        try:
            yield
        finally:
            random.setstate(py)
            np.random.set_state(npy)


def _texts(value, n: int | None, what: str) -> list[str]:
    if isinstance(value, str):
        values = [value]
    elif isinstance(value, (list, tuple, pd.Series, pd.Index)) or (hasattr(value, "__array__") and getattr(value, "ndim", 0) == 1):
        values = list(value)
    else:
        raise CoplError(f"{what} must be a text or a list of texts, not {type(value).__name__}")
    if n is not None and len(values) == 1 and n != 1:
        values = values * n  # one user (or prompt) for every response
    for i, v in enumerate(values):
        if not isinstance(v, str):
            raise CoplError(f"{what}[{i}] must be a text, not {type(v).__name__}")
        problem = not_unicode(v)
        if problem:
            raise CoplError(f"{what}[{i}] {problem}")
    return values


class RewardModel:
    """A saved run loaded for scoring (see the module docstring); build it with :func:`load`."""

    def __init__(self, method, run: Path, cache_texts: int = 50_000):
        from coplctl.models.features import MemoryStore

        self.method, self.run = method, run
        self._memory = MemoryStore(cache_texts)
        self._adapted: list[dict] = []  # the reports of adapt calls since loading

    @property
    def name(self) -> str:
        """The registered method's name (``copl``, ``i2e`` ...)."""
        return self.method.registry_name

    @property
    def users(self) -> list[str]:
        """The user ids the model can score: trained, and adapted since."""
        return list(getattr(self.method, "user_ids", ()))

    def reward(self, users: str | Sequence[str], prompts: str | Sequence[str], responses: str | Sequence[str],
               *, batch_size: int = 256) -> np.ndarray:
        """Rewards of ``responses[i]`` to ``prompts[i]`` for ``users[i]`` (a single user, prompt or response applies
        to every item of the others), as float32, in batches of ``batch_size``."""
        from coplctl.models.evaluate import score_frame
        from coplctl.models.features import in_memory

        if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
            raise CoplError(f"batch_size must be a whole number, at least 1, not {batch_size!r}")
        users, prompts, texts = (_texts(v, None, what) for v, what in
                                 ((users, "users"), (prompts, "prompts"), (responses, "responses")))
        n = max(len(users), len(prompts), len(texts))
        users, prompts, texts = (v * n if len(v) == 1 else v for v in (users, prompts, texts))  # one applies to all
        if not len(users) == len(prompts) == len(texts):
            raise CoplError(f"users, prompts and responses differ in length ({len(users)}, {len(prompts)}, "
                            f"{len(texts)})")
        index = getattr(self.method, "user_index", None) if getattr(self.method, "personalized", False) else None
        unknown = sorted({u for u in users if u not in index}) if index is not None else []
        if unknown:
            raise CoplError(f"unknown user {unknown[0]!r}" + (f" (and {len(unknown) - 1} more)" if len(unknown) > 1
                            else "") + f": the run has {len(index):,} users; add new ones from their annotations (POST /users on a "
                            f"server, rm.adapt(pairs) in Python, coplctl adapt)")
        out = np.empty(len(texts), dtype=np.float32)
        with _own_rng(), in_memory(self._memory):
            for s in range(0, len(texts), batch_size):
                rows = [{"prompt": p, "response": r} for p, r in zip(prompts[s:s + batch_size], texts[s:s + batch_size])]
                scores = self.method.score(users[s:s + batch_size], score_frame(rows))
                out[s:s + len(rows)] = scores.detach().float().cpu().numpy()
        return out

    def adapt(self, pairs: pd.DataFrame | Sequence[dict]) -> dict:
        """Add new users from their annotations: records (or a frame) with ``user``, ``chosen``, ``rejected``
        (a response of the run by id or exact text, or with ``prompt`` any new text) and optionally
        ``prompt``, as a user file's lines. Returns the method's report; a problem names the record (row,
        from 0)."""
        from coplctl.data.userfile import user_pairs
        from coplctl.models.features import in_memory

        if isinstance(pairs, (str, bytes, dict)) or not isinstance(pairs, (pd.DataFrame, Sequence, Iterator)):
            raise CoplError(f"pairs must be a DataFrame or a list of records (dicts), not {type(pairs).__name__}")
        if isinstance(pairs, pd.DataFrame):  # a frame's missing cells (NaN, None) are absent keys, as in a user file
            records = [{k: v for k, v in r.items() if not (v is None or (isinstance(v, float) and v != v))}
                       for r in pairs.to_dict("records")]
        else:
            records = list(pairs)
        uf = user_pairs(enumerate(records), self.method.responses, source="pairs", unit="row",
                        seen_users=set(self.users), new_responses=True)
        responses = uf.with_new_responses(self.method.responses)
        with _own_rng(), in_memory(self._memory):  # new texts' features stay in memory, as reward's do
            report = self.method.adapt(uf.pairs.drop(columns="line"), responses)
        self._adapted.append(report)
        return report

    def save(self, path: str | Path, *, force: bool = False) -> Path:
        """Write the run with the users adapted since loading, as ``coplctl adapt --model RUN --out PATH`` does
        (a run ``coplctl score``/``serve``/``load`` read, and its ``summary.json``); never over the loaded run."""
        from coplctl.core.atomic import atomic_write_text, check_output, refuse_overlap
        from coplctl.serving.adapt_run import MARKER

        if not isinstance(path, (str, Path)) or not str(path):
            raise CoplError(f"path must be a directory to write (a path), not {path!r:.60}")
        path = Path(path)
        refuse_overlap(path, {"the loaded run": self.run}, option="path")
        check_output(path, force=force, marker="method.json", kind="reward-model run", option="path")
        with _own_rng():
            self.method.save(path, overwrite=force)
        summary = {"model": str(self.run), "users": sum(int(r.get("users") or 0) for r in self._adapted),
                   "adapt_calls": self._adapted, "from": "coplctl.load(...).adapt(...).save(...)"}
        atomic_write_text(path / MARKER, json.dumps(summary, indent=2, default=str) + "\n")
        return path


def load(run: str | Path, *, cache_texts: int = 50_000) -> RewardModel:
    """Load a run directory (``coplctl train`` / ``adapt`` / a benchmark's ``runs/...``), a peft export
    (``coplctl export --format peft``), or either from the Hugging Face hub by its id (``owner/name``: read
    through ``huggingface_hub`` and its cache, so a cached repo loads offline)."""
    from coplctl.core.files import read_json
    from coplctl.models.reward import METHOD_FILE, load_method
    from coplctl.serving.export import is_export, load_export

    if not isinstance(run, (str, Path)) or not str(run):
        raise CoplError(f"run must be a run directory (a path), not {run!r:.60}")
    path = Path(run)
    if not path.exists() and _hub_id(str(run)):
        path = _download(str(run))
    if path.is_dir() and not (path / METHOD_FILE).is_file() and (path / "config.json").is_file() \
            and "coplctl" in read_json(path / "config.json", what="model config"):
        raise CoplError(f"{run} is an hf export: one user's reward as a transformers model; load it with "
                        f"AutoModelForSequenceClassification.from_pretrained (its README shows how)")
    with _own_rng():
        method = load_export(path) if path.is_dir() and not (path / METHOD_FILE).is_file() and is_export(path) \
            else load_method(path)
    return RewardModel(method, path, cache_texts)


def _hub_id(text: str) -> bool:
    """``owner/name`` as the hub spells repo ids, unless ``owner`` is a local directory (``runs/copl`` with a
    typo is a missing run, not a hub repo to wait for)."""
    import re

    return re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", text) is not None and ".." not in text \
        and not Path(text.split("/")[0]).is_dir()


def _download(repo_id: str) -> Path:
    """The files of hub repo ``repo_id`` (a model repo) in the local hub cache, downloaded if missing."""
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id))
    except Exception as e:  # offline without a cached copy, no such repo, no access: one line
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise CoplError(f"{repo_id} is no local directory, and the Hugging Face hub did not give it ({first})") from None
