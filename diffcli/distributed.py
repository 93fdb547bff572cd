"""Multi-GPU / multi-node training through torchrun: process group, rank 0's run folder, collectives.

torchrun sets WORLD_SIZE, RANK and LOCAL_RANK; without them (a plain `diffcli train`) every
function here is a no-op for a world of one, so the training loop has a single code path.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from . import DiffcliError

log = logging.getLogger("diffcli")


@dataclass
class World:
    """This process's place among the training processes."""

    rank: int = 0
    size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        """Rank 0 writes every file and draws the progress bar."""
        return self.rank == 0


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def setup(device: torch.device) -> World:
    """Join torchrun's process group (NCCL on GPUs, gloo on CPUs); a world of one otherwise."""
    if not launched_by_torchrun():
        return World(device=device)
    rank, size, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0))
    if device.type == "cuda":
        device = torch.device("cuda", local)  # one GPU per process, by its rank on this node
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if rank > 0:  # one voice: the other ranks only report problems
        log.setLevel(logging.WARNING)
    return World(rank, size, device)


def teardown(world: World, wait: bool = True) -> None:
    """Leave the process group; `wait` for every rank first (rank 0 may still be writing its last checkpoint)."""
    if world.size > 1 and dist.is_initialized():
        if wait:
            dist.barrier()
        dist.destroy_process_group()


def shared(world: World, value):
    """Rank 0's `value` on every rank (e.g. the run folder, whose name holds rank 0's start time)."""
    if world.size == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def mean(world: World, x: torch.Tensor) -> torch.Tensor:
    """The mean of a tensor over ranks (a collective: call it on every rank, at log intervals only)."""
    if world.size > 1:
        x = x.clone()
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
        x /= world.size
    return x


def any_rank(world: World, flag: bool) -> bool:
    """True on every rank when it is true on any (a signal seen by one process stops them all at one step)."""
    if world.size == 1:
        return flag
    x = torch.tensor([float(flag)], device=world.device)
    dist.all_reduce(x, op=dist.ReduceOp.MAX)
    return bool(x.item())


def micro_batch(world: World, batch_size: int, grad_accum: int) -> int:
    """Examples per forward pass: the global batch split over ranks and accumulation steps."""
    parts = world.size * grad_accum
    if grad_accum < 1 or batch_size % parts:
        raise DiffcliError(f"train.batch_size={batch_size} is the global batch; it must split evenly over "
                           f"{world.size} process(es) x train.grad_accum={grad_accum}: use a multiple of {parts}")
    return batch_size // parts


def wrap(world: World, net: torch.nn.Module) -> torch.nn.Module:
    """DistributedDataParallel around the net for a world of more than one; the net itself otherwise."""
    if world.size == 1:
        return net
    from torch.nn.parallel import DistributedDataParallel

    ids = [world.device.index] if world.device.type == "cuda" else None
    return DistributedDataParallel(net, device_ids=ids)


def gather(world: World, value) -> list | None:
    """Every rank's `value` on rank 0, in rank order (None on the other ranks): a collective, call it on every rank.
    Values travel pickled between this run's own processes; nothing read from a file passes here."""
    if world.size == 1:
        return [value]
    box = [None] * world.size if world.main else None
    dist.gather_object(value, box, dst=0)
    return box
