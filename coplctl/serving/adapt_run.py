"""Adapting new users into a run on disk (paper §4.3): read their pairs, place them, write the output.

- A graph run (``coplctl graph train``) gives a directory holding ``embeddings.safetensors`` (the exported
  embeddings; user ids and adaptation method in its metadata) and ``summary.json``.
- A reward-model run (``coplctl train``) gives a new run with the users added, plus ``summary.json``.

New users come from a user file (:func:`coplctl.data.userfile.read_user_file`) or from a dataset's unseen
users (their fewshot pairs); a user the run already has is never replaced. A reward-model run also takes
responses it has never seen, given by prompt and text: its backbone scores them, and CoPL places them
next to their nearest graph responses (:mod:`coplctl.copl.placement`, beyond the paper); ``in_graph_only``
turns both off, as before this existed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from collections.abc import Collection
from pathlib import Path

import pandas as pd
from safetensors.torch import save_file

from coplctl.copl.adapt import AdaptConfig, Adapted, adapt_users, graph_accuracy
from coplctl.core.atomic import atomic_dir, atomic_path, atomic_write_text
from coplctl.core.errors import DataError
from coplctl.data import PreferenceDataset, load
from coplctl.data.userfile import UserFile, read_user_file, seen_user_problem
from coplctl.graph.run import GCFRun
from coplctl.models.reward import load_method

#: The file that marks a directory as adapt's output (what --force may replace), and its kind in errors.
MARKER, KIND = "summary.json", "coplctl adapt output"


def new_user_pairs(responses: pd.DataFrame | None, *, user_file: Path | None = None, data: Path | None = None,
                   skip_invalid: bool = False, seen_users: Collection[str] = (), new_responses: bool = False
                   ) -> tuple[UserFile, PreferenceDataset | None]:
    """The pairs to adapt, from ``user_file`` (over ``responses``; ``new_responses``: texts it lacks become
    new responses) or from the fewshot pairs of dataset ``data``, and the dataset (None for a user file).
    Seen users are an error, or skipped and reported."""
    if data is None:
        return read_user_file(user_file, responses, skip_invalid=skip_invalid, seen_users=seen_users,
                              new_responses=new_responses), None
    ds = load(data)
    pairs = ds.split("fewshot")
    clash = list(dict.fromkeys(u for u in pairs["user_id"] if u in seen_users))
    if clash and not skip_invalid:
        more = f" (and {len(clash) - 1} more)" if len(clash) > 1 else ""
        raise DataError(data, seen_user_problem(clash[0]) + more)
    skipped = [{"user": u, "lines": [], "reason": seen_user_problem(u)} for u in clash]
    pairs = pairs[~pairs["user_id"].isin(clash)]
    if pairs.empty:
        raise DataError(data, "has no fewshot pair of a user new to the run")
    return UserFile(pairs, skipped_users=skipped), ds


def adapt_graph_run(model: Path, out: Path, cfg: AdaptConfig, *, user_file: Path | None = None,
                    data: Path | None = None, skip_invalid: bool = False, force: bool = False) -> dict:
    """Adapt new users into graph run ``model`` and write them to ``out``; returns the summary written.

    With ``data``, the summary also holds the users' GCF accuracy on their held-out valid pairs."""
    run = GCFRun(model)
    uf, ds = new_user_pairs(run.responses, user_file=user_file, data=data, skip_invalid=skip_invalid,
                            seen_users=set(run.graph.user_ids))
    adapted = adapt_users(run, uf.pairs, cfg)
    source: dict = {"user_file": str(user_file)} if ds is None else {"data": str(data)}
    if ds is not None:
        held = ds.split("valid")
        acc, n = graph_accuracy(run, adapted, held[held["user_id"].isin(set(uf.pairs["user_id"]))])
        source.update(held_out_graph_accuracy=acc, held_out_pairs=n)
    summary = {**{k: v for k, v in adapted.report.items() if k != "per_user"}, "model": str(model), **source,
               "pairs_unusable": len(uf.skipped_lines), "skipped_lines": uf.skipped_lines,
               "skipped_users": uf.skipped_users, "per_user": adapted.report["per_user"]}
    write_adapted_graph(out, adapted, summary, force=force)
    return summary


def write_adapted_graph(out: Path, adapted: Adapted, summary: dict, *, force: bool = False) -> None:
    """A graph run's adapt output: ``embeddings.safetensors`` and ``summary.json``, written to a temporary
    directory that replaces ``out`` (an existing one only with ``force``, and only if it is such an output)."""
    with atomic_dir(out, overwrite=force, marker=MARKER, kind=KIND) as tmp:
        with atomic_path(tmp / "embeddings.safetensors") as f:  # usual permissions (save_file alone: 0600)
            save_file({"embeddings": adapted.embeddings.contiguous()}, str(f),
                      metadata={"user_ids": json.dumps(adapted.user_ids), "method": adapted.report["method"]})
        (tmp / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")


def adapt_model_run(model: Path, out: Path, *, user_file: Path | None = None, data: Path | None = None,
                    skip_invalid: bool = False, force: bool = False, in_graph_only: bool = False) -> dict:
    """Adapt new users into reward-model run ``model`` as its method's config says, save the result as the
    run ``out`` and its ``summary.json``; returns the summary.

    A user file may name responses the run has never seen by prompt and text (``new_responses`` of the
    summary counts them); ``in_graph_only`` refuses those and has CoPL use only pairs over its graph's
    responses (no nearest-neighbour placement), as adaptation did before placement existed."""
    method = load_method(model)
    uf, ds = new_user_pairs(method.responses, user_file=user_file, data=data, skip_invalid=skip_invalid,
                            seen_users=set(getattr(method, "user_ids", ())), new_responses=not in_graph_only)
    responses = uf.with_new_responses(method.responses if ds is None else ds.responses)
    with placement_off(method) if in_graph_only else contextlib.nullcontext():
        report = method.adapt(uf.pairs, responses)
    per_user = getattr(method, "adapted_per_user", None)  # CoPL: each user's pairs in graph, placed, left out
    method.save(out, overwrite=force)
    summary = {**report, "model": str(model), "user_file": str(user_file) if user_file else None,
               "data": str(data) if data else None, "in_graph_only": in_graph_only,
               "new_responses": len(uf.new_responses), "pairs_unusable": len(uf.skipped_lines),
               "skipped_lines": uf.skipped_lines, "skipped_users": uf.skipped_users}
    if per_user is not None:
        summary["per_user"] = per_user
    summary.setdefault("users", report.get("users"))
    atomic_write_text(out / MARKER, json.dumps(summary, indent=2, default=str) + "\n")
    return summary


@contextlib.contextmanager
def placement_off(method):
    """``method`` adapting from in-graph pairs only: CoPL's ``place_k`` set to 0 for the block (its config
    is restored after, so a saved run keeps its own)."""
    config = method.config
    if getattr(config, "place_k", 0):
        method.config = dataclasses.replace(config, place_k=0)
    try:
        yield method
    finally:
        method.config = config
