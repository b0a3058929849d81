"""``normkd.distill``: your teacher, your student, your data, one call, the CLI's engine.

>>> result = normkd.distill(teacher, student, train_loader, val_loader, method="norm+kd", epochs=30)
>>> result.student          # deployable: the student's own architecture, FT merged for NORM
>>> result.best_top1, result.run_dir

Teacher and student are any CNN classifiers (zoo, torchvision, timm, your own) whose taps
``normkd.models.get_taps`` finds; data are DataLoaders (or Datasets) yielding ``(x, y)`` or
``(x, y, idx)``. Training runs through :func:`normkd.engine.fit`, so progress, ``metrics.csv``,
checkpoints, ``--resume`` semantics and the run directory are exactly those of ``normkd distill``.
Everything is checked before the first step, with errors that say what to change.
"""

from __future__ import annotations

import copy
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, IterableDataset

from normkd.config import Recipe, apply_overrides, recipe_from_dict
from normkd.data.imagenet import IndexedDataset
from normkd.engine.build import Data, Prebuilt, resolve_device
from normkd.engine.trainer import RunResult, fit
from normkd.errors import UserError
from normkd.models import get_taps, load_weights

__all__ = ["METHODS", "OPTIONS", "Result", "distill", "method_loss"]

TERMS = ("kd", "norm", "dkd", "crd", "fitnet", "at")
METHODS = (
    "vanilla",
    "kd",
    "norm",
    "norm+kd",
    "dkd",
    "norm+dkd",
    "crd",
    "norm+crd",
    "fitnet",
    "at",
)  # the usual ones; any terms joined with '+' work

# Every option distill() takes, with its default. Loss options shape the method's terms; the rest
# go to the recipe's data / optim / engine sections (see normkd.config).
OPTIONS: dict[str, Any] = {
    # loss terms (a plain CE term with ce_weight is always included)
    "ce_weight": 1.0,
    "kd_weight": 1.0,
    "temperature": 4.0,  # KD and DKD
    "n": 8,  # NORM expansion factor
    "norm_weight": 1.0,
    "norm_ramp": "none",  # or "cifar" / "imagenet": the paper's epoch ramp of the NORM weight
    "dkd_alpha": 1.0,
    "dkd_beta": 8.0,
    "dkd_warmup": None,  # epochs; default: epochs / 12 (mdistiller's 20 of 240), at most 20
    "crd_weight": 0.8,
    "fitnet_weight": 100.0,
    "at_weight": 1000.0,
    "loss": None,  # a full loss list (recipe format) instead of the method's defaults
    # data (batch_size / workers apply when you pass Datasets)
    "batch_size": 64,
    "workers": 2,
    # optimiser: SGD with momentum
    "lr": 0.05,
    "momentum": 0.9,
    "weight_decay": 5e-4,
    "schedule": "cosine",
    "warmup_epochs": 0,
    # engine / run directory
    "device": "auto",
    "amp": "off",
    "seed": 0,
    "out_dir": "runs",
    "run_name": None,
    "resume": False,
    "overwrite": False,
    "quiet": False,
    "eval_every": 1,
    "channels_last": False,
    "compile": False,
    # checks and escape hatches
    "check_teacher": True,  # refuse a teacher whose accuracy is near chance
    "overrides": None,  # list of "key=value" recipe overrides, as with the CLI's --set
}


@dataclass
class Result:
    """A finished ``normkd.distill`` run: the deployable student and its metrics."""

    student: nn.Module = field(repr=False)  # plain architecture; FT merged in for NORM; eval mode
    best_top1: float
    best_epoch: int
    final_top1: float
    final_top5: float
    run_dir: Path
    evaluated_on: str  # "val", or "train" when no val_data was given
    merged_top1: float | None = None
    merge_max_logit_diff: float | None = None
    seconds: float = 0.0
    history: list[dict[str, Any]] = field(default_factory=list, repr=False)
    recipe: Recipe | None = field(default=None, repr=False)
    run: RunResult | None = field(default=None, repr=False)


class _Batches:
    """A user loader seen as the engine's: ``(x, y, idx)`` batches, one length, set_epoch."""

    def __init__(self, loader: Any, has_idx: bool, labels: torch.Tensor | None) -> None:
        self.loader = loader
        self.has_idx = has_idx
        self.y = labels  # read by CRD for class-aware negatives (None: not known)
        dataset = getattr(loader, "dataset", None)
        self.dataset_size = len(dataset) if _sized(dataset) else None

    def __len__(self) -> int:
        return len(self.loader)

    def set_epoch(self, epoch: int) -> None:
        sampler = getattr(self.loader, "sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        seen = 0
        for batch in self.loader:
            x, y = batch[0], torch.as_tensor(batch[1]).long()
            idx = batch[2] if self.has_idx else torch.arange(seen, seen + len(y))
            seen += len(y)
            yield x, y, torch.as_tensor(idx).long()


def _sized(obj: Any) -> bool:
    try:
        len(obj)
    except TypeError:
        return False
    return True


def _labels_of(dataset: Any) -> torch.Tensor | None:
    """The dataset's labels in index order, when it exposes them (ImageFolder, TensorDataset)."""
    for ds in (dataset, getattr(dataset, "base", None)):
        targets = getattr(ds, "targets", None)
        if targets is not None:
            return torch.as_tensor(targets).long()
        tensors = getattr(ds, "tensors", None)
        if isinstance(tensors, tuple) and len(tensors) >= 2:
            return tensors[1].long()
    return None


def _as_loader(data: Any, what: str, batch_size: int, workers: int, train: bool) -> Any:
    """A Dataset becomes a DataLoader (items gain their index); a loader is used as it is."""
    if isinstance(data, Dataset) and not isinstance(data, IterableDataset) and _sized(data):
        if len(data) == 0:
            raise UserError(f"{what} is an empty Dataset")
        item = data[0]
        if isinstance(item, tuple | list) and len(item) == 2:
            data = IndexedDataset(data)
        return DataLoader(
            data,
            batch_size=batch_size,
            shuffle=train,  # order drawn from the global RNG, which the engine seeds per epoch
            drop_last=train and len(data) > batch_size,
            num_workers=workers,
            persistent_workers=workers > 0,
            pin_memory=torch.cuda.is_available(),
        )
    if isinstance(data, Dataset | str | bytes | dict) or not _sized(data):
        raise UserError(
            f"{what} must be a torch DataLoader (or a map-style Dataset) yielding (x, y) or "
            f"(x, y, idx) batches; got {type(data).__name__}"
            + ("" if _sized(data) else " (it has no length: pass a DataLoader)")
        )
    return data


def _first_batch(loader: Any, what: str) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """(x, y, has_idx) of the loader's first batch, or an error saying what is wrong with it."""
    if len(loader) == 0:
        raise UserError(f"{what} is empty: it yields no batches")
    try:
        batch = next(iter(loader))
    except StopIteration:
        raise UserError(f"{what} is empty: it yields no batches") from None
    expect = (
        f"{what} must yield (x, y) or (x, y, idx) batches: x a float tensor (B, C, H, W), "
        "y integer class labels (B,)"
    )
    if not isinstance(batch, tuple | list) or len(batch) not in (2, 3):
        got = f"a {len(batch)}-tuple" if isinstance(batch, tuple | list) else type(batch).__name__
        raise UserError(f"{expect}; got {got}")
    x, y = batch[0], batch[1]
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or not x.is_floating_point():
        desc = f"{x.dtype} {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
        raise UserError(f"{expect}; got x = {desc}")
    y = torch.as_tensor(y) if not isinstance(y, torch.Tensor) else y
    if y.dim() != 1 or len(y) != len(x) or y.is_floating_point() or y.dtype == torch.bool:
        raise UserError(f"{expect}; got y = {y.dtype} {tuple(y.shape)} for {len(x)} images")
    if len(batch) == 3:
        idx = torch.as_tensor(batch[2])
        if idx.dim() != 1 or len(idx) != len(x) or idx.is_floating_point():
            raise UserError(f"{expect}; got idx = {idx.dtype} {tuple(idx.shape)}")
    return x, y.long(), len(batch) == 3


def method_loss(method: str, options: dict[str, Any], epochs: int) -> list[dict[str, Any]]:
    """``"norm+kd"``-style method -> the recipe's loss list (CE first, then each named term)."""
    o = {**OPTIONS, **options}
    tokens = [t for t in re.split(r"[+_ ]+", str(method).strip().lower()) if t]
    valid = "'vanilla' or terms joined with '+' from " + ", ".join(TERMS)
    if tokens == ["vanilla"] or tokens == ["ce"]:
        tokens = []
    elif not tokens or any(t not in TERMS for t in tokens):
        bad = [t for t in tokens if t not in TERMS]
        raise UserError(
            f"unknown method {method!r}"
            + (f" (unknown: {', '.join(bad)})" if bad else "")
            + f"; use {valid} (e.g. {', '.join(repr(m) for m in METHODS[:6])})"
        )
    if len(set(tokens)) != len(tokens):
        raise UserError(f"method {method!r} names a term twice")
    warmup = o["dkd_warmup"]
    if warmup is None:
        warmup = min(20, max(1, round(epochs / 12)))
    term = {
        "kd": {"kind": "kd", "weight": o["kd_weight"], "temperature": o["temperature"]},
        "norm": {"kind": "norm", "weight": o["norm_weight"], "n": o["n"], "ramp": o["norm_ramp"]},
        "dkd": {
            "kind": "dkd",
            "alpha": o["dkd_alpha"],
            "beta": o["dkd_beta"],
            "temperature": o["temperature"],
            "warmup": warmup,
        },
        "crd": {"kind": "crd", "weight": o["crd_weight"]},
        "fitnet": {"kind": "fitnet", "weight": o["fitnet_weight"]},
        "at": {"kind": "at", "weight": o["at_weight"]},
    }
    return [{"kind": "ce", "weight": o["ce_weight"]}] + [term[t] for t in tokens]


def _logits(model: nn.Module, role: str, x: torch.Tensor) -> torch.Tensor:
    name = type(model).__name__
    try:
        out = model(x)
    except Exception as err:  # the user's model on the user's data: say which and what shape
        raise UserError(
            f"{role} {name} failed on a batch of shape {tuple(x.shape)}: "
            f"{type(err).__name__}: {err}"
        ) from None
    if not isinstance(out, torch.Tensor) or out.dim() != 2:
        desc = f"shape {tuple(out.shape)}" if isinstance(out, torch.Tensor) else type(out).__name__
        raise UserError(f"{role} {name} must return logits (batch, classes); got {desc}")
    return out


@torch.no_grad()
def _teacher_accuracy(teacher: nn.Module, loader: Any, device: torch.device) -> tuple[float, int]:
    """Top-1 (%) of the teacher on the first batches of ``loader`` (about 256 images)."""
    n = correct = 0
    for batch in loader:
        x, y = batch[0].to(device), torch.as_tensor(batch[1]).long().to(device)
        correct += int((teacher(x).argmax(1) == y).sum())
        n += len(y)
        if n >= 256:
            break
    return 100.0 * correct / max(n, 1), n


def _check_models(
    teacher: nn.Module | None, student: nn.Module, x: torch.Tensor, y: torch.Tensor
) -> int:
    """Both models take ``x``, predict the same number of classes, and have findable taps."""
    roles = [("student", student)] + ([("teacher", teacher)] if teacher is not None else [])
    widths = {}
    with torch.no_grad():
        for role, model in roles:
            was = model.training
            model.eval()
            try:
                widths[role] = _logits(model, role, x).shape[1]
            finally:
                model.train(was)
    k = widths["student"]
    if teacher is not None and widths["teacher"] != k:
        raise UserError(
            f"teacher {type(teacher).__name__} predicts {widths['teacher']} classes but student "
            f"{type(student).__name__} predicts {k}: build both with the same number of classes "
            f"(e.g. num_classes={widths['teacher']})"
        )
    if int(y.max()) >= k or int(y.min()) < 0:
        raise UserError(
            f"train_data labels run from {int(y.min())} to {int(y.max())}, but the models predict "
            f"{k} classes (labels must lie in 0..{k - 1})"
        )
    for role, model in roles:
        try:
            get_taps(model, x[:2])
        except ValueError as err:
            raise UserError(
                f"{role} {type(model).__name__} is not a CNN classifier normkd can distil: {err}"
            ) from None
    return k


def distill(
    teacher: nn.Module | None,
    student: nn.Module,
    train_data: Any,
    val_data: Any = None,
    method: str = "norm+kd",
    epochs: int = 10,
    **options: Any,
) -> Result:
    """Distil ``teacher`` into ``student`` on your data; returns the deployable student + metrics.

    ``method``: 'vanilla', 'kd', 'norm', 'norm+kd' (default), 'dkd', 'norm+dkd', 'crd',
    'norm+crd', ... (any of kd, norm, dkd, crd, fitnet, at joined with '+'; CE is always on).
    ``options``: see :data:`OPTIONS` (e.g. n=8, kd_weight, temperature, norm_weight, lr,
    batch_size, out_dir, run_name, device, amp, resume, overwrite, quiet, seed,
    check_teacher=False). The run directory is ``out_dir/run_name`` as for the CLI.

    ``student`` is copied, never changed; the teacher is frozen (requires_grad off, eval mode)
    and moved to the run's device. Raises :class:`normkd.errors.UserError` for bad input.
    """
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise UserError(
            f"unknown option(s) {', '.join(unknown)}; valid options: {', '.join(OPTIONS)}"
        )
    o = {**OPTIONS, **options}
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise UserError(
            "normkd.distill runs in one process; for several GPUs use the CLI under torchrun"
        )
    loss = copy.deepcopy(o["loss"]) if o["loss"] is not None else method_loss(method, o, epochs)
    kinds = {t.get("kind") for t in loss if isinstance(t, dict)}
    needs_teacher = bool(kinds - {"ce"})
    if not isinstance(student, nn.Module):
        raise UserError(f"student must be a torch nn.Module, got {type(student).__name__}")
    if needs_teacher and not isinstance(teacher, nn.Module):
        raise UserError(
            f"method {method!r} needs a teacher nn.Module, got {type(teacher).__name__}"
        )
    if not needs_teacher:
        teacher = None

    train = _as_loader(train_data, "train_data", o["batch_size"], o["workers"], train=True)
    val = (
        None
        if val_data is None
        else _as_loader(val_data, "val_data", o["batch_size"], o["workers"], train=False)
    )
    x, y, has_idx = _first_batch(train, "train_data")
    val_idx = False
    if val is not None:
        vx, _vy, val_idx = _first_batch(val, "val_data")
        if tuple(vx.shape[1:]) != tuple(x.shape[1:]):
            raise UserError(
                f"val_data images are {tuple(vx.shape[1:])} but train_data images are "
                f"{tuple(x.shape[1:])}: use the same size"
            )

    labels = _labels_of(getattr(train, "dataset", None))
    if "crd" in kinds:
        if not has_idx:
            raise UserError(
                "CRD needs each sample's index (its memory bank has one slot per training "
                "image), but train_data yields only (x, y): pass a Dataset (normkd adds the "
                "indices) or a DataLoader yielding (x, y, idx) with idx the sample's index in "
                "its dataset"
            )
        if not _sized(getattr(train, "dataset", None)):
            raise UserError("CRD needs train_data.dataset with a length (the memory bank size)")
        crd = next(t for t in loss if t.get("kind") == "crd")
        if labels is None and "negatives" not in crd:
            crd["negatives"] = "any"  # class-aware negatives need labels we cannot read here
            if not o["quiet"]:
                print("note: CRD draws negatives from any class (train_data exposes no labels)")

    device = resolve_device(o["device"])
    student = copy.deepcopy(student).to(device)
    if teacher is not None:
        teacher = teacher.to(device)
    x, y = x.to(device), y.to(device)
    num_classes = _check_models(teacher, student, x, y)
    if teacher is not None and o["check_teacher"]:
        teacher.eval()
        source = val if val is not None else train
        acc, n = _teacher_accuracy(teacher, source, device)
        chance = 100.0 / num_classes
        if acc <= 1.5 * chance:
            raise UserError(
                f"teacher {type(teacher).__name__} gets {acc:.1f}% top-1 on {n} "
                f"{'val_data' if val is not None else 'train_data'} images, about chance "
                f"({chance:.1f}% for {num_classes} classes): it looks untrained. Train it (or "
                "load its weights) first, or pass check_teacher=False to distil from it anyway"
            )

    slug = "_".join(sorted(kinds - {"ce"}, key=lambda k: (k != "norm", k))) or "vanilla"
    name = o["run_name"] or f"distill_{slug}"
    recipe_dict: dict[str, Any] = {
        "name": name,
        "task": "distill" if teacher is not None else "train",
        "data": {
            "kind": "external",
            "batch_size": int(getattr(train, "batch_size", None) or o["batch_size"]),
            "workers": int(getattr(train, "num_workers", o["workers"])),
        },
        "teacher": {"model": "external"} if teacher is not None else None,
        "student": {"model": "external"},
        "loss": loss,
        "optim": {
            "epochs": epochs,
            "lr": o["lr"],
            "momentum": o["momentum"],
            "weight_decay": o["weight_decay"],
            "schedule": o["schedule"],
            "milestones": [],
            "warmup_epochs": o["warmup_epochs"],
        },
        "engine": {
            "device": o["device"],
            "amp": o["amp"],
            "seed": o["seed"],
            "out_dir": str(o["out_dir"]),
            "run_name": o["run_name"],
            "quiet": o["quiet"],
            "eval_every": o["eval_every"],
            "channels_last": o["channels_last"],
            "compile": o["compile"],
        },
    }
    if teacher is None:
        del recipe_dict["teacher"]
    recipe_dict = apply_overrides(recipe_dict, list(o["overrides"] or []))
    recipe = recipe_from_dict(recipe_dict, "normkd.distill options")

    if val is None and not o["quiet"]:
        print("note: no val_data: accuracy is measured on train_data")
    info = {
        "source": "python",
        "train": type(getattr(train, "dataset", train)).__name__,
        "n_train": len(train.dataset) if _sized(getattr(train, "dataset", None)) else None,
        "evaluated_on": "val" if val is not None else "train",
        "teacher": type(teacher).__name__ if teacher is not None else None,
        "student": type(student).__name__,
    }
    test_loader = val if val is not None else train
    test_has_idx = val_idx if val is not None else has_idx
    data = Data(
        train=_Batches(train, has_idx, labels),
        test=_Batches(test_loader, test_has_idx, None),
        num_classes=num_classes,
        in_shape=tuple(int(s) for s in x.shape[1:]),  # type: ignore[arg-type]
        info=info,
    )
    run = fit(
        recipe,
        resume=bool(o["resume"]),
        overwrite=bool(o["overwrite"]),
        prebuilt=Prebuilt(data=data, student=student, teacher=teacher),
    )
    # The run's model.safetensors is the deployable student (FT merged for NORM): load it into
    # our trained copy, whose architecture it has, so the returned model is exactly the file.
    load_weights(student, Path(run.run_dir) / "model.safetensors")
    return Result(
        student=student.eval(),
        best_top1=run.best_top1,
        best_epoch=run.best_epoch,
        final_top1=run.final_top1,
        final_top5=run.final_top5,
        run_dir=Path(run.run_dir),
        evaluated_on=info["evaluated_on"],
        merged_top1=run.merged_top1,
        merge_max_logit_diff=run.merge_max_logit_diff,
        seconds=run.seconds,
        history=run.history,
        recipe=recipe,
        run=run,
    )
