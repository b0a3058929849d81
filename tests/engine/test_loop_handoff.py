"""What the training loop hands each step, seen where the step receives it, for every data kind.

The lower layers are tested on their own (the distiller with an epoch, ``lr_at`` with a step, the
loaders' ``set_epoch``); these tests run the loop itself (``normkd.engine.fit`` on a job built as
a run builds it) and record, at the distiller's forward, the epoch, the batch's sample indices and
the lr the optimizer holds. A loop that handed down a constant epoch, the epoch's first lr, or the
same order every epoch would pass every lower-layer test and fail here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from normkd.config import Recipe, load_recipe, recipe_from_dict
from normkd.engine import RunDir, fit
from support import DEMO, FAST, build_job, write_cifar100, write_image_folder


def _fit_recording(recipe: Recipe) -> tuple[list[tuple[int, list[int], float]], Any]:
    """Run ``recipe``'s loop; for each step (epoch, sample indices, lr at its forward), the job."""
    job = build_job(recipe)
    seen: list[tuple[int, list[int], float]] = []

    def record(_module: torch.nn.Module, args: tuple) -> None:
        _x, _y, idx, epoch = args
        seen.append((epoch, idx.tolist(), job.optimizer.param_groups[0]["lr"]))

    handle = job.distiller.register_forward_pre_hook(record)
    run = RunDir(recipe, resume=False, overwrite=False)
    run.check()
    run.open(job.data.info)
    try:
        fit(job, run)
    finally:
        run.close()
        handle.remove()
    return seen, job


def _by_epoch(seen: list[tuple[int, list[int], float]]) -> dict[int, list[list[int]]]:
    out: dict[int, list[list[int]]] = {}
    for epoch, idx, _lr in seen:
        out.setdefault(epoch, []).append(idx)
    return out


def test_each_step_gets_its_epoch_its_own_lr_and_the_epochs_samples(tmp_path: Path) -> None:
    """3 epochs of 300 digits in batches of 64 (5 steps, the last one short), the lr warming up
    per step over 2 epochs and scaled by 64/256: every step's forward sees its epoch, the lr of
    its own step (not its epoch's first), and each epoch's indices are the 300 samples once, in
    an order of that epoch's own."""
    over = [*FAST, f"engine.out_dir={tmp_path}", "optim.epochs=3", "optim.lr=0.4"]
    over += ["optim.schedule=constant", "optim.warmup_epochs=2", "optim.lr_scaling=linear"]
    recipe = load_recipe(DEMO / "vanilla.yaml", over)
    seen, job = _fit_recording(recipe)
    steps = 5  # ceil(300 / 64)
    assert len(job.data.train) == steps
    assert [e for e, _i, _lr in seen] == [0] * steps + [1] * steps + [2] * steps
    for n, (epoch, _idx, lr) in enumerate(seen):
        t = epoch + (n % steps) / steps  # the warm-up rises per step, by hand
        want = 0.4 * (t + 1 / steps) / 2 if t < 2 else 0.4
        assert lr == pytest.approx(want * 64 / 256, rel=1e-12), (epoch, n % steps)
    orders = _by_epoch(seen)
    for batches in orders.values():
        flat = [i for b in batches for i in b]
        assert sorted(flat) == list(range(300)) and [len(b) for b in batches][-1] == 300 - 4 * 64
    assert len({tuple(i for b in batches for i in b) for batches in orders.values()}) == 3


def _image_recipe(tmp_path: Path, data: dict[str, Any]) -> Recipe:
    return recipe_from_dict(
        {
            "name": "handoff",
            "task": "train",
            "data": {"batch_size": 8, "eval_batch_size": 16, "augment": False, **data},
            "student": {"model": "tinycnn", "kwargs": {"width": 4}},
            "loss": [{"kind": "ce"}],
            "optim": {"epochs": 3, "lr": 0.01, "schedule": "constant"},
            "engine": {"device": "cpu", "quiet": True, "out_dir": str(tmp_path / "runs")},
        }
    )


def _kind_data(kind: str, tmp_path: Path) -> dict[str, Any]:
    """Each data kind's smallest generated data: CIFAR-100 pickles, a class folder split by
    val_fraction, an ImageNet-style train/ and val/ tree, the digits that ship."""
    if kind == "cifar100":
        return {"root": str(write_cifar100(tmp_path / "cifar", n_train=40, n_test=16))}
    if kind == "folder":
        root = write_image_folder(tmp_path / "images", classes=3, per_class=10, size=20)
        return {"root": str(root), "image_size": 16, "workers": 0}
    if kind == "imagenet":
        root = write_image_folder(tmp_path / "imagenet", classes=3, size=20, split=(10, 2))
        return {"root": str(root), "workers": 0}
    return {"n_train": 40}


@pytest.mark.parametrize("kind", ["digits", "cifar100", "folder", "imagenet"])
def test_every_data_kind_is_reshuffled_every_epoch_through_the_loop(tmp_path, kind) -> None:
    """Device loaders (digits, CIFAR-100) reshuffle by their own set_epoch, DataLoaders over
    folders (folder, ImageNet) by their DistributedSampler's: either way each of 3 epochs trains
    on indices of the training set, none twice, in an order no other epoch had."""
    recipe = _image_recipe(tmp_path, {"kind": kind, **_kind_data(kind, tmp_path)})
    seen, job = _fit_recording(recipe)
    orders = _by_epoch(seen)
    assert sorted(orders) == [0, 1, 2]
    flats = [[i for b in orders[e] for i in b] for e in range(3)]
    for flat in flats:
        assert len(set(flat)) == len(flat) >= 8 and set(flat) <= set(range(job.data.train_size))
    assert len({tuple(f) for f in flats}) == 3, flats
