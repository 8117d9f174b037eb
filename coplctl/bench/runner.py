"""The benchmark runner: every (method, seed) of a spec trained, evaluated and stored as one results
JSON; finished runs are skipped, so an interrupted benchmark resumes where it stopped.

Each job's config is resolved once, before any work (:func:`resolve_jobs`); a run carries one
:class:`Benchmark` context (spec, data, output directory, processes, provenance computed once). The
runner knows no method: a method says itself when it cannot run on a dataset
(:meth:`~coplctl.models.reward.RewardMethod.cannot_run`) and runs its own experiments."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from coplctl.bench.data import data_record, prepare_data
from coplctl.bench.results import Result, check_result, provenance, result_path, write_result
from coplctl.bench.search import candidate_path, check_grid, choose, diverged, lr_grid, tag
from coplctl.bench.spec import BenchmarkSpec, SpecError, experiment_options
from coplctl.core.atomic import atomic_write_text, locked
from coplctl.core.errors import CoplError, DataError, Diverged
from coplctl.core.files import read_json
from coplctl.core.progress import Bar

LOCK_FILE = ".lock"
"""Held (flock) in OUT/NAME/ while a benchmark runs there."""


@dataclass
class Job:
    """One method or ablation of a spec, its config resolved once (:func:`resolve_jobs`)."""

    name: str
    """Its results' name: the method's, or the ablation's."""
    method: str
    """The registered method."""
    settings: dict
    """The resolved config (as a mapping); a searched job's ``lr`` holds its grid."""
    candidates: dict[float, dict] = field(default_factory=dict)
    """A searched job: the resolved config at each learning rate of the grid, in grid order."""
    ablation: bool = False
    """Ablations are compared on the standard evaluation only; methods also run their own experiments."""
    options: Any = None
    """The method's own experiment options in this spec (:func:`coplctl.bench.spec.experiment_options`)."""


@dataclass
class Benchmark:
    """What every job of one benchmark run shares."""

    spec: BenchmarkSpec
    data: Any
    """The dataset (:class:`coplctl.data.dataset.PreferenceDataset`)."""
    out: Path
    state: Any
    """accelerate's ``PartialState``: every process trains, the main one writes."""
    force: bool = False
    provenance: dict = field(default_factory=dict)
    """Package versions, git commit, data hash, hardware, command: computed once per benchmark."""
    record: dict = field(default_factory=dict)
    """What the results say of the data (:func:`data_record`)."""

    @property
    def base(self) -> Path:
        return self.out / self.spec.name

    def work_dir(self, job: Job, seed: int, tag: str = "") -> Path:
        return self.base / "work" / f"{job.name}-seed{seed}{tag}"

    def bare(self, job: Job, seed: int, settings: dict) -> Result:
        """A job's result without metrics: what it was and on which data."""
        spec = self.spec
        return {"spec": spec.name, "spec_version": spec.version, "spec_file": spec.path, "name": job.name,
                "method": job.method, "seed": seed, "config": settings, "metrics": {}, "data": self.record,
                "provenance": self.stamp()}

    def stamp(self) -> dict:
        """The benchmark's provenance, with the time this result was made."""
        return {**self.provenance, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def run_benchmark(spec: BenchmarkSpec, out: str | Path, *, names: list[str] | None = None,
                  seeds: list[int] | None = None, backbone: str | None = None, mode: str | None = None,
                  force: bool = False, progress: bool = True, log=None, sets: dict | None = None,
                  download: bool = True) -> dict:
    """Run the spec's jobs not finished yet; returns {"done": [...], "skipped": [...]} result paths.

    ``sets`` (``--set``) joins the spec's ``common`` (in a copy: the caller's spec is left as it is).
    Every job's config is checked before any work starts, and ``OUT/NAME`` is locked for the run: a
    second benchmark of the same spec into the same directory stops at once instead of removing the first
    one's work. A real spec's missing dataset is built on first use (the main process builds, the others
    wait), unless ``download`` is False.
    """
    import torch
    from accelerate import PartialState

    spec, jobs, seeds = select_jobs(spec, names, seeds, backbone, mode, sets)
    state = PartialState(cpu=not torch.cuda.is_available())
    out = Path(out)
    with contextlib.ExitStack() as lock:
        _lock(state, lock, out, out / spec.name, spec.name)
        with state.main_process_first():
            ds = prepare_data(spec, out / spec.name, force, download=download,
                              progress=progress and state.is_main_process, log=log if state.is_main_process else None)
        run = Benchmark(spec, ds, out, state, force, provenance(ds.path), data_record(spec, ds))
        return _run(run, jobs, seeds, progress, log)


def select_jobs(spec: BenchmarkSpec, names: list[str] | None, seeds: list[int] | None, backbone=None, mode=None,
                sets: dict | None = None) -> tuple[BenchmarkSpec, list[Job], list[int]]:
    """The spec with ``sets`` (``--set``) joined to its ``common`` (a copy), its jobs resolved and narrowed to
    ``names``, and the seeds to run: every value checked, the error naming the spec's key or the option."""
    spec = dataclasses.replace(spec, common={**spec.common, **(sets or {})})
    _check_common(spec)
    known = [j[0] for j in spec.jobs()]
    unknown = [n for n in names or [] if n not in known]
    if unknown:
        raise CoplError(f"{unknown[0]!r} is not a method or ablation of {spec.name} (it has: {', '.join(known)})")
    jobs = [j for j in resolve_jobs(spec, backbone, mode, sets or {}) if not names or j.name in names]
    where = spec.path or spec.name
    seeds_key = "--seeds" if seeds is not None else f"{where}: seeds"
    seeds = list(dict.fromkeys(seeds if seeds is not None else spec.seeds))
    if not seeds:
        raise CoplError(f"no seeds to run for {spec.name}")
    for seed, key in [*((s, seeds_key) for s in seeds), (spec.data.seed, f"{where}: data.seed")]:
        if not 0 <= seed < 2**32:
            raise SpecError(f"{key}: {seed} is out of range (0 .. 2**32 - 1)")
    return spec, jobs, seeds


def _run(run: Benchmark, jobs: list[Job], seeds: list[int], progress: bool, log) -> dict:
    from coplctl.core.registry import METHODS

    todo, skipped = [], []
    for job in jobs:
        for seed in seeds:
            path = result_path(run.out, run.spec.name, job.name, seed)
            if path.exists() and not run.force:
                _check_same(path, job.settings)
                skipped.append(path)
            else:
                todo.append((job, seed, path))
    main = run.state.is_main_process
    if main:
        atomic_write_text(run.base / "spec.json", json.dumps(asdict(run.spec), indent=2) + "\n")
    bar = Bar(progress and main, len(todo), run.spec.name)
    done = []
    try:
        for i, (job, seed, path) in enumerate(todo):
            stage = lambda s, n=job.name, k=seed, i=i: bar.update(completed=i, info=f"{n} seed {k}: {s}")  # noqa: E731
            reason = METHODS.get(job.method).cannot_run(run.data)
            if reason:
                result = {**run.bare(job, seed, job.settings), "skipped": reason}
            elif job.candidates:
                result = _search(run, job, seed, stage)
            else:
                result = run_job(run, job, seed, stage=stage)
            if main:
                write_result(path, result)
                _clean(run, job, seed)
                if log:
                    log(_summary(job, seed, result, reason))
            run.state.wait_for_everyone()
            done.append(str(path))
    finally:
        bar.update(completed=len(done))
        bar.close()
    return {"done": done, "skipped": [str(p) for p in skipped]}


def _clean(run: Benchmark, job: Job, seed: int, tag: str = "") -> None:
    """Remove a finished job's work directory (and ``work/`` once empty)."""
    shutil.rmtree(run.work_dir(job, seed, tag), ignore_errors=True)
    work = run.base / "work"
    if not tag and work.is_dir() and not any(work.iterdir()):
        work.rmdir()


def _summary(job: Job, seed: int, result: Result, reason: str | None) -> str:
    if reason:
        return f"{job.name} seed {seed}: skipped ({reason})"
    chosen = f", lr {result['lr_search']['chosen']:g} chosen" if result.get("lr_search") else ""
    return (f"{job.name} seed {seed}: seen {_pct(result, 'seen')}, unseen {_pct(result, 'unseen')} "
            f"({result['timing']['fit_seconds']:.0f} s to train{chosen})")


def _search(run: Benchmark, job: Job, seed: int, stage: Callable[[str], None]) -> Result:
    """Train the job at each learning rate of its grid (candidates already stored are reused when their
    settings match), and keep the one with the best validation accuracy (:mod:`coplctl.bench.search`)."""
    found = {}
    for lr, settings in job.candidates.items():
        path = candidate_path(run.out, run.spec.name, job.name, seed, lr)
        if path.exists() and not run.force:
            _check_same(path, settings)
            found[lr] = check_result(read_json(path, what="results file"), path)
            continue
        try:
            found[lr] = run_job(run, job, seed, settings=settings, tag=tag(lr),
                                stage=lambda s, lr=lr: stage(f"lr {lr:g}: {s}"))
        except Diverged as e:
            found[lr] = diverged(run.bare(job, seed, settings), str(e))
        if run.state.is_main_process:
            write_result(path, found[lr])
            _clean(run, job, seed, tag(lr))
        run.state.wait_for_everyone()
    return choose(list(job.candidates), found)


def _tidy(lock_file: Path, made: list[Path]) -> None:
    """A benchmark that stopped before writing anything leaves no trace: its lock file, and the directories it
    made for it, go when they hold nothing else."""
    if lock_file.parent.is_dir() and [p.name for p in lock_file.parent.iterdir()] == [lock_file.name]:
        lock_file.unlink(missing_ok=True)
        for d in reversed(made):
            with contextlib.suppress(OSError):
                d.rmdir()  # only when empty


def not_a_file(out: Path, base: Path) -> None:
    """``--out`` and its spec's directory in it must be directories where they exist."""
    for p in (out, base):
        if p.exists() and not p.is_dir():
            raise CoplError(f"--out {out}: {p} is a file; the results directory must be a directory")


def _lock(state, stack: contextlib.ExitStack, out: Path, base: Path, name: str) -> None:
    """The main process creates ``base`` and locks it; every process learns whether that worked."""
    problem = None
    if state.is_main_process:
        try:
            not_a_file(out, base)
            made = [p for p in (out, base) if not p.exists()]
            try:
                base.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise CoplError(f"cannot create {base} ({e.strerror or e}); choose another --out") from None
            stack.callback(_tidy, base / LOCK_FILE, made)  # runs after the lock is released
            stack.enter_context(locked(base / LOCK_FILE, str(out), by=f"coplctl benchmark {name}",
                                       advice="wait for it or use another --out"))
        except CoplError as e:
            problem = str(e)
    if state.num_processes > 1:  # the others must not wait forever for a main process that stopped
        from accelerate.utils import broadcast_object_list

        problem = broadcast_object_list([problem])[0]
    if problem:
        raise CoplError(problem)


def _settings(spec: BenchmarkSpec, method: str, overrides: dict, backbone, mode) -> dict:
    """The config a job resolves to: spec backbone/mode (or the overrides of the command line), then
    the spec's overrides — keeping only the fields this method has (``common`` and ``--set`` apply to
    every method that knows the key)."""
    from coplctl.core.registry import METHODS
    from coplctl.models.reward import make_config

    cls = METHODS.get(method)
    settings = {**_placement(cls, spec, backbone, mode), **_own(spec, method, overrides)}
    return asdict(make_config(cls.Config, settings, owner=f"{spec.name}: method {method}"))


def _placement(cls, spec: BenchmarkSpec, backbone, mode) -> dict:
    """The spec's backbone and mode (or the command line's), for a method whose config has them (a method
    without a backbone, e.g. one scoring responses by id, runs as it is)."""
    fields = {f.name for f in dataclasses.fields(cls.Config)}
    return {k: v for k, v in (("backbone", backbone or spec.backbone), ("mode", mode or spec.mode)) if k in fields}


def _own(spec: BenchmarkSpec, method: str, overrides: dict) -> dict:
    """The overrides that apply to ``method``: a ``common`` key (or the ``lr_grid``) it does not have is for
    other methods."""
    from coplctl.core.registry import METHODS

    fields = {f.name for f in dataclasses.fields(METHODS.get(method).Config)}
    shared = set(spec.common) | ({"lr"} if spec.lr_grid else set())
    return {k: v for k, v in overrides.items()
            if k in fields or k not in shared or k in spec.overrides.get(method, {})}


def resolve_jobs(spec: BenchmarkSpec, backbone=None, mode=None, sets: dict | None = None) -> list[Job]:
    """Every method and ablation of the spec with its config resolved, once and before any work, so a wrong
    value stops the run at once; the error names the spec file and the key that holds the value."""
    out = []
    for i, (name, method, overrides) in enumerate(spec.jobs()):
        try:
            grid = lr_grid(_own(spec, method, overrides))
            if grid is None:
                job = Job(name, method, _settings(spec, method, overrides, backbone, mode))
            else:  # every candidate's config, checked now; the job's settings hold the grid
                check_grid(grid, f"method {name}")
                candidates = {lr: _settings(spec, method, {**overrides, "lr": lr}, backbone, mode) for lr in grid}
                job = Job(name, method, {**candidates[grid[0]], "lr": grid}, candidates)
        except CoplError as e:
            key = _culprit(spec, i, method, overrides, backbone, mode, sets or {})
            where = key if key and key.startswith("--") else f"{spec.path or spec.name}: {key or f'method {name}'}"
            raise SpecError(f"{where}: {e}") from None
        job.ablation = i >= len(spec.methods)
        job.options = None if job.ablation else experiment_options(spec, method)
        out.append(job)
    return out


def _culprit(spec: BenchmarkSpec, i: int, method: str, overrides: dict, backbone, mode, sets: dict) -> str | None:
    """Where the value that a job's config rejects comes from (None when no single value is wrong)."""
    from coplctl.core.registry import METHODS
    from coplctl.models.reward import make_config

    cls = METHODS.get(method)
    values = {**_placement(cls, spec, backbone, mode), **_own(spec, method, overrides)}
    for key, value in values.items():
        try:
            make_config(cls.Config, {key: value})
        except CoplError:
            pass
        else:
            continue
        ablation = spec.ablations[i - len(spec.methods)] if i >= len(spec.methods) else None
        if key in ("backbone", "mode") and key not in overrides:
            return f"--{key}" if (backbone if key == "backbone" else mode) else key
        if ablation is not None and key in ablation.overrides:
            return f"ablations[{i - len(spec.methods)}].overrides.{key}"
        if key in spec.overrides.get(method, {}):
            return f"overrides.{method}.{key}"
        return f"--set {key}" if key in sets else f"common.{key}"
    return None


def _check_common(spec: BenchmarkSpec) -> None:
    """A key of ``common`` (or ``--set``) must be an option of at least one of the spec's methods."""
    from coplctl.core.registry import METHODS

    fields = {f.name for _, m, _ in spec.jobs() for f in dataclasses.fields(METHODS.get(m).Config)}
    for key in spec.common:
        if key not in fields:
            import difflib

            close = difflib.get_close_matches(key, fields, n=1)
            raise CoplError(f"no method of {spec.name} has the option {key!r}"
                            + (f"; did you mean {close[0]}?" if close else ""))


def _check_same(path: Path, settings: dict) -> None:
    """A finished result is reused only if it was produced with the same settings."""
    old = read_json(path, what="results file").get("config", {})
    if not isinstance(old, dict):
        raise DataError(path, "key 'config' must be a JSON object; delete the file or use --force to redo it")
    diff = sorted(k for k in settings.keys() | old.keys() if old.get(k) != settings.get(k))
    if diff:
        shown = ", ".join(f"{k}: {old.get(k)!r} -> {settings.get(k)!r}" for k in diff[:3])
        raise CoplError(f"{path} was produced with other settings ({shown}); use another --out, or --force "
                        f"to redo it")


def _pct(result: dict, role: str) -> str:
    m = result["metrics"].get(role)
    return "-" if not m or m["accuracy"] is None else f"{100 * m['accuracy']:.2f}"


def run_job(run: Benchmark, job: Job, seed: int, *, settings: dict | None = None, tag: str = "",
            stage: Callable[[str], None] = lambda s: None) -> Result:
    """Train one (method, seed) with ``settings`` (default: the job's), save its run, evaluate it, and
    run the method's own experiments (:meth:`coplctl.models.reward.RewardMethod.experiments`) when the
    job is one of the spec's methods.

    Under several processes every process trains (training is collective); only the main process
    writes files.
    """
    from coplctl.core.registry import METHODS
    from coplctl.models.evaluate import evaluate
    from coplctl.models.reward import ExperimentContext

    main = run.state.is_main_process
    settings = settings or job.settings
    cls = METHODS.get(job.method)
    method = cls(cls.Config(**settings))
    stage("train")
    t0 = time.perf_counter()
    training = method.fit(run.data, seed=seed, work_dir=run.work_dir(job, seed, tag), progress=False)
    fit_seconds = time.perf_counter() - t0
    run_dir = run.base / "runs" / job.name / f"seed{seed}{tag}"
    if main:
        method.save(run_dir)
    run.state.wait_for_everyone()
    stage("evaluate")
    t0 = time.perf_counter()
    ev = evaluate(method, run.data)
    result: Result = {
        **run.bare(job, seed, asdict(method.config)), "backbone": settings.get("backbone"), "mode": settings.get("mode"),
        "metrics": ev["metrics"], "adaptation": ev.get("adaptation"), "training": dict(training),
        "timing": {"fit_seconds": round(fit_seconds, 2), "evaluate_seconds": round(time.perf_counter() - t0, 2)},
        "run_dir": str(run_dir),
    }
    if not job.ablation:
        extra = method.experiments(ExperimentContext(data=run.data, options=job.options, settings=settings, seed=seed,
                                                     run_dir=run_dir, out_dir=run.base, main_process=main, stage=stage))
        if extra:
            result["extra"] = extra
    return result
