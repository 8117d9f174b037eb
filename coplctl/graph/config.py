"""The GCF's hyperparameters and presets (paper §4.1, Appendix C.2), and the choice between full-graph and
neighbour-sampled training by the graph's size."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Annotated

import torch

from coplctl.core.config import AT_LEAST_1, FRACTION, NON_NEGATIVE, POSITIVE, OneOf, check_fields
from coplctl.core.errors import CoplError
from coplctl.graph.model import VARIANTS

NEIGHBOR_BATCH = 4096
"""Pairs per step when ``auto`` picks neighbour sampling and the config gives no batch size."""
MEMORY_SHARE = 0.8
"""Share of the device's memory full-graph training may plan to use before ``auto`` samples instead."""


@dataclass
class GCFConfig:
    """GCF hyperparameters. Defaults are the CPU preset; ``PRESETS["paper"]`` holds the paper's values.

    CPU preset: d=32 and one full-graph step per epoch over all training pairs, with a larger learning
    rate, an L2 penalty on the scored embeddings and the paper layer's signed init. On the simulated
    twins at paper scale (one pair per prompt, as real UF-P) it reaches 88.8% validation accuracy and a
    99.2% group probe on UF-P-2-ALL, 88.4% and 95.7% on UF-P-4-AVG, in about 2-4 minutes on 2 cores
    (``benchmarks/perf/gcf_quality.py``).
    """

    dim: Annotated[int, AT_LEAST_1] = 32
    """Embedding width d (paper: 512; the CPU preset's 32 lands within a point of 512, see benchmarks/perf/gcf.py)."""
    layers: Annotated[int, AT_LEAST_1] = 4
    """Message-passing layers L (paper: 4)."""
    variant: Annotated[str, OneOf(*VARIANTS)] = "paper"
    """``paper`` (Eq. 2-4), ``official`` (the authors' code, see METHODS.md) or ``lightgcn`` (another GNN)."""
    epochs: Annotated[int, AT_LEAST_1] = 300
    """Maximum epochs (paper: 300; official code: 100)."""
    lr: Annotated[float, POSITIVE] = 2e-2
    """AdamW learning rate (paper: 1e-4 with batches of 1024 pairs)."""
    batch_size: Annotated[int, NON_NEGATIVE] = 0
    """Pairs per optimisation step; 0 = all training pairs (one full-graph step per epoch). Paper: 1024."""
    l2: Annotated[float, NON_NEGATIVE] = 1e-2
    """λ of the L2 penalty on the layer-L embeddings that enter each batch's scores (as BPR penalises its
    factors); the paper writes λ‖θ‖² without a value. It is what keeps full-batch GCF from memorising."""
    weight_decay: Annotated[float, NON_NEGATIVE] = 0.0
    """AdamW weight decay of the layer weights."""
    grad_clip: Annotated[float, NON_NEGATIVE] = 1.0
    """Clip the gradient norm (0 = off): the Hadamard terms make deep GCF steep early on."""
    warmup_ratio: Annotated[float, FRACTION] = 0.1
    """Linear warmup share of all steps before the cosine decay (paper: 0.1)."""
    negative_slope: Annotated[float, NON_NEGATIVE] = 0.2
    """LeakyReLU slope ψ (paper: not reported; 0.2 as in NGCF)."""
    signed_init: bool = True
    """``paper`` variant: initialise W1 = I and W3 = -I (the other blocks as usual), so that training starts
    from signed propagation, e ← ψ(W_self e + Σα e_r⁺ − Σβ e_r⁻ + ...). The paper gives no init. With
    PyTorch's default init the layers mix the signs at random, and on graphs with one pair per prompt
    (real UF-P) the user embeddings then barely carry the preference groups: a logistic probe of the group
    reads 53% of simulated UF-P-2-ALL's users right, against 99% with this init (95% for a spectral split
    of the co-annotation matrix), and validation accuracy rises from 73% to 88% (benchmarks/perf/gcf_quality.py)."""
    init_std: Annotated[float, POSITIVE] | None = None
    """Standard deviation of the initial embeddings; None = 0.1·sqrt(32/d), so that embedding norms
    (and initial scores) do not grow with d."""
    edge_dropout: Annotated[float, FRACTION] = 0.0
    """Share of edges dropped at each training step (official code: 0.1)."""
    holdout: Annotated[float, FRACTION] = 0.0
    """Share of the training pairs held out of message passing at each step: their edges are removed
    from the graph the step propagates on, and only they enter the loss. 0 = the paper (every training
    edge carries messages and is scored)."""
    sampler: Annotated[str, OneOf("auto", "full", "neighbor")] = "auto"
    """``full``: propagate on the whole graph at each step; ``neighbor``: sampled subgraphs per batch (of
    ``batch_size`` pairs, :data:`NEIGHBOR_BATCH` when that is 0); ``auto``: full while the graph's
    full-graph training fits the device's memory (:func:`full_graph_bytes`), else neighbour sampling."""
    fanouts: tuple[Annotated[int, AT_LEAST_1], ...] = (15, 10, 10, 10)
    """Edges sampled per node and hop when ``sampler="neighbor"``."""
    select_on: Annotated[str, OneOf("all", "personal")] = "all"
    """Validation pairs the best epoch is chosen on: ``all``, or ``personal``: those whose label goes against
    the training labels' majority on the same pair (:func:`coplctl.data.signal.against_majority`; all pairs
    when fewer than 20 are), so the kept epoch is the one that tells users apart rather than the one that
    predicts the consensus best (beyond the paper; for mixed preferences)."""
    patience: Annotated[int, NON_NEGATIVE] = 40
    """Stop after this many epochs without a better validation accuracy (0 = never) ..."""
    min_epochs: Annotated[int, NON_NEGATIVE] = 150
    """... but not before this epoch: accuracy plateaus at the non-personalized level for tens of
    epochs before users' groups separate (longer for larger d)."""
    dtype: Annotated[str, OneOf("float32", "bfloat16", "float16")] = "float32"
    """Parameter dtype (float32, bfloat16 or float16)."""

    def __post_init__(self):
        check_fields(self, "GCF")  # types and ranges, from the annotations above
        if self.sampler == "neighbor" and self.batch_size <= 0:
            raise CoplError("the neighbour sampler needs a batch size (--batch-size)")
        if self.sampler == "neighbor" and len(self.fanouts) < self.layers:
            raise CoplError(f"GCF option fanouts: {len(self.fanouts)} values for {self.layers} layers")
        if self.holdout and self.sampler == "neighbor":
            raise CoplError("GCF option holdout works with the full-graph sampler only")


PRESETS = {
    "cpu": {},
    "paper": {"dim": 512, "lr": 1e-4, "batch_size": 1024, "epochs": 300},
    "official": {"dim": 512, "lr": 1e-4, "batch_size": 1024, "epochs": 100, "variant": "official",
                 "edge_dropout": 0.1},
}


def preset_config(preset: str = "auto", **overrides) -> GCFConfig:
    """``auto`` = ``paper`` when a GPU is present, else ``cpu``; then apply the non-None overrides."""
    if preset == "auto":
        preset = "paper" if torch.cuda.is_available() else "cpu"
    if preset not in PRESETS:
        raise CoplError(f"unknown preset {preset!r}; choose auto, {', '.join(PRESETS)}")
    fields = {f.name for f in dataclasses.fields(GCFConfig)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise CoplError(f"GCF has no option {unknown[0]!r} (options: {', '.join(sorted(fields))})")
    # options override the preset's values (an option the preset also sets is not a conflict)
    return GCFConfig(**{**PRESETS[preset], **{k: v for k, v in overrides.items() if v is not None}})


def full_graph_bytes(nodes: int, edges: int, cfg: GCFConfig) -> int:
    """Memory full-graph training needs (the memory-lean layers of :mod:`coplctl.graph.model`): per node and
    embedding dimension, the parameters, their gradient, AdamW's two moments, the best epoch's copy, one
    output per layer, the loss's gradient and the backward pass's transients (three); per edge (both
    signs counted), its index in the graph and in the CSR matrices. Measured at a million users (6.2M
    nodes, 31M edges, d=32, L=4): 11.5 GB estimated, 12.0 GiB peak RSS of `coplctl graph train`."""
    width = torch.finfo(getattr(torch, cfg.dtype)).bits // 8
    return nodes * cfg.dim * width * (cfg.layers + 9) + edges * 40


def memory_budget(device: torch.device) -> int:
    """Bytes full-graph training may plan to use on ``device``: :data:`MEMORY_SHARE` of its memory."""
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
    else:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return int(MEMORY_SHARE * total)


def resolve_sampler(cfg: GCFConfig, nodes: int, edges: int, device: torch.device) -> GCFConfig:
    """``cfg`` with ``sampler="auto"`` decided for a graph of ``nodes`` and ``edges`` on ``device``."""
    if cfg.sampler != "auto":
        return cfg
    if full_graph_bytes(nodes, edges, cfg) <= memory_budget(device) or cfg.holdout:
        return dataclasses.replace(cfg, sampler="full")
    return dataclasses.replace(cfg, sampler="neighbor", batch_size=cfg.batch_size or NEIGHBOR_BATCH)
