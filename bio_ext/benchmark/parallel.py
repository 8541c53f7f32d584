"""The runner under ``torchrun``: one process per device, DistributedDataParallel, rank 0 writes.

    torchrun --nproc_per_node=2 -m bio_ext.benchmark CONFIG.yaml [--resume]

Every process runs the whole sweep, in the same order, and trains each run together with the others:

* **Process group.** torchrun sets ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``; the runner starts the default
  process group from them (NCCL on CUDA, gloo on the CPU) unless the caller started one already, and ends
  it when the sweep ends. Without torchrun (``WORLD_SIZE`` unset or 1) nothing changes.
* **Devices.** ``infrastructure.gpus: [0, 1]`` gives local rank ``r`` the CUDA device ``gpus[r]`` (one device per
  process: the list needs as many entries as ``--nproc_per_node``); ``-1`` puts every process on the CPU
  (gloo). Without CUDA the processes run on the CPU, with a warning, as a single process does.
* **Batches.** ``training.hyperparameters.batch_size`` is the global batch, as in a single process: each of
  the ``N`` processes takes ``batch_size / N`` of it (it must divide), so a configuration means the same
  experiment whatever ``N``. The epoch's order is the single process's permutation (seeded with the run's
  seed and the epoch), split by :class:`torch.utils.data.DistributedSampler`: rank ``r`` takes every ``N``-th
  example from position ``r``, so one step of all ranks together trains on the very batch the single process
  trains on. When ``N`` does not divide the training set the sampler repeats its first examples to even
  the shards (as DistributedSampler does); otherwise the run equals the single-process run up to float
  rounding in every mode (the DDP gradient of equal shards is the whole batch's: ``tests/test_distributed.py``).
* **Model.** The converted model is wrapped in ``DistributedDataParallel``: gradients are averaged, buffers
  broadcast from rank 0 at every forward (GrAPE's feedback is identical on every rank anyway:
  :mod:`bio_ext.distributed`). Before evaluation and checkpoints rank 0's buffers (batch-norm statistics)
  are broadcast, so every rank evaluates and rank 0 saves the same model.
* **Metrics.** Each step's loss and correct count are summed over the ranks (one small all-reduce, also
  how every rank learns that some rank's loss is not finite); validation and test sets are split between
  the ranks (without repeats) and their sums reduced. So every rank holds the metrics of the whole data.
* **Files.** Rank 0 alone writes results, checkpoints, TensorBoard, summary and figures, and draws the
  progress bars; ``--resume`` reads them on every rank (the output folder must be shared by all processes,
  which it is on one machine). The alignment probe runs on rank 0 only (on its shard of the batch).
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass
from typing import Iterable

import torch
import torch.nn as nn

log = logging.getLogger(__name__)


@dataclass
class Ranks:
    """Where this process stands among the processes of a sweep (one process: rank 0 of 1)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    #: whether :func:`setup` started the process group (and :meth:`close` ends it)
    owned: bool = False

    @property
    def main(self) -> bool:
        """Whether this process writes (rank 0)."""
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` summed over the processes (in place; unchanged in a single process)."""
        if self.active:
            torch.distributed.all_reduce(t)
        return t

    def any(self, flag: bool, device) -> bool:
        """Whether ``flag`` holds on some process."""
        if not self.active:
            return flag
        return bool(self.all_reduce(torch.tensor([float(flag)], device=device)).item() > 0)

    def sums(self, values, device) -> list:
        """``values`` (numbers) summed over the processes, the integers back as ints."""
        if not self.active:
            return list(values)
        summed = self.all_reduce(flatten(values, device)).tolist()
        return [int(round(t)) if isinstance(v, int) else t for v, t in zip(values, summed)]

    def step_metrics(self, loss: torch.Tensor, correct: torch.Tensor, seen: int):
        """``(mean loss, correct, examples)`` of one step over all processes (one all-reduce, which is also how
        every rank learns that some rank's loss is not finite); the loss stays a tensor."""
        if not self.active:
            return loss.detach(), int(correct), seen
        sums = self.all_reduce(torch.stack([loss.detach().double() * seen, correct.double(),
                                            torch.tensor(float(seen), dtype=torch.float64, device=loss.device)]))
        return sums[0] / sums[2], int(sums[1]), int(sums[2])

    def first_on_rank0(self, fn, *args):
        """``fn(*args)`` on rank 0, then on the others (a download happens once)."""
        if not self.main:
            self.barrier()
        out = fn(*args)
        if self.main:
            self.barrier()
        return out

    def barrier(self) -> None:
        if self.active:
            torch.distributed.barrier()

    def broadcast_buffers(self, model: nn.Module) -> None:
        """Rank 0's buffers on every process (one broadcast per dtype)."""
        if not self.active:
            return
        buffers = [b for b in model.buffers()]
        for dtype in sorted({b.dtype for b in buffers}, key=str):
            group = [b for b in buffers if b.dtype == dtype]
            flat = torch.cat([b.detach().reshape(-1) for b in group])
            torch.distributed.broadcast(flat, 0)
            offset = 0
            with torch.no_grad():
                for b in group:
                    b.copy_(flat[offset:offset + b.numel()].view_as(b))
                    offset += b.numel()

    def shard(self, order: torch.Tensor, epoch: int) -> torch.Tensor:
        """This rank's part of the epoch's order (a DistributedSampler over the positions of ``order``)."""
        if not self.active:
            return order
        from torch.utils.data import DistributedSampler
        sampler = DistributedSampler(range(len(order)), num_replicas=self.world, rank=self.rank, shuffle=False)
        sampler.set_epoch(epoch)
        return order[torch.tensor(list(iter(sampler)), dtype=torch.long)]

    def eval_indices(self, n: int) -> torch.Tensor:
        """This rank's share of an evaluation set of ``n`` examples (every example once over all ranks)."""
        return torch.arange(self.rank, n, self.world)

    def close(self) -> None:
        if self.owned and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
            self.owned = False


def launched() -> Ranks:
    """The ranks torchrun's environment (or an already started default process group) describes."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
        return Ranks(rank, world, int(os.environ.get("LOCAL_RANK", rank)))
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    rank = int(os.environ.get("RANK", "0") or 0)
    return Ranks(rank, world, int(os.environ.get("LOCAL_RANK", rank) or rank))


@contextlib.contextmanager
def launch(cfg):
    """The :class:`Ranks` of this process for a sweep of ``cfg``; under torchrun the process group is started
    (when not started already) for the sweep and ended after it."""
    from .build import select_device
    ranks = launched()
    if ranks.active:
        batches_per_rank(cfg.training.hyperparameters.batch_size, ranks)
        setup(select_device(cfg.infrastructure.gpus, ranks.local_rank, ranks.world), ranks)
    try:
        yield ranks
    finally:
        ranks.close()


def setup(device: torch.device, ranks: Ranks) -> Ranks:
    """Start the default process group for ``ranks`` (torchrun's ``env://``) when it is not started yet."""
    dist = torch.distributed
    if not ranks.active or dist.is_initialized():
        return ranks
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend)
    log.info("rank %d of %d: %s process group, device %s", ranks.rank, ranks.world, backend, device)
    ranks.owned = True
    return ranks


def wrap(model: nn.Module, device: torch.device, ranks: Ranks) -> nn.Module:
    """``model`` in DistributedDataParallel over the default group (``model`` itself in a single process)."""
    if not ranks.active:
        return model
    ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids)


def batches_per_rank(batch_size: int, ranks: Ranks) -> int:
    from ..errors import ConfigError
    if batch_size % ranks.world:
        raise ConfigError([f"training.hyperparameters.batch_size: {batch_size} is the global batch and must be a "
                           f"multiple of the {ranks.world} processes torchrun started (each takes an equal share); "
                           f"use e.g. {batch_size - batch_size % ranks.world or ranks.world}"],
                          what="benchmark configuration")
    return batch_size // ranks.world


def flatten(values: Iterable[float], device) -> torch.Tensor:
    return torch.tensor(list(values), dtype=torch.float64, device=device)

