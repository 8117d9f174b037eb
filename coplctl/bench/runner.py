"""The benchmark runner: every (method, seed) of a spec trained, evaluated and stored as one results
JSON; finished runs are skipped, so an interrupted benchmark resumes where it stopped."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import shutil
import time
from dataclasses import asdict
from pathlib import Path

from coplctl.core.atomic import atomic_write_text, locked
from coplctl.bench.results import Result, check_result, provenance, result_path, write_result
from coplctl.bench.search import candidate_path, check_grid, choose, diverged, lr_grid, tag
from coplctl.bench.spec import BenchmarkSpec, SpecError
from coplctl.core.errors import CoplError, DataError, Diverged
from coplctl.core.files import read_json
from coplctl.core.progress import Bar

LOCK_FILE = ".lock"
"""Held (flock) in OUT/NAME/ while a benchmark runs there."""

HOW_TO_BUILD = (
    "{path} does not exist. Build it from UltraFeedback first: download openbmb/UltraFeedback and "
    "argilla/ultrafeedback-binarized-preferences-cleaned (e.g. `huggingface-cli download --repo-type dataset "
    "openbmb/UltraFeedback --local-dir ~/data/UltraFeedback`), then `coplctl data build-ufp --variant {variant} "
    "--annotations {annotations} --ultrafeedback ~/data/UltraFeedback --cleaned ~/data/uf-cleaned --out {path}`; "
    "or run the simulated twin, `coplctl benchmark sim-{variant}-{annotations}`."
)


def prepare_data(spec: BenchmarkSpec, base: Path, force: bool = False):
    """The spec's dataset: generated once for simulated specs, read from data.path for real ones."""
    from coplctl.data import load

    d = spec.data
    if d.source == "directory":
        path = Path(d.path)
        if not path.is_dir():
            raise CoplError(f"{spec.path or spec.name}: data.path {path} is not a dataset directory"
                            + ("" if path.exists() else " (it does not exist)"))
        return load(path)
    if d.source == "ultrafeedback":
        path = Path(d.path)
        if not path.exists():
            raise CoplError(HOW_TO_BUILD.format(path=path, variant=d.variant, annotations=d.annotations))
        ds = load(path)
        if (ds.meta.get("variant"), ds.meta.get("annotations")) != (d.variant, d.annotations):
            raise CoplError(f"{path} holds {ds.meta.get('variant')}-{ds.meta.get('annotations')}, but the spec "
                            f"{spec.name} expects {d.variant}-{d.annotations}")
        return ds
    from coplctl.data.simulate import SimConfig, simulate

    path = base / "data"
    proto = d.protocol()
    if (path / "meta.json").exists():
        ds = load(path)
        if ds.meta.get("protocol") == asdict(proto) and ds.meta.get("seed") == d.seed:
            return ds
        if not force:
            raise CoplError(f"{path} was simulated with other settings than the spec's data section; results "
                            f"there are stale: use another --out, or --force to regenerate and rerun everything")
    simulate(SimConfig(protocol=proto, seed=d.seed)).save(path, overwrite=True)
    return load(path)


def run_benchmark(spec: BenchmarkSpec, out: str | Path, *, names: list[str] | None = None,
                  seeds: list[int] | None = None, backbone: str | None = None, mode: str | None = None,
                  force: bool = False, progress: bool = True, log=None, sets: dict | None = None) -> dict:
    """Run the spec's jobs not finished yet; returns {"done": [...], "skipped": [...]} result paths.

    ``sets`` (``--set``) joins the spec's ``common``. Every job's config is checked before any work
    starts, and ``OUT/NAME`` is locked for the run: a second benchmark of the same spec into the same
    directory stops at once instead of removing the first one's work.
    """
    import torch
    from accelerate import PartialState

    out = Path(out)
    base = out / spec.name
    spec.common.update(sets or {})
    _check_common(spec)
    known = [j[0] for j in spec.jobs()]
    unknown = [n for n in names or [] if n not in known]
    if unknown:
        raise CoplError(f"{unknown[0]!r} is not a method or ablation of {spec.name} (it has: {', '.join(known)})")
    settings = check_jobs(spec, backbone, mode, sets or {})
    where = spec.path or spec.name
    seeds_key = "--seeds" if seeds is not None else f"{where}: seeds"
    seeds = list(dict.fromkeys(seeds if seeds is not None else spec.seeds))
    if not seeds:
        raise CoplError(f"no seeds to run for {spec.name}")
    for seed, key in [*((s, seeds_key) for s in seeds), (spec.data.seed, f"{where}: data.seed")]:
        if not 0 <= seed < 2**32:
            raise SpecError(f"{key}: {seed} is out of range (0 .. 2**32 - 1)")
    state = PartialState(cpu=not torch.cuda.is_available())
    with contextlib.ExitStack() as lock:
        _lock(state, lock, out, base, spec.name)
        with state.main_process_first():
            ds = prepare_data(spec, base, force)
        return _run(spec, state, ds, out, base, names, seeds, settings, backbone, mode, force, progress, log)


def _run(spec, state, ds, out, base, names, seeds, settings, backbone, mode, force, progress, log) -> dict:
    jobs = [j for j in spec.jobs() if not names or j[0] in names]
    todo, skipped = [], []
    for name, method, overrides in jobs:
        for seed in seeds:
            path = result_path(out, spec.name, name, seed)
            if path.exists() and not force:
                _check_same(path, settings[name])
                skipped.append(path)
            else:
                todo.append((name, method, overrides, seed, path))
    if state.is_main_process:
        atomic_write_text(base / "spec.json", json.dumps(asdict(spec), indent=2) + "\n")
    bar = Bar(progress and state.is_main_process, len(todo), spec.name)
    done = []
    try:
        for i, (name, method, overrides, seed, path) in enumerate(todo):
            stage = lambda s, n=name, k=seed, i=i: bar.update(completed=i, info=f"{n} seed {k}: {s}")  # noqa: E731
            reason, grid = _cannot_run(method, ds), lr_grid(_own(spec, method, overrides))
            if reason:
                result = _skipped(spec, ds, name, method, seed, settings[name], reason)
            elif grid:
                result = _search(spec, ds, out, base, state, name, method, overrides, seed, grid, force,
                                 backbone=backbone, mode=mode, stage=stage)
            else:
                result = run_job(spec, ds, base, name, method, overrides, seed, backbone=backbone, mode=mode,
                                 stage=stage)
            if state.is_main_process:
                write_result(path, result)
                shutil.rmtree(base / "work" / f"{name}-seed{seed}", ignore_errors=True)
                if (base / "work").is_dir() and not any((base / "work").iterdir()):
                    (base / "work").rmdir()
                if log and reason:
                    log(f"{name} seed {seed}: skipped ({reason})")
                elif log:
                    chosen = f", lr {result['lr_search']['chosen']:g} chosen" if result.get("lr_search") else ""
                    log(f"{name} seed {seed}: seen {_pct(result, 'seen')}, unseen {_pct(result, 'unseen')} "
                        f"({result['timing']['fit_seconds']:.0f} s to train{chosen})")
            state.wait_for_everyone()
            done.append(str(path))
    finally:
        bar.update(completed=len(done))
        bar.close()
    return {"done": done, "skipped": [str(p) for p in skipped]}


def _search(spec, ds, out: Path, base: Path, state, name: str, method: str, overrides: dict, seed: int,
            grid: list[float], force: bool, *, backbone, mode, stage) -> Result:
    """Train the job at each learning rate of ``grid`` (candidates already stored are reused when their
    settings match), and keep the one with the best validation accuracy (:mod:`coplctl.bench.search`)."""
    found = {}
    for lr in grid:
        path, own = candidate_path(out, spec.name, name, seed, lr), {**overrides, "lr": lr}
        if path.exists() and not force:
            _check_same(path, _settings(spec, method, own, backbone, mode))
            found[lr] = check_result(read_json(path, what="results file"), path)
            continue
        try:
            found[lr] = run_job(spec, ds, base, name, method, own, seed, backbone=backbone, mode=mode, tag=tag(lr),
                                stage=lambda s, lr=lr: stage(f"lr {lr:g}: {s}"))
        except Diverged as e:
            settings = _settings(spec, method, own, backbone, mode)
            found[lr] = diverged(_bare(spec, ds, name, method, seed, settings), str(e))
        if state.is_main_process:
            write_result(path, found[lr])
            shutil.rmtree(base / "work" / f"{name}-seed{seed}{tag(lr)}", ignore_errors=True)
        state.wait_for_everyone()
    return choose(grid, found)


def _cannot_run(method: str, ds) -> str | None:
    """Why ``method`` cannot run on ``ds`` (it needs every user's group and some have none), or None."""
    from coplctl.core.registry import METHODS

    from coplctl.graph.probe import weight_columns

    mixture = weight_columns(ds.users) and ds.users["group"].isna().all()  # the oracle knows their weights
    if getattr(METHODS.get(method), "needs_groups", False) and ds.users["group"].isna().any() and not mixture:
        return "needs every user's preference group, and the dataset does not give them all"
    return None


def _bare(spec, ds, name: str, method: str, seed: int, settings: dict) -> Result:
    """A job's result without metrics: what it was and on which data."""
    return {"spec": spec.name, "spec_version": spec.version, "spec_file": spec.path, "name": name, "method": method,
            "seed": seed, "config": settings, "metrics": {}, "data": data_record(spec, ds),
            "provenance": provenance(ds.path)}


def _skipped(spec, ds, name: str, method: str, seed: int, settings: dict, reason: str) -> Result:
    """The result of a job that cannot run on this dataset: no metrics, the reason (tables note it)."""
    return {**_bare(spec, ds, name, method, seed, settings), "skipped": reason}  # type: ignore[return-value]


def data_record(spec, ds) -> dict:
    """What the results say of the data: the spec's data section for simulated data (its protocol), the
    source and path otherwise; and always the dataset's own counts (its hash is in the provenance)."""
    d = spec.data
    own = asdict(d) if d.source == "simulated" else {
        "source": d.source, "path": d.path, "variant": ds.meta.get("variant"), "annotations": ds.meta.get("annotations")}
    return {**own, "counts": ds.counts()}


def _lock(state, stack: contextlib.ExitStack, out: Path, base: Path, name: str) -> None:
    """The main process creates ``base`` and locks it; every process learns whether that worked."""
    problem = None
    if state.is_main_process:
        try:
            for p in (out, base):
                if p.exists() and not p.is_dir():
                    raise CoplError(f"--out {out}: {p} is a file; the results directory must be a directory")
            try:
                base.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise CoplError(f"cannot create {base} ({e.strerror or e}); choose another --out") from None
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
    settings = {"backbone": backbone or spec.backbone, "mode": mode or spec.mode, **_own(spec, method, overrides)}
    return asdict(make_config(cls.Config, settings, owner=f"{spec.name}: method {method}"))


def _own(spec: BenchmarkSpec, method: str, overrides: dict) -> dict:
    """The overrides that apply to ``method``: a ``common`` key (or the ``lr_grid``) it does not have is for
    other methods."""
    from coplctl.core.registry import METHODS

    fields = {f.name for f in dataclasses.fields(METHODS.get(method).Config)}
    shared = set(spec.common) | ({"lr"} if spec.lr_grid else set())
    return {k: v for k, v in overrides.items()
            if k in fields or k not in shared or k in spec.overrides.get(method, {})}


def check_jobs(spec: BenchmarkSpec, backbone=None, mode=None, sets: dict | None = None) -> dict[str, dict]:
    """{job name: resolved config} of every method and ablation of the spec, built before any work so a
    wrong value stops the run at once; the error names the spec file and the key that holds the value."""
    out = {}
    for i, (name, method, overrides) in enumerate(spec.jobs()):
        try:
            grid = lr_grid(_own(spec, method, overrides))
            if grid is None:
                out[name] = _settings(spec, method, overrides, backbone, mode)
            else:  # every candidate's config, checked now; the job's settings hold the grid
                check_grid(grid, f"method {name}")
                out[name] = {**[_settings(spec, method, {**overrides, "lr": lr}, backbone, mode) for lr in grid][0],
                             "lr": grid}
        except CoplError as e:
            key = _culprit(spec, i, method, overrides, backbone, mode, sets or {})
            where = key if key and key.startswith("--") else f"{spec.path or spec.name}: {key or f'method {name}'}"
            raise SpecError(f"{where}: {e}") from None
    return out


def _culprit(spec: BenchmarkSpec, i: int, method: str, overrides: dict, backbone, mode, sets: dict) -> str | None:
    """Where the value that a job's config rejects comes from (None when no single value is wrong)."""
    from coplctl.core.registry import METHODS
    from coplctl.models.reward import make_config

    cls = METHODS.get(method)
    values = {"backbone": backbone or spec.backbone, "mode": mode or spec.mode, **_own(spec, method, overrides)}
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


def run_job(spec, ds, base: Path, name: str, method_name: str, overrides: dict, seed: int, *,
            backbone=None, mode=None, stage=lambda s: None, tag: str = "") -> dict:
    """Train one (method, seed), save its run, evaluate it, and run the method's extra experiments
    (:meth:`coplctl.models.reward.RewardMethod.experiments`) when the job is one of the spec's methods.

    Under several processes every process trains (training is collective); only the main process
    writes files.
    """
    from accelerate import PartialState

    from coplctl.models.evaluate import evaluate
    from coplctl.core.registry import METHODS
    from coplctl.models.reward import ExperimentContext

    main = PartialState().is_main_process
    cls = METHODS.get(method_name)
    settings = _settings(spec, method_name, overrides, backbone, mode)
    method = cls(cls.Config(**settings))
    stage("train")
    t0 = time.perf_counter()
    training = method.fit(ds, seed=seed, work_dir=base / "work" / f"{name}-seed{seed}{tag}", progress=False)
    fit_seconds = time.perf_counter() - t0
    run_dir = base / "runs" / name / f"seed{seed}{tag}"
    if main:
        method.save(run_dir)
    PartialState().wait_for_everyone()
    stage("evaluate")
    t0 = time.perf_counter()
    ev = evaluate(method, ds)
    result: Result = {
        "spec": spec.name, "spec_version": spec.version, "spec_file": spec.path, "name": name,
        "method": method_name, "seed": seed, "backbone": settings["backbone"], "mode": settings["mode"],
        "data": data_record(spec, ds),
        "config": asdict(method.config), "metrics": ev["metrics"], "adaptation": ev.get("adaptation"),
        "training": dict(training),
        "timing": {"fit_seconds": round(fit_seconds, 2), "evaluate_seconds": round(time.perf_counter() - t0, 2)},
        "run_dir": str(run_dir), "provenance": provenance(ds.path),
    }
    if name in spec.methods:  # ablations are compared on the standard evaluation only
        extra = method.experiments(ExperimentContext(data=ds, spec=spec, settings=settings, seed=seed,
                                                     run_dir=run_dir, out_dir=base, main_process=main, stage=stage))
        if extra:
            result["extra"] = extra
    return result
