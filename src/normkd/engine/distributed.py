"""Multi-process training with PyTorch's own engine: torchrun + DistributedDataParallel.

``torchrun --nproc_per_node K -m normkd distill CONFIG`` sets RANK / WORLD_SIZE / LOCAL_RANK;
:func:`setup` reads them, picks NCCL on GPUs and gloo on CPUs, and binds each process to its
device. Without those variables everything here is a no-op, so single-process runs are unchanged.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from normkd.errors import ConfigError


@dataclass(frozen=True)
class DistContext:
    """This process's place in the job (rank 0 of 1 when not distributed)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup(device_name: str) -> tuple[DistContext, torch.device | None]:
    """Initialise the process group from torchrun's environment; returns (context, device).

    The device is None when not distributed (the caller resolves ``engine.device`` itself).
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistContext(), None
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and device_name in ("auto", "cuda")
    if device_name.startswith("cuda:"):
        raise ConfigError("engine.device: under torchrun use 'auto' or 'cuda' (one GPU per rank)")
    device = torch.device(f"cuda:{local_rank}") if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(
            backend="nccl" if use_cuda else "gloo",
            timeout=timedelta(minutes=int(os.environ.get("NORMKD_DIST_TIMEOUT_MIN", "30"))),
        )
    return DistContext(rank=rank, world_size=world, local_rank=local_rank), device


def teardown(ctx: DistContext) -> None:
    """Leave the process group (a no-op when not distributed)."""
    if ctx.enabled and dist.is_initialized():
        dist.destroy_process_group()


def barrier(ctx: DistContext) -> None:
    if ctx.enabled:
        dist.barrier()


def all_reduce_sum(values: dict[str, torch.Tensor | float], ctx: DistContext, device: torch.device):
    """Sum a dict of scalars over ranks (one collective); returns floats."""
    keys = sorted(values)
    if not ctx.enabled:
        return {k: float(values[k]) for k in keys}
    t = torch.stack([torch.as_tensor(values[k], dtype=torch.float64, device=device) for k in keys])
    dist.all_reduce(t)
    return {k: float(v) for k, v in zip(keys, t.tolist())}


def broadcast_flag(flag: bool, ctx: DistContext, device: torch.device) -> bool:
    """True on every rank if it is true on any rank (so all stop together)."""
    if not ctx.enabled:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)
