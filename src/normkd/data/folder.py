"""Your own images: one sub-folder per class, split by folder or by a seeded fraction.

``ROOT/train/<class>/*`` and ``ROOT/val/<class>/*`` are used as they are; with no ``train``/``val``
folders, ``ROOT/<class>/*`` is split per class (stratified) by ``val_fraction`` with a seeded
permutation. Images go through the standard ImageNet transforms at ``image_size`` and loaders
yielding ``(x, y, idx)`` (see :mod:`normkd.data.imagenet`, which this reuses, its checks of
bad files included: ``skip_bad`` leaves out files whose header is no readable image).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from normkd.data.imagenet import (
    _image_folder,
    check_same_classes,
    indexed_loaders,
    skipped_info,
    standard_transforms,
)
from normkd.errors import DataError

LAYOUT = (
    "ROOT/<class>/<image files> (split by data.val_fraction), or "
    "ROOT/train/<class>/<image files> and ROOT/val/<class>/<image files>"
)


class ClassSubset(Dataset):
    """Some items of an ImageFolder with their own transform; keeps ``classes`` and ``targets``."""

    def __init__(self, base: Any, indices: list[int], transform: Any) -> None:
        """``base`` yields (PIL image, label); ``indices`` pick the items of this split."""
        self.base = base
        self.indices = list(indices)
        self.transform = transform
        self.classes = list(base.classes)
        self.targets = [int(base.targets[i]) for i in self.indices]

    def __len__(self) -> int:
        """Items in this split."""
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[Any, int]:
        """The transformed image and its label."""
        img, y = self.base[self.indices[i]]
        return self.transform(img), y


def stratified_split(
    targets: list[int], num_classes: int, val_fraction: float, seed: int
) -> tuple[list[int], list[int]]:
    """(train, val) indices: each class split by ``val_fraction`` (>= 1 val image if it has 2+)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.as_tensor(targets)
    train: list[int] = []
    val: list[int] = []
    for c in range(num_classes):
        idx = (y == c).nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=g)].tolist()
        k = min(max(round(len(idx) * val_fraction), 1), len(idx) - 1) if len(idx) >= 2 else 0
        val += idx[:k]
        train += idx[k:]
    return sorted(train), sorted(val)


def _class_dirs(path: Path) -> list[str]:
    return sorted(d.name for d in path.iterdir() if d.is_dir() and not d.name.startswith("."))


def folder_datasets(
    root: str | Path,
    image_size: int = 224,
    val_fraction: float = 0.2,
    split_seed: int = 0,
    augment: bool = True,
    skip_bad: bool = False,
) -> tuple[Any, Any, list[str], dict[str, Any]]:
    """(train set, val set, class names, info) of an image folder; items are (x, y).

    With ``skip_bad`` the files left out are counted in ``info["skipped"]``.
    """
    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"val_fraction must lie strictly between 0 and 1, got {val_fraction}")
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(f"image folder {root} does not exist: expected the layout {LAYOUT}")
    train_tf, val_tf = standard_transforms(image_size, augment=augment)
    has_train, has_val = (root / "train").is_dir(), (root / "val").is_dir()
    if has_train != has_val:
        have, lack = ("train", "val") if has_train else ("val", "train")
        raise DataError(
            f"image folder {root} has {have}/ but no {lack}/: add {root / lack}/<class>/ folders, "
            "or put the class folders directly under the root to split them by data.val_fraction"
        )
    if has_train:
        for part in ("train", "val"):
            if not _class_dirs(root / part):
                raise DataError(
                    f"image folder {root / part} has no class folders: expected the layout {LAYOUT}"
                )
        check_same_classes(_class_dirs(root / "train"), _class_dirs(root / "val"), str(root))
        train = _image_folder(root / "train", train_tf, "image folder", LAYOUT, skip_bad)
        val = _image_folder(root / "val", val_tf, "image folder", LAYOUT, skip_bad)
        check_same_classes(train.classes, val.classes, str(root))
        split = "folders"
        scanned: tuple[Any, ...] = (train, val)
    else:
        if not _class_dirs(root):
            raise DataError(
                f"image folder {root} has no class folders (one sub-folder of images per class): "
                f"expected the layout {LAYOUT}"
            )
        base = _image_folder(root, None, "image folder", LAYOUT, skip_bad)
        scanned = (base,)
        train_idx, val_idx = stratified_split(
            base.targets, len(base.classes), val_fraction, split_seed
        )
        if not val_idx:
            raise DataError(
                f"image folder {root}: too few images to hold out a validation split "
                "(each class needs at least 2)"
            )
        train = ClassSubset(base, train_idx, train_tf)
        val = ClassSubset(base, val_idx, val_tf)
        split = f"val_fraction {val_fraction}, split_seed {split_seed}"
    classes = list(train.classes)
    if len(classes) < 2:
        raise DataError(f"image folder {root} has {len(classes)} class folder; need at least 2")
    info = {
        "source": "folder",
        "root": str(root),
        "split": split,
        "classes": classes,
        "n_train": len(train),
        "n_val": len(val),
        "image_size": image_size,
    }
    if skip_bad:
        info["skipped"] = skipped_info(*scanned)
    return train, val, classes, info


def folder_loaders(
    root: str | Path,
    batch_size: int,
    workers: int,
    *,
    eval_batch_size: int | None = None,
    image_size: int = 224,
    val_fraction: float = 0.2,
    split_seed: int = 0,
    augment: bool = True,
    distributed: bool = False,
    seed: int = 0,
    skip_bad: bool = False,
    plain_train: bool = False,
) -> tuple[DataLoader, DataLoader, int, dict[str, Any]]:
    """Train and val loaders yielding (x, y, idx), the class count and a description (with
    ``plain_train`` the train images come un-augmented and in order, as :func:`indexed_loaders`
    says)."""
    if batch_size < 1 or workers < 0 or image_size < 1:
        raise DataError(
            f"need batch_size >= 1, workers >= 0, image_size >= 1; got {batch_size}, {workers}, "
            f"{image_size}"
        )
    train, val, classes, info = folder_datasets(
        root, image_size, val_fraction, split_seed, augment and not plain_train, skip_bad
    )
    train_loader, val_loader = indexed_loaders(
        train,
        val,
        batch_size,
        workers,
        eval_batch_size=eval_batch_size,
        distributed=distributed,
        seed=seed,
        plain_train=plain_train,
    )
    return train_loader, val_loader, len(classes), info
