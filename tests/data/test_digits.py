"""The embedded digits split: shapes, a reproducible disjoint split, and real pixel content."""

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

from normkd.data import Split, fake_split, load_digits_split
from normkd.errors import DataError


@pytest.fixture(scope="module")
def split() -> Split:
    return load_digits_split(seed=0)


def test_shapes_and_dtypes(split: Split) -> None:
    assert split.x_train.shape == (1000, 3, 8, 8)
    assert split.x_test.shape == (797, 3, 8, 8)
    assert split.x_train.dtype == torch.uint8 and split.y_train.dtype == torch.int64
    assert split.num_classes == 10
    assert int(split.y_train.min()) == 0 and int(split.y_train.max()) == 9
    assert int(split.y_test.min()) == 0 and int(split.y_test.max()) == 9
    # gray replicated to 3 channels
    assert torch.equal(split.x_train[:, 0], split.x_train[:, 1])
    assert torch.equal(split.x_train[:, 0], split.x_train[:, 2])


def test_indices_are_disjoint_and_cover_everything(split: Split) -> None:
    train, test = split.info["train_indices"], split.info["test_indices"]
    assert len(train) == 1000 and len(test) == 797
    assert set(train).isdisjoint(test)
    assert sorted(train + test) == list(range(1797))


def test_pixels_and_labels_match_sklearn(split: Split) -> None:
    bunch = load_digits()
    train = split.info["train_indices"]
    expected = np.rint(bunch.images[train] * 255 / 16).astype(np.uint8)
    assert np.array_equal(split.x_train[:, 0].numpy(), expected)
    assert np.array_equal(split.y_train.numpy(), bunch.target[train])
    assert split.x_train.max() == 255  # 16 maps to 255


def test_stats_come_from_the_train_split(split: Split) -> None:
    xf = split.x_train.double() / 255
    assert split.mean == pytest.approx([float(xf.mean())] * 3, abs=1e-4)
    assert split.std == pytest.approx([float(xf.std())] * 3, abs=1e-4)


def test_same_seed_same_split_other_seed_other_split(split: Split) -> None:
    again = load_digits_split(seed=0)
    other = load_digits_split(seed=1)
    assert again.info["train_indices"] == split.info["train_indices"]
    assert torch.equal(again.x_train, split.x_train)
    assert other.info["train_indices"] != split.info["train_indices"]


def test_split_is_stratified(split: Split) -> None:
    counts = torch.bincount(split.y_train, minlength=10)
    assert int(counts.sum()) == 1000
    assert int(counts.min()) >= 95 and int(counts.max()) <= 105


def test_bad_n_train_is_a_data_error() -> None:
    with pytest.raises(DataError, match="n_train"):
        load_digits_split(n_train=1797)
    small = load_digits_split(n_train=7)
    assert len(small.y_train) == 7 and len(small.y_test) == 1790


def test_fake_split_shapes_and_reproducibility() -> None:
    a = fake_split(num_classes=100, image_size=32, n_train=64, n_test=16, seed=3)
    b = fake_split(num_classes=100, image_size=32, n_train=64, n_test=16, seed=3)
    assert a.x_train.shape == (64, 3, 32, 32) and a.x_test.shape == (16, 3, 32, 32)
    assert a.x_train.dtype == torch.uint8 and a.y_test.dtype == torch.int64
    assert int(a.y_train.max()) < 100
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_test, b.y_test)
    assert len(a.mean) == 3 and all(0.4 < m < 0.6 for m in a.mean)
