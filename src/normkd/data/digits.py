"""The embedded default set: scikit-learn's 1,797 real 8x8 digits, so demos need no download."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from normkd.data.common import Split, channel_stats
from normkd.errors import DataError
from normkd.extras import require

NUM_DIGITS = 1797


def _stratified_train_indices(y: Tensor, n_train: int, g: torch.Generator) -> Tensor:
    """Pick n_train indices with each class in proportion, so a small split stays balanced."""
    counts = torch.bincount(y, minlength=10)
    quota = counts.double() * n_train / len(y)
    take = quota.floor().long()
    # Largest remainders get the leftover places (ties: lower class first), so sum(take) == n_train.
    order = torch.argsort(-(quota - take), stable=True)
    take[order[: n_train - int(take.sum())]] += 1
    picked = []
    for c in range(len(counts)):
        members = torch.nonzero(y == c).flatten()
        picked.append(members[torch.randperm(len(members), generator=g)[: int(take[c])]])
    return torch.cat(picked).sort().values


def load_digits_split(seed: int = 0, n_train: int = 1000) -> Split:
    """Digits as uint8 (N, 3, 8, 8) with a seeded stratified split the engine can record."""
    load_digits = require("sklearn.datasets").load_digits

    if not 1 <= n_train < NUM_DIGITS:
        raise DataError(f"digits n_train must be between 1 and {NUM_DIGITS - 1}, got {n_train}")
    bunch = load_digits()
    # 0..16 -> 0..255, rounded; gray replicated to 3 channels so every zoo CNN takes it.
    gray = np.rint(bunch.images.astype(np.float64) * (255.0 / 16.0)).astype(np.uint8)
    x = torch.from_numpy(gray).unsqueeze(1).expand(-1, 3, -1, -1).contiguous()
    y = torch.from_numpy(bunch.target.astype(np.int64))

    g = torch.Generator().manual_seed(seed)
    train_idx = _stratified_train_indices(y, n_train, g)
    is_train = torch.zeros(len(y), dtype=torch.bool)
    is_train[train_idx] = True
    test_idx = torch.nonzero(~is_train).flatten()

    x_train = x[train_idx]
    mean, std = channel_stats(x_train)
    return Split(
        x_train=x_train,
        y_train=y[train_idx],
        x_test=x[test_idx],
        y_test=y[test_idx],
        num_classes=10,
        mean=mean,
        std=std,
        info={
            "source": "sklearn.datasets.load_digits",
            "root": None,
            "seed": seed,
            "split": "stratified",
            "train_indices": train_idx.tolist(),
            "test_indices": test_idx.tolist(),
            "n_train": len(train_idx),
            "n_test": len(test_idx),
        },
    )
