"""``--resume`` ends bit-identical to an uninterrupted run for every data kind.

Each epoch must be a pure function of (seed, epoch, state at its start): the data order, the
augmentation (RandomResizedCrop/flip in DataLoader workers or the main process, pad/flip of the
device loaders) and the worker seeds. Each kind builds its loaders differently (device loaders for
digits and CIFAR-100, DataLoaders over image folders, a DataLoader the Python API wraps around a
Dataset), and a loader shuffled by a generator seeded once per process replays epoch 0's order
after a resume, so every kind is run 2 epochs straight and 1 epoch + resume, and the final
``last.pt`` states must be equal tensor for tensor.
"""

from pathlib import Path
from typing import Any

import pytest
import torch
from torch.utils.data import Dataset

import normkd
from normkd.config import Recipe, load_recipe, recipe_from_dict
from normkd.engine import run_recipe
from normkd.engine.checkpoint import load_checkpoint
from normkd.models import create_model
from support import DEMO, FAST, write_cifar100, write_image_folder

# A BatchNorm student (its running statistics must match too), kept small for the 2-core CI box.
STUDENT = {"model": "tinycnn", "kwargs": {"width": 4}}


def _assert_same_state(a_run: Path, b_run: Path) -> None:
    a = load_checkpoint(a_run / "last.pt")
    b = load_checkpoint(b_run / "last.pt")
    assert a["epoch"] == b["epoch"] == 2
    sa, sb = a["distiller"], b["distiller"]
    assert sa.keys() == sb.keys()
    differ = [k for k in sa if not torch.equal(sa[k], sb[k])]
    assert not differ, f"resumed run differs from the uninterrupted one in {differ}"


def _straight_vs_resumed(make: Any, tmp_path: Path) -> None:
    """``make(run_name)`` -> Recipe of 2 epochs; run it straight and as 1 epoch + --resume."""
    run_recipe(make("full"))
    part = make("part")
    run_recipe(part, stop_after_epoch=1)
    assert load_checkpoint(tmp_path / "part" / "last.pt")["epoch"] == 1
    run_recipe(part, resume=True)
    _assert_same_state(tmp_path / "full", tmp_path / "part")


def _image_recipe(data: dict[str, Any], out: Path):
    def make(run: str) -> Recipe:
        return recipe_from_dict(
            {
                "name": "resume_kinds",
                "task": "train",
                "data": {"batch_size": 8, "eval_batch_size": 16, **data},
                "student": STUDENT,
                "loss": [{"kind": "ce"}],
                "optim": {"epochs": 2, "lr": 0.05, "schedule": "cosine"},
                "engine": {"device": "cpu", "quiet": True, "out_dir": str(out), "run_name": run},
            }
        )

    return make


def test_digits(tmp_path):
    def make(run: str) -> Recipe:
        over = [*FAST, "student.model=tinycnn", "optim.epochs=2", f"engine.run_name={run}"]
        return load_recipe(DEMO / "teacher.yaml", [*over, f"engine.out_dir={tmp_path}"])

    _straight_vs_resumed(make, tmp_path)


def test_cifar100(tmp_path):
    root = write_cifar100(tmp_path / "cifar", n_train=96, n_test=32)
    data = {"kind": "cifar100", "root": str(root), "batch_size": 32}
    _straight_vs_resumed(_image_recipe(data, tmp_path), tmp_path)


@pytest.mark.parametrize("workers", [0, 2])
def test_folder(tmp_path, workers):
    """Split by val_fraction, 32 px crops; 29 train images in batches of 8 (drop_last drops 5).

    With workers > 0 the augmentation runs in worker processes, whose seeds must also be a function
    of the epoch (not carried over from epoch 0 by persistent workers).
    """
    root = write_image_folder(tmp_path / "images", classes=3, per_class=12, size=40)
    data = {"kind": "folder", "root": str(root), "image_size": 32, "workers": workers}
    _straight_vs_resumed(_image_recipe(data, tmp_path), tmp_path)


def test_imagenet(tmp_path):
    """ROOT/train and ROOT/val class folders (the engine uses 224 px crops for this kind)."""
    root = write_image_folder(tmp_path / "imagenet", classes=3, size=40, split=(7, 2))
    data = {"kind": "imagenet", "root": str(root), "workers": 0}
    _straight_vs_resumed(_image_recipe(data, tmp_path), tmp_path)


class _Flipped(Dataset):
    """Random images with a random horizontal flip drawn from torch's global RNG (augmentation
    the engine must re-seed per epoch); ``stop_at`` raises Ctrl-C at that item fetch."""

    def __init__(self, n: int, stop_at: int | None = None) -> None:
        g = torch.Generator().manual_seed(1)
        self.y = torch.arange(n) % 3
        self.x = torch.rand(n, 3, 16, 16, generator=g) + self.y[:, None, None, None] * 0.3
        self.stop_at = stop_at
        self.fetched = 0

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        self.fetched += 1
        if self.stop_at is not None and self.fetched >= self.stop_at:
            raise KeyboardInterrupt
        x = self.x[i].flip(-1) if torch.rand(()) < 0.5 else self.x[i]
        return x, int(self.y[i])


def test_external_dataset_through_the_api(tmp_path):
    """``normkd.distill`` wraps a Dataset into its own shuffled DataLoader. The API has no
    stop-after-epoch, so the partial run is stopped by Ctrl-C at epoch 2's first item fetch."""
    n, batch = 48, 16
    student = create_model("tinycnn", num_classes=3, width=4)
    opts = {
        "method": "vanilla",
        "epochs": 2,
        "batch_size": batch,
        "workers": 0,
        "device": "cpu",
        "quiet": True,
        "out_dir": tmp_path,
    }
    val = _Flipped(24)
    normkd.distill(None, student, _Flipped(n), val, run_name="full", **opts)
    # The API reads item 0 and one batch to check the data, epoch 1 reads n items: the fetch
    # after those is epoch 2's first.
    cut = _Flipped(n, stop_at=1 + batch + n + 1)
    with pytest.raises(KeyboardInterrupt):
        normkd.distill(None, student, cut, val, run_name="part", **opts)
    assert load_checkpoint(tmp_path / "part" / "last.pt")["epoch"] == 1
    assert not (tmp_path / "part" / "model.safetensors").exists()
    normkd.distill(None, student, _Flipped(n), val, run_name="part", resume=True, **opts)
    _assert_same_state(tmp_path / "full", tmp_path / "part")
