"""The benchmark runner: every (method, seed) of a spec trained, evaluated and stored as one results
JSON; finished runs are skipped, so an interrupted benchmark resumes where it stopped."""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict
from pathlib import Path

from coplctl.bench.results import provenance, result_path, write_result
from coplctl.bench.spec import BenchmarkSpec
from coplctl.errors import CoplError

HOW_TO_BUILD = (
    "{path} does not exist. Build it from UltraFeedback first: download openbmb/UltraFeedback and "
    "argilla/ultrafeedback-binarized-preferences-cleaned (e.g. `huggingface-cli download --repo-type dataset "
    "openbmb/UltraFeedback --local-dir ~/data/UltraFeedback`), then `coplctl data build-ufp --variant {variant} "
    "--annotations {annotations} --ultrafeedback ~/data/UltraFeedback --cleaned ~/data/uf-cleaned --out {path}`; "
    "or run the simulated twin, `coplctl benchmark sim-{variant}-{annotations}`."
)


def prepare_data(spec: BenchmarkSpec, base: Path):
    """The spec's dataset: generated once for simulated specs, read from data.path for real ones."""
    from coplctl.data import load

    d = spec.data
    if d.source == "ultrafeedback":
        path = Path(d.path)
        if not path.exists():
            raise CoplError(HOW_TO_BUILD.format(path=path, variant=d.variant, annotations=d.annotations))
        ds = load(path)
        if (ds.meta.get("variant"), ds.meta.get("annotations")) != (d.variant, d.annotations):
            raise CoplError(f"{path} holds {ds.meta.get('variant')}-{ds.meta.get('annotations')}, but the spec "
                            f"{spec.name} expects {d.variant}-{d.annotations}")
        return ds
    path = base / "data"
    if not (path / "meta.json").exists():
        from coplctl.data.protocol import ProtocolConfig
        from coplctl.data.simulate import SimConfig, simulate

        proto = ProtocolConfig(variant=d.variant, annotations=d.annotations, users=d.users,
                               unseen_users=d.unseen_users, survey_pairs=d.survey_pairs, fewshot_pairs=d.fewshot_pairs)
        simulate(SimConfig(protocol=proto, seed=d.seed)).save(path, overwrite=True)
    return load(path)


def run_benchmark(spec: BenchmarkSpec, out: str | Path, *, names: list[str] | None = None,
                  seeds: list[int] | None = None, backbone: str | None = None, mode: str | None = None,
                  force: bool = False, progress: bool = True, log=None) -> dict:
    """Run the spec's jobs not finished yet; returns {"done": [...], "skipped": [...]} result paths."""
    import torch
    from accelerate import PartialState

    state = PartialState(cpu=not torch.cuda.is_available())
    base = Path(out) / spec.name
    with state.main_process_first():
        ds = prepare_data(spec, base)
    jobs = [j for j in spec.jobs() if not names or j[0] in names or j[1] in names]
    if names and not jobs:
        raise CoplError(f"none of {', '.join(names)} is a method or ablation of {spec.name} "
                        f"(it has: {', '.join(j[0] for j in spec.jobs())})")
    seeds = seeds if seeds is not None else spec.seeds
    todo, skipped = [], []
    for name, method, overrides in jobs:
        for seed in seeds:
            path = result_path(out, spec.name, name, seed)
            (todo if force or not path.exists() else skipped).append((name, method, overrides, seed, path))
    if state.is_main_process:
        base.mkdir(parents=True, exist_ok=True)
        (base / "spec.json").write_text(json.dumps(asdict(spec), indent=2) + "\n")
    bar = _bar(progress and state.is_main_process, len(todo), spec.name)
    done = []
    try:
        for i, (name, method, overrides, seed, path) in enumerate(todo):
            result = run_job(spec, ds, base, name, method, overrides, seed, backbone=backbone, mode=mode,
                             stage=lambda s, n=name, k=seed: bar(i, f"{n} seed {k}: {s}"))
            if state.is_main_process:
                write_result(path, result)
                shutil.rmtree(base / "work" / f"{name}-seed{seed}", ignore_errors=True)
                if (base / "work").is_dir() and not any((base / "work").iterdir()):
                    (base / "work").rmdir()
                if log:
                    log(f"{name} seed {seed}: seen {_pct(result, 'seen')}, unseen {_pct(result, 'unseen')} "
                        f"({result['timing']['fit_seconds']:.0f} s to train)")
            state.wait_for_everyone()
            done.append(str(path))
    finally:
        bar(len(todo), None)
    return {"done": done, "skipped": [str(t[-1]) for t in skipped]}


def _pct(result: dict, role: str) -> str:
    m = result["metrics"].get(role)
    return "-" if not m or m["accuracy"] is None else f"{100 * m['accuracy']:.2f}"


def run_job(spec, ds, base: Path, name: str, method_name: str, overrides: dict, seed: int, *,
            backbone=None, mode=None, stage=lambda s: None) -> dict:
    """Train one (method, seed), save its run, evaluate it, and the paper's extras for CoPL."""
    from coplctl.evaluate import evaluate
    from coplctl.registry import METHODS
    from coplctl.reward import make_config

    cls = METHODS.get(method_name)
    settings = {"backbone": backbone or spec.backbone, "mode": mode or spec.mode, **overrides}
    method = cls(make_config(cls.Config, settings, owner=f"{spec.name}: method {name}"))
    stage("train")
    t0 = time.perf_counter()
    training = method.fit(ds, seed=seed, work_dir=base / "work" / f"{name}-seed{seed}", progress=False)
    fit_seconds = time.perf_counter() - t0
    run_dir = base / "runs" / name / f"seed{seed}"
    method.save(run_dir)
    n_seen = len(method.user_ids)
    stage("evaluate")
    t0 = time.perf_counter()
    ev = evaluate(method, ds)
    result = {
        "spec": spec.name, "spec_version": spec.version, "spec_file": spec.path, "name": name,
        "method": method_name, "seed": seed, "backbone": settings["backbone"], "mode": settings["mode"],
        "data": asdict(spec.data),
        "config": asdict(method.config), "metrics": ev["metrics"], "adaptation": ev.get("adaptation"),
        "training": {k: v for k, v in training.items()},
        "timing": {"fit_seconds": round(fit_seconds, 2), "evaluate_seconds": round(time.perf_counter() - t0, 2)},
        "run_dir": str(run_dir), "provenance": provenance(ds.path),
    }
    if method_name == "copl" and name == "copl":
        result["extra"] = copl_extras(spec, ds, method, n_seen, base, seed, settings, stage)
    return result


def copl_extras(spec, ds, method, n_seen: int, base: Path, seed: int, settings: dict, stage) -> dict:
    """Table 4 (adaptation variants), Table 5 (GCF accuracy), Figure 2 (few-shot curve), figures, Table 6."""
    from coplctl.evaluate import evaluate

    extra: dict = {"gcf": json.loads((Path(method.gcf_dir) / "metrics.json").read_text())}
    extra["gcf"].pop("history", None)
    original = (method.config.adaptation, method.config.hops)
    adapted = method.net.user_table[n_seen:].detach().clone(), method.user_ids[n_seen:]
    if spec.adaptation:
        stage("adaptation variants")
        extra["adaptation"] = {}
        for variant in spec.adaptation:
            method.forget_users(n_seen)
            method.config.adaptation = variant
            extra["adaptation"][variant] = evaluate(method, ds, roles=("unseen",))["metrics"].get("unseen")
    if spec.fewshot_curve:
        stage("few-shot curve")
        curve: dict = {}
        method.config.adaptation = "weighted"
        for hops in spec.fewshot_curve.hops:
            method.config.hops = hops
            for shots in spec.fewshot_curve.shots:
                method.forget_users(n_seen)
                m = evaluate(method, ds, fewshot=shots, roles=("unseen",))["metrics"].get("unseen")
                curve.setdefault(str(hops), {})[str(shots)] = m["accuracy"] if m else None
        extra["fewshot_curve"] = curve
    method.config.adaptation, method.config.hops = original
    if spec.figures:
        stage("figures")
        from coplctl.bench.plots import plot_embeddings, plot_experts

        fig = base / "figures"
        extra["figures"] = {"tsne": plot_embeddings(method.gcf_dir, fig / f"tsne-seed{seed}.png",
                                                    adapted_embeddings=(adapted[1], adapted[0]))["path"]}
        if method.config.mole:
            extra["figures"]["experts"] = plot_experts(base / "runs" / "copl" / f"seed{seed}",
                                                       fig / f"experts-seed{seed}.png")["path"]
    if spec.pseudo_labels:
        stage("pseudo labels")
        from coplctl.bench.pseudo import pseudo_label_experiments

        extra["pseudo_labels"] = pseudo_label_experiments(spec, ds, method, base, seed, settings)
    return extra


def _bar(enabled: bool, total: int, label: str):
    if not enabled:
        return lambda done, info: None
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from coplctl.cli.common import err

    prog = Progress(TextColumn(label), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TextColumn("{task.fields[info]}"), console=err)
    task = prog.add_task(label, total=total, info="")
    prog.start()

    def update(done, info):
        if info is None:
            prog.update(task, completed=done, info="")
            prog.stop()
        else:
            prog.update(task, completed=done, info=info)

    return update
