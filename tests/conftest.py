"""Shared test settings: small thread count and deterministic seeds for the 2-core CI machine."""

import pytest
import torch

torch.set_num_threads(2)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def write_image_folder(root, classes=3, per_class=12, size=32, split=None, seed=0):
    """Tiny PNGs whose dominant colour is their class (learnable in a few steps).

    ``split=None`` writes ROOT/<class>/*.png; ``split=(n_train, n_val)`` writes ROOT/train/<class>/
    and ROOT/val/<class>/. Returns ``root``.
    """
    import numpy as np
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


@pytest.fixture
def write_images():
    """The folder writer, for tests that need other layouts (tests cannot import conftest)."""
    return write_image_folder


@pytest.fixture
def image_folder(tmp_path):
    """A generated 3-class folder of 32x32 PNGs, 12 per class, no train/val split."""
    return write_image_folder(tmp_path / "images")
