"""A recipe's ``data`` section -> train/test loaders yielding ``(x, y, idx)`` and what they hold.

Small sets (digits, CIFAR-100) live on the device as uint8 and are augmented per batch
(:class:`DeviceLoader`); image folders and ImageNet stream through torch DataLoaders. A dry run
reads the real data as a run does, so it fails where the run would; with ``data.fake``
(``--dry-run --fake-data``) random images of the right shape stand in (``Data.fake``), so
recipes can be checked where their data is not. ``plain_train`` reads the training split as the
test split is read (a pass that measures a model on it rather than trains: WKD-L's class costs).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from normkd.config import DataCfg
from normkd.data.common import Split, fake_split
from normkd.data.device import Augment, DeviceLoader
from normkd.errors import ConfigError
from normkd.log import logger

# What each kind's data.root must point at (said when it is missing).
ROOT_HINTS = {
    "cifar100": "the folder holding cifar-100-python/ or cifar-100-binary/",
    "imagenet": "the ImageNet folder holding train/ and val/",
}


@dataclass
class Data:
    """Loaders yielding ``(x, y, idx)`` plus what the models and terms need to know of them."""

    train: Any
    test: Any
    num_classes: int
    in_shape: tuple[int, int, int]
    info: dict[str, Any] = field(default_factory=dict)
    fake: bool = False
    train_size: int = 0  # images in the whole training set (a CRD memory bank's rows)
    train_labels: torch.Tensor | None = None  # their labels in index order, when known
    # How a deployed model's inputs are made, for its metadata (None: the caller's own loaders).
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    classes: list[str] | None = None


@dataclass(frozen=True)
class Place:
    """Where the loaders run: device, this process's rank, layout."""

    device: torch.device
    seed: int = 0
    rank: int = 0
    world_size: int = 1
    channels_last: bool = False


def build_data(
    cfg: DataCfg, place: Place, dry_run: bool = False, plain_train: bool = False
) -> Data:
    """The loaders of ``cfg``; random images instead when ``cfg.fake`` (dry runs only).

    With ``plain_train`` the train loader yields every training image un-augmented, in dataset
    order, ``eval_batch_size`` at a time, to each process whole (the test loader's way)."""
    if cfg.batch_size % place.world_size:
        raise ConfigError(
            f"data.batch_size is the global batch ({cfg.batch_size}); it must be divisible by the "
            f"number of processes ({place.world_size})"
        )
    if cfg.kind == "external":
        raise ConfigError(
            "data.kind 'external': this run's loaders were passed from Python (normkd.distill), "
            "so there is no data for the CLI to build; evaluate it from Python, or write a recipe "
            "with data.kind folder/cifar100/imagenet"
        )
    if cfg.fake:
        if not dry_run:
            raise ConfigError(
                "data.fake: random images can check a recipe (normkd train|distill RECIPE "
                "--dry-run --fake-data) but not train a model; unset it to use the real data"
            )
        if cfg.kind != "digits":  # the digits ship with scikit-learn: nothing to stand in for
            return _fake(cfg, place, plain_train)
    if cfg.kind != "digits" and cfg.root is None:
        raise ConfigError(f"data.root: set it to {_root_hint(cfg.kind)}")
    if cfg.kind in ("imagenet", "folder"):
        return _streamed(cfg, place, plain_train)
    return _on_device(cfg, place, _split(cfg), _augment(cfg), plain_train)


def _root_hint(kind: str) -> str:
    if kind == "folder":
        from normkd.data.folder import LAYOUT

        return f"your image folder ({LAYOUT})"
    return ROOT_HINTS[kind]


def _split(cfg: DataCfg) -> Split:
    from normkd.data import load_cifar100, load_digits_split

    if cfg.kind == "cifar100":
        assert cfg.root is not None
        split = load_cifar100(cfg.root)
    else:
        split = load_digits_split(seed=cfg.split_seed, n_train=cfg.n_train)
    return split.subset(cfg.fraction, cfg.split_seed)


def _augment(cfg: DataCfg) -> Augment | None:
    """CIFAR's pad-4 crop + flip; digits get a 1-pixel shift and no flip (a flipped 2 is no 2)."""
    if not cfg.augment:
        return None
    return Augment(pad=4, flip=True) if cfg.kind == "cifar100" else Augment(pad=1, flip=False)


def _fake(cfg: DataCfg, place: Place, plain_train: bool = False) -> Data:
    """Random images of the kind's shape and class count (dry runs with --fake-data only)."""
    classes, side = {"imagenet": (1000, 224), "folder": (10, cfg.image_size)}.get(
        cfg.kind, (100, 32)
    )
    split = fake_split(classes, side, cfg.batch_size * 2, cfg.batch_size, place.seed)
    augment = _augment(cfg) if cfg.kind == "cifar100" else None
    data = _on_device(cfg, place, split, augment, plain_train)
    data.fake = True
    return data


def _on_device(
    cfg: DataCfg, place: Place, split: Split, augment: Augment | None, plain_train: bool = False
) -> Data:
    """Device-resident loaders over a uint8 split; the train loader shards over ranks (a plain
    one does not: it reads the whole split in order, as the test loader does)."""
    common = {
        "device": place.device,
        "mean": split.mean,
        "std": split.std,
        "drop_last": False,
        "seed": place.seed,
        "channels_last": place.channels_last,
    }

    def in_order(x: torch.Tensor, y: torch.Tensor) -> DeviceLoader:
        return DeviceLoader(x, y, cfg.eval_batch_size, shuffle=False, augment=None, **common)

    if plain_train:
        train = in_order(split.x_train, split.y_train)
    else:
        train = DeviceLoader(
            split.x_train,
            split.y_train,
            cfg.batch_size // place.world_size,
            shuffle=True,
            augment=augment,
            rank=place.rank,
            world_size=place.world_size,
            **common,
        )
    test = in_order(split.x_test, split.y_test)
    in_shape = tuple(int(s) for s in split.x_train.shape[1:])
    return Data(
        train,
        test,
        split.num_classes,
        in_shape,  # type: ignore[arg-type]
        dict(split.info),
        train_size=len(split.x_train),
        train_labels=split.y_train.cpu(),
        mean=tuple(split.mean),
        std=tuple(split.std),
        classes=split.info.get("classes"),
    )


def _streamed(cfg: DataCfg, place: Place, plain_train: bool = False) -> Data:
    """DataLoaders over ImageFolder-style trees (ImageNet, or your own folder)."""
    from normkd.data import folder_loaders, imagenet_loaders
    from normkd.data.imagenet import IMAGENET_MEAN, IMAGENET_STD, skipped_info

    assert cfg.root is not None
    common = {
        "eval_batch_size": cfg.eval_batch_size,
        "distributed": place.world_size > 1,
        "seed": place.seed,
        "plain_train": plain_train,
    }
    batch = cfg.batch_size // place.world_size
    if cfg.kind == "imagenet":
        train, test, num_classes = imagenet_loaders(
            cfg.root, batch, cfg.workers, skip_bad=cfg.skip_bad, **common
        )
        info: dict[str, Any] = {"source": "imagenet"}
        if cfg.skip_bad:
            info["skipped"] = skipped_info(train.dataset.base, test.dataset.base)
        size = 224
    else:
        train, test, num_classes, info = folder_loaders(
            cfg.root,
            batch,
            cfg.workers,
            image_size=cfg.image_size,
            val_fraction=cfg.val_fraction,
            split_seed=cfg.split_seed,
            augment=cfg.augment,
            skip_bad=cfg.skip_bad,
            **common,
        )
        size = cfg.image_size
    skipped = info.get("skipped", {"count": 0, "files": []})
    if skipped["count"] and place.rank == 0:
        logger.info(
            f"data: left out {skipped['count']:,} file(s) that are no readable image "
            f"(data.skip_bad), e.g. {skipped['files'][0]}; data.json lists them"
        )
    dataset = train.dataset  # IndexedDataset over an ImageFolder (or a split of one)
    targets = getattr(dataset.base, "targets", None)
    labels = torch.as_tensor(targets) if targets is not None else None
    classes = info.get("classes") or getattr(dataset.base, "classes", None)
    return Data(
        train, test, num_classes, (3, size, size), info, False, len(dataset), labels,
        IMAGENET_MEAN, IMAGENET_STD, list(classes) if classes else None,
    )  # fmt: skip
