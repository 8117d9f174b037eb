"""Training CoPL's GCF: AdamW, cosine schedule with warmup, per-epoch validation, best checkpoint,
early stopping, resumable after an interruption (paper §4.1, Appendix C.2)."""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import shutil
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

import torch

from coplctl.atomic import atomic_path, atomic_write_text, check_replaceable, remove_stale
from coplctl.checkpoint import load_checkpoint
from coplctl.checkpoint import save_checkpoint as save_checkpoint_file
from coplctl.config import AT_LEAST_1, FRACTION, NON_NEGATIVE, POSITIVE, OneOf, check_fields
from coplctl.errors import CoplError
from coplctl.graph.graph import PreferenceGraph
from coplctl.graph.model import VARIANTS, GCF
from coplctl.graph.probe import group_probe
from coplctl.graph.sampling import NeighborSampler
from coplctl.progress import Bar
from coplctl.optim import bt_loss, cosine_with_warmup, resolve_device


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
    sampler: Annotated[str, OneOf("full", "neighbor")] = "full"
    """``full``: propagate on the whole graph at each step; ``neighbor``: sampled subgraphs per batch."""
    fanouts: tuple[Annotated[int, AT_LEAST_1], ...] = (15, 10, 10, 10)
    """Edges sampled per node and hop when ``sampler="neighbor"``."""
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


@dataclass
class TrainState:
    epoch: int = 0
    best_valid: float = -1.0
    best_epoch: int = -1
    best_state: dict | None = None
    since_best: int = 0
    seconds: float = 0.0
    seconds_to_best: float = 0.0
    history: list[dict] = field(default_factory=list)


CHECKPOINT = "checkpoint.safetensors"  # tensors + JSON metadata: never unpickled
OLD_CHECKPOINT = "checkpoint.pt"  # written by coplctl before 0.2 (pickle): never loaded
CHECKPOINT_SECONDS = 60  # an interruption loses at most this much training


def _accuracy(e_u, e_r, u, c, r) -> float:
    if len(u) == 0:
        return float("nan")
    return float((GCF.score(e_u, e_r, u, c) > GCF.score(e_u, e_r, u, r)).float().mean())


def train_gcf(ds, out: str | Path, cfg: GCFConfig, *, seed: int = 0, device: str | None = None,
              force: bool = False, progress: bool = True,
              on_epoch_end: Callable[[int, dict], None] | None = None) -> dict:
    """Train GCF on ``ds``'s train pairs, select on its valid pairs, write the run to ``out``.

    Returns the final metrics. An existing checkpoint in ``out`` with the same configuration is
    resumed; a finished run raises unless ``force``.
    """
    out = Path(out)
    if force and out.exists():
        if not (out / CHECKPOINT).exists():  # only a graph run (finished or not) is replaced
            check_replaceable(out, "config.json", "GCF run")
        shutil.rmtree(out)
    if (out / "metrics.json").exists():
        raise CoplError(f"{out} already holds a trained model; pass --force to train again")
    out.mkdir(parents=True, exist_ok=True)
    dev = resolve_device(device)
    dtype = getattr(torch, cfg.dtype)

    graph = PreferenceGraph.from_dataset(ds)
    u, c, r, _ = graph.index_pairs(ds.split("train"))
    valid = ds.split("valid")
    valid = valid[valid["user_id"].isin(graph.user_index)]
    vu, vc, vr, vok = graph.index_pairs(valid)
    vu, vc, vr = vu[vok], vc[vok], vr[vok]
    u, c, r, vu, vc, vr = (t.to(dev) for t in (u, c, r, vu, vc, vr))

    torch.manual_seed(seed)
    init_std = cfg.init_std if cfg.init_std is not None else 0.1 * math.sqrt(32 / cfg.dim)
    model = GCF(graph.num_users, graph.num_responses, cfg.dim, cfg.layers, cfg.variant,
                cfg.negative_slope, init_std, cfg.signed_init).to(device=dev, dtype=dtype)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    n = len(u)
    steps_per_epoch = 1 if cfg.batch_size <= 0 else math.ceil(n / cfg.batch_size)
    sched = cosine_with_warmup(opt, cfg.epochs * steps_per_epoch, cfg.warmup_ratio)
    gen = torch.Generator().manual_seed(seed)
    sampler = NeighborSampler(graph, cfg.fanouts[: cfg.layers]) if cfg.sampler == "neighbor" else None
    adj = graph.adjacency(device=dev, dtype=dtype)
    pos_edge, neg_edge = graph.edge_ids(u.cpu(), c.cpu(), "pos"), graph.edge_ids(u.cpu(), r.cpu(), "neg")
    state = TrainState()
    config_dict = dataclasses.asdict(cfg)

    ckpt = out / CHECKPOINT
    if (out / OLD_CHECKPOINT).exists():
        warnings.warn(f"{out / OLD_CHECKPOINT} is ignored: a pickle (written by coplctl before 0.2) is never loaded"
                      + ("" if ckpt.exists() else "; training starts from the beginning"))
    if ckpt.exists():
        saved = load_checkpoint(ckpt)
        try:
            if saved["config"] != config_dict or saved["seed"] != seed:
                raise CoplError(f"{out} holds a checkpoint of a different configuration or seed; "
                                f"pass --force to start over")
            model.load_state_dict(saved["model"])
            opt.load_state_dict(saved["optimizer"])
            sched.load_state_dict(saved["scheduler"])
            gen.set_state(saved["generator"])
            state = TrainState(**saved["state"])
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            raise CoplError(f"{ckpt} does not fit this run ({type(e).__name__}: {str(e).strip()[:200]}); "
                            f"delete it or pass --force to start over") from None

    def save_checkpoint() -> None:
        save_checkpoint_file(ckpt, {"config": config_dict, "seed": seed, "model": model.state_dict(),
                                    "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                                    "generator": gen.get_state(), "state": dataclasses.asdict(state)})

    bar = Bar(progress, cfg.epochs, "GCF", completed=state.epoch)
    last_ckpt = time.monotonic()
    saved_epoch = state.epoch if ckpt.exists() else None
    at_boundary = True  # a checkpoint is exact only between epochs
    try:
        while state.epoch < cfg.epochs:
            at_boundary = False
            t0 = time.perf_counter()
            model.train()
            order = torch.randperm(n, generator=gen).to(dev) if cfg.batch_size > 0 else None
            total = 0.0
            for s in range(steps_per_epoch):
                b = slice(None) if order is None else order[s * cfg.batch_size:(s + 1) * cfg.batch_size]
                bu, bc, br = u[b], c[b], r[b]
                if sampler is None:
                    without = None
                    if cfg.holdout:  # these pairs are scored, and carry no messages in this step
                        sel = torch.arange(n)[b if order is None else b.cpu()]
                        sel = sel[torch.rand(len(sel), generator=gen) < cfg.holdout]
                        bu, bc, br = (t.index_select(0, sel.to(dev)) for t in (u, c, r))
                        without = (pos_edge[sel], neg_edge[sel])
                    step_adj = adj if cfg.edge_dropout == 0 and without is None else graph.adjacency(
                        device=dev, dtype=dtype, edge_dropout=cfg.edge_dropout, generator=gen, without=without)
                    e_u, e_r = model(step_adj)
                else:
                    sub = sampler.sample(bu.cpu(), torch.cat([bc, br]).cpu(), generator=gen, device=dev, dtype=dtype)
                    e_u, e_r = model(sub.adj, sub.users.to(dev), sub.responses.to(dev))
                    ul, rl = sub.user_local.to(dev), sub.response_local.to(dev)
                    bu, bc, br = ul[bu], rl[bc], rl[br]
                loss = bt_loss(GCF.score(e_u, e_r, bu, bc).float(), GCF.score(e_u, e_r, bu, br).float())
                if cfg.l2:
                    loss = loss + cfg.l2 * (e_u.index_select(0, bu).pow(2).sum(-1) + e_r.index_select(0, bc).pow(2).sum(-1)
                                            + e_r.index_select(0, br).pow(2).sum(-1)).float().mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if cfg.grad_clip:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                opt.step()
                sched.step()
                total += loss.item()
            model.eval()
            with torch.no_grad():
                e_u, e_r = model(adj)
                metrics = {"epoch": state.epoch + 1, "loss": total / steps_per_epoch,
                           "train_accuracy": _accuracy(e_u, e_r, u, c, r),
                           "valid_accuracy": _accuracy(e_u, e_r, vu, vc, vr)}
            state.seconds += time.perf_counter() - t0
            metrics["seconds"] = round(state.seconds, 3)
            state.history.append(metrics)
            state.epoch += 1
            improved = metrics["valid_accuracy"] > state.best_valid if len(vu) else True  # no valid pairs: keep last
            if improved:
                state.best_valid, state.best_epoch = metrics["valid_accuracy"], state.epoch
                state.best_state = copy.deepcopy({k: v.cpu() for k, v in model.state_dict().items()})
                state.seconds_to_best, state.since_best = state.seconds, 0
            else:
                state.since_best += 1
            at_boundary = True
            bar.update(completed=state.epoch, info=f"loss {metrics['loss']:.4f} valid {metrics['valid_accuracy']:.4f}"
                                                   f" best {state.best_valid:.4f}@{state.best_epoch}")
            if on_epoch_end is not None:
                on_epoch_end(state.epoch, metrics)
            if cfg.patience and state.since_best >= cfg.patience and state.epoch >= cfg.min_epochs:
                break
            if time.monotonic() - last_ckpt > CHECKPOINT_SECONDS:
                save_checkpoint()
                saved_epoch, last_ckpt = state.epoch, time.monotonic()
    except KeyboardInterrupt:
        if at_boundary:
            save_checkpoint()
            saved_epoch = state.epoch
        where = f"after epoch {saved_epoch}" if saved_epoch else "from the start"
        raise CoplError(f"interrupted during training; run the same command again to resume {where}") from None
    finally:
        bar.close()

    model.load_state_dict(state.best_state)
    return _export(out, ds, graph, model, adj, cfg, seed, state, (u, c, r), (vu, vc, vr), ckpt)


def _export(out, ds, graph, model, adj, cfg, seed, state, train, valid, ckpt) -> dict:
    from safetensors.torch import save_file

    model.eval()
    with torch.no_grad():
        e_u, e_r = model(adj)
    metrics = {
        "status": "complete", "seed": seed, "epochs_run": state.epoch, "best_epoch": state.best_epoch,
        "train_accuracy": _accuracy(e_u, e_r, *train), "valid_accuracy": _accuracy(e_u, e_r, *valid),
        "valid_pairs_scored": int(len(valid[0])), "seconds": round(state.seconds, 3),
        "seconds_to_best": round(state.seconds_to_best, 3),
        "seconds_per_epoch": round(state.seconds / max(1, state.epoch), 4), "history": state.history,
        "group_probe": group_probe(e_u.float().cpu().numpy(),
                                   ds.users.set_index("user_id")["group"].reindex(graph.user_ids).to_numpy(), seed=seed),
    }
    graph.save(out)
    responses = ds.responses.set_index("response_id").loc[graph.response_ids, ["prompt", "text"]].reset_index()
    for name, df in (("responses", responses), ("users", ds.users)):
        with atomic_path(out / f"{name}.parquet") as tmp:
            df.to_parquet(tmp, index=False)
    for name, tensors in (("model", model.state_dict()),
                          ("embeddings", {"users": e_u.float(), "responses": e_r.float()})):
        with atomic_path(out / f"{name}.safetensors") as tmp:
            save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp))
    info = {"gcf": dataclasses.asdict(cfg), "seed": seed, "graph": graph.stats(), "export": "l2",
            "data": {"path": str(ds.path) if ds.path else None, "meta": {k: ds.meta.get(k) for k in
                                                                           ("source", "variant", "annotations", "seed", "counts")}}}
    atomic_write_text(out / "config.json", json.dumps(info, indent=2) + "\n")
    atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=2) + "\n")  # written last: marks completion
    ckpt.unlink(missing_ok=True)
    remove_stale(ckpt)  # a checkpoint write cut short by a kill leaves a temporary that nothing rewrites
    return metrics
