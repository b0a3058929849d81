"""ImageNet-style folders through torchvision's ImageFolder, with the standard transforms.

Bad files are found early and named: when a folder is scanned every image's header is read
(cheap: no pixels are decoded), so a text file named ``x.jpg``, an empty file or an image of
absurd size stops the run before it starts (or, with ``skip_bad``, is left out and counted); an
image whose pixel data is cut short is found when it is decoded, and the error names it (also
from a DataLoader worker process).
"""

from __future__ import annotations

import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset
from torch.utils.data.distributed import DistributedSampler

from normkd.errors import DataError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
LAYOUT = "ROOT/train/<class>/*.JPEG and ROOT/val/<class>/*.JPEG"
_SHOWN = 3  # bad files named in an error line
_CHUNK = 512  # header checks per thread task


class ImageError(DataError):
    """An image that cannot be decoded, named; its message survives a DataLoader worker.

    A worker's exception is re-raised in the main process as ``type(text)``, where the text is
    "Caught ImageError in DataLoader worker process N. Original Traceback ...": its last line
    holds the message, which is all the user should see.
    """

    def __init__(self, message: str) -> None:
        """Keep ``message``, or recover it from a worker's wrapped traceback."""
        if message.startswith(f"Caught {type(self).__name__}") and "Traceback" in message:
            message = message.rstrip().splitlines()[-1].split(f"{type(self).__name__}: ", 1)[-1]
        super().__init__(message)


def _why(err: BaseException) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return text[:200]


def load_image(path: str) -> Any:
    """ImageFolder's loader (PIL, RGB) with a decode failure turned into a one-line ImageError."""
    from PIL import Image

    try:
        with open(path, "rb") as fh:
            return Image.open(fh).convert("RGB")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise ImageError(
            f"cannot decode image {path} ({_why(err)}): replace or remove the file"
        ) from None


def image_problem(path: str) -> str | None:
    """Why the file at ``path`` is no usable image, from its header alone; None if it looks fine.

    Reading the header (what ``Image.open`` does before any pixel is decoded) costs tens of
    microseconds, against milliseconds to decode: cheap enough for every file of a big folder.
    """
    from PIL import Image

    try:
        if os.path.getsize(path) == 0:
            return "empty file"
        with Image.open(path) as img:
            w, h = img.size
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        return _why(err)
    limit = Image.MAX_IMAGE_PIXELS
    if w < 1 or h < 1:
        return f"size {w}x{h}"
    if limit and w * h > limit:
        return f"{w}x{h} pixels, over PIL's limit of {limit:,} (a decompression bomb?)"
    return None


def find_bad_images(paths: list[str]) -> list[tuple[str, str]]:
    """(path, reason) for every file of ``paths`` whose header is no usable image, in order.

    Threads overlap the file reads (on network storage the latency dominates); PIL's warning for
    large images is silenced here because :func:`image_problem` reports them itself.
    """
    from PIL import Image

    def check(chunk: list[str]) -> list[tuple[str, str]]:
        return [(p, why) for p in chunk if (why := image_problem(p)) is not None]

    chunks = [paths[i : i + _CHUNK] for i in range(0, len(paths), _CHUNK)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        if len(chunks) <= 1:
            return [bad for chunk in chunks for bad in check(chunk)]
        with ThreadPoolExecutor(min(16, 2 * (os.cpu_count() or 1))) as pool:
            return [bad for found in pool.map(check, chunks) for bad in found]


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


def _real(path: str) -> tuple[int, int] | str:
    """What ``path`` is on disk, links followed: (device, inode); the path if it cannot be read
    (a dangling link, left for the header scan to name)."""
    try:
        st = os.stat(path)
    except OSError:
        return path
    return st.st_dev, st.st_ino


def walk_once(top: str, seen: set[Any]) -> list[tuple[str, list[str]]]:
    """(folder, sorted file names) under ``top``, in sorted order, following links but entering
    each real folder once and listing each real file once (``seen`` is shared over the classes:
    the first class that reaches a file in sorted order holds it), so a link back up the tree
    (a cycle) or two links to one folder never repeat images."""
    found = []
    for root, dirs, files in os.walk(top, followlinks=True):
        dirs.sort()
        seen.add(_real(root))
        dirs[:] = [d for d in dirs if _real(os.path.join(root, d)) not in seen]
        mine = []
        for name in sorted(files):
            key = ("file", _real(os.path.join(root, name)))
            if key not in seen:
                seen.add(key)
                mine.append(name)
        found.append((root, mine))
    return sorted(found)


def _links_once_dataset(
    directory: str,
    class_to_idx: dict[str, int],
    extensions: tuple[str, ...] | None = None,
    is_valid_file: Any = None,
    allow_empty: bool = False,
) -> list[tuple[str, int]]:
    """torchvision's make_dataset over :func:`walk_once`: its order, its error for empty
    classes, but each real image once (torchvision's own walk loops through a cycle of links
    until paths grow too long: 24 images became 10,824 samples)."""
    from torchvision.datasets.folder import has_file_allowed_extension

    def valid(p: str) -> bool:
        return (
            is_valid_file(p)
            if is_valid_file is not None
            else has_file_allowed_extension(p, extensions or ())
        )

    # The root and every class folder count as entered: a link up to them is not followed.
    top = os.path.expanduser(directory)
    seen = {_real(top), *(_real(os.path.join(top, c)) for c in class_to_idx)}
    samples, have = [], set()
    for cls in sorted(class_to_idx):
        target = os.path.join(top, cls)
        if not os.path.isdir(target):
            continue
        for root, names in walk_once(target, seen):
            for name in names:
                if valid(os.path.join(root, name)):
                    samples.append((os.path.join(root, name), class_to_idx[cls]))
                    have.add(cls)
    empty = set(class_to_idx) - have
    if empty and not allow_empty:
        msg = f"Found no valid file for the classes {', '.join(sorted(empty))}. "
        if extensions is not None:
            msg += f"Supported extensions are: {', '.join(extensions)}"
        raise FileNotFoundError(msg)
    return samples


def _links_once_folder() -> Any:
    """ImageFolder whose scan is :func:`_links_once_dataset`, made on first use (torchvision is
    imported lazily) and kept as this module's ``LinksOnce``, so worker processes unpickle it."""
    if "LinksOnce" not in globals():
        from torchvision.datasets import ImageFolder

        cls = type("LinksOnce", (ImageFolder,), {"make_dataset": staticmethod(_links_once_dataset)})
        cls.__module__ = __name__
        globals()["LinksOnce"] = cls
    return globals()["LinksOnce"]


def __getattr__(name: str) -> Any:
    """``LinksOnce`` on demand (a spawned worker unpickling a dataset looks it up here)."""
    if name == "LinksOnce":
        return _links_once_folder()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _image_folder(
    path: Path,
    transform: Any,
    what: str = "ImageNet folder",
    layout: str = LAYOUT,
    skip_bad: bool = False,
) -> Any:
    """An ImageFolder for one split whose files all have a readable image header, or a DataError
    that names the path and expected layout (or the bad files).

    With ``skip_bad`` the bad files are left out instead, listed in its ``skipped`` attribute
    as (path, reason); otherwise ``skipped`` is empty.
    """

    if not path.is_dir():
        raise DataError(f"{what} {path} does not exist: expected the layout {layout}")
    try:
        ds = _links_once_folder()(str(path), transform=transform, loader=load_image)
    except FileNotFoundError as e:  # no class folders, or class folders with no images
        raise DataError(
            f"{what} {path} has no images ({e}): expected the layout {layout}"
        ) from None
    bad = find_bad_images([p for p, _ in ds.samples])
    if bad and not skip_bad:
        shown = "; ".join(f"{p} ({why})" for p, why in bad[:_SHOWN])
        more = f" and {len(bad) - _SHOWN:,} more" if len(bad) > _SHOWN else ""
        raise DataError(
            f"{what} {path}: {len(bad):,} file(s) are no readable image: {shown}{more}; remove "
            "them, or set data.skip_bad: true to leave them out"
        )
    ds.skipped = bad
    if bad:
        drop = {p for p, _ in bad}
        ds.samples = [s for s in ds.samples if s[0] not in drop]
        ds.imgs, ds.targets = ds.samples, [y for _, y in ds.samples]
        empty = sorted(set(ds.classes) - {ds.classes[y] for y in ds.targets})
        if empty:
            raise DataError(
                f"{what} {path}: class folder(s) {', '.join(empty[:5])} have no readable image "
                f"left after data.skip_bad left out {len(bad):,} file(s)"
            )
    return ds


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
    plain_train: bool = False,
) -> tuple[DataLoader, DataLoader]:
    """Train (shuffled, seeded, full batches) and val loaders yielding (x, y, idx). With
    ``plain_train`` the train loader reads the training set as the val one is read: in order,
    every image, ``eval_batch_size`` at a time, whole in every process (its augmentation is the
    dataset's transform: the caller gives it the val one).

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
    if plain_train:
        train_loader = DataLoader(train, eval_batch_size or batch_size, shuffle=False, **common)
    else:
        train_sampler = DistributedSampler(train, shuffle=True, seed=seed, drop_last=True, **one)
        train_loader = DataLoader(
            train, batch_size, sampler=train_sampler, drop_last=True, **common
        )
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
    skip_bad: bool = False,
    plain_train: bool = False,
) -> tuple[DataLoader, DataLoader, int]:
    """Train and val loaders yielding (x, y, idx) plus the class count, from ROOT/train, ROOT/val
    (with ``plain_train`` the train images come through the val transforms, in order).

    Files whose header is no readable image are refused, or with ``skip_bad`` left out (each
    dataset's ``skipped`` lists them; :func:`skipped_info` sums them up).
    """
    if batch_size < 1 or workers < 0 or image_size < 1:
        raise DataError(
            f"need batch_size >= 1, workers >= 0, image_size >= 1; got {batch_size}, {workers}, "
            f"{image_size}"
        )
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(f"ImageNet root {root} does not exist: expected the layout {LAYOUT}")
    train_tf, val_tf = standard_transforms(image_size, augment=not plain_train)
    train_set = _image_folder(root / "train", train_tf, skip_bad=skip_bad)
    val_set = _image_folder(root / "val", val_tf, skip_bad=skip_bad)
    check_same_classes(train_set.classes, val_set.classes, f"ImageNet root {root}")
    train_loader, val_loader = indexed_loaders(
        train_set,
        val_set,
        batch_size,
        workers,
        eval_batch_size=eval_batch_size,
        distributed=distributed,
        seed=seed,
        plain_train=plain_train,
    )
    return train_loader, val_loader, len(train_set.classes)


def skipped_info(*datasets: Any) -> dict[str, Any]:
    """What ``skip_bad`` left out of ``datasets`` (ImageFolders), for data.json: the count and
    the first 100 files with their reasons."""
    bad = [b for ds in datasets for b in getattr(ds, "skipped", [])]
    return {"count": len(bad), "files": [f"{p}: {why}" for p, why in bad[:100]]}
