"""Device-resident CIFAR-scale loader: the whole set lives on the device, augmented per batch.

Follows airbench: images are moved once as uint8, every batch is gathered, cropped, flipped and
normalised with a handful of tensor ops, and an epoch's order and augmentation are a pure function
of (seed, epoch) so a resumed run sees the same batches bit for bit.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from normkd.errors import DataError

SEED_STRIDE = 100_003  # epoch seeds seed * SEED_STRIDE + epoch never collide for epoch < stride


@dataclass
class Augment:
    """Random crop with zero padding ``pad`` (same output size) and optional horizontal flip."""

    pad: int = 4
    flip: bool = True

    def __post_init__(self) -> None:
        """Reject a negative pad here rather than as an indexing error mid-epoch."""
        if self.pad < 0:
            raise DataError(f"augment pad must be >= 0, got {self.pad}")


@dataclass(frozen=True)
class EpochPlan:
    """What one rank sees in one epoch: sample order and per-sample crop offsets and flips."""

    idx: Tensor  # int64 (num_samples,) dataset indices, in the order batches take them
    dy: Tensor  # int64 row offset of the crop inside the padded image, 0..2*pad
    dx: Tensor  # int64 column offset of the crop inside the padded image, 0..2*pad
    flip: Tensor  # bool, mirror left-right after cropping


def augment_batch(x: Tensor, dy: Tensor, dx: Tensor, flip: Tensor, pad: int) -> Tensor:
    """Crop every image of a (B, C, H, W) batch at its own offset and flip it, in one gather."""
    b, c, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad)) if pad else x
    dev, wp = x.device, w + 2 * pad
    rows = dy.to(dev)[:, None] + torch.arange(h, device=dev)  # (B, H) rows of the padded image
    cols = torch.arange(w, device=dev).expand(b, w)
    cols = torch.where(flip.to(dev)[:, None], w - 1 - cols, cols) + dx.to(dev)[:, None]  # (B, W)
    flat = (rows[:, :, None] * wp + cols[:, None, :]).view(b, 1, h * w).expand(b, c, h * w)
    return padded.reshape(b, c, -1).gather(2, flat).view(b, c, h, w)


class DeviceLoader:
    """Iterates (x normalised float, y, idx) batches from uint8 images held on the device."""

    def __init__(
        self,
        x: Tensor,
        y: Tensor,
        batch_size: int,
        *,
        device: torch.device | str = "cpu",
        mean: Sequence[float],
        std: Sequence[float],
        shuffle: bool,
        drop_last: bool,
        augment: Augment | None,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        channels_last: bool = False,
    ) -> None:
        """Validate once and move the data to the device once; batches are then cheap slices."""
        if x.dtype != torch.uint8 or x.ndim != 4:
            raise DataError(f"images must be uint8 (N, C, H, W), got {x.dtype} {tuple(x.shape)}")
        if y.ndim != 1 or len(y) != len(x):
            raise DataError(f"labels must be (N,) with N = {len(x)}, got {tuple(y.shape)}")
        if len(x) == 0:
            raise DataError("cannot iterate an empty dataset")
        if batch_size < 1:
            raise DataError(f"batch_size must be >= 1, got {batch_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise DataError(f"need 0 <= rank < world_size, got rank {rank}, world {world_size}")
        channels = x.shape[1]
        if len(mean) != channels or len(std) != channels or min(std) <= 0:
            raise DataError(f"mean/std need {channels} values (std > 0), got {mean} / {std}")
        self.device = torch.device(device)
        self.x = x.to(self.device)
        self.y = y.to(self.device, torch.int64)
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.augment = augment
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.channels_last = channels_last
        self.epoch = 0
        m = torch.tensor(mean, dtype=torch.float64).view(1, -1, 1, 1)
        s = torch.tensor(std, dtype=torch.float64).view(1, -1, 1, 1)
        self._scale = (1.0 / (255.0 * s)).to(self.device, torch.float32)
        self._shift = (-m / s).to(self.device, torch.float32)
        if len(self) == 0:
            raise DataError(
                f"no batches: {self.shard_size} samples per rank with batch_size {batch_size} "
                "and drop_last=True; lower batch_size or set drop_last=False"
            )

    @property
    def dataset_size(self) -> int:
        """Samples in the whole set (what a CRD memory bank is sized by)."""
        return len(self.x)

    @property
    def shard_size(self) -> int:
        """This rank's share of an epoch, DistributedSampler semantics (before batching)."""
        n, w = len(self.x), self.world_size
        return n // w if self.drop_last else math.ceil(n / w)

    @property
    def num_samples(self) -> int:
        """Samples this rank actually sees per epoch (the partial last batch dropped if asked)."""
        if self.drop_last:
            return len(self) * self.batch_size
        return self.shard_size

    def __len__(self) -> int:
        """Batches this rank yields per epoch."""
        if self.drop_last:
            return self.shard_size // self.batch_size
        return math.ceil(self.shard_size / self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        """Pick the epoch whose order and augmentation the next iteration reproduces."""
        if not 0 <= epoch < SEED_STRIDE:
            raise DataError(f"epoch must lie in 0..{SEED_STRIDE - 1}, got {epoch}")
        self.epoch = epoch

    def plan(self, epoch: int | None = None) -> EpochPlan:
        """This rank's shard order and crop/flip draws for an epoch, on the CPU, from the seeds."""
        # Batches take idx in order; with drop_last the last shard_size % batch_size go unused.
        epoch = self.epoch if epoch is None else epoch
        g = torch.Generator().manual_seed(self.seed * SEED_STRIDE + epoch)
        n, total = len(self.x), self.shard_size * self.world_size
        order = torch.randperm(n, generator=g) if self.shuffle else torch.arange(n)
        if total > n:  # pad by wrapping so every rank gets the same number of samples
            order = order.repeat(math.ceil(total / n))
        order = order[:total]
        if self.augment is not None:
            pad = self.augment.pad
            # Drawn for every global position so all ranks draw identically and then shard.
            dy = torch.randint(0, 2 * pad + 1, (total,), generator=g)
            dx = torch.randint(0, 2 * pad + 1, (total,), generator=g)
            flip = torch.rand(total, generator=g) < 0.5
            if not self.augment.flip:
                flip = torch.zeros(total, dtype=torch.bool)
        else:
            dy = dx = torch.zeros(total, dtype=torch.int64)
            flip = torch.zeros(total, dtype=torch.bool)
        take = slice(self.rank, total, self.world_size)
        return EpochPlan(idx=order[take], dy=dy[take], dx=dx[take], flip=flip[take])

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
        """Yield (x float normalised, y int64, idx int64) batches, all on the device."""
        plan = self.plan()
        idx = plan.idx.to(self.device)
        if self.augment is not None:
            dy, dx, flip = (t.to(self.device) for t in (plan.dy, plan.dx, plan.flip))
        bs = self.batch_size
        for b in range(len(self)):
            sl = slice(b * bs, (b + 1) * bs)
            i = idx[sl]
            xb = self.x[i]
            if self.augment is not None:
                # Crop/flip on uint8 equals doing it after /255: zero padding stays exactly 0.
                xb = augment_batch(xb, dy[sl], dx[sl], flip[sl], self.augment.pad)
            # (x / 255 - mean) / std as one fused multiply-add.
            xf = torch.addcmul(self._shift, xb.to(torch.float32), self._scale)
            if self.channels_last:
                xf = xf.contiguous(memory_format=torch.channels_last)
            yield xf, self.y[i], i
