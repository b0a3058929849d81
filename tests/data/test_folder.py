"""Your own image folders: split by folder or by a seeded fraction, transforms, loaders, errors."""

import shutil

import pytest
import torch

from normkd.config import recipe_from_dict
from normkd.data import folder_datasets, folder_loaders
from normkd.errors import ConfigError, DataError
from support import recipe_data


def _recipe(root, **data):
    return recipe_from_dict(
        {
            "name": "f",
            "task": "train",
            "data": {"kind": "folder", "root": root, "image_size": 16, "workers": 0, **data},
            "student": {"model": "resnet8"},
        }
    )


def test_fraction_split_is_stratified_seeded_and_disjoint(image_folder):
    train, val, classes, info = folder_datasets(image_folder, image_size=16, val_fraction=0.25)
    assert classes == ["class_0", "class_1", "class_2"]
    assert (len(train), len(val)) == (27, 9)  # 12 per class: 3 held out of each
    assert sorted(val.targets) == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert not set(train.indices) & set(val.indices)
    assert info["split"].startswith("val_fraction 0.25")
    same = folder_datasets(image_folder, image_size=16, val_fraction=0.25)[1]
    other = folder_datasets(image_folder, image_size=16, val_fraction=0.25, split_seed=1)[1]
    assert same.indices == val.indices
    assert other.indices != val.indices


def test_loaders_yield_normalised_indexed_batches(image_folder):
    train, val, k, info = folder_loaders(image_folder, 8, 0, eval_batch_size=64, image_size=24)
    assert k == 3 and info["n_train"] == 30 and info["n_val"] == 6
    assert len(train) == 3  # 30 images, full batches of 8
    x, y, idx = next(iter(train))
    assert x.shape == (8, 3, 24, 24) and x.dtype == torch.float32
    assert y.dtype == torch.int64 and idx.dtype == torch.int64
    assert int(idx.max()) < 30
    vx, vy, _ = next(iter(val))
    assert vx.shape == (6, 3, 24, 24)
    # Normalised with ImageNet statistics: the class colour channel is bright, others dark.
    for img, label in zip(vx, vy):
        means = img.mean((1, 2))
        assert int(means.argmax()) == int(label)
    assert float(vx.min()) < -1.0  # ToTensor alone gives values in [0, 1]


def test_train_and_val_folders_are_used_as_they_are(tmp_path, write_images):
    root = write_images(tmp_path / "split", split=(5, 2))
    train, val, classes, info = folder_datasets(root, image_size=16)
    assert (len(train), len(val), info["split"]) == (15, 6, "folders")
    assert classes == ["class_0", "class_1", "class_2"]


def test_build_data_from_a_recipe(image_folder):
    recipe = _recipe(image_folder, batch_size=4, val_fraction=0.5)
    data = recipe_data(recipe)
    assert (data.num_classes, data.in_shape) == (3, (3, 16, 16))
    assert data.info["n_val"] == 18 and not data.fake


def test_a_dry_run_reads_the_real_folder_and_fakes_data_only_when_asked(tmp_path):
    with pytest.raises(DataError, match=r"image folder .*absent does not exist"):
        recipe_data(_recipe(tmp_path / "absent"), dry_run=True)
    data = recipe_data(_recipe(tmp_path / "absent", fake=True), dry_run=True)
    assert data.fake and data.in_shape == (3, 16, 16) and data.num_classes == 10
    with pytest.raises(ConfigError, match=r"data\.fake: random images can check a recipe"):
        recipe_data(_recipe(tmp_path / "absent", fake=True))


def test_missing_root(tmp_path):
    with pytest.raises(DataError, match=r"image folder .*absent does not exist.*ROOT/<class>"):
        folder_datasets(tmp_path / "absent")
    with pytest.raises(ConfigError, match=r"data\.root: set it to your image folder"):
        recipe_data(_recipe(None))


def test_empty_root_and_class_folders_without_images(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="has no class folders"):
        folder_datasets(tmp_path / "empty")
    for c in ("a", "b"):
        (tmp_path / "noimg" / c).mkdir(parents=True)
        (tmp_path / "noimg" / c / "notes.txt").write_text("not an image")
    with pytest.raises(DataError, match="has no images"):
        folder_datasets(tmp_path / "noimg")


def test_train_without_val_and_class_mismatch(tmp_path, write_images):
    root = write_images(tmp_path / "split", split=(3, 2))
    shutil.rmtree(root / "val" / "class_2")
    with pytest.raises(DataError, match=r"differ.*only in train \['class_2'\]"):
        folder_datasets(root)
    shutil.rmtree(root / "val")
    with pytest.raises(DataError, match="has train/ but no val/"):
        folder_datasets(root)


def test_too_few_images_and_one_class(tmp_path, write_images):
    root = write_images(tmp_path / "tiny", classes=2, per_class=1)
    with pytest.raises(DataError, match="too few images"):
        folder_datasets(root)
    root = write_images(tmp_path / "one", classes=1, per_class=4)
    with pytest.raises(DataError, match="need at least 2"):
        folder_datasets(root)
    root = write_images(tmp_path / "few", classes=2, per_class=4)
    with pytest.raises(DataError, match="fewer than one batch"):
        folder_loaders(root, 64, 0)


def test_a_plain_train_pass_is_every_training_image_in_order_and_the_same_twice(image_folder):
    """``plain_train``: the val transforms on the training images, unshuffled (no crop, flip or
    order that changes from one pass to the next)."""
    from normkd.data.build import Place, build_data

    recipe = _recipe(image_folder, batch_size=4, eval_batch_size=8, val_fraction=0.25)
    data = build_data(recipe.data, Place(torch.device("cpu")), plain_train=True)
    first, again = list(data.train), list(data.train)
    assert [len(b[2]) for b in first] == [8, 8, 8, 3]  # 27 training images, none dropped
    assert torch.cat([b[2] for b in first]).tolist() == list(range(27))
    assert torch.cat([b[1] for b in first]).tolist() == data.train.dataset.base.targets
    assert all(torch.equal(a[0], b[0]) for a, b in zip(first, again))
