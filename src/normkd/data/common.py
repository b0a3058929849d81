"""The in-memory dataset every CIFAR-scale loader returns, plus a random stand-in for dry runs."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from normkd.errors import DataError


@dataclass
class Split:
    """Train/test images as uint8 (N, C, H, W) tensors so they can live on the device whole."""

    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        """Catch a malformed split where it is built, not deep inside a training step."""
        for name, x, y in (
            ("train", self.x_train, self.y_train),
            ("test", self.x_test, self.y_test),
        ):
            if x.dtype != torch.uint8 or x.ndim != 4:
                raise DataError(
                    f"{name} images must be uint8 (N, C, H, W), got {x.dtype} {tuple(x.shape)}"
                )
            if y.dtype != torch.int64 or y.ndim != 1 or len(y) != len(x):
                raise DataError(
                    f"{name} labels must be int64 (N,) matching {len(x)} images, "
                    f"got {y.dtype} {tuple(y.shape)}"
                )
            if len(y) and (int(y.min()) < 0 or int(y.max()) >= self.num_classes):
                raise DataError(f"{name} labels must lie in 0..{self.num_classes - 1}")
        channels = self.x_train.shape[1]
        if len(self.mean) != channels or len(self.std) != channels:
            raise DataError(f"mean/std need {channels} values, got {self.mean} / {self.std}")

    def subset(self, fraction: float, seed: int) -> Split:
        """A seeded random ``fraction`` of train and of test (at least one image each), in
        their original order; mean/std stay those of the whole set (smoke runs)."""
        if fraction >= 1.0:
            return self
        g = torch.Generator().manual_seed(seed)

        def pick(n: int) -> Tensor:
            keep = max(1, round(n * fraction))
            return torch.randperm(n, generator=g)[:keep].sort().values

        tr, te = pick(len(self.x_train)), pick(len(self.x_test))
        info = self.info | {"fraction": fraction, "n_train": len(tr), "n_test": len(te)}
        return Split(
            self.x_train[tr], self.y_train[tr], self.x_test[te], self.y_test[te],
            self.num_classes, self.mean, self.std, info,
        )  # fmt: skip

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one image, what a model constructor needs to know."""
        return tuple(self.x_train.shape[1:])  # type: ignore[return-value]


def channel_stats(x: Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean/std of uint8 images in 0..1 units, for normalising a set we computed."""
    xf = x.to(torch.float64).div_(255.0).transpose(0, 1).reshape(x.shape[1], -1)
    mean = tuple(round(float(m), 4) for m in xf.mean(dim=1))
    std = tuple(round(max(float(s), 1e-3), 4) for s in xf.std(dim=1))
    return mean, std


def fake_split(num_classes: int, image_size: int, n_train: int, n_test: int, seed: int) -> Split:
    """Random uint8 images of the right shape, so ``--dry-run`` works without the real folder."""
    if num_classes < 1 or image_size < 1 or n_train < 1 or n_test < 0:
        raise DataError(
            "fake_split needs num_classes, image_size, n_train >= 1 and n_test >= 0, got "
            f"{num_classes}, {image_size}, {n_train}, {n_test}"
        )
    g = torch.Generator().manual_seed(seed)
    n = n_train + n_test
    x = torch.randint(0, 256, (n, 3, image_size, image_size), generator=g, dtype=torch.uint8)
    y = torch.randint(0, num_classes, (n,), generator=g, dtype=torch.int64)
    mean, std = channel_stats(x[:n_train])
    return Split(
        x_train=x[:n_train].clone(),
        y_train=y[:n_train].clone(),
        x_test=x[n_train:].clone(),
        y_test=y[n_train:].clone(),
        num_classes=num_classes,
        mean=mean,
        std=std,
        info={"source": "fake", "seed": seed, "n_train": n_train, "n_test": n_test},
    )
