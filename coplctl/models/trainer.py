"""The training loop every neural method shares: Bradley-Terry on pairs, AdamW, cosine schedule with
warmup, accelerate for devices / mixed precision / several processes, best-of-epochs selection on
validation pairs (paper Appendix C.2)."""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import torch
from torch import nn

from coplctl.core.config import AT_LEAST_1, FRACTION, NON_NEGATIVE, OneOf, check_fields
from coplctl.models.encoders import MODES, ResponseEncoder, ResponseInputs
from coplctl.core.errors import CoplError, Diverged
from coplctl.core.progress import Bar, stderr_console
from coplctl.core.optim import bt_loss, cosine_with_warmup

#: Defaults that depend on the mode: the paper's LLM settings for ``lora``, a small trunk's for ``frozen``.
MODE_DEFAULTS = {
    "lora": {"lr": 5e-5, "epochs": 1, "batch_size": 32},
    "frozen": {"lr": 1e-3, "epochs": 8, "batch_size": 128},
}


@dataclass
class TrainConfig:
    """Settings shared by every neural method. ``None`` means the mode's default (``MODE_DEFAULTS``)."""

    mode: Annotated[str, OneOf(*MODES)] = "frozen"
    """``frozen`` (cached backbone features + trained trunk; CPU-friendly) or ``lora`` (adapters in the LM)."""
    backbone: str = "minilm"
    """Embedded name (minilm, gemma-3-270m), gemma-2b-it / gemma-7b-it, or any hub id / local path."""
    max_length: Annotated[int, AT_LEAST_1] = 512
    """Tokens per formatted text (prompt + response)."""
    lr: Annotated[float, NON_NEGATIVE] | None = None
    """AdamW learning rate (paper: 5e-5 for CoPL; baselines searched in 1e-4, 5e-5, 1e-5, 5e-6)."""
    epochs: Annotated[int, AT_LEAST_1] | None = None
    """Passes over the training pairs (not reported in the paper)."""
    batch_size: Annotated[int, AT_LEAST_1] | None = None
    """Pairs per step and process (paper: 32 per GPU for gemma-2b-it, 16 for gemma-7b-it)."""
    warmup_ratio: Annotated[float, FRACTION] = 0.03
    """Linear warmup share of the steps before the cosine decay (paper: 0.03)."""
    weight_decay: Annotated[float, NON_NEGATIVE] = 0.0
    """AdamW weight decay."""
    grad_clip: Annotated[float, NON_NEGATIVE] = 1.0
    """Gradient-norm clipping (0 = off)."""
    trunk_width: Annotated[int, AT_LEAST_1] = 256
    """Width of the ``frozen``-mode trunk MLP."""
    trunk_layers: Annotated[int, AT_LEAST_1] = 2
    """Layers of the ``frozen``-mode trunk MLP."""
    eval_pairs: Annotated[int, AT_LEAST_1] = 2000
    """Validation pairs scored after each epoch to keep the best epoch (a fixed random subset)."""
    dtype: Annotated[str, OneOf("auto", "float32", "bfloat16", "float16")] = "auto"
    """Backbone weights: ``auto`` (bf16 on GPU, fp32 on CPU, as the paper trains in bf16), ``float32``,
    ``bfloat16``; trained parameters (adapters, gates, heads) stay fp32."""
    mixed_precision: Annotated[str, OneOf("auto", "no", "bf16", "fp16")] = "auto"
    """``auto``: the launcher's (``accelerate launch --mixed_precision``) when set, else autocast to the
    backbone's dtype when it is not fp32; ``no``; ``bf16``; ``fp16`` (with a gradient scaler)."""
    grad_accum: Annotated[int, AT_LEAST_1] | None = None
    """Batches whose gradients are summed before each optimizer step (None: the launcher's
    ``--gradient_accumulation_steps``, else 1). The effective batch is ``batch_size × grad_accum × processes``."""
    device: Annotated[str, OneOf("auto", "cpu", "cuda")] = "auto"
    """``auto``, ``cpu`` or ``cuda``; under ``accelerate launch`` the launcher decides."""
    gradient_checkpointing: bool = False
    """``lora`` mode: recompute the LM's activations in the backward pass instead of keeping them (much less
    memory for about one more forward pass a step, the same numbers; transformers' non-reentrant
    checkpointing). Refused in ``frozen`` mode, which runs no LM while training."""
    checkpoint_every: Annotated[int, NON_NEGATIVE] = 0
    """When training has a work directory (``coplctl train``, benchmarks): save the training state every
    this many optimizer steps, besides each epoch's end (0 = at epoch ends only), so that a killed run
    resumes there when started again (the paper's single lora-mode epoch has no other boundary)."""

    def __post_init__(self):
        check_fields(self, type(self).__name__.removesuffix("Config") or "method")  # types, ranges, choices
        if self.gradient_checkpointing and self.mode != "lora":
            raise CoplError(f"gradient_checkpointing needs mode lora: {self.mode} mode trains small nets on cached "
                            f"features and runs no language model while training")

    def get(self, key: str):
        value = getattr(self, key)
        return MODE_DEFAULTS[self.mode][key] if value is None else value


def use_cpu(cfg: TrainConfig) -> bool:
    return cfg.device == "cpu" or not torch.cuda.is_available()


def distributed_state(cfg: TrainConfig):
    """accelerate's process state; the first call decides the backend (gloo across CPU processes)."""
    from accelerate import PartialState

    return PartialState(cpu=use_cpu(cfg))


def make_accelerator(cfg: TrainConfig, *, find_unused: bool = False, log_with: str = "none", log_dir=None):
    """The Accelerator of one training run. ``find_unused``: some trained parameters may get no gradient in
    a step (a net says so with a true ``unused_parameters`` attribute), so DDP must look for them; asking
    for it otherwise costs a graph walk per step and makes torch warn. ``log_with``: a tracker
    (:mod:`coplctl.models.tracking`) writing under ``log_dir``."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, GradientAccumulationPlugin

    # Precision (`autocast` below) and gradient accumulation (`train_pairs`) are done here, from the
    # config or the launcher's settings (:func:`launcher_precision`, :func:`grad_accum_steps`), not by
    # accelerate, whose process-wide state cannot change them between two methods trained in one process
    # (a benchmark); the plugin stops it from also dividing the loss by the launcher's accumulation steps.
    # MoLE's top-k routing needs no find_unused: it gathers experts by a one-hot product, so every expert
    # is in the graph (with a zero gradient when no sample picked it).
    tracking = {} if log_with == "none" else {"log_with": log_with, "project_dir": str(log_dir)}
    return Accelerator(mixed_precision="no", cpu=use_cpu(cfg),
                       gradient_accumulation_plugin=GradientAccumulationPlugin(num_steps=1),
                       kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=find_unused)],
                       **tracking)


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


def launcher_precision(mode: str) -> str:
    """``mode`` with ``auto`` resolved to ``accelerate launch --mixed_precision`` when the launcher set one."""
    launched = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    return launched if mode == "auto" and launched in ("bf16", "fp16") else mode


def grad_accum_steps(cfg: TrainConfig) -> int:
    """``cfg.grad_accum``, else ``accelerate launch --gradient_accumulation_steps``, else 1."""
    if cfg.grad_accum is not None:
        return cfg.grad_accum
    launched = os.environ.get("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "1")
    return int(launched) if launched.isdigit() and int(launched) > 0 else 1


def autocast(net: nn.Module, mode: str = "auto"):
    """Autocast for a low-precision backbone: ``auto`` follows the launcher's mixed precision, else its
    weights' dtype; ``bf16`` / ``fp16`` force it, ``no`` disables it. Training and scoring use the same rule."""
    mode = launcher_precision(mode)
    if mode == "no":
        return contextlib.nullcontext()
    low = next((p for p in net.parameters() if p.is_floating_point() and p.dtype in (torch.bfloat16, torch.float16)),
               None)
    forced = {"bf16": torch.bfloat16, "fp16": torch.float16}
    dtype = forced[mode] if mode in forced else (low.dtype if low is not None else None)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(next(net.parameters()).device.type, dtype=dtype)


def fp32_trainable(net: nn.Module) -> nn.Module:
    """Keep every trained parameter in fp32 (a low-precision backbone's adapters would otherwise follow it)."""
    for p in net.parameters():
        if p.requires_grad and p.is_floating_point() and p.dtype != torch.float32:
            p.data = p.data.float()
    return net


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
    lr, epochs, batch_size = cfg.get("lr"), cfg.get("epochs"), cfg.get("batch_size")
    accum, precision = grad_accum_steps(cfg), launcher_precision(cfg.mixed_precision)
    stamp = None if work is None else resume.fingerprint(
        trainable_state(net), inputs, train, valid, cfg, seed=seed, label=label, lr_groups=lr_groups or {},
        accum=accum, precision=precision, processes=acc.num_processes)
    params = [p for p in net.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(param_groups(net, lr, lr_groups), lr=lr, weight_decay=cfg.weight_decay)
    data = torch.utils.data.TensorDataset(*train)
    shuffle = torch.Generator().manual_seed(seed)
    loader = torch.utils.data.DataLoader(data, batch_size=batch_size, shuffle=True, generator=shuffle)
    net, opt, loader = acc.prepare(net, opt, loader)
    updates = -(-len(loader) // accum)  # optimizer steps per epoch: the last one may sum fewer batches
    sched = cosine_with_warmup(opt, max(1, epochs * updates), cfg.warmup_ratio)
    scaler = torch.amp.GradScaler(acc.device.type) if precision == "fp16" else None
    g = torch.Generator().manual_seed(seed)
    keep = torch.randperm(len(valid[0]), generator=g)[: cfg.eval_pairs]
    valid = tuple(t[keep] for t in valid)
    model = acc.unwrap_model(net)
    path = work / resume.STATE_FILE if work is not None else None
    found = path and resume.load(path, stamp, restore_weights=lambda w: load_trainable_state(model, w), model=model,
                                 optimizer=opt, scheduler=sched, scaler=scaler, generator=shuffle)
    state, rng = found or (resume.Progress(), None)  # rng: the global random states to restore, once there
    if found and progress and acc.is_main_process:
        stderr_console().print(f"{label}: resuming after epoch {state.epoch}" + (f", batch {state.batch}" if state.batch
                               else "") + f" ({path})", highlight=False, soft_wrap=True)
    if report_to != "none":
        (work / "logs").mkdir(parents=True, exist_ok=True)
        acc.init_trackers(tracking.PROJECT, tracking.tracker_config(cfg, seed=seed, method=label),
                          init_kwargs=tracking.init_kwargs(report_to, work / "logs", label))

    def checkpoint(loader_rng: torch.Tensor) -> None:
        if path is not None and acc.is_main_process:
            resume.save(path, stamp, state, weights=trainable_state(model), model=model, optimizer=opt,
                        scheduler=sched, scaler=scaler, loader_rng=loader_rng)

    bar = Bar(progress and acc.is_main_process, epochs * len(loader), label,
              completed=state.epoch * len(loader) + state.batch)
    try:
        for epoch in range(state.epoch, epochs):
            net.train()
            skip, epoch_rng = state.batch, shuffle.get_state()  # the shuffle's state before this epoch's draw
            if rng is not None and not skip:  # resumed at an epoch boundary: restore before the shuffle draws
                resume.restore_rng(rng)
                rng = None
            window = []  # losses of the batches summed into the next optimizer step
            for i, (u, c, r, *extra) in enumerate(loader):  # extra columns (e.g. VPL's pair ids) go to the net
                if i < skip:  # resumed within the epoch: these batches were trained before the interruption
                    continue
                if rng is not None:  # resumed within the epoch: restore where the interrupted run saved them
                    resume.restore_rng(rng)
                    rng = None
                last = (i + 1) % accum == 0 or i + 1 == len(loader)  # this batch ends an optimizer step
                share = accum if i < len(loader) - len(loader) % accum else len(loader) % accum
                with contextlib.nullcontext() if last else acc.no_sync(net):  # DDP: sync only on the step
                    with autocast(model, cfg.mixed_precision):
                        rc, rr, aux = net(u, inputs.batch(c, acc.device), inputs.batch(r, acc.device), *extra)
                    loss = bt_loss(rc.float(), rr.float()) + aux
                    value = (acc.reduce(loss.detach(), "sum") if acc.num_processes > 1 else loss).item()
                    if not math.isfinite(value):  # every process sees the same sum, so all stop together
                        raise Diverged(f"{label}: the training loss became {value} at epoch {epoch + 1}, step "
                                       f"{state.n + 1} (lr {lr:g}); lower the learning rate")
                    acc.backward(loss / share if scaler is None else scaler.scale(loss / share))
                state.total, state.n = state.total + value / acc.num_processes, state.n + 1
                window.append(value / acc.num_processes)
                if last:
                    step_lr = opt.param_groups[0]["lr"]
                    if scaler is not None:
                        scaler.unscale_(opt)
                    if cfg.grad_clip:
                        acc.clip_grad_norm_(params, cfg.grad_clip)
                    if scaler is None:
                        opt.step()
                    else:
                        scaler.step(opt)
                        scaler.update()
                    sched.step()
                    opt.zero_grad(set_to_none=True)
                    state.steps += 1
                    acc.log({"train/loss": sum(window) / len(window), "lr": step_lr}, step=state.steps)
                    window = []
                    if cfg.checkpoint_every and state.steps % cfg.checkpoint_every == 0 and i + 1 < len(loader):
                        state.batch = i + 1
                        checkpoint(epoch_rng)
                bar.update(advance=1, info=f"epoch {epoch + 1}/{epochs} loss {state.total / state.n:.4f}")
            valid_acc = row_accuracy(model, inputs, *valid)
            loss = state.total / max(state.n, 1)
            state.history.append({"epoch": epoch + 1, "loss": loss, "valid_accuracy": valid_acc})
            if valid_acc > state.best_acc or state.best is None or math.isnan(valid_acc):  # no valid pairs: the last
                state.best_acc, state.best, state.best_epoch = valid_acc, trainable_state(model), epoch + 1
            state.epoch, state.batch, state.total, state.n = epoch + 1, 0, 0.0, 0
            acc.log({"train/epoch_loss": loss, "valid/accuracy": valid_acc, "epoch": epoch + 1}, step=state.steps)
            checkpoint(shuffle.get_state())
    except KeyboardInterrupt:
        if path is None or not path.exists():
            raise
        raise CoplError(f"{label}: interrupted; run the same command again to resume from the last checkpoint "
                        f"({path})") from None
    finally:
        bar.close()
        tracking.finish(acc)
    if rng is not None:  # resumed after the last epoch: leave the random streams where the full run did
        resume.restore_rng(rng)
    load_trainable_state(model, state.best)
    acc.wait_for_everyone()
    return {"history": state.history, "best_epoch": state.best_epoch, "valid_accuracy": state.best_acc,
            "steps": epochs * updates, "grad_accum": accum, "mixed_precision": precision,
            "processes": acc.num_processes, "lr": lr, "lr_groups": dict(lr_groups or {}),
            "resumed_from": state.resumed_from}


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
