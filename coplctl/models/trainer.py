"""The training loop every neural method shares: Bradley-Terry on pairs, AdamW, cosine schedule with
warmup, accelerate for devices / mixed precision / several processes (set up from a
:class:`~coplctl.models.train_config.TrainConfig`), best-of-epochs selection on validation pairs (paper
Appendix C.2), resumable from checkpoints; and the few-step fit of new users' own parameters."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from coplctl.core.errors import CoplError, Diverged
from coplctl.core.optim import bt_loss, cosine_with_warmup
from coplctl.core.progress import Bar, stderr_console
from coplctl.models.encoders import ResponseEncoder, ResponseInputs
from coplctl.models.train_config import TrainConfig, autocast, grad_accum_steps, launcher_precision, make_accelerator


def trainable_state(net: nn.Module) -> dict[str, torch.Tensor]:
    """What a run saves: trained parameters and the method's own buffers (user tables ...), but not the
    frozen backbone, which is reloaded by name (its buffers live under ``encoder.lm``)."""
    state = {n: p.detach().cpu().clone() for n, p in net.named_parameters() if p.requires_grad}
    persistent = net.state_dict(keep_vars=True)
    state.update({n: b.detach().cpu().clone() for n, b in net.named_buffers()
                  if n in persistent and ".lm." not in f".{n}"})
    return state


def load_trainable_state(net: nn.Module, state: dict[str, torch.Tensor]) -> None:
    missing, unexpected = [], []
    own = dict(net.named_parameters()) | dict(net.named_buffers())
    for name, value in state.items():
        if name not in own:
            unexpected.append(name)
            continue
        with torch.no_grad():
            if own[name].shape != value.shape:
                raise CoplError(f"saved tensor {name} has shape {tuple(value.shape)}, the model {tuple(own[name].shape)}")
            own[name].copy_(value)
    persistent = net.state_dict(keep_vars=True)  # a missing table buffer would silently stay zeros
    missing = [n for n, p in net.named_parameters() if p.requires_grad and n not in state]
    missing += [n for n, _ in net.named_buffers() if n in persistent and ".lm." not in f".{n}" and n not in state]
    if missing or unexpected:
        raise CoplError(f"saved weights do not match the model (missing {missing[:3]}, unexpected {unexpected[:3]})")


@torch.no_grad()
def rewards(net: nn.Module, users: torch.Tensor, inputs: ResponseInputs, responses: torch.Tensor,
            batch_size: int = 256) -> torch.Tensor:
    """r(user, response) for aligned index tensors, in batches, as float32 on CPU."""
    net.eval()
    dev = next(net.parameters()).device
    out = []
    with autocast(net):
        for s in range(0, len(users), batch_size):
            r = net.score(users[s:s + batch_size].to(dev), inputs.batch(responses[s:s + batch_size], dev))
            out.append(r.float().cpu())
    return torch.cat(out) if out else torch.empty(0)


def row_accuracy(net, inputs, users, chosen, rejected, batch_size: int = 256) -> float:
    """Accuracy on pairs given as row indices (users, chosen responses, rejected responses)."""
    if len(users) == 0:
        return float("nan")
    return float((rewards(net, users, inputs, chosen, batch_size) > rewards(net, users, inputs, rejected, batch_size))
                 .float().mean())


def param_groups(net: nn.Module, lr: float, rates: dict[str, float] | None = None) -> list[dict]:
    """AdamW parameter groups: the trainable parameters named by a prefix of ``rates`` (``"user_table"``,
    ``"user_vector.table"`` ...) train at that rate, the others at ``lr`` (the first group)."""
    rates = rates or {}
    groups: dict[float, list] = {lr: []}
    for name, p in net.named_parameters():
        if p.requires_grad:
            rate = next((r for prefix, r in rates.items() if name == prefix or name.startswith(prefix + ".")), lr)
            groups.setdefault(rate, []).append(p)
    return [{"params": ps, "lr": rate} for rate, ps in groups.items() if ps or rate == lr]


def enable_checkpointing(net: nn.Module) -> None:
    """Gradient checkpointing in every ``lora``-mode response encoder of ``net`` (see ``gradient_checkpointing``)."""
    encoders = [m for m in net.modules() if isinstance(m, ResponseEncoder) and m.mode == "lora"]
    if not encoders:
        raise CoplError("gradient_checkpointing: this net runs no language model while training")
    for encoder in encoders:
        encoder.enable_checkpointing()


def train_pairs(net: nn.Module, inputs: ResponseInputs, train: tuple, valid: tuple, cfg: TrainConfig, *,
                seed: int = 0, progress: bool = True, label: str = "train",
                lr_groups: dict[str, float] | None = None, work_dir: str | Path | None = None,
                report_to: str = "none") -> dict:
    """Train ``net`` (forward(users, chosen batch, rejected batch, *extra) -> (r⁺, r⁻, aux loss)) on pairs.

    ``train`` is (user rows, chosen rows, rejected rows, *extra columns) and ``valid`` (user rows,
    chosen rows, rejected rows) tensors. ``lr_groups`` gives parameters their own learning rate
    (:func:`param_groups`; the schedule scales every rate alike). The epoch with the best validation
    accuracy is kept. With a ``work_dir``, the training state is saved there at each epoch's end and every
    ``cfg.checkpoint_every`` optimizer steps, and the same run started again resumes from it with the same
    result as without the interruption (:mod:`coplctl.models.resume`). ``report_to``: an experiment tracker
    (:mod:`coplctl.models.tracking`; its files go to ``work_dir/logs``). Returns metrics.
    """
    from coplctl.models import tracking

    run = _PairTraining(net, inputs, train, valid, cfg, seed=seed, progress=progress, label=label,
                        lr_groups=lr_groups or {}, work_dir=work_dir, report_to=report_to)
    try:
        for epoch in range(run.state.epoch, run.epochs):
            run.epoch(epoch)
    except KeyboardInterrupt:
        if run.path is None or not run.path.exists():
            raise
        raise CoplError(f"{label}: interrupted; run the same command again to resume from the last checkpoint "
                        f"({run.path})") from None
    finally:
        run.bar.close()
        tracking.finish(run.acc)
    return run.finish()


class _PairTraining:
    """One run of :func:`train_pairs`: accelerator, optimiser, schedule, loader and validation pairs set up
    (the training state restored from a checkpoint of the same run, if any), then trained epoch by epoch."""

    def __init__(self, net: nn.Module, inputs: ResponseInputs, train: tuple, valid: tuple, cfg: TrainConfig, *,
                 seed: int, progress: bool, label: str, lr_groups: dict[str, float], work_dir, report_to: str):
        from accelerate.utils import set_seed

        from coplctl.models import resume, tracking

        tracking.check_tracker(report_to)
        work = Path(work_dir) if work_dir is not None else None
        if report_to != "none" and work is None:
            raise CoplError(f"report_to {report_to}: the tracker's files need a work directory")
        if cfg.gradient_checkpointing:
            enable_checkpointing(net)
        acc = make_accelerator(cfg, find_unused=bool(getattr(net, "unused_parameters", False)), log_with=report_to,
                               log_dir=work / "logs" if work is not None else None)
        set_seed(seed)
        self.cfg, self.inputs, self.label, self.lr_groups, self.acc = cfg, inputs, label, lr_groups, acc
        self.lr, self.epochs, batch_size = cfg.get("lr"), cfg.get("epochs"), cfg.get("batch_size")
        self.accum, self.precision = grad_accum_steps(cfg), launcher_precision(cfg.mixed_precision)
        self.stamp = None if work is None else resume.fingerprint(
            trainable_state(net), inputs, train, valid, cfg, seed=seed, label=label, lr_groups=lr_groups,
            accum=self.accum, precision=self.precision, processes=acc.num_processes)
        self.params = [p for p in net.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(param_groups(net, self.lr, lr_groups), lr=self.lr, weight_decay=cfg.weight_decay)
        data = torch.utils.data.TensorDataset(*train)
        self.shuffle = torch.Generator().manual_seed(seed)
        loader = torch.utils.data.DataLoader(data, batch_size=batch_size, shuffle=True, generator=self.shuffle)
        self.net, self.opt, self.loader = acc.prepare(net, opt, loader)
        self.updates = -(-len(self.loader) // self.accum)  # optimizer steps per epoch: the last may sum fewer batches
        self.sched = cosine_with_warmup(self.opt, max(1, self.epochs * self.updates), cfg.warmup_ratio)
        self.scaler = torch.amp.GradScaler(acc.device.type) if self.precision == "fp16" else None
        g = torch.Generator().manual_seed(seed)
        keep = torch.randperm(len(valid[0]), generator=g)[: cfg.eval_pairs]
        self.valid = tuple(t[keep] for t in valid)
        self.model = model = acc.unwrap_model(self.net)
        self.path = path = work / resume.STATE_FILE if work is not None else None
        found = path and resume.load(path, self.stamp, restore_weights=lambda w: load_trainable_state(model, w),
                                     model=model, optimizer=self.opt, scheduler=self.sched, scaler=self.scaler,
                                     generator=self.shuffle)
        self.state, self.rng = found or (resume.Progress(), None)  # rng: global random states to restore, once there
        if found and progress and acc.is_main_process:
            stderr_console().print(f"{label}: resuming after epoch {self.state.epoch}" + (
                f", batch {self.state.batch}" if self.state.batch else "") + f" ({path})", highlight=False,
                soft_wrap=True)
        if report_to != "none":
            (work / "logs").mkdir(parents=True, exist_ok=True)
            acc.init_trackers(tracking.PROJECT, tracking.tracker_config(cfg, seed=seed, method=label),
                              init_kwargs=tracking.init_kwargs(report_to, work / "logs", label))
        self.window: list[float] = []  # losses of the batches summed into the next optimizer step
        self.bar = Bar(progress and acc.is_main_process, self.epochs * len(self.loader), label,
                       completed=self.state.epoch * len(self.loader) + self.state.batch)

    def checkpoint(self, loader_rng: torch.Tensor) -> None:
        from coplctl.models import resume

        if self.path is not None and self.acc.is_main_process:
            resume.save(self.path, self.stamp, self.state, weights=trainable_state(self.model), model=self.model,
                        optimizer=self.opt, scheduler=self.sched, scaler=self.scaler, loader_rng=loader_rng)

    def _restore_rng(self) -> None:
        """Resumed: put the global random streams where the interrupted run saved them (once)."""
        from coplctl.models import resume

        if self.rng is not None:
            resume.restore_rng(self.rng)
            self.rng = None

    def epoch(self, epoch: int) -> None:
        state, loader, cfg = self.state, self.loader, self.cfg
        self.net.train()
        skip, epoch_rng = state.batch, self.shuffle.get_state()  # the shuffle's state before this epoch's draw
        if not skip:  # resumed at an epoch boundary: restore before the shuffle draws
            self._restore_rng()
        self.window = []
        for i, (u, c, r, *extra) in enumerate(loader):  # extra columns (e.g. VPL's pair ids) go to the net
            if i < skip:  # resumed within the epoch: these batches were trained before the interruption
                continue
            self._restore_rng()  # resumed within the epoch
            last = (i + 1) % self.accum == 0 or i + 1 == len(loader)  # this batch ends an optimizer step
            self._batch(epoch, i, last, u, c, r, extra)
            if last:
                self._step()
                if cfg.checkpoint_every and state.steps % cfg.checkpoint_every == 0 and i + 1 < len(loader):
                    state.batch = i + 1
                    self.checkpoint(epoch_rng)
            self.bar.update(advance=1, info=f"epoch {epoch + 1}/{self.epochs} loss {state.total / state.n:.4f}")
        valid_acc = row_accuracy(self.model, self.inputs, *self.valid)
        loss = state.total / max(state.n, 1)
        state.history.append({"epoch": epoch + 1, "loss": loss, "valid_accuracy": valid_acc})
        if valid_acc > state.best_acc or state.best is None or math.isnan(valid_acc):  # no valid pairs: the last
            state.best_acc, state.best, state.best_epoch = valid_acc, trainable_state(self.model), epoch + 1
        state.epoch, state.batch, state.total, state.n = epoch + 1, 0, 0.0, 0
        self.acc.log({"train/epoch_loss": loss, "valid/accuracy": valid_acc, "epoch": epoch + 1}, step=state.steps)
        self.checkpoint(self.shuffle.get_state())

    def _batch(self, epoch: int, i: int, last: bool, u, c, r, extra: list) -> None:
        """Forward and backward one batch; its loss is 1/k of the step that sums k batches."""
        acc, state, net, n = self.acc, self.state, self.net, len(self.loader)
        share = self.accum if i < n - n % self.accum else n % self.accum
        with contextlib.nullcontext() if last else acc.no_sync(net):  # DDP: sync only on the step
            with autocast(self.model, self.cfg.mixed_precision):
                rc, rr, aux = net(u, self.inputs.batch(c, acc.device), self.inputs.batch(r, acc.device), *extra)
            loss = bt_loss(rc.float(), rr.float()) + aux
            value = (acc.reduce(loss.detach(), "sum") if acc.num_processes > 1 else loss).item()
            if not math.isfinite(value):  # every process sees the same sum, so all stop together
                raise Diverged(f"{self.label}: the training loss became {value} at epoch {epoch + 1}, step "
                               f"{state.n + 1} (lr {self.lr:g}); lower the learning rate")
            acc.backward(loss / share if self.scaler is None else self.scaler.scale(loss / share))
        state.total, state.n = state.total + value / acc.num_processes, state.n + 1
        self.window.append(value / acc.num_processes)

    def _step(self) -> None:
        """One optimizer step over the batches summed since the last (clipped, scaled in fp16), logged."""
        opt, scaler = self.opt, self.scaler
        step_lr = opt.param_groups[0]["lr"]
        if scaler is not None:
            scaler.unscale_(opt)
        if self.cfg.grad_clip:
            self.acc.clip_grad_norm_(self.params, self.cfg.grad_clip)
        if scaler is None:
            opt.step()
        else:
            scaler.step(opt)
            scaler.update()
        self.sched.step()
        opt.zero_grad(set_to_none=True)
        self.state.steps += 1
        self.acc.log({"train/loss": sum(self.window) / len(self.window), "lr": step_lr}, step=self.state.steps)
        self.window = []

    def finish(self) -> dict:
        """Back to the best epoch's weights; the run's metrics."""
        self._restore_rng()  # resumed after the last epoch: leave the random streams where the full run did
        load_trainable_state(self.model, self.state.best)
        self.acc.wait_for_everyone()
        s = self.state
        return {"history": s.history, "best_epoch": s.best_epoch, "valid_accuracy": s.best_acc,
                "steps": self.epochs * self.updates, "grad_accum": self.accum, "mixed_precision": self.precision,
                "processes": self.acc.num_processes, "lr": self.lr, "lr_groups": dict(self.lr_groups),
                "resumed_from": s.resumed_from}


def optimize_rows(params: list[nn.Parameter], loss_fn: Callable[[torch.Tensor], torch.Tensor], n_items: int, *,
                  steps: int = 50, lr: float = 1e-2, batch_size: int = 256, seed: int = 0,
                  frozen: nn.Module | None = None) -> None:
    """Fit only ``params`` (new users' own parameters) for ``steps`` Adam steps on minibatches of items.

    ``loss_fn(item_indices)`` returns the loss of those few-shot pairs. ``frozen`` (the trained model)
    gets no gradient during the fit and is left exactly as it was.
    """
    if n_items == 0:
        return
    opt = torch.optim.Adam(params, lr=lr)
    g = torch.Generator().manual_seed(seed)
    fitted = {id(p) for p in params}
    flags = [(p, p.requires_grad) for p in frozen.parameters() if id(p) not in fitted] if frozen is not None else []
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        for _ in range(steps):
            idx = torch.randperm(n_items, generator=g)[:batch_size]
            loss = loss_fn(idx)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
