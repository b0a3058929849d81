"""ImageFolder loaders: (x, y, idx) batches from a tiny folder, and clear errors for bad layouts."""

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
from PIL import Image
from torch.utils.data.distributed import DistributedSampler

from normkd.data import imagenet_loaders
from normkd.errors import DataError

CLASSES = ("n01440764", "n01443537")


def _write(root: Path, split: str, per_class: int, classes=CLASSES) -> None:
    rng = np.random.default_rng(len(split) + per_class)
    for c in classes:
        folder = root / split / c
        folder.mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 256, size=(30, 40, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / f"img_{i}.png")


@pytest.fixture
def root(tmp_path: Path) -> Path:
    _write(tmp_path, "train", 3)
    _write(tmp_path, "val", 2)
    return tmp_path


def test_batches_have_shape_labels_and_indices(root: Path) -> None:
    train, val, num_classes = imagenet_loaders(root, 2, 0, eval_batch_size=3, image_size=32)
    assert num_classes == 2
    batches = list(train)
    assert len(batches) == len(train) == 3
    seen = []
    for x, y, idx in batches:
        assert x.shape == (2, 3, 32, 32) and x.dtype == torch.float32
        assert y.dtype == torch.int64 and idx.dtype == torch.int64
        # the index points at the very file whose label came back
        assert [train.dataset.base.samples[i][1] for i in idx.tolist()] == y.tolist()
        seen += idx.tolist()
    assert sorted(seen) == list(range(6))
    val_batches = list(val)
    assert [len(b[2]) for b in val_batches] == [3, 1]
    assert torch.cat([b[2] for b in val_batches]).tolist() == [0, 1, 2, 3]  # unshuffled
    assert torch.cat([b[1] for b in val_batches]).tolist() == [0, 0, 1, 1]
    assert val_batches[0][0].shape == (3, 3, 32, 32)


def test_val_transform_is_deterministic_and_normalised(root: Path) -> None:
    _, val, _ = imagenet_loaders(root, 2, 0, image_size=32)
    a, b = next(iter(val))[0], next(iter(val))[0]
    assert torch.equal(a, b)
    assert float(a.min()) < -1.0 and float(a.max()) > 1.5  # ImageNet mean/std applied to 0..1


def test_a_plain_train_pass_is_every_training_image_in_order_through_the_val_transform(
    root: Path,
) -> None:
    from normkd.data.imagenet import load_image, standard_transforms

    train, _, _ = imagenet_loaders(root, 2, 0, eval_batch_size=4, image_size=32, plain_train=True)
    batches = list(train)
    assert [len(b[2]) for b in batches] == [4, 2]  # every image, eval_batch_size at a time
    assert torch.cat([b[2] for b in batches]).tolist() == list(range(6))
    val_tf = standard_transforms(32, augment=False)[1]
    want = torch.stack([val_tf(load_image(p)) for p, _ in train.dataset.base.samples])
    assert torch.equal(torch.cat([b[0] for b in batches]), want)


def test_same_seed_same_train_order(root: Path) -> None:
    orders = []
    for seed in (1, 1, 2):
        train, _, _ = imagenet_loaders(root, 2, 0, seed=seed, image_size=32)
        orders.append(torch.cat([b[2] for b in train]).tolist())
    assert orders[0] == orders[1]
    assert orders[0] != orders[2]  # the seed is used, not a fixed order


def test_train_order_is_a_function_of_seed_and_epoch(root: Path) -> None:
    """The engine calls sampler.set_epoch(epoch): every epoch has its own order, and a fresh
    loader (a resumed run) set to epoch 1 replays the epoch-1 order of one that ran epoch 0."""
    running, _, _ = imagenet_loaders(root, 2, 0, seed=1, image_size=32)
    orders = []
    for epoch in (0, 1):
        running.sampler.set_epoch(epoch)
        orders.append(torch.cat([b[2] for b in running]).tolist())
    assert orders[0] != orders[1]
    resumed, _, _ = imagenet_loaders(root, 2, 0, seed=1, image_size=32)
    resumed.sampler.set_epoch(1)
    assert torch.cat([b[2] for b in resumed]).tolist() == orders[1]


def test_val_workers_persist_and_train_workers_start_per_epoch(root: Path) -> None:
    """Persistent train workers would carry their RNG (the augmentation) from one epoch to the
    next, so a resumed run would crop differently; new ones are seeded per epoch by the engine."""
    train, val, _ = imagenet_loaders(root, 2, 1, image_size=32)
    assert train.num_workers == 1 and not train.persistent_workers and val.persistent_workers
    train, _, _ = imagenet_loaders(root, 2, 0, image_size=32)
    assert not train.persistent_workers


def test_distributed_uses_a_seeded_distributed_sampler(root: Path, tmp_path: Path) -> None:
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        train, val, _ = imagenet_loaders(root, 2, 0, distributed=True, seed=5, image_size=32)
        assert isinstance(train.sampler, DistributedSampler) and train.sampler.seed == 5
        assert isinstance(val.sampler, DistributedSampler) and not val.sampler.shuffle
        assert sorted(torch.cat([b[2] for b in train]).tolist()) == list(range(6))
    finally:
        dist.destroy_process_group()


def test_missing_val_folder_names_path_and_layout(tmp_path: Path) -> None:
    _write(tmp_path, "train", 1)
    with pytest.raises(DataError) as e:
        imagenet_loaders(tmp_path, 2, 0)
    msg = str(e.value)
    assert str(tmp_path / "val") in msg and "does not exist" in msg
    assert "ROOT/train/<class>/*.JPEG" in msg and "ROOT/val/<class>/*.JPEG" in msg


def test_missing_root_is_a_data_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        imagenet_loaders(tmp_path / "nope", 2, 0)


def test_folder_without_images_is_a_data_error(tmp_path: Path) -> None:
    _write(tmp_path, "train", 1)
    for c in CLASSES:
        (tmp_path / "val" / c).mkdir(parents=True)
    with pytest.raises(DataError, match=r"val has no images.*ROOT/val/<class>"):
        imagenet_loaders(tmp_path, 2, 0)


def test_mismatched_classes_are_a_data_error(tmp_path: Path) -> None:
    _write(tmp_path, "train", 1)
    _write(tmp_path, "val", 1, classes=(CLASSES[0], "n99999999"))
    with pytest.raises(DataError, match=r"differ.*n01443537.*n99999999"):
        imagenet_loaders(tmp_path, 2, 0)
