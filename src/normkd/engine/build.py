"""Recipe -> device, data loaders, models and distiller: the one place a job is assembled."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from normkd.config import ModelCfg, Recipe
from normkd.distiller import Distiller
from normkd.errors import ConfigError, DataError, UserError
from normkd.losses import (
    TAP_KINDS,
    ATLoss,
    CELoss,
    CRDLoss,
    DKDLoss,
    FitNetLoss,
    KDLoss,
    LossTerm,
    NORMLoss,
    TapShapes,
)
from normkd.losses.at import ATTerm
from normkd.losses.ce import CETerm
from normkd.losses.crd import CRDTerm
from normkd.losses.dkd import DKDTerm
from normkd.losses.fitnet import FitNetTerm
from normkd.losses.kd import KDTerm
from normkd.losses.norm import NormTerm
from normkd.models import TapSpec, create_model, get_taps
from normkd.models.taps import collect_taps
from normkd.norm import FTStudent, attach_ft


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
    if cfg.batch_size % world_size:
        raise ConfigError(
            f"data.batch_size is the global batch ({cfg.batch_size}); it must be divisible by the "
            f"number of processes ({world_size})"
        )
    batch_size = cfg.batch_size // world_size  # per process
    fake = False
    if cfg.kind == "imagenet":
        if cfg.root is None and not dry_run:
            raise ConfigError("data.root: set it to the ImageNet folder holding train/ and val/")
        try:
            if cfg.root is None:
                raise DataError("no data.root")
            train, test, num_classes = imagenet_loaders(
                cfg.root,
                batch_size,
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
    elif cfg.kind == "folder":
        from normkd.data.folder import LAYOUT, folder_loaders

        if cfg.root is None and not dry_run:
            raise ConfigError(f"data.root: set it to your image folder ({LAYOUT})")
        try:
            if cfg.root is None:
                raise DataError("no data.root")
            train, test, num_classes, info = folder_loaders(
                cfg.root,
                batch_size,
                cfg.workers,
                eval_batch_size=cfg.eval_batch_size,
                image_size=cfg.image_size,
                val_fraction=cfg.val_fraction,
                split_seed=cfg.split_seed,
                augment=cfg.augment,
                distributed=world_size > 1,
                seed=seed,
            )
            return Data(train, test, num_classes, (3, cfg.image_size, cfg.image_size), info)
        except DataError:
            if not dry_run:
                raise
        split = fake_split(10, cfg.image_size, cfg.batch_size * 2, cfg.batch_size, seed)
        fake, augment = True, None
    elif cfg.kind == "external":
        raise ConfigError(
            "data.kind 'external': this run's loaders were passed from Python (normkd.distill), "
            "so there is no data for the CLI to build; evaluate it from Python, or write a recipe "
            "with data.kind folder/cifar100/imagenet"
        )
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
        batch_size,
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


SIZED_TERMS = (FitNetTerm, CRDTerm)  # terms that own modules sized from the taps and the data


@dataclass(frozen=True)
class TermContext:
    """What terms owning modules or memory banks need at construction, measured by the builder."""

    student: TapShapes  # the student as trained (its pooled tap after FT)
    teacher: TapShapes | None
    dataset_size: int
    train_labels: torch.Tensor | None = None


def build_terms(
    recipe: Recipe, ctx: TermContext | None = None
) -> tuple[dict[str, LossTerm], dict[str, float]]:
    """Recipe loss list -> term modules and their weights (FitNet and CRD need ``ctx``)."""
    terms: dict[str, LossTerm] = {}
    weights: dict[str, float] = {}
    for t in recipe.loss:
        if isinstance(t, CETerm):
            term: LossTerm = CELoss(t.label_smoothing)
        elif isinstance(t, KDTerm):
            term = KDLoss(t.temperature)
        elif isinstance(t, NormTerm):
            inner = None
            if t.stages == "all":
                s, te = _shapes(ctx, t.kind)
                pairs = list(zip(s.stages[-2::-1], te.stages[-2::-1]))
                _check_norm_stage_ratios(pairs, recipe)
                inner = [(ss[0], ts[0]) for ss, ts in pairs]
            term = NORMLoss(t.n, t.reduce, t.ramp, recipe.optim.epochs, inner=inner)
        elif isinstance(t, ATTerm):
            term = ATLoss(t.p)
        elif isinstance(t, DKDTerm):
            term = DKDLoss(t.alpha, t.beta, t.temperature, t.warmup)
        elif isinstance(t, FitNetTerm):
            s, te = _shapes(ctx, t.kind)
            ti = t.stage if t.teacher_stage is None else t.teacher_stage
            s_shape = _stage(s, t.stage, f"loss fitnet: stage of student {recipe.student.model}")
            t_shape = _stage(te, ti, f"loss fitnet: teacher_stage of teacher {_teacher(recipe)}")
            try:
                term = FitNetLoss(s_shape, t_shape, t.stage, ti)
            except ValueError as err:
                raise ConfigError(f"loss fitnet: {err}") from None
        elif isinstance(t, CRDTerm):
            s, te = _shapes(ctx, t.kind)
            assert ctx is not None
            labels = ctx.train_labels if t.negatives == "other_classes" else None
            if t.negatives == "other_classes" and labels is None:
                raise ConfigError(
                    "loss crd: negatives 'other_classes' needs the training labels, which this "
                    "data source does not expose; set negatives: any"
                )
            term = CRDLoss(
                s.pooled[0],
                te.pooled[0],
                ctx.dataset_size,
                t.feat_dim,
                t.nce_k,
                t.nce_t,
                t.nce_m,
                labels=labels,
            )
        else:  # pragma: no cover - config validation prevents this
            raise ConfigError(f"unsupported loss term {t!r}")
        terms[t.kind] = term
        weights[t.kind] = t.weight
    return terms, weights


def _teacher(recipe: Recipe) -> str:
    return recipe.teacher.model if recipe.teacher is not None else "?"


def _check_norm_stage_ratios(
    pairs: list[tuple[tuple[int, ...], tuple[int, ...]]], recipe: Recipe
) -> None:
    """``stages: all`` pools the larger map of each pair by an integer ratio; refuse others."""
    for depth, (ss, ts) in enumerate(pairs, start=1):
        big, small = (ss, ts) if ss[1] >= ts[1] else (ts, ss)
        if big[1] % small[1] or big[2] % small[2] or (ss[1] - ts[1]) * (ss[2] - ts[2]) < 0:
            raise ConfigError(
                f"loss norm: stages 'all': inner stage {depth} (from the end) of student "
                f"{recipe.student.model} is {ss[1]}x{ss[2]} and of teacher {_teacher(recipe)} "
                f"{ts[1]}x{ts[2]}: no integer size ratio; use stages: last"
            )


def _shapes(ctx: TermContext | None, kind: str) -> tuple[TapShapes, TapShapes]:
    """Student and teacher tap shapes, or a clear error for a builder that did not measure them."""
    if ctx is None or ctx.teacher is None:
        raise ValueError(
            f"loss term {kind!r} sizes its modules from the models' tap shapes: "
            "pass a TermContext (build_distiller does, given the data)"
        )
    return ctx.student, ctx.teacher


def _stage(shapes: TapShapes, i: int, what: str) -> tuple[int, ...]:
    n = len(shapes.stages)
    if not -n <= i < n:
        raise ConfigError(f"{what}: index {i} is out of range; valid: {-n}..{n - 1} ({n} stages)")
    return shapes.stages[i]


@torch.no_grad()
def tap_shapes(model: nn.Module, example: torch.Tensor) -> TapShapes:
    """Shapes of every tap of ``model`` (an FT student: its pooled tap after FT), eval mode."""
    plain = model.student if isinstance(model, FTStudent) else model
    was = model.training
    model.eval()
    try:
        with collect_taps(plain, get_taps(plain), frozenset(TAP_KINDS)) as taps:
            model(example)
    finally:
        model.train(was)
    return TapShapes.of(taps)


def term_context(student: nn.Module, teacher: nn.Module | None, data: Data) -> TermContext:
    """Measure tap shapes on a zero batch and read the training set's size and labels."""
    param = next(student.parameters())
    example = torch.zeros(2, *data.in_shape, device=param.device, dtype=param.dtype)
    train = data.train
    size = getattr(train, "dataset_size", None) or len(train.dataset)
    labels = getattr(train, "y", None)  # DeviceLoader
    if labels is None:  # DataLoader over IndexedDataset(ImageFolder)
        targets = getattr(getattr(getattr(train, "dataset", None), "base", None), "targets", None)
        labels = torch.as_tensor(targets) if targets is not None else None
    return TermContext(
        student=tap_shapes(student, example),
        teacher=tap_shapes(teacher, example) if teacher is not None else None,
        dataset_size=int(size),
        train_labels=labels.cpu() if labels is not None else None,
    )


def build_models(
    recipe: Recipe, num_classes: int, in_shape: tuple[int, int, int], allow_untrained: bool = False
) -> tuple[nn.Module, nn.Module | None, nn.Module]:
    """(student as trained — with FT for NORM —, teacher or None, plain student)."""
    teacher = None
    if recipe.teacher is not None:
        if recipe.teacher.weights is None and not allow_untrained:
            raise ConfigError(
                "teacher.weights: distillation needs a trained teacher; set it to a local "
                "checkpoint (normkd train writes RUN_DIR/model.safetensors)"
            )
        weights = recipe.teacher.weights
        if allow_untrained and weights is not None and not Path(weights).is_file():
            print(
                f"note: teacher weights {weights} not found; continuing with a random teacher (nothing is trained here)"
            )
            weights = None
        teacher = _create("teacher", recipe.teacher.model, num_classes, recipe.teacher.kwargs)
        if weights is not None:
            _load("teacher", teacher, weights)
    plain = _create("student", recipe.student.model, num_classes, recipe.student.kwargs)
    if recipe.student.weights is not None:
        _load("student", plain, recipe.student.weights)
    return prepare_student(recipe, plain, teacher, in_shape), teacher, plain


@dataclass
class Prebuilt:
    """Data and models made outside the recipe (``normkd.distill``): ``fit`` trains these.

    ``student`` is the plain student (FT is attached by ``fit`` when the recipe uses NORM);
    ``data`` loaders yield ``(x, y, idx)``.
    """

    data: Data
    student: nn.Module
    teacher: nn.Module | None = None


def _display(cfg: ModelCfg | None, model: nn.Module | None) -> str:
    """The recipe's model name, or the class name for an object passed from Python."""
    if cfg is None or cfg.model == "external":
        return type(model).__name__
    return cfg.model


def _example(model: nn.Module, in_shape: tuple[int, ...]) -> torch.Tensor:
    """A zero batch of two inputs of the data's shape, on the model's device."""
    param = next(model.parameters(), None)
    return torch.zeros(2, *in_shape, device=param.device if param is not None else None)


def _spec(role: str, name: str, model: nn.Module, in_shape: tuple[int, ...]) -> TapSpec:
    """get_taps on an example of the data's shape, errors naming the role and the model."""
    try:
        return get_taps(model, _example(model, in_shape))
    except ValueError as err:
        raise ConfigError(f"{role} {name}: {err}") from None


def prepare_student(
    recipe: Recipe, plain: nn.Module, teacher: nn.Module | None, in_shape: tuple[int, int, int]
) -> nn.Module:
    """The student as trained: ``plain``, with FT attached when the recipe uses NORM.

    Both models' taps are found (and cached) on inputs of the data's shape first, so a model
    that is no CNN classifier is reported here, by role and name.
    """
    s_name = _display(recipe.student, plain)
    t_name = _display(recipe.teacher, teacher)
    s_spec = _spec("student", s_name, plain, in_shape)
    t_spec = _spec("teacher", t_name, teacher, in_shape) if teacher is not None else None
    norm = recipe.norm
    if norm is None:
        return plain
    assert teacher is not None and t_spec is not None
    example = _example(plain, in_shape)
    with torch.no_grad():
        t_hw = _feat_hw(teacher, t_spec.feat, _example(teacher, in_shape))
        s_hw = _feat_hw(plain, s_spec.feat, example)
    big, small = (t_hw, s_hw) if t_hw[0] >= s_hw[0] else (s_hw, t_hw)
    if big[0] % small[0] or big[1] % small[1]:
        raise ConfigError(
            f"teacher {t_name} last map is {t_hw[0]}x{t_hw[1]} and student "
            f"{s_name} last map is {s_hw[0]}x{s_hw[1]} for "
            f"{in_shape[1]}x{in_shape[2]} inputs: NORM needs an integer size ratio"
        )
    try:
        return attach_ft(
            plain, t_spec.feat_channels, norm.n, bn=norm.bn, residual=norm.residual, example=example
        )
    except ValueError as err:
        raise ConfigError(f"student {s_name} cannot take NORM's FT: {err}") from None


def _create(role: str, name: str, num_classes: int, kwargs: dict[str, Any]) -> nn.Module:
    """create_model, with constructor keywords that do not fit reported as a recipe error."""
    try:
        return create_model(name, num_classes=num_classes, **kwargs)
    except UserError:
        raise
    except (TypeError, ValueError) as err:  # a keyword the constructor refuses
        raise ConfigError(f"{role}.kwargs {kwargs} do not fit model {name!r}: {err}") from None


def _load(role: str, model: nn.Module, weights: str | Path) -> None:
    """load_weights, with errors saying which recipe key named the file."""
    from normkd.models import load_weights
    from normkd.models.weights import CheckpointError

    try:
        load_weights(model, weights)
    except CheckpointError as err:
        raise CheckpointError(f"{role}.weights: {err}") from None


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


def build_distiller(
    recipe: Recipe, student: nn.Module, teacher: nn.Module | None, data: Data | None = None
) -> Distiller:
    """Terms (sized from ``data`` and the models when a term owns modules) + models -> Distiller."""
    sized = any(
        isinstance(t, SIZED_TERMS) or (isinstance(t, NormTerm) and t.stages == "all")
        for t in recipe.loss
    )
    ctx = term_context(student, teacher, data) if sized and data is not None else None
    terms, weights = build_terms(recipe, ctx)
    scale = recipe.logit_standardization.scale if recipe.logit_standardization.enabled else None
    return Distiller(student, terms, weights, teacher=teacher, logit_scale=scale)


def build_optimizer(recipe: Recipe, module: nn.Module) -> torch.optim.SGD:
    """SGD over the trainable parameters of ``module`` (student, FT, term heads; never the teacher)."""
    o = recipe.optim
    return torch.optim.SGD(
        [p for p in module.parameters() if p.requires_grad],
        lr=o.lr,
        momentum=o.momentum,
        nesterov=o.nesterov,
        weight_decay=o.weight_decay,
    )
