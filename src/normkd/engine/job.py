"""Recipe (+ optional models and data from Python) -> Job: the one way a run is put together.

The CLI, ``normkd.distill``, the demo and every benchmark call :func:`assemble`. Order matters
for reproducibility: the seed is set, then data, teacher, student, FT and the terms' own modules
draw their initial weights, always in this order.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from normkd.config import ModelCfg, OptimCfg, Recipe
from normkd.data.build import Data, Place, build_data
from normkd.distiller import Distiller
from normkd.engine.runtime import Runtime
from normkd.engine.schedule import lr_at
from normkd.errors import ConfigError, UserError
from normkd.losses.base import BuildContext
from normkd.losses.norm import layer3_pair
from normkd.models import create_model, load_weights, probe
from normkd.models.weights import CheckpointError
from normkd.norm import attach_ft, attach_inner_ft, spatial_ratio

MAX_FT_PARAMS = 2**30  # 4 GiB of FT weights in float32: far beyond any sensible N


@dataclass
class Job:
    """Everything a run trains with. ``plain`` is the student's own architecture (deployed)."""

    recipe: Recipe
    runtime: Runtime
    data: Data
    plain: nn.Module
    distiller: Distiller  # student (+ FT for NORM), frozen teacher, weighted terms
    optimizer: torch.optim.Optimizer
    step_module: nn.Module  # what the step calls: the distiller, DDP- / compile-wrapped
    lr_scale: float = 1.0

    @property
    def student(self) -> nn.Module:
        """The student as trained (with FT for NORM)."""
        return self.distiller.student

    def lr(self, epoch: int, step: int, steps: int) -> float:
        """The schedule's lr for this step, times the linear scaling factor."""
        return lr_at(self.recipe.optim, epoch, step, steps) * self.lr_scale


def assemble(
    recipe: Recipe,
    runtime: Runtime,
    *,
    student: nn.Module | None = None,
    teacher: nn.Module | None = None,
    data: Data | None = None,
    dry_run: bool = False,
) -> Job:
    """Build the run of ``recipe``; ``student``/``teacher``/``data`` replace what it names."""
    torch.manual_seed(recipe.engine.seed)
    if data is None:
        place = Place(
            runtime.device,
            recipe.engine.seed,
            runtime.rank,
            runtime.world_size,
            recipe.engine.channels_last,
        )
        data = build_data(recipe.data, place, dry_run=dry_run)
    if teacher is None and recipe.teacher is not None:
        teacher = _teacher(recipe.teacher, data.num_classes, allow_untrained=dry_run)
    if student is None:
        student = _create("student", recipe.student, data.num_classes)
    names = (_name(recipe.student, student), _name(recipe.teacher, teacher))
    s_shapes = _probe("student", names[0], student, data.in_shape)
    t_shapes = _probe("teacher", names[1], teacher, data.in_shape) if teacher else None
    trained = _with_ft(recipe, student, t_shapes, s_shapes, names, data.in_shape)
    ctx = BuildContext(
        student=s_shapes,
        teacher=t_shapes,
        dataset_size=data.train_size,
        train_labels=data.train_labels,
        epochs=recipe.optim.epochs,
        student_name=names[0],
        teacher_name=names[1],
    )
    terms = {t.kind: t.build(ctx) for t in recipe.loss}
    weights = {t.kind: t.weight for t in recipe.loss}
    std = recipe.logit_standardization
    distiller = Distiller(
        trained, terms, weights, teacher=teacher, logit_scale=std.scale if std.enabled else None
    )
    step_module = runtime.prepare(distiller)
    scale = 1.0
    if recipe.optim.lr_scaling == "linear":
        scale = recipe.data.batch_size / recipe.optim.lr_reference_batch
    return Job(
        recipe, runtime, data, student, distiller, build_optimizer(recipe.optim, distiller),
        step_module, scale,
    )  # fmt: skip


def build_optimizer(cfg: OptimCfg, module: nn.Module) -> torch.optim.SGD:
    """SGD over the trainable parameters of ``module`` (student, FT, term heads; never the teacher)."""
    return torch.optim.SGD(
        [p for p in module.parameters() if p.requires_grad],
        lr=cfg.lr,
        momentum=cfg.momentum,
        nesterov=cfg.nesterov,
        weight_decay=cfg.weight_decay,
    )


def _name(cfg: ModelCfg | None, model: nn.Module | None) -> str:
    """The recipe's model name, or the class name for an object passed from Python."""
    if cfg is None or cfg.model == "external":
        return type(model).__name__
    return cfg.model


def _create(
    role: str, cfg: ModelCfg, num_classes: int, weights: Path | str | None = ""
) -> nn.Module:
    """create_model + local weights, errors naming the recipe key at fault."""
    try:
        model = create_model(cfg.model, num_classes=num_classes, **cfg.kwargs)
    except UserError:
        raise
    except (TypeError, ValueError) as err:  # a keyword the constructor refuses
        raise ConfigError(
            f"{role}.kwargs {cfg.kwargs} do not fit model {cfg.model!r}: {err}"
        ) from None
    path = cfg.weights if weights == "" else weights
    if path is not None:
        try:
            load_weights(model, path)
        except CheckpointError as err:
            raise CheckpointError(f"{role}.weights: {err}") from None
    return model


def _teacher(cfg: ModelCfg, num_classes: int, allow_untrained: bool) -> nn.Module:
    """The trained teacher; a dry run may go on with a random one (nothing is trained there)."""
    weights = cfg.weights
    if weights is None and not allow_untrained:
        raise ConfigError(
            "teacher.weights: distillation needs a trained teacher; set it to a local "
            "checkpoint (normkd train writes RUN_DIR/model.safetensors)"
        )
    if allow_untrained and weights is not None and not Path(weights).is_file():
        print(
            f"note: teacher weights {weights} not found; continuing with a random teacher "
            "(nothing is trained here)"
        )
        weights = None
    return _create("teacher", cfg, num_classes, weights)


def _probe(role: str, name: str, model: nn.Module, in_shape: tuple[int, ...]) -> Any:
    """Tap shapes of ``model`` on inputs of the data's shape (its taps found and cached first)."""
    try:
        return probe(model, in_shape)
    except ValueError as err:
        raise ConfigError(f"{role} {name}: {err}") from None


def _with_ft(
    recipe: Recipe,
    student: nn.Module,
    t_shapes: Any,
    s_shapes: Any,
    names: tuple[str, str],
    in_shape: tuple[int, ...],
) -> nn.Module:
    """The student as trained: with NORM's FT after its last map when the recipe uses NORM.

    ``stages: layer3`` also puts the authors' in-path inner FT after the student's stage before
    the last, sized to the teacher's stage of the same depth; it changes ``student`` in place, so
    the deployed student (and its parameter count) includes it.
    """
    norm = recipe.norm
    if norm is None:
        return student
    assert t_shapes is not None
    (s_hw, t_hw) = s_shapes.feat[1:], t_shapes.feat[1:]
    if spatial_ratio(s_hw, t_hw) is None:
        raise ConfigError(
            f"teacher {names[1]} last map is {t_hw[0]}x{t_hw[1]} and student {names[0]} last map "
            f"is {s_hw[0]}x{s_hw[1]} for {in_shape[1]}x{in_shape[2]} inputs: NORM needs an "
            "integer size ratio"
        )
    c_s, c_t = s_shapes.feat[0], t_shapes.feat[0]
    ft_params = 2 * c_s * norm.n * c_t
    if ft_params > MAX_FT_PARAMS:
        raise ConfigError(
            f"loss norm: n={norm.n} makes FT {ft_params:,} parameters ({ft_params * 4 / 2**30:,.0f} "
            f"GiB in float32) for student channels {c_s} and teacher channels {c_t}; use n <= "
            f"{MAX_FT_PARAMS // (2 * c_s * c_t):,} (the paper uses 4 to 8)"
        )
    param = next(student.parameters())
    example = torch.zeros(2, *in_shape, device=param.device)
    # Refused before the student is touched: the pair layer3 matches must exist and fit.
    inner = layer3_pair(s_shapes, t_shapes, names) if norm.stages == "layer3" else None
    try:
        s_ft = attach_ft(
            student, t_shapes.feat[0], norm.n, norm.bn, norm.residual, example, norm.init
        )
        if inner is not None:
            attach_inner_ft(s_ft, inner.t_channels, example, norm.init)
    except ValueError as err:
        raise ConfigError(f"student {names[0]} cannot take NORM's FT: {err}") from None
    return s_ft
