"""CIFAR-100 from a local folder (python or binary layout); never downloads, never runs pickled code."""

from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch

from normkd.data.common import Split
from normkd.errors import DataError

CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)
NUM_CLASSES = 100
PIXELS = 3 * 32 * 32
RECORD = 2 + PIXELS  # binary layout: coarse label byte, fine label byte, 3072 pixel bytes

PY_DIR, BIN_DIR = "cifar-100-python", "cifar-100-binary"
PY_FILES = ("train", "test")
BIN_FILES = ("train.bin", "test.bin")
URL = "https://www.cs.toronto.edu/~kriz/cifar.html"


def _allowed_globals() -> dict[tuple[str, str], Any]:
    """The only callables a CIFAR pickle needs: numpy array rebuilding and bytes decoding."""
    import _codecs

    try:
        from numpy._core import multiarray, numeric
    except ImportError:  # numpy < 2
        from numpy.core import multiarray, numeric  # type: ignore[no-redef]
    allowed: dict[tuple[str, str], Any] = {
        ("_codecs", "encode"): _codecs.encode,
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
    }
    for mod in ("numpy.core", "numpy._core"):
        allowed[(f"{mod}.multiarray", "_reconstruct")] = multiarray._reconstruct
        allowed[(f"{mod}.multiarray", "scalar")] = multiarray.scalar
        allowed[(f"{mod}.numeric", "_frombuffer")] = numeric._frombuffer
    return allowed


class _CifarUnpickler(pickle.Unpickler):
    """Unpickler that resolves only the array-rebuilding names above; anything else is refused."""

    def __init__(self, file: io.BufferedIOBase, path: Path) -> None:
        super().__init__(file, encoding="bytes")  # the real files are Python 2 pickles
        self._path = path
        self._allowed = _allowed_globals()

    def find_class(self, module: str, name: str) -> Any:
        """Look the name up in the allow-list instead of importing it."""
        try:
            return self._allowed[(module, name)]
        except KeyError:
            raise DataError(
                f"refused to unpickle {module}.{name} from {self._path}: not a CIFAR array"
            ) from None

    def persistent_load(self, pid: Any) -> Any:
        """CIFAR pickles carry no persistent ids; treat one as a foreign file."""
        raise DataError(f"refused to unpickle a persistent id from {self._path}: not a CIFAR array")


def _get(d: dict, key: str) -> Any:
    """Dict entry under the Python 2 bytes key or a re-pickled str key."""
    if key.encode() in d:
        return d[key.encode()]
    return d[key]


def _read_python(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One python-layout file -> (N, 3072) uint8 pixels and (N,) fine labels, validated."""
    try:
        with path.open("rb") as f:
            obj = _CifarUnpickler(f, path).load()
    except DataError:
        raise
    except Exception as e:  # truncated or garbage bytes surface as many exception types
        raise DataError(f"corrupt CIFAR-100 file {path}: cannot unpickle ({e})") from None
    if not isinstance(obj, dict):
        raise DataError(f"corrupt CIFAR-100 file {path}: expected a dict, got {type(obj).__name__}")
    try:
        data, labels = _get(obj, "data"), _get(obj, "fine_labels")
    except KeyError:
        keys = sorted(k.decode() if isinstance(k, bytes) else str(k) for k in obj)
        raise DataError(
            f"corrupt CIFAR-100 file {path}: expected keys b'data' and b'fine_labels', got {keys}"
        ) from None
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2:
        raise DataError(f"corrupt CIFAR-100 file {path}: b'data' is not a uint8 (N, 3072) array")
    if data.shape[1] != PIXELS:
        raise DataError(
            f"corrupt CIFAR-100 file {path}: b'data' rows have {data.shape[1]} values, not {PIXELS}"
        )
    try:
        y = np.asarray(labels, dtype=np.int64)
    except (TypeError, ValueError):
        raise DataError(f"corrupt CIFAR-100 file {path}: b'fine_labels' are not integers") from None
    if y.shape != (len(data),):
        raise DataError(
            f"corrupt CIFAR-100 file {path}: {len(data)} images but {y.size} fine labels"
        )
    return data, y


def _read_binary(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One binary-layout file -> (N, 3072) uint8 pixels and (N,) fine labels, validated."""
    size = path.stat().st_size
    if size == 0 or size % RECORD:
        raise DataError(
            f"corrupt CIFAR-100 file {path}: {size} bytes is not a whole number of "
            f"{RECORD}-byte records (truncated download?)"
        )
    raw = np.fromfile(path, dtype=np.uint8).reshape(-1, RECORD)
    return raw[:, 2:], raw[:, 1].astype(np.int64)


def _find_layout(root: Path) -> tuple[str, Path]:
    """Which layout lives at or under root; otherwise say exactly what was expected where."""
    folders = [root, root / PY_DIR, root / BIN_DIR]
    for folder in folders:
        for layout, files in (("python", PY_FILES), ("binary", BIN_FILES)):
            if all((folder / f).is_file() for f in files):
                return layout, folder
    # Nothing complete: list what is missing in every folder that looks like a started copy.
    parent = root.parent if root.name in (PY_DIR, BIN_DIR) else root
    expected = (
        f"{parent / PY_DIR}/{{{','.join(PY_FILES)}}} (python layout) or "
        f"{parent / BIN_DIR}/{{{','.join(BIN_FILES)}}} (binary layout)"
    )
    missing = []
    for folder in folders:
        for files in (PY_FILES, BIN_FILES):
            started = any((folder / f).exists() for f in files)
            named = folder.name == (PY_DIR if files is PY_FILES else BIN_DIR)
            if started or (named and folder.is_dir()):
                missing += [str(folder / f) for f in files if not (folder / f).is_file()]
    state = "does not exist" if not root.exists() else "holds no complete CIFAR-100 copy"
    msg = f"CIFAR-100 folder {root} {state}: expected {expected}."
    if missing:
        msg += f" Missing: {', '.join(missing)}."
    archives = sorted(parent.glob("cifar-100-*.tar.gz")) if parent.is_dir() else []
    if archives:
        msg += f" Found {archives[0].name} there: extract it first (tar xzf)."
    raise DataError(
        f"{msg} Download cifar-100-python.tar.gz from {URL} and extract it into {parent}."
    )


def check_cifar100_root(root: str | Path) -> None:
    """Raise the :func:`load_cifar100` error (what is missing, where to put it) without reading
    the files: a command that will train checks its data before it starts anything."""
    _find_layout(Path(root).expanduser())


def load_cifar100(root: str | Path) -> Split:
    """CIFAR-100 as uint8 (N, 3, 32, 32) tensors from a local folder, ready to move to the device."""
    root = Path(root).expanduser()
    layout, folder = _find_layout(root)
    read, files = (_read_python, PY_FILES) if layout == "python" else (_read_binary, BIN_FILES)
    parts = []
    for name in files:
        path = folder / name
        data, y = read(path)
        if len(y) and (y.min() < 0 or y.max() >= NUM_CLASSES):
            raise DataError(
                f"corrupt CIFAR-100 file {path}: fine labels must lie in 0..{NUM_CLASSES - 1}, "
                f"found {int(y.min())}..{int(y.max())}"
            )
        # Rows are 1024 red, 1024 green, 1024 blue values, each a row-major 32x32 plane.
        x = torch.from_numpy(np.ascontiguousarray(data).reshape(-1, 3, 32, 32))
        parts.append((x, torch.from_numpy(y)))
    (x_train, y_train), (x_test, y_test) = parts
    return Split(
        x_train=x_train,
        y_train=y_train,
        x_test=x_test,
        y_test=y_test,
        num_classes=NUM_CLASSES,
        mean=CIFAR100_MEAN,
        std=CIFAR100_STD,
        info={
            "source": "cifar100",
            "root": str(folder),
            "layout": layout,
            "n_train": len(y_train),
            "n_test": len(y_test),
            "full": len(y_train) == 50_000 and len(y_test) == 10_000,
        },
    )
