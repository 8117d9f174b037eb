"""What a benchmark would do, without doing it (``coplctl benchmark SPEC --dry-run``): every job (method or
ablation, seed, learning-rate candidate) and whether a finished result in ``--out`` skips it, where the data
comes from and whether it must be simulated, built or downloaded, the backbone, mode, precision and
processes, and in ``lora`` mode an estimate of each method's peak memory per process
(:mod:`coplctl.models.memory`, the formula in its docstring)."""

from __future__ import annotations

from pathlib import Path

from coplctl.bench.data import builder, datasets_cache, simulated_as_specified
from coplctl.bench.results import result_path
from coplctl.bench.runner import not_a_file, select_jobs
from coplctl.bench.search import candidate_path
from coplctl.bench.spec import BenchmarkSpec
from coplctl.core.errors import CoplError
from coplctl.models.train_config import MODE_DEFAULTS

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def data_plan(spec: BenchmarkSpec, base: Path, download: bool, force: bool = False) -> dict:
    """Where the spec's data comes from and what the run must do to have it (``usable``: it exists and the
    run would read it)."""
    d = spec.data
    if d.source == "simulated":
        path = base / "data"
        status, usable = "simulated on first use (offline; seconds to a minute at paper scale)", False
        if (path / "meta.json").exists():
            from coplctl.data import load

            usable = simulated_as_specified(load(path).meta, d)
            status = ("simulated earlier (reused while the spec's data section is unchanged)" if usable else
                      "simulated with other settings than the spec's: " + (
                          "--force regenerates it and reruns everything" if force else
                          "the run stops (use another --out, or --force)"))
        return {"source": "simulated", "path": str(path), "status": status, "build": False, "usable": usable}
    path, b = Path(d.path), builder(spec)
    if path.is_dir():
        return {"source": d.source, "path": str(path), "status": "exists", "build": False, "usable": True}
    if path.exists():
        status = "is a file, not a dataset directory: the run stops"
    elif b is None:
        status = "missing, and the spec names no data.build: the run stops"
    elif not download:
        status = "missing; --no-download: the run stops and says how to build it"
    else:
        status = (f"missing: built on first use ({b.what}) from " + ", ".join(v for v in b.inputs.values() if v)
                  + f", read through `datasets` (downloaded unless already in its cache: {datasets_cache()})"
                  + (f"; responses over {d.max_tokens} {d.tokenizer} tokens dropped" if d.max_tokens else ""))
    return {"source": d.source, "path": str(path), "status": status,
            "build": b is not None and download and not path.exists(), "inputs": b.inputs if b else {}, "usable": False}


def _precision(dtype: str, cuda: bool) -> str:
    return dtype if dtype != "auto" else ("bfloat16" if cuda else "float32")


def memory(job) -> dict | None:
    """Peak-memory estimates of a ``lora``-mode job per process: on a GPU (bf16 weights unless the job sets a
    dtype) and on a CPU (fp32); None in frozen mode (no language model trains)."""
    from coplctl.core.registry import METHODS
    from coplctl.models.memory import estimate

    cls = METHODS.get(job.method)
    if job.settings.get("mode") != "lora" or not hasattr(cls, "adapter_parameters"):
        return None
    config = cls.Config(**next(iter(job.candidates.values()), job.settings))  # a search's first candidate
    out = {}
    for where, on_gpu in (("gpu", True), ("cpu", False)):
        dtype = _precision(config.dtype, on_gpu)
        out[where] = {"dtype": dtype, **estimate(cls, config, dtype_bytes=DTYPE_BYTES[dtype], fused_attention=on_gpu)}
    return out


def _status(path: Path, settings: dict, force: bool, cannot: str | None) -> str:
    """What the run would do with one training whose result (or candidate) file is ``path``."""
    from coplctl.bench.runner import _check_same

    if path.exists() and not force:
        try:
            _check_same(path, settings)
        except CoplError as e:
            return f"stops: {e}"
        return "finished: skipped"
    if cannot:
        return f"cannot run: {cannot}"
    return "to run" + (" (--force redoes it)" if path.exists() else "")


def plan(spec: BenchmarkSpec, out: str | Path, *, names=None, seeds=None, backbone=None, mode=None,
         sets: dict | None = None, download: bool = True, force: bool = False) -> dict:
    """The dry run of ``coplctl benchmark`` with the same arguments, as one JSON-able document."""
    import torch
    from accelerate import PartialState

    spec, jobs, seeds = select_jobs(spec, names, seeds, backbone, mode, sets)
    out = Path(out)
    not_a_file(out, out / spec.name)
    cuda = torch.cuda.is_available()
    state = PartialState(cpu=not cuda)
    data = data_plan(spec, out / spec.name, download, force)
    cannot = {}
    if data.get("usable"):
        from coplctl.core.registry import METHODS
        from coplctl.data import load

        ds = load(data["path"])
        cannot = {j.name: METHODS.get(j.method).cannot_run(ds) for j in jobs}
    rows = []
    for job in jobs:
        for seed in seeds:
            final = result_path(out, spec.name, job.name, seed)
            default = MODE_DEFAULTS.get(job.settings.get("mode"), {}).get("lr")
            own = job.settings.get("lr")
            for lr in list(job.candidates) or [default if own is None else own]:
                path, settings = ((candidate_path(out, spec.name, job.name, seed, lr), job.candidates[lr])
                                  if job.candidates else (final, job.settings))
                status = _status(final if final.exists() else path, job.settings if final.exists() else settings,
                                 force, cannot.get(job.name))
                rows.append({"name": job.name, "method": job.method, "ablation": job.ablation, "seed": seed,
                             "lr": lr, "searched": bool(job.candidates), "status": status, "result": str(path)})
    setup = sorted({(j.settings.get("backbone"), j.settings.get("mode"), j.settings.get("dtype"))
                    for j in jobs if j.settings.get("backbone")})
    return {"spec": spec.name, "spec_file": spec.path, "out": str(out / spec.name), "data": data,
            "backbones": [{"backbone": b, "mode": m, "precision": _precision(d or "auto", cuda),
                           "precision_setting": d} for b, m, d in setup],
            "processes": state.num_processes, "device": "cuda" if cuda else "cpu", "seeds": seeds,
            "jobs": rows, "to_run": sum(r["status"].startswith("to run") for r in rows),
            "finished": sum(r["status"].startswith("finished") for r in rows),
            "memory": {j.name: m for j in jobs if (m := memory(j)) is not None}}
