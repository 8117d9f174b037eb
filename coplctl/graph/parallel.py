"""GCF training across processes and machines, on torch.distributed through accelerate (gloo across CPU
processes, nccl across GPUs): ``accelerate launch --num_processes N -m coplctl graph train ...``.

Every process holds the whole graph. Each minibatch of training pairs (``batch_size``, the same order on
every process) is split across the processes; each samples the neighbourhoods of its share
(:mod:`coplctl.graph.sampling`, from a random stream fixed by the run's seed, the epoch, the step and the
process, so that a resumed run draws what the interrupted one would have), and DDP averages the
gradients, so every process takes the same optimiser step and holds the same model. Evaluation is the
full-graph one, on every process (the same numbers everywhere, so every process stops at the same
epoch); the main process alone writes checkpoints and the run, in the run format of one process.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

from coplctl.core.errors import CoplError
from coplctl.graph.config import NEIGHBOR_BATCH, GCFConfig


@dataclass
class Processes:
    """The processes a GCF run trains on (one, unless launched with several and asked to use them)."""

    size: int = 1
    rank: int = 0
    state: Any = None
    """accelerate's ``PartialState`` (None for one process)."""

    @property
    def main(self) -> bool:
        return self.rank == 0

    def wait(self) -> None:
        if self.size > 1:
            self.state.wait_for_everyone()

    def agree(self, work) -> None:
        """Run ``work()`` (the main process's part of a step: the others pass None-returning work) and go on
        together: a CoplError on the main process is raised on every process, never left waiting."""
        problem = None
        try:
            work()
        except CoplError as e:
            problem = str(e)
        if self.size > 1:
            from accelerate.utils import broadcast_object_list

            problem = broadcast_object_list([problem])[0]
        if problem:
            raise CoplError(problem)

    def mean(self, value: float) -> float:
        """The mean of ``value`` over the processes (one process: ``value``)."""
        if self.size == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.state.device)
        torch.distributed.all_reduce(t)
        return float(t) / self.size


def processes(device: torch.device, enabled: bool) -> Processes:
    """The launched processes when ``enabled`` (``accelerate launch`` or ``torchrun`` started several), else one."""
    if not enabled:
        return Processes()
    from accelerate import PartialState

    state = PartialState(cpu=device.type == "cpu")
    return Processes(state.num_processes, state.process_index, state) if state.num_processes > 1 else Processes()


def for_processes(cfg: GCFConfig, procs: Processes) -> GCFConfig:
    """``cfg`` for training on ``procs``: several processes split neighbour-sampled minibatches."""
    if procs.size == 1:
        return cfg
    if cfg.sampler == "full":
        raise CoplError(f"GCF on {procs.size} processes splits neighbour-sampled minibatches: use --sampler "
                        f"neighbor (or auto), or one process for full-graph steps")
    if cfg.holdout or cfg.edge_dropout:
        raise CoplError("GCF options holdout and edge_dropout work with full-graph steps on one process")
    batch = cfg.batch_size or NEIGHBOR_BATCH
    if batch < procs.size:
        raise CoplError(f"batch_size {batch} is smaller than the {procs.size} processes it is split across")
    return dataclasses.replace(cfg, sampler="neighbor", batch_size=batch)


def wrap(model: torch.nn.Module, procs: Processes) -> torch.nn.Module:
    """The module training steps call: DDP over the processes (prepared by accelerate), else ``model``."""
    if procs.size == 1:
        return model
    from accelerate import Accelerator

    return Accelerator(cpu=procs.state.device.type == "cpu").prepare_model(model)


def share(batch: torch.Tensor, procs: Processes) -> torch.Tensor:
    """This process's share of a minibatch of pair indices (every ``size``-th one)."""
    return batch if procs.size == 1 else batch[procs.rank::procs.size]


def step_stream(seed: int, epoch: int, step: int, procs: Processes) -> torch.Generator:
    """The random stream one process samples one step's neighbourhoods from (see the module docstring)."""
    return torch.Generator().manual_seed(((((seed * 1_000_003) + epoch) * 1_000_033 + step) * 1_009 + procs.rank) % (1 << 63))
