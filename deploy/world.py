"""The group of training processes: one (the default) or a torchrun DDP world.

torchrun sets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT; `World.from_env`
joins that process group (NCCL on GPUs, gloo on CPU). Each rank consumes its own Kafka
partitions; once per loop iteration the ranks exchange a small `Tick` so that every
decision (step or idle, experience boundary, checkpoint, stop) is taken by all of them
together, and the main rank (0) receives the other ranks' samples for the sample store,
the probe sets and the audit log. With one process every call is a local no-op.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

COLLECTIVE_TIMEOUT = timedelta(minutes=30)  # an experience end on rank 0 (evaluation) must fit
CPU = torch.device("cpu")


@dataclass
class Tick:
    """What one rank tells the others each loop iteration."""

    records: int = 0  # records behind this rank's batch (0: no batch this iteration)
    images: int = 0  # stream images this rank trains on in this iteration
    stepped: int = 0  # images through this rank's step: stream + replay
    domain: str | None = None  # domain of those images
    changed_to: str | None = None  # set when this rank's stream switched domain
    stop: bool = False  # a stop was requested on this rank
    idle: bool = False  # this rank would exit for idleness (no data, no lag)
    checkpoint_due: bool = False  # the main rank's interval timer fired
    drift: float | None = None  # the main rank's drift detector found a shift (its z-score)
    lag: dict[int, int] = field(default_factory=dict)  # consumer lag of this rank's partitions


@dataclass(frozen=True)
class Agreement:
    """The decisions every rank derives identically from all ranks' ticks."""

    records: int  # records in this iteration's batches, all ranks together
    images: int  # stream images trained this iteration, all ranks together
    stepped: int  # images through the step (stream + replay), all ranks together
    per_rank: list[int]  # `stepped` of each rank
    domain: str | None  # the domain that opens an experience, or the first one seen
    boundary_to: str | None  # some rank switched to this new domain: end the experience first
    stop: bool
    idle: bool
    checkpoint_due: bool
    lag: dict[int, int]
    drift: float | None = None  # a drift boundary is due (its z-score): end the experience first

    def weight(self, rank: int, world_size: int) -> float:
        """Loss scale so that DDP's gradient mean is the mean over all images of all ranks.

        DDP averages gradients over ranks; a rank holding n of N images must weigh its
        mean loss by n * world / N (0 for a rank that only keeps the collective going).
        """
        return self.per_rank[rank] * world_size / self.stepped if self.stepped else 0.0


def agree(ticks: list[Tick], current_domain: str | None) -> Agreement:
    """Combine the ranks' ticks (the same list on every rank gives the same decisions).

    A domain switch on one rank ends the experience unless the rank is only catching up
    to the domain that already opened the current experience (ranks read their partitions
    at their own pace, so the last rank to see a new domain must not split it again).
    """
    switched = [t.changed_to for t in ticks if t.changed_to is not None and t.changed_to != current_domain]
    seen = [t.domain for t in ticks if t.images and t.domain is not None]
    lag: dict[int, int] = {}
    for t in ticks:
        lag.update(t.lag)
    return Agreement(
        records=sum(t.records for t in ticks),
        images=sum(t.images for t in ticks),
        stepped=sum(t.stepped for t in ticks),
        per_rank=[t.stepped for t in ticks],
        domain=switched[0] if switched else (seen[0] if seen else None),
        boundary_to=switched[0] if switched else None,
        stop=any(t.stop for t in ticks),
        idle=all(t.idle for t in ticks),
        checkpoint_due=any(t.checkpoint_due for t in ticks),
        lag=lag,
        drift=next((t.drift for t in ticks if t.drift is not None), None),
    )


class World:
    """This process's place in the training group."""

    def __init__(self, rank: int = 0, size: int = 1, local_rank: int = 0,
                 device: torch.device = CPU, objects: dist.ProcessGroup | None = None) -> None:
        self.rank, self.size, self.local_rank = rank, size, local_rank
        self.device = device  # where tensor collectives run: this rank's GPU under NCCL, else the CPU
        # Pickled objects (ticks, samples) travel over gloo even under NCCL: through NCCL they
        # would be staged on the GPU and wait behind the queued training kernels every step.
        self._objects = objects  # None: the default group (gloo already)

    @classmethod
    def from_env(cls, device: str) -> World:
        """Join torchrun's process group if WORLD_SIZE > 1, else a world of one."""
        size = int(os.environ.get("WORLD_SIZE", "1"))
        if size <= 1:
            return cls()
        rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
        use_cuda = device != "cpu" and torch.cuda.is_available()
        if not use_cuda:
            dist.init_process_group("gloo", timeout=COLLECTIVE_TIMEOUT)
            return cls(rank, size, local_rank)
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", timeout=COLLECTIVE_TIMEOUT, device_id=device)
        objects = dist.new_group(backend="gloo", timeout=COLLECTIVE_TIMEOUT)
        return cls(rank, size, local_rank, device, objects)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    def exchange(self, tick: Tick) -> list[Tick]:
        """Every rank's tick, in rank order."""
        if not self.distributed:
            return [tick]
        out: list[Any] = [None] * self.size
        dist.all_gather_object(out, tick, group=self._objects)
        return out

    def agree(self, tick: Tick, current_domain: str | None) -> Agreement:
        """This iteration's decisions: every rank's tick exchanged, then `agree` (one process: its own tick)."""
        return agree(self.exchange(tick), current_domain)

    def gather(self, obj: Any) -> list[Any] | None:
        """Every rank's `obj` on the main rank (rank order); None on the others."""
        if not self.distributed:
            return [obj]
        out: list[Any] | None = [None] * self.size if self.is_main else None
        dist.gather_object(obj, out, dst=0, group=self._objects)
        return out

    def gather_others(self, make: Callable[[], Any]) -> list[Any]:
        """The other ranks' `make()` on the main rank, in rank order; [] on the other ranks.

        Every rank calls it (a collective). With one process there are no others and `make` is not called.
        """
        if not self.distributed:
            return []
        out = self.gather(make())
        return out[1:] if out is not None else []

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's `obj` on every rank."""
        if not self.distributed:
            return obj
        box = [obj if self.is_main else None]
        dist.broadcast_object_list(box, src=0, group=self._objects)
        return box[0]

    def all_true(self, flag: bool) -> bool:
        """True when `flag` holds on every rank (e.g. a finite loss: all step or none)."""
        if not self.distributed:
            return flag
        agreed = torch.tensor([int(flag)], device=self.device)  # one small all-reduce: it runs every step
        dist.all_reduce(agreed, op=dist.ReduceOp.MIN)
        return bool(agreed.item())

    def average_state(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """`state` with floating tensors averaged over ranks (regularizer statistics that each
        rank estimated from its own data); returned on the devices they came from."""
        if not self.distributed:
            return state
        out = {}
        for key, tensor in state.items():
            if tensor.is_floating_point():
                reduced = tensor.to(self.device, copy=True)
                dist.all_reduce(reduced, op=dist.ReduceOp.SUM)
                out[key] = (reduced / self.size).to(tensor.device)
            else:
                out[key] = tensor
        return out

    def barrier(self) -> None:
        """Wait until every rank gets here (rank 0 prepared the topic, say)."""
        if self.distributed:
            dist.barrier(group=self._objects)

    def wrap(self, module: nn.Module, device: torch.device) -> nn.Module:
        """`module` under DistributedDataParallel (rank 0's weights broadcast), or as is."""
        if not self.distributed:
            return module
        device_ids = [device.index] if device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(module, device_ids=device_ids)

    def all_reduce_grads(self, params: list[nn.Parameter]) -> None:
        """Average gradients of parameters outside the DDP module (a distillation predictor)."""
        if not self.distributed:
            return
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
            p.grad /= self.size

    def close(self) -> None:
        if self.distributed and dist.is_initialized():
            dist.destroy_process_group()
