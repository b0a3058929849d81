"""CIFAR-100 from a local folder: both layouts round-trip, and bad folders fail safely and clearly."""

import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from normkd.data import load_cifar100
from normkd.errors import DataError

N_TRAIN, N_TEST = 40, 12


def _fake_arrays(n: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Images as (n, 3, 32, 32), fine labels 0..99 and coarse labels 0..19."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, 3, 32, 32), dtype=np.uint8)
    return images, rng.integers(0, 100, size=n), rng.integers(0, 20, size=n)


def _rows(images: np.ndarray) -> np.ndarray:
    """The documented row format: 1024 red, then 1024 green, then 1024 blue, each row-major."""
    return np.stack([np.concatenate([img[c].ravel() for c in range(3)]) for img in images])


def _write_python(root: Path, protocol: int = 2) -> dict[str, tuple]:
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    written = {}
    for name, n, seed in (("train", N_TRAIN, 0), ("test", N_TEST, 1)):
        images, fine, coarse = _fake_arrays(n, seed)
        d = {
            b"filenames": [f"img_{i}.png".encode() for i in range(n)],
            b"batch_label": f"{name}ing batch 1 of 1".encode(),
            b"fine_labels": [int(v) for v in fine],
            b"coarse_labels": [int(v) for v in coarse],
            b"data": _rows(images),
        }
        (folder / name).write_bytes(pickle.dumps(d, protocol=protocol))
        written[name] = (images, fine)
    (folder / "meta").write_bytes(pickle.dumps({b"fine_label_names": [b"x"] * 100}, protocol=2))
    return written


def _write_binary(root: Path) -> dict[str, tuple]:
    folder = root / "cifar-100-binary"
    folder.mkdir(parents=True)
    written = {}
    for name, n, seed in (("train.bin", N_TRAIN, 2), ("test.bin", N_TEST, 3)):
        images, fine, coarse = _fake_arrays(n, seed)
        records = np.concatenate(
            [coarse[:, None].astype(np.uint8), fine[:, None].astype(np.uint8), _rows(images)],
            axis=1,
        )
        records.tofile(folder / name)
        written[name] = (images, fine)
    return written


def _check(split, written: dict, train: str, test: str) -> None:
    images, fine = written[train]
    assert split.x_train.shape == (N_TRAIN, 3, 32, 32) and split.x_train.dtype == torch.uint8
    assert split.y_train.dtype == torch.int64 and split.num_classes == 100
    assert np.array_equal(split.x_train.numpy(), images)
    assert np.array_equal(split.y_train.numpy(), fine)
    # one known pixel, spelled out: green plane, row 5, column 7
    assert split.x_train[3, 1, 5, 7] == images[3][1][5][7]
    images, fine = written[test]
    assert np.array_equal(split.x_test.numpy(), images)
    assert np.array_equal(split.y_test.numpy(), fine)
    assert split.mean == (0.5071, 0.4865, 0.4409) and split.std == (0.2673, 0.2564, 0.2762)


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_python_layout_round_trips_from_parent_and_folder(tmp_path: Path, protocol: int) -> None:
    written = _write_python(tmp_path, protocol)
    _check(load_cifar100(tmp_path), written, "train", "test")
    split = load_cifar100(str(tmp_path / "cifar-100-python"))
    _check(split, written, "train", "test")
    assert split.info["layout"] == "python" and split.info["n_train"] == N_TRAIN


def _py2_array_pickle(rows: np.ndarray) -> bytes:
    """A uint8 array pickled the way Python 2 + numpy 1 did it (the real files): old names, str."""

    def s(b: bytes) -> bytes:  # SHORT_BINSTRING: a Python 2 str, read back as bytes
        return b"U" + bytes([len(b)]) + b

    shape = b"(" + b"".join(b"J" + struct.pack("<i", d) for d in rows.shape) + b"t"
    dtype = b"cnumpy\ndtype\n" + s(b"u1") + b"K\x00K\x01\x87R(K\x03" + s(b"|")
    dtype += b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb"
    data = b"T" + struct.pack("<I", rows.size) + rows.tobytes()
    return (
        b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85"
        + s(b"b")
        + b"\x87R(K\x01"
        + shape
        + dtype
        + b"\x89"
        + data
        + b"tb"
    )


def test_python2_era_pickles_load(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    written = {}
    for name, n, seed in (("train", N_TRAIN, 0), ("test", N_TEST, 1)):
        images, fine, _ = _fake_arrays(n, seed)
        labels = b"(" + b"".join(b"K" + bytes([int(v)]) for v in fine) + b"l"
        body = b"U\x04data" + _py2_array_pickle(_rows(images)) + b"U\x0bfine_labels" + labels
        (folder / name).write_bytes(b"\x80\x02}(" + body + b"u.")
        written[name] = (images, fine)
    _check(load_cifar100(tmp_path), written, "train", "test")


def test_binary_layout_round_trips_from_parent_and_folder(tmp_path: Path) -> None:
    written = _write_binary(tmp_path)
    _check(load_cifar100(tmp_path), written, "train.bin", "test.bin")
    split = load_cifar100(tmp_path / "cifar-100-binary")
    _check(split, written, "train.bin", "test.bin")
    assert split.info["layout"] == "binary" and split.info["n_test"] == N_TEST


def test_missing_folder_names_expected_files_and_source(tmp_path: Path) -> None:
    with pytest.raises(DataError) as e:
        load_cifar100(tmp_path / "nowhere")
    msg = str(e.value)
    assert "does not exist" in msg
    assert "cifar-100-python/{train,test}" in msg and "cifar-100-binary/{train.bin,test.bin}" in msg
    assert "https://www.cs.toronto.edu/~kriz/cifar.html" in msg
    assert str(tmp_path / "nowhere") in msg


def test_incomplete_folder_lists_the_missing_file(tmp_path: Path) -> None:
    _write_python(tmp_path)
    (tmp_path / "cifar-100-python" / "test").unlink()
    (tmp_path / "cifar-100-python.tar.gz").write_bytes(b"")
    with pytest.raises(DataError) as e:
        load_cifar100(tmp_path)
    msg = str(e.value)
    assert f"Missing: {tmp_path / 'cifar-100-python' / 'test'}." in msg
    assert "cifar-100-python.tar.gz" in msg and "extract" in msg


def test_truncated_binary_is_refused(tmp_path: Path) -> None:
    _write_binary(tmp_path)
    path = tmp_path / "cifar-100-binary" / "train.bin"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(DataError, match=r"train\.bin.*truncated"):
        load_cifar100(tmp_path)


def test_binary_label_out_of_range_is_refused(tmp_path: Path) -> None:
    _write_binary(tmp_path)
    path = tmp_path / "cifar-100-binary" / "test.bin"
    raw = bytearray(path.read_bytes())
    raw[1] = 100  # fine label of the first record
    path.write_bytes(bytes(raw))
    with pytest.raises(DataError, match=r"test\.bin.*0\.\.99"):
        load_cifar100(tmp_path)


def test_truncated_pickle_is_refused(tmp_path: Path) -> None:
    _write_python(tmp_path)
    path = tmp_path / "cifar-100-python" / "train"
    path.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(DataError, match=r"corrupt CIFAR-100 file .*train"):
        load_cifar100(tmp_path)


def test_wrong_keys_are_refused(tmp_path: Path) -> None:
    _write_python(tmp_path)
    path = tmp_path / "cifar-100-python" / "test"
    path.write_bytes(pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 1]}))
    with pytest.raises(DataError, match=r"test: expected keys b'data' and b'fine_labels'"):
        load_cifar100(tmp_path)


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_code_carrying_pickle_is_refused_and_never_runs(tmp_path: Path) -> None:
    _write_python(tmp_path)
    marker = tmp_path / "pwned"
    path = tmp_path / "cifar-100-python" / "train"
    payload = {b"data": _Evil(marker), b"fine_labels": [0]}
    path.write_bytes(pickle.dumps(payload, protocol=2))
    with pytest.raises(DataError, match=r"refused to unpickle .*system.*not a CIFAR array"):
        load_cifar100(tmp_path)
    assert not marker.exists()
    # the same payload through plain pickle would have run: proves the test can catch it
    pickle.loads(path.read_bytes())
    assert marker.exists()
