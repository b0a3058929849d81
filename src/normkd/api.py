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
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, IterableDataset

from normkd import losses
from normkd.config import DataCfg, EngineCfg, OptimCfg, Recipe, apply_overrides, recipe_from_dict
from normkd.data.build import Data
from normkd.data.imagenet import IndexedDataset
from normkd.engine.loop import RunResult, run_recipe
from normkd.engine.runtime import resolve_device
from normkd.errors import UserError
from normkd.log import logger
from normkd.losses import TERMS
from normkd.models import eval_mode, get_taps

__all__ = ["METHODS", "OPTIONS", "Result", "distill", "export", "method_loss"]

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
    "lskd",
)  # the usual ones; any registered terms joined with '+' work

# Recipe fields distill() takes as plain options (defaults from normkd.config), by section.
SECTION_OPTIONS = {
    DataCfg: ("data", ("batch_size", "workers")),
    OptimCfg: (
        "optim",
        ("optimizer", "lr", "momentum", "weight_decay", "schedule", "warmup_epochs", "grad_clip"),
    ),
    EngineCfg: (
        "engine",
        ("device", "amp", "seed", "out_dir", "run_name", "quiet", "eval_every", "channels_last",
         "compile", "bn_recalibrate"),
    ),
}  # fmt: skip
# One option for a setting several terms share (None: each term's own default).
SHARED = {"temperature": ("temperature", None), "n": ("n", None)}
# Where distill() differs from a recipe: a short job on the caller's own data (cosine schedule
# to zero, no milestones, 2 loader workers, DKD / ReviewKD warm-up of epochs / 12 as mdistiller's
# 20 of 240).
OWN_DEFAULTS: dict[str, Any] = {
    "schedule": "cosine",
    "workers": 2,
    "dkd_warmup": None,
    "loss": None,  # a full loss list (recipe format) instead of the method's terms
    "resume": False,
    "overwrite": False,
    "check_teacher": True,  # refuse a teacher whose accuracy is near chance
    "overrides": None,  # list of "key=value" recipe overrides, as with the CLI's --set
}


def _options() -> dict[str, Any]:
    """Every option distill() takes, with its default: ``<kind>_<field>`` for each loss term's
    settings, the shared ones, the recipe fields above, and distill()'s own."""
    out: dict[str, Any] = {}
    for kind, cls in TERMS.items():
        for name, f in cls.model_fields.items():
            if name != "kind":
                out[f"{kind}_{name}"] = f.default
    out |= {k: default for k, (_field, default) in SHARED.items()}
    for cls, (_section, names) in SECTION_OPTIONS.items():
        out |= {n: cls.model_fields[n].default for n in names}
    return out | OWN_DEFAULTS


OPTIONS: dict[str, Any] = _options()


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

    @classmethod
    def of(cls, run: RunResult, recipe: Recipe, evaluated_on: str) -> Result:
        """The result of a completed run, its deployable model taken from memory."""
        assert run.model is not None  # the run completed its schedule
        return cls(
            student=run.model.eval(),
            best_top1=run.best_top1,
            best_epoch=run.best_epoch,
            final_top1=run.final_top1,
            final_top5=run.final_top5,
            run_dir=Path(run.run_dir),
            evaluated_on=evaluated_on,
            merged_top1=run.merged_top1,
            merge_max_logit_diff=run.merge_max_logit_diff,
            seconds=run.seconds,
            history=run.history,
            recipe=recipe,
            run=run,
        )

    def export(self, path: str | Path, input_shape: tuple[int, ...] | None = None) -> Path:
        """The deployable student as ONNX (see :func:`export`)."""
        return export(self, path, input_shape)


def export(
    source: Result | str | Path,
    path: str | Path,
    input_shape: tuple[int, ...] | None = None,
    force: bool = False,
) -> Path:
    """Write a deployable student to ONNX, checked against PyTorch with onnxruntime, with its
    input shape, normalisation and class names in the file's metadata. ``source``: a Result, a
    run directory or a model.safetensors; ``input_shape`` (C, H, W) defaults to the run's."""
    from normkd.config import MAX_IMAGE_SIZE
    from normkd.engine import deploy
    from normkd.engine.checkpoint import input_shape_ok, load_model_file

    if input_shape is not None and not input_shape_ok(list(input_shape)):
        raise UserError(
            f"input_shape must be (C, H, W), integers in 1..{MAX_IMAGE_SIZE}; got "
            f"{str(input_shape)[:80]}"
        )
    path = Path(path)
    if path.exists() and not force:
        raise UserError(f"{path} exists: pass force=True to replace it")
    if isinstance(source, Result):
        assert source.run is not None and source.run.model_meta is not None
        model, meta = source.student, source.run.model_meta
    else:
        file = Path(source)
        model, meta = load_model_file(file / "model.safetensors" if file.is_dir() else file)
    deploy.export(copy.deepcopy(model).cpu().eval(), meta, path, input_shape)
    return path


class _Batches:
    """A user loader seen as the engine's: ``(x, y, idx)`` batches, one length, set_epoch."""

    def __init__(self, loader: Any, has_idx: bool, what: str = "train_data") -> None:
        self.loader = loader
        self.has_idx = has_idx
        self.what = what
        self.classes: int | None = None  # set once the models' class count is known

    def __len__(self) -> int:
        return len(self.loader)

    def set_epoch(self, epoch: int) -> None:
        sampler = getattr(self.loader, "sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        seen = 0
        for i, batch in enumerate(self.loader):
            x, y = batch[0], torch.as_tensor(batch[1]).long()
            self._check_labels(y, i)
            idx = batch[2] if self.has_idx else torch.arange(seen, seen + len(y))
            seen += len(y)
            yield x, y, torch.as_tensor(idx).long()

    def _check_labels(self, y: torch.Tensor, i: int) -> None:
        """Labels outside 0..classes-1 in any batch (not only the first, checked up front) are a
        UserError naming the batch, not torch's IndexError from deep inside a loss."""
        k = self.classes
        if k is None or not y.numel():
            return
        low, high = int(y.min()), int(y.max())
        if low < 0 or high >= k:
            raise UserError(
                f"{self.what} batch {i}: labels run from {low} to {high}, but the models predict "
                f"{k} classes (labels must lie in 0..{k - 1})"
            )


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


def _method_kinds(method: str) -> list[str]:
    """:func:`normkd.losses.method_kinds` with a user error naming example methods."""
    try:
        return losses.method_kinds(method)
    except ValueError as err:
        raise UserError(f"{err} (e.g. {', '.join(repr(m) for m in METHODS[:6])})") from None


def method_loss(method: str, options: dict[str, Any], epochs: int) -> list[dict[str, Any]]:
    """The recipe's loss list for ``method``: CE first, then each named term, with the options
    the caller set (``<kind>_<field>``, or a shared one); the rest keep the terms' defaults."""
    o = {**OPTIONS, **options}
    terms = []
    for kind in ["ce", *_method_kinds(method)]:
        settings = TERMS[kind].model_fields
        term: dict[str, Any] = {"kind": kind}
        for option, (setting, _default) in SHARED.items():
            if setting in settings and o[option] is not None:
                term[setting] = o[option]
        for setting in settings:
            value = options.get(f"{kind}_{setting}")
            if setting != "kind" and value is not None:
                term[setting] = value
        terms.append(term)
    for term in terms:  # DKD, ReviewKD: their authors' 20 of 240 epochs, scaled to this run
        if "warmup" in TERMS[term["kind"]].model_fields and "warmup" not in term:
            term["warmup"] = min(20, max(1, round(epochs / 12)))
    return terms


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
            with eval_mode(model):
                widths[role] = _logits(model, role, x).shape[1]
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
    o = _checked_options(options)
    loss = (
        copy.deepcopy(o["loss"]) if o["loss"] is not None else method_loss(method, options, epochs)
    )
    kinds = {t.get("kind") for t in loss if isinstance(t, dict)}
    if not isinstance(student, nn.Module):
        raise UserError(f"student must be a torch nn.Module, got {type(student).__name__}")
    needs_teacher = any(TERMS[k].needs_teacher() for k in kinds if k in TERMS)
    if needs_teacher and not isinstance(teacher, nn.Module):
        raise UserError(
            f"method {method!r} needs a teacher nn.Module, got {type(teacher).__name__}"
        )
    teacher = teacher if needs_teacher else None
    train = _as_loader(train_data, "train_data", o["batch_size"], o["workers"], train=True)
    val = (
        None
        if val_data is None
        else _as_loader(val_data, "val_data", o["batch_size"], o["workers"], train=False)
    )
    x, y, has_idx = _first_batch(train, "train_data")
    val_idx = _check_val(val, x)
    labels = _labels_of(getattr(train, "dataset", None))
    if "crd" in kinds:
        _check_crd(loss, train, has_idx, labels, o["quiet"])
    device = resolve_device(o["device"])
    student = copy.deepcopy(student).to(device)
    if teacher is not None:
        teacher = teacher.to(device)
    num_classes = _check_models(teacher, student, x.to(device), y.to(device))
    if teacher is not None and o["check_teacher"]:
        _check_teacher_accuracy(
            teacher, val if val is not None else train, val is not None, device, num_classes
        )
    recipe = _recipe(o, loss, kinds, teacher is not None, epochs, train)
    if val is None and not o["quiet"]:
        logger.info("note: no val_data: accuracy is measured on train_data")
    data = _data(train, (val, val_idx) if val is not None else (train, has_idx), has_idx, x)
    data.num_classes, data.train_labels = num_classes, labels
    data.train.classes = data.test.classes = num_classes  # type: ignore[union-attr]
    data.info |= {"teacher": type(teacher).__name__ if teacher else None}
    data.info |= {"student": type(student).__name__}
    run = run_recipe(
        recipe,
        resume=bool(o["resume"]),
        overwrite=bool(o["overwrite"]),
        student=student,
        teacher=teacher,
        data=data,
    )
    return Result.of(run, recipe, data.info["evaluated_on"])


def _checked_options(options: dict[str, Any]) -> dict[str, Any]:
    """The caller's options over the defaults; unknown names and torchrun are refused."""
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise UserError(
            f"unknown option(s) {', '.join(unknown)}; valid options: {', '.join(OPTIONS)}"
        )
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise UserError(
            "normkd.distill runs in one process; for several GPUs use the CLI under torchrun"
        )
    return {**OPTIONS, **options}


def _check_val(val: Any, x: torch.Tensor) -> bool:
    """val_data's images must be train_data's size; returns whether it yields indices."""
    if val is None:
        return False
    vx, _vy, val_idx = _first_batch(val, "val_data")
    if tuple(vx.shape[1:]) != tuple(x.shape[1:]):
        raise UserError(
            f"val_data images are {tuple(vx.shape[1:])} but train_data images are "
            f"{tuple(x.shape[1:])}: use the same size"
        )
    return val_idx


def _check_crd(
    loss: list[dict[str, Any]], train: Any, has_idx: bool, labels: Any, quiet: bool
) -> None:
    """CRD's memory bank needs each sample's index and the dataset's size."""
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
        if not quiet:
            logger.info("note: CRD draws negatives from any class (train_data exposes no labels)")


def _check_teacher_accuracy(
    teacher: nn.Module, source: Any, is_val: bool, device: torch.device, num_classes: int
) -> None:
    """Refuse a teacher at about chance accuracy: it was most likely never trained."""
    with eval_mode(teacher):
        acc, n = _teacher_accuracy(teacher, source, device)
    chance = 100.0 / num_classes
    if acc <= 1.5 * chance:
        raise UserError(
            f"teacher {type(teacher).__name__} gets {acc:.1f}% top-1 on {n} "
            f"{'val_data' if is_val else 'train_data'} images, about chance "
            f"({chance:.1f}% for {num_classes} classes): it looks untrained. Train it (or "
            "load its weights) first, or pass check_teacher=False to distil from it anyway"
        )


def _recipe(
    o: dict[str, Any], loss: list[Any], kinds: set[Any], has_teacher: bool, epochs: int, train: Any
) -> Recipe:
    """The run's recipe: the options' sections, models passed as objects ("external")."""
    sections = {sec: {n: o[n] for n in names} for sec, names in SECTION_OPTIONS.values()}
    sections["data"] |= {
        "kind": "external",
        "batch_size": int(getattr(train, "batch_size", None) or o["batch_size"]),
        "workers": int(getattr(train, "num_workers", o["workers"])),
    }
    sections["optim"] |= {"epochs": epochs, "milestones": []}
    sections["engine"]["out_dir"] = str(o["out_dir"])
    slug = "_".join(sorted(kinds - {"ce"}, key=lambda k: (k != "norm", k))) or "vanilla"
    recipe: dict[str, Any] = {
        "name": o["run_name"] or f"distill_{slug}",
        "task": "distill" if has_teacher else "train",
        "student": {"model": "external"},
        "loss": loss,
        **sections,
    }
    if has_teacher:
        recipe["teacher"] = {"model": "external"}
    recipe = apply_overrides(recipe, list(o["overrides"] or []))
    return recipe_from_dict(recipe, "normkd.distill options")


def _data(train: Any, test: tuple[Any, bool], has_idx: bool, x: torch.Tensor) -> Data:
    """The engine's view of the caller's loaders (``test``: the loader and whether it yields
    indices; train_data when no val_data was given)."""
    dataset = getattr(train, "dataset", None)
    size = len(dataset) if _sized(dataset) else 0
    info = {
        "source": "python",
        "train": type(dataset if dataset is not None else train).__name__,
        "n_train": size or None,
        "evaluated_on": "train" if test[0] is train else "val",
    }
    in_shape = tuple(int(s) for s in x.shape[1:])
    what = "train_data" if test[0] is train else "val_data"
    batches = _Batches(train, has_idx), _Batches(*test, what=what)
    return Data(*batches, 0, in_shape, info, train_size=size)  # type: ignore[arg-type]
