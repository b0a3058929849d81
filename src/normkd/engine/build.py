"""Recipe -> device, data loaders, models and distiller: the one place a job is assembled."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from normkd.config import CETerm, KDTerm, NormTerm, Recipe
from normkd.distiller import Distiller
from normkd.errors import ConfigError, DataError
from normkd.losses import CELoss, KDLoss, LossTerm, NORMLoss
from normkd.models import create_model, get_taps
from normkd.norm import attach_ft


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when present; an explicit device that is absent is a user error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"engine.device: {name!r} requested but CUDA is not available here")
    if name == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("engine.device: 'mps' requested but MPS is not available here")
    return torch.device(name)


@dataclass
class Data:
    """Loaders yielding ``(x, y, idx)`` plus what the models need to know about the images."""

    train: Any
    test: Any
    num_classes: int
    in_shape: tuple[int, int, int]
    info: dict[str, Any] = field(default_factory=dict)
    fake: bool = False


def build_data(
    recipe: Recipe, device: torch.device, dry_run: bool = False, rank: int = 0, world_size: int = 1
) -> Data:
    """Build the loaders of ``recipe.data``; with ``dry_run`` a missing real folder gives fake data."""
    from normkd.data import (
        Augment,
        DeviceLoader,
        fake_split,
        imagenet_loaders,
        load_cifar100,
        load_digits_split,
    )

    cfg = recipe.data
    seed = recipe.engine.seed
    fake = False
    if cfg.kind == "imagenet":
        if cfg.root is None and not dry_run:
            raise ConfigError("data.root: set it to the ImageNet folder holding train/ and val/")
        try:
            if cfg.root is None:
                raise DataError("no data.root")
            train, test, num_classes = imagenet_loaders(
                cfg.root,
                cfg.batch_size,
                cfg.workers,
                eval_batch_size=cfg.eval_batch_size,
                distributed=world_size > 1,
                seed=seed,
            )
            return Data(train, test, num_classes, (3, 224, 224), {"source": "imagenet"})
        except DataError:
            if not dry_run:
                raise
        split = fake_split(1000, 224, cfg.batch_size * 2, cfg.batch_size, seed)
        fake, augment = True, None
    elif cfg.kind == "cifar100":
        if cfg.root is None and not dry_run:
            raise ConfigError(
                "data.root: set it to the folder holding cifar-100-python/ or cifar-100-binary/"
            )
        try:
            if cfg.root is None:
                raise DataError("no data.root")
            split = load_cifar100(cfg.root)
        except DataError:
            if not dry_run:
                raise
            split = fake_split(100, 32, cfg.batch_size * 2, cfg.batch_size, seed)
            fake = True
        augment = Augment(pad=4, flip=True) if cfg.augment else None
    else:
        split = load_digits_split(seed=cfg.split_seed, n_train=cfg.n_train)
        augment = Augment(pad=1, flip=False) if cfg.augment else None

    channels_last = recipe.engine.channels_last
    train = DeviceLoader(
        split.x_train,
        split.y_train,
        cfg.batch_size,
        device=device,
        mean=split.mean,
        std=split.std,
        shuffle=True,
        drop_last=False,
        augment=augment,
        seed=seed,
        rank=rank,
        world_size=world_size,
        channels_last=channels_last,
    )
    test = DeviceLoader(
        split.x_test,
        split.y_test,
        cfg.eval_batch_size,
        device=device,
        mean=split.mean,
        std=split.std,
        shuffle=False,
        drop_last=False,
        augment=None,
        seed=seed,
        channels_last=channels_last,
    )
    in_shape = tuple(split.x_train.shape[1:])
    return Data(train, test, split.num_classes, in_shape, dict(split.info), fake)  # type: ignore[arg-type]


def build_terms(recipe: Recipe) -> tuple[dict[str, LossTerm], dict[str, float]]:
    """Recipe loss list -> term modules and their weights."""
    terms: dict[str, LossTerm] = {}
    weights: dict[str, float] = {}
    for t in recipe.loss:
        if isinstance(t, CETerm):
            term: LossTerm = CELoss(t.label_smoothing)
        elif isinstance(t, KDTerm):
            term = KDLoss(t.temperature)
        elif isinstance(t, NormTerm):
            term = NORMLoss(t.n, t.reduce, t.ramp, recipe.optim.epochs)
        else:  # pragma: no cover - config validation prevents this
            raise ConfigError(f"unsupported loss term {t!r}")
        terms[t.kind] = term
        weights[t.kind] = t.weight
    return terms, weights


def build_models(
    recipe: Recipe, num_classes: int, in_shape: tuple[int, int, int], allow_untrained: bool = False
) -> tuple[nn.Module, nn.Module | None, nn.Module]:
    """(student as trained — with FT for NORM —, teacher or None, plain student)."""
    example = torch.zeros(2, *in_shape)
    teacher = None
    if recipe.teacher is not None:
        if recipe.teacher.weights is None and not allow_untrained:
            raise ConfigError(
                "teacher.weights: distillation needs a trained teacher; set it to a local "
                "checkpoint (normkd train writes RUN_DIR/model.safetensors)"
            )
        teacher = create_model(
            recipe.teacher.model,
            num_classes=num_classes,
            weights=recipe.teacher.weights,
            **recipe.teacher.kwargs,
        )
    plain = create_model(recipe.student.model, num_classes=num_classes, **recipe.student.kwargs)
    if recipe.student.weights is not None:
        from normkd.models import load_weights

        load_weights(plain, recipe.student.weights)
    student: nn.Module = plain
    norm = recipe.norm
    if norm is not None:
        assert teacher is not None
        t_spec = get_taps(teacher, example)
        s_spec = get_taps(plain, example)
        with torch.no_grad():
            t_hw = _feat_hw(teacher, t_spec.feat, example)
            s_hw = _feat_hw(plain, s_spec.feat, example)
        big, small = (t_hw, s_hw) if t_hw[0] >= s_hw[0] else (s_hw, t_hw)
        if big[0] % small[0] or big[1] % small[1]:
            raise ConfigError(
                f"teacher {recipe.teacher.model} last map is {t_hw[0]}x{t_hw[1]} and student "
                f"{recipe.student.model} last map is {s_hw[0]}x{s_hw[1]} for "
                f"{in_shape[1]}x{in_shape[2]} inputs: NORM needs an integer size ratio"
            )
        student = attach_ft(
            plain, t_spec.feat_channels, norm.n, bn=norm.bn, residual=norm.residual, example=example
        )
    return student, teacher, plain


def _feat_hw(model: nn.Module, feat: str, example: torch.Tensor) -> tuple[int, int]:
    from normkd.models import capture

    was = model.training
    model.eval()
    try:
        with capture(model, [feat]) as maps:
            model(example)
    finally:
        model.train(was)
    h, w = maps[feat].shape[-2:]
    return int(h), int(w)


def build_distiller(recipe: Recipe, student: nn.Module, teacher: nn.Module | None) -> Distiller:
    terms, weights = build_terms(recipe)
    scale = recipe.logit_standardization.scale if recipe.logit_standardization.enabled else None
    return Distiller(student, terms, weights, teacher=teacher, logit_scale=scale)
