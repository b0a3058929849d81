"""Shared test constants and data writers (importable from any test: pytest's pythonpath).

Fixtures live in conftest.py; plain values and functions live here, because with
``--import-mode=importlib`` a test module cannot import conftest.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
DEMO = CONFIGS / "demo"
# Small, quiet, CPU runs of the demo recipes: 300 training digits.
FAST = ["data.n_train=300", "engine.quiet=true", "engine.device=cpu"]


def sets(*items: str) -> list[str]:
    """``--set`` arguments for the CLI: sets("a=1", "b=2") -> ["--set", "a=1", "--set", "b=2"]."""
    return [a for s in items for a in ("--set", s)]


def write_image_folder(root, classes=3, per_class=12, size=32, split=None, seed=0):
    """Tiny PNGs whose dominant colour is their class (learnable in a few steps).

    ``split=None`` writes ROOT/<class>/*.png; ``split=(n_train, n_val)`` writes ROOT/train/<class>/
    and ROOT/val/<class>/. Returns ``root``.
    """
    from PIL import Image

    rng = np.random.default_rng(seed)
    parts = [("", per_class)] if split is None else [("train", split[0]), ("val", split[1])]
    for part, n in parts:
        for c in range(classes):
            folder = root / part / f"class_{c}" if part else root / f"class_{c}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                img = rng.integers(0, 90, (size, size, 3), dtype=np.uint8)
                img[..., c % 3] += 150  # the class's colour channel is bright
                if c >= 3:  # more than 3 classes: a bright top half tells them apart
                    img[: size // 2] //= 2
                Image.fromarray(img).save(folder / f"{i:03d}.png")
    return root


def write_cifar100(
    root: Path, n_train: int = 200, n_test: int = 100, seed: int = 0, balanced: bool = False
) -> Path:
    """CIFAR-100 python-pickle files (``root/cifar-100-python/{train,test,meta}``), random images
    whose labels a model can learn a little (the label sets the mean of the red channel).
    ``balanced``: the classes in turn (each as often as ``n`` allows), in a shuffled order."""
    folder = Path(root) / "cifar-100-python"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for name, n in (("train", n_train), ("test", n_test)):
        fine = rng.permutation(np.arange(n) % 100) if balanced else rng.integers(0, 100, size=n)
        images = rng.integers(0, 128, size=(n, 3, 32, 32), dtype=np.uint8)
        images[:, 0] += (fine[:, None, None] * 127 // 99).astype(np.uint8)
        d = {
            b"filenames": [f"img_{i}.png".encode() for i in range(n)],
            b"batch_label": f"{name} batch 1 of 1".encode(),
            b"fine_labels": [int(v) for v in fine],
            b"coarse_labels": [int(v) // 5 for v in fine],
            b"data": images.reshape(n, -1),
        }
        (folder / name).write_bytes(pickle.dumps(d, protocol=2))
    (folder / "meta").write_bytes(pickle.dumps({b"fine_label_names": [b"x"] * 100}, protocol=2))
    return Path(root)


def recipe_data(recipe, dry_run: bool = False):
    """The loaders of a recipe's ``data`` section, on CPU (what a run trains and tests on)."""
    import torch

    from normkd.data.build import Place, build_data

    return build_data(recipe.data, Place(torch.device("cpu"), recipe.engine.seed), dry_run=dry_run)


def build_job(recipe, untrained_teacher: bool = False, data=None):
    """The engine's Job for ``recipe`` on CPU, exactly as a run assembles it. With
    ``untrained_teacher`` it is built as for a dry run (a random teacher is fine)."""
    import torch

    from normkd.engine import Runtime, assemble

    runtime = Runtime(torch.device("cpu"))
    return assemble(recipe, runtime, data=data, dry_run=untrained_teacher)


def one_error_line(main, argv: list[str], capsys, max_len: int | None = None) -> str:
    """Run the CLI in process; assert exit 2 and exactly one ``normkd: error:`` line on stderr
    (no traceback, at most ``max_len`` characters); return that line."""
    capsys.readouterr()
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("normkd: error: ")
    assert max_len is None or len(lines[0]) <= max_len
    return lines[0]
