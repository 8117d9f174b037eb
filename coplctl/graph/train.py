"""Training CoPL's GCF: AdamW, cosine schedule with warmup, per-epoch validation, best checkpoint,
early stopping, resumable after an interruption (paper §4.1, Appendix C.2)."""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import torch

from coplctl.core.atomic import atomic_path, atomic_write_text, check_replaceable, remove_stale
from coplctl.core.errors import CoplError
from coplctl.core.files import read_json
from coplctl.core.optim import cosine_with_warmup, resolve_device
from coplctl.core.progress import Bar
from coplctl.data.dataset import release_arrow_memory, weight_columns
from coplctl.graph.config import GCFConfig, resolve_sampler
from coplctl.graph.graph import Adjacency, PreferenceGraph
from coplctl.graph.loss import pair_accuracy, pair_loss
from coplctl.graph.model import GCF
from coplctl.graph.parallel import Processes, for_processes, processes, share, step_stream, wrap
from coplctl.graph.probe import group_probe, weight_probe
from coplctl.graph.sampling import NeighborSampler
from coplctl.graph.state import CHECKPOINT, TrainingRun

CHECKPOINT_SECONDS = 60
"""An interruption loses at most this much training (or ten times what a checkpoint takes to write, when
that is more: at a million users a checkpoint is 3 GB)."""

Pairs = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # (user, chosen, rejected) node indices


@dataclass
class TrainingData:
    """A dataset's graph and the pairs a run trains on and selects with, on the training device."""

    graph: PreferenceGraph
    adj: Adjacency  # the whole graph's: validation, and every step of the full-graph sampler
    train: Pairs
    valid: Pairs  # valid pairs whose user and responses are all in the graph
    device: torch.device
    dtype: torch.dtype

    @classmethod
    def build(cls, ds, device: torch.device, dtype: torch.dtype, select_on: str = "all") -> "TrainingData":
        graph, (u, c, r) = PreferenceGraph.from_pairs(ds.split("train"), ds.user_ids("seen"),
                                                      ds.responses["response_id"], with_index=True)
        valid_pairs = ds.split("valid")
        if select_on == "personal":  # the valid labels that go against the training majority (>= 20 of them)
            from coplctl.data.signal import against_majority

            personal = against_majority(valid_pairs, ds.split("train"))
            if personal.sum() >= 20:
                valid_pairs = valid_pairs[personal]
        vu, vc, vr, vok = graph.index_pairs(valid_pairs)
        train = tuple(t.to(device) for t in (u, c, r))
        valid = tuple(t[vok].to(device) for t in (vu, vc, vr))
        data = cls(graph, graph.adjacency(device=device, dtype=dtype), train, valid, device, dtype)
        release_arrow_memory()
        return data

    @cached_property
    def edges(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Each training pair's positive and negative edge column (``holdout`` leaves them out)."""
        u, c, r = (t.cpu() for t in self.train)
        return self.graph.edge_ids(u, c, "pos"), self.graph.edge_ids(u, r, "neg")

    def accuracy(self, model: GCF) -> tuple[float, float]:
        """(train, valid) accuracy of the model's full-graph embeddings."""
        model.eval()
        with torch.no_grad():
            e_u, e_r = model(self.adj)
        return pair_accuracy(e_u, e_r, *self.train), pair_accuracy(e_u, e_r, *self.valid)


def train_gcf(ds, out: str | Path, cfg: GCFConfig, *, seed: int = 0, device: str | None = None,
              force: bool = False, progress: bool = True, on_epoch_end: Callable[[int, dict], None] | None = None,
              distributed: bool = False) -> dict:
    """Train GCF on ``ds``'s train pairs, select on its valid pairs, write the run to ``out``.

    Returns the final metrics. An existing checkpoint in ``out`` with the same configuration is
    resumed; a finished run raises unless ``force``. ``distributed``: when launched on several processes
    (``accelerate launch``, ``torchrun``), train on all of them (:mod:`coplctl.graph.parallel`); every
    process calls this and gets the metrics.
    """
    out, dev = Path(out), resolve_device(device)
    procs = processes(dev, distributed)
    procs.agree(lambda: _prepare_out(out, force) if procs.main else None)
    data = TrainingData.build(ds, dev, getattr(torch, cfg.dtype), cfg.select_on)
    stats = data.graph.stats()
    cfg = resolve_sampler(for_processes(cfg, procs), stats["users"] + stats["responses"],
                          stats["positive_edges"] + stats["negative_edges"], dev)  # `auto`: full-graph while it fits
    # The pairs live in `data` now, and texts left on disk are streamed at export: a caller that passed the
    # dataset without keeping it (`coplctl graph train`) frees the rest while the model trains.
    ds = dataclasses.replace(ds, pairs=ds.pairs.iloc[:0], responses=ds.responses if "text" in ds.responses
                             else ds.responses[["response_id"]])
    release_arrow_memory()
    run = _start(data, cfg, seed, out / CHECKPOINT, procs)
    resumed = run.resume()
    _fit(run, data, cfg, saved_epoch=run.state.epoch if resumed else None, progress=progress and procs.main,
         on_epoch_end=on_epoch_end)
    run.model.load_state_dict(run.state.best_state)
    metrics = _export(out, ds, data, run) if procs.main else None
    procs.wait()
    return metrics if metrics is not None else read_json(out / "metrics.json", what="GCF metrics")


def _prepare_out(out: Path, force: bool) -> None:
    if force and out.exists():
        if not (out / CHECKPOINT).exists():  # only a graph run (finished or not) is replaced
            check_replaceable(out, "config.json", "GCF run")
        shutil.rmtree(out)
    if (out / "metrics.json").exists():
        raise CoplError(f"{out} already holds a trained model; pass --force to train again")
    out.mkdir(parents=True, exist_ok=True)


def _start(data: TrainingData, cfg: GCFConfig, seed: int, checkpoint: Path, procs: Processes | None = None) -> TrainingRun:
    """A new run: the model initialised from ``seed``, its optimiser, schedule and random stream."""
    procs = procs or Processes()
    torch.manual_seed(seed)
    init_std = cfg.init_std if cfg.init_std is not None else 0.1 * math.sqrt(32 / cfg.dim)
    model = GCF(data.graph.num_users, data.graph.num_responses, cfg.dim, cfg.layers, cfg.variant,
                cfg.negative_slope, init_std, cfg.signed_init).to(device=data.device, dtype=data.dtype)
    # fused: one kernel per tensor, no temporaries the size of the embeddings (1.3 GB at a million users)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
    sched = cosine_with_warmup(opt, cfg.epochs * _steps_per_epoch(data, cfg), cfg.warmup_ratio)
    return TrainingRun(model, opt, sched, torch.Generator().manual_seed(seed), dataclasses.asdict(cfg), seed,
                       checkpoint, net=wrap(model, procs), procs=procs)


def _steps_per_epoch(data: TrainingData, cfg: GCFConfig) -> int:
    return 1 if cfg.batch_size <= 0 else math.ceil(len(data.train[0]) / cfg.batch_size)


def _fit(run: TrainingRun, data: TrainingData, cfg: GCFConfig, *, saved_epoch: int | None, progress: bool,
         on_epoch_end: Callable[[int, dict], None] | None) -> None:
    """Epochs until ``cfg.epochs`` or early stopping, with a checkpoint every CHECKPOINT_SECONDS; Ctrl-C
    saves one at an epoch boundary and raises a CoplError that says where the next run resumes.

    With one full-graph step per epoch and no edge dropout or holdout (the ``cpu`` preset), a step's
    forward pass is the full-graph forward pass of the model the previous step left: it evaluates that
    model (train and valid accuracy) before training on, so an epoch costs one forward pass, not two,
    and the numbers are those of a separate evaluation."""
    state = run.state
    sampler = NeighborSampler(data.graph, cfg.fanouts[: cfg.layers]) if cfg.sampler == "neighbor" else None
    folded = sampler is None and cfg.batch_size <= 0 and not cfg.edge_dropout and not cfg.holdout
    bar = Bar(progress, cfg.epochs, "GCF", completed=state.epoch)
    last_save, last_end = time.monotonic(), time.perf_counter()
    boundary, save_cost = [True], [0.0]  # a checkpoint is exact only between epochs; how long the last took
    pending = None  # the loss of a step whose model the next forward pass evaluates

    def end(loss: float, accuracies: tuple[float, float]) -> bool:
        """Record an epoch; True when training should stop here."""
        nonlocal last_save, last_end, saved_epoch
        now = time.perf_counter()
        metrics = {"epoch": state.epoch + 1, "loss": loss, "train_accuracy": accuracies[0],
                   "valid_accuracy": accuracies[1]}
        state.record(metrics, now - last_end, run.model, has_valid=len(data.valid[0]) > 0)
        last_end, boundary[0] = now, True
        bar.update(completed=state.epoch, info=f"loss {metrics['loss']:.4f} valid {metrics['valid_accuracy']:.4f}"
                                               f" best {state.best_valid:.4f}@{state.best_epoch}")
        if on_epoch_end is not None:
            on_epoch_end(state.epoch, metrics)
        if cfg.patience and state.since_best >= cfg.patience and state.epoch >= cfg.min_epochs:
            return True
        slow = save_cost[0] > 1  # a large graph's checkpoint: at most a tenth of the time goes to them
        if time.monotonic() - last_save > (max(CHECKPOINT_SECONDS, 10 * save_cost[0]) if slow else CHECKPOINT_SECONDS):
            started = time.monotonic()
            run.save()
            saved_epoch, last_save, save_cost[0] = state.epoch, time.monotonic(), time.monotonic() - started
        return False

    try:
        while state.epoch + (pending is not None) < cfg.epochs:
            if not folded:
                boundary[0] = False
                if end(_train_epoch(run, data, cfg, sampler), data.accuracy(run.model)):
                    break
                continue
            run.model.train()
            e_u, e_r = run.model(data.adj)
            loss, train_acc = pair_loss(e_u, e_r, *data.train, cfg.l2)  # on the model the last step left
            valid_acc = pair_accuracy(e_u.detach(), e_r.detach(), *data.valid) if pending is not None else None
            del e_u, e_r  # the loss holds its gradient: the last layer's output can go (0.8 GB at a million users)
            if pending is not None:
                pending, stop = None, end(pending, (train_acc, valid_acc))
                if stop or state.epoch >= cfg.epochs:
                    break
            boundary[0] = False
            pending = _step(run, cfg, loss)
        if pending is not None:  # the last step's model, evaluated on its own
            end(pending, data.accuracy(run.model))
    except KeyboardInterrupt:
        if boundary[0]:
            run.save()
            saved_epoch = state.epoch
        where = f"after epoch {saved_epoch}" if saved_epoch else "from the start"
        raise CoplError(f"interrupted during training; run the same command again to resume {where}") from None
    finally:
        bar.close()


def _step(run: TrainingRun, cfg: GCFConfig, loss: torch.Tensor) -> float:
    """One optimisation step on a batch's loss (:func:`coplctl.graph.loss.pair_loss`); the loss value."""
    run.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if cfg.grad_clip:  # after DDP's averaging: the same on every process
        torch.nn.utils.clip_grad_norm_(run.model.parameters(), cfg.grad_clip)
    run.optimizer.step()
    run.scheduler.step()
    return loss.item()


def _train_epoch(run: TrainingRun, data: TrainingData, cfg: GCFConfig, sampler: NeighborSampler | None) -> float:
    """One pass over the training pairs (in minibatches of ``cfg.batch_size``); returns the mean loss."""
    model, gen, dev, (u, c, r), procs = run.net, run.generator, data.device, data.train, run.procs
    n, steps = len(u), _steps_per_epoch(data, cfg)
    model.train()
    order = torch.randperm(n, generator=gen).to(dev) if cfg.batch_size > 0 else None  # the same on every process
    total = 0.0
    for s in range(steps):
        b = slice(None) if order is None else share(order[s * cfg.batch_size:(s + 1) * cfg.batch_size], procs)
        bu, bc, br = u[b], c[b], r[b]
        draws = gen if procs.size == 1 else step_stream(run.seed, run.state.epoch, s, procs)
        if sampler is None:
            without = None
            if cfg.holdout:  # these pairs are scored, and carry no messages in this step
                sel = torch.arange(n)[b if order is None else b.cpu()]
                sel = sel[torch.rand(len(sel), generator=gen) < cfg.holdout]
                bu, bc, br = (t.index_select(0, sel.to(dev)) for t in (u, c, r))
                without = (data.edges[0][sel], data.edges[1][sel])
            step_adj = data.adj if cfg.edge_dropout == 0 and without is None else data.graph.adjacency(
                device=dev, dtype=data.dtype, edge_dropout=cfg.edge_dropout, generator=gen, without=without)
            e_u, e_r = model(step_adj)
        else:
            sub = sampler.sample(bu.cpu(), torch.cat([bc, br]).cpu(), generator=draws, device=dev, dtype=data.dtype)
            e_u, e_r = model(sub.adj, sub.users.to(dev), sub.responses.to(dev))
            ul, rl = sub.user_local.to(dev), sub.response_local.to(dev)
            bu, bc, br = ul[bu], rl[bc], rl[br]
        loss, _ = pair_loss(e_u, e_r, bu, bc, br, cfg.l2)
        del e_u, e_r
        total += _step(run, cfg, loss)
    return procs.mean(total / steps)


def _write_responses(path: Path, ds, graph: PreferenceGraph) -> None:
    """The graph's responses (response_id, prompt, text) in node order, from the dataset in memory or, when
    it was loaded without texts, streamed from its responses.parquet in row batches (a graph built from a
    dataset lists its responses in the table's order, so its rows are a filter of the table)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from coplctl.data.dataset import positions

    columns = ["response_id", "prompt", "text"]
    rows = positions(graph.response_ids, ds.responses["response_id"])
    if (rows < 0).any():
        raise CoplError("the dataset lacks some of the graph's responses")
    with atomic_path(path) as tmp:
        if "text" in ds.responses.columns:
            ds.responses.iloc[rows][columns].reset_index(drop=True).to_parquet(tmp, index=False)
            return
        if (np.diff(rows) <= 0).any():
            raise CoplError("the graph's responses are not in the order of the dataset's table; load it with texts")
        keep = np.zeros(len(ds.responses), dtype=bool)
        keep[rows] = True
        source, start = pq.ParquetFile(ds.path / "responses.parquet"), 0
        with pq.ParquetWriter(tmp, pa.schema([source.schema_arrow.field(c) for c in columns])) as writer:
            for batch in source.iter_batches(batch_size=1 << 16, columns=columns):
                writer.write_batch(batch.filter(pa.array(keep[start:start + len(batch)])))
                start += len(batch)


def _export(out: Path, ds, data: TrainingData, run: TrainingRun) -> dict:
    """Write the finished run (graph, responses, users, model, embeddings, config, metrics) and remove
    the checkpoint; returns the metrics."""
    from safetensors.torch import save_file

    model, graph, state, seed = run.model, data.graph, run.state, run.seed
    model.eval()
    with torch.no_grad():
        e_u, e_r = model(data.adj)
    users = ds.users.set_index("user_id").reindex(graph.user_ids)
    weights = weight_columns(ds.users)
    metrics = {
        "status": "complete", "seed": seed, "epochs_run": state.epoch, "best_epoch": state.best_epoch,
        "train_accuracy": pair_accuracy(e_u, e_r, *data.train), "valid_accuracy": pair_accuracy(e_u, e_r, *data.valid),
        "valid_pairs_scored": int(len(data.valid[0])), "seconds": round(state.seconds, 3),
        "seconds_to_best": round(state.seconds_to_best, 3),
        "seconds_per_epoch": round(state.seconds / max(1, state.epoch), 4), "history": state.history,
        "group_probe": group_probe(e_u.float().cpu().numpy(), users["group"].to_numpy(), seed=seed),
    }
    if weights:
        metrics["weight_probe"] = weight_probe(e_u.float().cpu().numpy(), users[weights].to_numpy(), seed=seed)
    graph.save(out)
    _write_responses(out / "responses.parquet", ds, graph)
    with atomic_path(out / "users.parquet") as tmp:
        ds.users.to_parquet(tmp, index=False)
    for name, tensors in (("model", model.state_dict()),
                          ("embeddings", {"users": e_u.float(), "responses": e_r.float()})):
        with atomic_path(out / f"{name}.safetensors") as tmp:
            save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp))
    info = {"gcf": run.config, "seed": seed, "graph": graph.stats(), "export": "l2",
            "data": {"path": str(ds.path) if ds.path else None, "meta": {k: ds.meta.get(k) for k in
                                                                           ("source", "variant", "annotations", "seed", "counts")}}}
    atomic_write_text(out / "config.json", json.dumps(info, indent=2) + "\n")
    atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=2) + "\n")  # written last: marks completion
    run.path.unlink(missing_ok=True)
    remove_stale(run.path)  # a checkpoint write cut short by a kill leaves a temporary that nothing rewrites
    return metrics
