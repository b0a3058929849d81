"""ImageNet-style folders through torchvision's ImageFolder, with the standard transforms."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset
from torch.utils.data.distributed import DistributedSampler

from normkd.errors import DataError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
LAYOUT = "ROOT/train/<class>/*.JPEG and ROOT/val/<class>/*.JPEG"


class IndexedDataset(Dataset):
    """Wraps a dataset so items are (x, y, idx): CRD's memory bank needs the sample index."""

    def __init__(self, base: Any) -> None:
        """Keep the wrapped dataset; classes and samples stay reachable through ``base``."""
        self.base = base

    def __len__(self) -> int:
        """Same length as the wrapped dataset."""
        return len(self.base)

    def __getitem__(self, index: int) -> tuple[Any, int, int]:
        """The wrapped item plus its own index."""
        x, y = self.base[index]
        return x, y, index


def _image_folder(
    path: Path, transform: Any, what: str = "ImageNet folder", layout: str = LAYOUT
) -> Any:
    """An ImageFolder for one split, or a DataError that names the path and expected layout."""
    from torchvision.datasets import ImageFolder

    if not path.is_dir():
        raise DataError(f"{what} {path} does not exist: expected the layout {layout}")
    try:
        return ImageFolder(str(path), transform=transform)
    except FileNotFoundError as e:  # no class folders, or class folders with no images
        raise DataError(
            f"{what} {path} has no images ({e}): expected the layout {layout}"
        ) from None


def standard_transforms(image_size: int, augment: bool = True) -> tuple[Any, Any]:
    """ImageNet-style (train, val) transforms: RandomResizedCrop + flip; Resize + CenterCrop."""
    from torchvision import transforms as T

    normalize = T.Normalize(IMAGENET_MEAN, IMAGENET_STD)
    # 256/224 resize ratio, the standard evaluation protocol, kept for other image sizes.
    val_tf = T.Compose(
        [
            T.Resize(round(image_size * 256 / 224)),
            T.CenterCrop(image_size),
            T.ToTensor(),
            normalize,
        ]
    )
    if not augment:
        return val_tf, val_tf
    train_tf = T.Compose(
        [T.RandomResizedCrop(image_size), T.RandomHorizontalFlip(), T.ToTensor(), normalize]
    )
    return train_tf, val_tf


def check_same_classes(train_classes: list[str], val_classes: list[str], where: str) -> None:
    """Train and val must have the same class folders, or labels would mean different things."""
    if train_classes != val_classes:
        only_train = sorted(set(train_classes) - set(val_classes))
        only_val = sorted(set(val_classes) - set(train_classes))
        raise DataError(
            f"train and val class folders differ under {where}: only in train "
            f"{only_train[:5]}{'...' if len(only_train) > 5 else ''}, only in val "
            f"{only_val[:5]}{'...' if len(only_val) > 5 else ''}"
        )


def indexed_loaders(
    train_set: Any,
    val_set: Any,
    batch_size: int,
    workers: int,
    *,
    eval_batch_size: int | None = None,
    distributed: bool = False,
    seed: int = 0,
) -> tuple[DataLoader, DataLoader]:
    """Train (shuffled, seeded, full batches) and val loaders yielding (x, y, idx).

    The train order is a function of (seed, epoch) alone: a DistributedSampler reshuffles with
    ``seed + epoch`` when the engine calls ``train_loader.sampler.set_epoch(epoch)``, also in one
    process (one replica, no process group needed), so a resumed run draws the same order as one
    that never stopped (a generator seeded once per process would replay epoch 0's order), and
    one process sees the same global batches as several. The train loader's workers are not
    persistent: each epoch starts new ones seeded from torch's global RNG, which the engine
    re-seeds per epoch, so the augmentation (RandomResizedCrop, flip) of an epoch does not depend
    on the epochs before it either (persistent workers would carry their RNG state over).
    """
    train, val = IndexedDataset(train_set), IndexedDataset(val_set)
    common: dict[str, Any] = {"num_workers": workers, "pin_memory": torch.cuda.is_available()}
    one = {} if distributed else {"num_replicas": 1, "rank": 0}
    train_sampler = DistributedSampler(train, shuffle=True, seed=seed, drop_last=True, **one)
    train_loader = DataLoader(train, batch_size, sampler=train_sampler, drop_last=True, **common)
    common["persistent_workers"] = workers > 0  # evaluation draws no random numbers
    if distributed:
        val_sampler = DistributedSampler(val, shuffle=False, seed=seed)
        val_loader = DataLoader(val, eval_batch_size or batch_size, sampler=val_sampler, **common)
    else:
        val_loader = DataLoader(val, eval_batch_size or batch_size, shuffle=False, **common)
    if len(train_loader) == 0:
        raise DataError(
            f"the training split has {len(train)} images, fewer than one batch "
            f"({batch_size} per process): lower data.batch_size"
        )
    return train_loader, val_loader


def imagenet_loaders(
    root: str | Path,
    batch_size: int,
    workers: int,
    *,
    eval_batch_size: int | None = None,
    distributed: bool = False,
    seed: int = 0,
    image_size: int = 224,
) -> tuple[DataLoader, DataLoader, int]:
    """Train and val loaders yielding (x, y, idx) plus the class count, from ROOT/train, ROOT/val."""
    if batch_size < 1 or workers < 0 or image_size < 1:
        raise DataError(
            f"need batch_size >= 1, workers >= 0, image_size >= 1; got {batch_size}, {workers}, "
            f"{image_size}"
        )
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(f"ImageNet root {root} does not exist: expected the layout {LAYOUT}")
    train_tf, val_tf = standard_transforms(image_size)
    train_set = _image_folder(root / "train", train_tf)
    val_set = _image_folder(root / "val", val_tf)
    check_same_classes(train_set.classes, val_set.classes, f"ImageNet root {root}")
    train_loader, val_loader = indexed_loaders(
        train_set,
        val_set,
        batch_size,
        workers,
        eval_batch_size=eval_batch_size,
        distributed=distributed,
        seed=seed,
    )
    return train_loader, val_loader, len(train_set.classes)
