"""A benchmark's dataset: simulated on first use (deterministically, from the spec's data section) and
reused while its settings match, or read from the directory a real-data spec names; and what results
record of it."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from coplctl.bench.spec import BenchmarkSpec
from coplctl.core.errors import CoplError

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


def data_record(spec, ds) -> dict:
    """What the results say of the data: the spec's data section for simulated data (its protocol), the
    source and path otherwise; and always the dataset's own counts (its hash is in the provenance)."""
    d = spec.data
    own = asdict(d) if d.source == "simulated" else {
        "source": d.source, "path": d.path, "variant": ds.meta.get("variant"), "annotations": ds.meta.get("annotations")}
    from coplctl.data.signal import seen_train_signal

    return {**own, "counts": ds.counts(), "text_format": ds.text_format, "personal_signal": seen_train_signal(ds)}
