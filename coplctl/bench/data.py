"""A benchmark's dataset: simulated on first use (deterministically, from the spec's data section) and
reused while its settings match, or read from the directory a real-data spec names; and what results
record of it."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from coplctl.bench.spec import BenchmarkSpec
from coplctl.core.errors import CoplError

HOW_TO_BUILD = (
    "{path} does not exist. Build it from UltraFeedback first: download openbmb/UltraFeedback and "
    "argilla/ultrafeedback-binarized-preferences-cleaned (`huggingface-cli download --repo-type dataset "
    "openbmb/UltraFeedback --local-dir ~/data/UltraFeedback`, and the second to ~/data/uf-cleaned), then "
    "`coplctl data build-ufp --variant {variant} "
    "--annotations {annotations} --ultrafeedback ~/data/UltraFeedback --cleaned ~/data/uf-cleaned{cut} --out {path}`; "
    "or run the simulated twin, `coplctl benchmark sim-{variant}-{annotations}`."
)
BUILD_ONLY = ("build", "tokenizer", "max_tokens")
"""Data keys only real data's builders read (a simulated twin inherits them from its real spec)."""
HOW_TO_BUILD_OTHER = ("{path} does not exist. Build it with `coplctl data build-{build} --annotations {annotations}"
                      "{cut} --out {path}` (see README), or run the simulated twin, `coplctl benchmark {twin}`.")


@dataclass
class Builder:
    """How a real spec's missing dataset is made on first use."""

    what: str
    """What is built (UF-P, TL;DR, PersonalLLM)."""
    inputs: dict[str, str]
    """{what: hub id} of the source datasets, read through ``datasets`` (its cache first)."""
    make: Callable
    """Builds the dataset (a :class:`coplctl.data.dataset.PreferenceDataset`)."""
    manual: str
    """The error a user gets when the data may not be downloaded: how to build it by hand."""


def _own_protocol(d, protocol):
    """A TL;DR or PersonalLLM builder's protocol: the authors' (``protocol()``), with the spec's data keys that
    differ from UF-P's defaults (``annotations``, ``users`` ...); a key left at UF-P's default keeps the
    builder's own (e.g. PersonalLLM's 100 test pairs a user, not UF-P's 10)."""
    from coplctl.data.protocol import ProtocolConfig

    default = ProtocolConfig()
    return protocol(**{f.name: getattr(d, f.name) for f in dataclasses.fields(ProtocolConfig)
                       if getattr(d, f.name) != getattr(default, f.name)})


OPTIONS = {"ufp": ("users", "unseen_users", "survey_pairs", "fewshot_pairs", "valid_pairs", "valid_prompt_fraction",
                   "preferences", "alpha"),
           "tldr": ("users", "unseen_users", "fewshot_pairs", "test_pairs", "unseen_test_pairs"),
           "personalllm": ("users", "unseen_users", "fewshot_pairs", "test_pairs", "unseen_test_pairs",
                           "valid_prompt_fraction", "alpha")}
"""The protocol keys each ``coplctl data build-*`` command has an option for."""


def _flags(d, built, default, command: str) -> str:
    """The ``coplctl data build-*`` options that make by hand what the spec builds: the protocol keys where
    ``built`` differs from the command's ``default``, the seed, the length filter."""
    keys = [k for k in OPTIONS[command] if getattr(built, k) != getattr(default, k)]
    pairs = [(k, getattr(built, k)) for k in keys] + [("seed", d.seed)] * bool(d.seed) + [
        (k, getattr(d, k)) for k in ("tokenizer", "max_tokens") if getattr(d, k) is not None]
    return "".join(f" --{k.replace('_', '-')} {v}" for k, v in pairs)


def builder(spec: BenchmarkSpec) -> Builder | None:
    """The builder of the spec's real dataset, with the spec's protocol and length filter; None for simulated
    data and for a ``directory`` source that names no ``build``. A protocol the builder rejects is one error
    naming the spec's data section."""
    try:
        return _builder(spec)
    except CoplError as e:
        raise CoplError(f"{spec.path or spec.name}: data: {e}") from None


def _builder(spec: BenchmarkSpec) -> Builder | None:
    from coplctl.data.protocol import ProtocolConfig

    d = spec.data
    cut = {"tokenizer": d.tokenizer, "max_tokens": d.max_tokens}
    if d.source == "ultrafeedback":
        from coplctl.data.ultrafeedback import BuildConfig, build_ufp

        cfg = BuildConfig(protocol=d.protocol(), seed=d.seed, **cut)
        flags = _flags(d, cfg.protocol, ProtocolConfig(variant=d.variant, annotations=d.annotations), "ufp")
        return Builder("UF-P", {"UltraFeedback": cfg.ultrafeedback, "the cleaned pairs": cfg.cleaned},
                       lambda: build_ufp(cfg), HOW_TO_BUILD.format(path=d.path, variant=d.variant,
                                                                    annotations=d.annotations, cut=flags))
    if d.source == "directory" and d.build == "tldr":
        from coplctl.data.tldr import TldrConfig, build_tldr, tldr_protocol

        cfg = TldrConfig(protocol=_own_protocol(d, tldr_protocol), seed=d.seed, **cut)
        flags = _flags(d, cfg.protocol, tldr_protocol(annotations=d.annotations), "tldr")
        return Builder("TL;DR", {"TL;DR comparisons": cfg.source}, lambda: build_tldr(cfg),
                       HOW_TO_BUILD_OTHER.format(path=d.path, build="tldr", annotations=d.annotations, cut=flags,
                                                 twin="sim-tldr-" + d.annotations))
    if d.source == "directory" and d.build == "personalllm":
        from coplctl.data.personalllm import PersonalLLMConfig, build_personalllm, plm_protocol

        cfg = PersonalLLMConfig(protocol=_own_protocol(d, plm_protocol), seed=d.seed, **cut)
        flags = _flags(d, cfg.protocol, plm_protocol(annotations=d.annotations), "personalllm")
        return Builder("PersonalLLM", {"PersonalLLM": cfg.source}, lambda: build_personalllm(cfg),
                       HOW_TO_BUILD_OTHER.format(path=d.path, build="personalllm", annotations=d.annotations,
                                                 cut=flags, twin="sim-personalllm-" + d.annotations))
    return None


def datasets_cache() -> str:
    """Where ``datasets`` keeps what it downloads (HF_DATASETS_CACHE), or a note that it is not installed."""
    try:
        import datasets
    except ImportError:
        return "the `datasets` package is not installed (pip install 'coplctl[hub]')"
    return str(datasets.config.HF_DATASETS_CACHE)


def _build(spec: BenchmarkSpec, path: Path, download: bool, progress: bool, log) -> None:
    """Make a real spec's missing dataset directory (once; saved atomically), or say how to."""
    where = spec.path or spec.name
    b = builder(spec)
    if b is None:
        raise CoplError(f"{where}: data.path {path} is not a dataset directory (it does not exist, and the spec "
                        f"names no data.build to make it)")
    if not download:
        raise CoplError(b.manual + " (--no-download: nothing is downloaded or built)")
    from coplctl.core.progress import Bar

    sources = ", ".join(f"{k} ({v})" for k, v in b.inputs.items() if v)
    if log:
        log(f"{path} does not exist: building {b.what} from {sources} through `datasets` (cache: "
            f"{datasets_cache()}); done once, reused afterwards")
    bar = Bar(progress, 1, f"building {path}")
    try:
        ds = b.make()
        ds.save(path)
    except CoplError as e:  # the builders' advice on local copies ("; or download ...") is for their options
        raise CoplError(f"{where}: could not build {path}: {str(e).split('; or ')[0]}. By hand instead: "
                        f"{b.manual}") from None
    finally:
        bar.close()
    if log:
        c = ds.counts()
        log(f"built {path}: {c['responses']:,} responses, {c['users']['seen']:,} seen + {c['users']['unseen']:,} "
            f"unseen users")


def simulated_as_specified(meta: dict, d) -> bool:
    """Whether simulated data with ``meta`` was made with the spec's data section ``d`` (then it is reused)."""
    return meta.get("protocol") == asdict(d.protocol()) and meta.get("seed") == d.seed


def prepare_data(spec: BenchmarkSpec, base: Path, force: bool = False, *, download: bool = True,
                 progress: bool = False, log=None):
    """The spec's dataset: generated once for simulated specs, read from data.path for real ones (built there
    on first use when the spec says how, unless ``download`` is False)."""
    from coplctl.data import load

    d = spec.data
    if d.source in ("directory", "ultrafeedback"):
        path = Path(d.path)
        if not path.exists():
            _build(spec, path, download, progress, log)
        if not path.is_dir():
            raise CoplError(f"{spec.path or spec.name}: data.path {path} is not a dataset directory")
        ds = load(path)
        if d.source == "ultrafeedback" and (ds.meta.get("variant"), ds.meta.get("annotations")) != (d.variant, d.annotations):
            raise CoplError(f"{path} holds {ds.meta.get('variant')}-{ds.meta.get('annotations')}, but the spec "
                            f"{spec.name} expects {d.variant}-{d.annotations}")
        return ds
    from coplctl.data.simulate import SimConfig, simulate

    path = base / "data"
    if (path / "meta.json").exists():
        ds = load(path)
        if simulated_as_specified(ds.meta, d):
            return ds
        if not force:
            raise CoplError(f"{path} was simulated with other settings than the spec's data section; results "
                            f"there are stale: use another --out, or --force to regenerate and rerun everything")
    simulate(SimConfig(protocol=d.protocol(), seed=d.seed)).save(path, overwrite=True)
    return load(path)


def data_record(spec, ds) -> dict:
    """What the results say of the data: the spec's data section for simulated data (its protocol), the
    source and path otherwise; and always the dataset's own counts (its hash is in the provenance)."""
    d = spec.data
    own = {k: v for k, v in asdict(d).items() if k not in BUILD_ONLY} if d.source == "simulated" else {
        "source": d.source, "path": d.path, "variant": ds.meta.get("variant"), "annotations": ds.meta.get("annotations")}
    from coplctl.data.signal import seen_train_signal

    return {**own, "counts": ds.counts(), "text_format": ds.text_format, "personal_signal": seen_train_signal(ds)}
