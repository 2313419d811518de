"""Several processes, one job: PyTorch's own distributed engine, as `torchrun` launches it.

Under `torchrun --nproc_per_node N ...` every process gets RANK, WORLD_SIZE, LOCAL_RANK and a
rendezvous address in its environment; `setup()` joins the process group (gloo on CPU, NCCL on
GPU) and says which share of the work is this process's. Without torchrun the world is one
process and every helper here is a no-op, so single-process code paths stay as they were.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Sequence, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


@dataclass(frozen=True)
class DistEnv:
    """This process's place in the job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0  # rank within its machine: picks its GPU
    device: str = "cpu"  # "cpu" or "cuda:<local_rank>"

    @property
    def is_main(self) -> bool:
        """Rank 0 writes files, logs and shows progress."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def resolve_device(device: str = "auto", local_rank: int = 0) -> str:
    """"auto" -> this process's GPU where CUDA is present, else "cpu"; "cpu", "cuda" and
    "cuda:N" as asked, where torch has them; anything else is an `OptionError`."""
    from captioner.errors import OptionError

    device = str(device)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        return device
    kind, _, index = device.partition(":")
    if kind != "cuda" or (index and not index.isdigit()):
        raise OptionError(f"device {device!r} is not one captioner runs on: cpu, cuda, cuda:N or auto")
    if not torch.cuda.is_available():
        raise OptionError(f"device {device} asked for, but torch sees no CUDA device (use cpu or auto)")
    if index and int(index) >= torch.cuda.device_count():
        raise OptionError(f"device {device}: torch sees {torch.cuda.device_count()} CUDA device(s)")
    return device if index else f"cuda:{local_rank % torch.cuda.device_count()}"


def setup(device: str = "auto", timeout_minutes: float | None = None) -> DistEnv:
    """This process's DistEnv; under torchrun (WORLD_SIZE > 1) it joins the process group first
    (once; later calls return the same answer). The timeout bounds every collective wait, and
    feature extraction waits in one: CAPTIONER_DIST_TIMEOUT_MIN overrides its 3 hours."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local_rank)
    if world <= 1:
        return DistEnv(device=dev)
    if not dist.is_initialized():
        if dev.startswith("cuda"):
            torch.cuda.set_device(torch.device(dev))
        minutes = timeout_minutes or float(os.environ.get("CAPTIONER_DIST_TIMEOUT_MIN", "180"))
        dist.init_process_group("nccl" if dev.startswith("cuda") else "gloo", timeout=timedelta(minutes=minutes))
    return DistEnv(dist.get_rank(), dist.get_world_size(), local_rank, dev)


def teardown() -> None:
    """Leave the process group, if this process joined one."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def shard(items: Sequence[T], env: DistEnv | None) -> list[T]:
    """This rank's share: every world_size-th item from its rank (balanced to within one)."""
    if env is None or not env.distributed:
        return list(items)
    return list(items[env.rank::env.world_size])


def barrier(env: DistEnv | None) -> None:
    if env is not None and env.distributed:
        dist.barrier()


def broadcast(obj: T, env: DistEnv | None) -> T:
    """Rank 0's `obj` on every rank (any picklable object)."""
    if env is None or not env.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_lists(items: list[T], env: DistEnv | None) -> list[T]:
    """Every rank's list, concatenated in rank order, on every rank."""
    if env is None or not env.distributed:
        return list(items)
    out: list[Any] = [None] * env.world_size
    dist.all_gather_object(out, items)
    return [x for part in out for x in part]


def all_sum(values: torch.Tensor, env: DistEnv | None) -> torch.Tensor:
    """Element-wise sum over ranks (a new tensor; the input is left alone)."""
    if env is None or not env.distributed:
        return values.clone()
    out = values.detach().clone()
    if env.device.startswith("cuda"):
        out = out.to(env.device)
    dist.all_reduce(out)
    return out.to(values.device)
