"""Where and how a run executes: device, precision, processes. One object, as in Lightning Fabric.

The training loop stays ours and readable; everything that depends on the hardware (which device,
autocast and its dtype, the fp16 GradScaler, channels_last, torchrun/DDP, torch.compile, summing
metrics over ranks) is decided here once. ``torchrun --nproc_per_node K -m normkd distill CONFIG``
sets RANK / WORLD_SIZE / LOCAL_RANK; without them every distributed call is a no-op.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from normkd.config import EngineCfg
from normkd.errors import ConfigError


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when present; an explicit device that is absent is a user error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"engine.device: {name!r} requested but CUDA is not available here")
    if name == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("engine.device: 'mps' requested but MPS is not available here")
    return torch.device(name)


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes in bf16 natively (not by emulation, which is slower than fp32)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type == "cpu":
        return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    return False


def resolve_amp(amp: str, device: torch.device) -> str:
    """``engine.amp`` as the run uses it: ``auto`` becomes bf16 on native-bf16 devices, else off."""
    if amp != "auto":
        return amp
    return "bf16" if native_bf16(device) else "off"


def resolve_channels_last(channels_last: bool | str, amp: str) -> bool:
    """``engine.channels_last`` as the run uses it: ``auto`` is on exactly under bf16 / fp16."""
    if channels_last == "auto":
        return amp in ("bf16", "fp16")
    return bool(channels_last)


def autocast(device: torch.device, amp: str) -> Any:
    """The autocast context for ``engine.amp`` (off: a no-op)."""
    if amp == "off":
        return nullcontext()
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


@dataclass
class Runtime:
    """This process's device and precision, and its place among torchrun's processes."""

    device: torch.device
    amp: str = "off"
    channels_last: bool | str = False
    compile: bool = False
    sync_bn: bool = False
    rank: int = 0
    world_size: int = 1
    scaler: torch.amp.GradScaler = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.amp = resolve_amp(self.amp, self.device)
        self.channels_last = resolve_channels_last(self.channels_last, self.amp)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp == "fp16")

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that writes the run directory and prints."""
        return self.rank == 0

    def autocast(self) -> Any:
        return autocast(self.device, self.amp)

    def prepare(self, module: nn.Module) -> nn.Module:
        """Move ``module`` here; return what the step calls (DDP- and/or compile-wrapped)."""
        module.to(self.device)
        if self.channels_last:
            module.to(memory_format=torch.channels_last)
        wrapped = module
        if self.distributed:
            from torch.nn.parallel import DistributedDataParallel as DDP

            if self.sync_bn:
                module.student = nn.SyncBatchNorm.convert_sync_batchnorm(module.student)
            ids = [self.device.index] if self.device.type == "cuda" else None
            wrapped = DDP(module, device_ids=ids)  # the frozen teacher is no parameter of it
        return torch.compile(wrapped) if self.compile else wrapped

    def sum(self, values: dict[str, Any]) -> dict[str, float]:
        """Sum scalars over ranks (one collective); floats, in sorted key order."""
        keys = sorted(values)
        if not self.distributed:
            return {k: float(values[k]) for k in keys}
        t = torch.stack(
            [torch.as_tensor(values[k], dtype=torch.float64, device=self.device) for k in keys]
        )
        dist.all_reduce(t)
        return {k: float(v) for k, v in zip(keys, t.tolist())}

    def share_buffers(self, module: nn.Module) -> None:
        """Give every rank rank 0's buffers (BatchNorm statistics move per rank on its own last
        batch; DDP re-broadcasts them only at the next forward), so evaluation and checkpoints
        see the model rank 0 saves."""
        if self.distributed:
            for b in module.buffers():
                dist.broadcast(b, src=0)

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()


@contextlib.contextmanager
def start(cfg: EngineCfg) -> Iterator[Runtime]:
    """The Runtime of ``cfg`` in this process; joins (and finally leaves) torchrun's group."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    common = {"amp": cfg.amp, "channels_last": cfg.channels_last, "compile": cfg.compile}
    if world <= 1:
        yield Runtime(resolve_device(cfg.device), sync_bn=cfg.sync_bn, **common)
        return
    if cfg.device.startswith("cuda:"):
        raise ConfigError("engine.device: under torchrun use 'auto' or 'cuda' (one GPU per rank)")
    use_cuda = torch.cuda.is_available() and cfg.device in ("auto", "cuda")
    if cfg.sync_bn and not use_cuda:
        raise ConfigError("engine.sync_bn needs CUDA devices (PyTorch has no CPU SyncBN)")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device(f"cuda:{local_rank}") if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        minutes = int(os.environ.get("NORMKD_DIST_TIMEOUT_MIN", "30"))
        dist.init_process_group(
            backend="nccl" if use_cuda else "gloo", timeout=timedelta(minutes=minutes)
        )
    try:
        yield Runtime(
            device, sync_bn=cfg.sync_bn, rank=int(os.environ["RANK"]), world_size=world, **common
        )
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
