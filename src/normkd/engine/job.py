"""Recipe (+ optional models and data from Python) -> Job: the one way a run is put together.

The CLI, ``normkd.distill``, the demo and every benchmark call :func:`assemble`. Order matters
for reproducibility: the seed is set, then data, teacher, student, the terms' modules on the
student and the terms' own modules draw their initial weights, always in this order.
"""

from __future__ import annotations

import os
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
from normkd.log import logger
from normkd.losses.base import BuildContext
from normkd.models import create_model, probe
from normkd.models.external import pretrained_report
from normkd.models.weights import CheckpointError, fit_weights


@dataclass
class Job:
    """Everything a run trains with. ``plain`` is the student's own architecture (deployed)."""

    recipe: Recipe
    runtime: Runtime
    data: Data
    plain: nn.Module
    distiller: Distiller  # student (as its terms wrap it), frozen teacher, weighted terms
    optimizer: torch.optim.Optimizer
    step_module: nn.Module  # what the step calls: the distiller, DDP- / compile-wrapped
    lr_scale: float = 1.0

    @property
    def student(self) -> nn.Module:
        """The student as trained (wrapped by the terms that change it)."""
        return self.distiller.student

    @property
    def wrapped(self) -> bool:
        """Whether a term trains the student with its own modules in its path (then the model
        to deploy is the terms' :meth:`deployable`, not the trained student itself)."""
        return self.student is not self.plain

    def deployable(self) -> nn.Module:
        """The model to ship: each term's deploy of the trained student, last wrapper first."""
        model = self.student
        for term in reversed(self.recipe.loss):
            model = term.deploy(model)
        return model

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
            bool(runtime.channels_last),  # as resolved (auto: on under bf16 / fp16)
        )
        data = build_data(recipe.data, place, dry_run=dry_run)
    if teacher is None and recipe.teacher is not None:
        teacher = build_teacher(recipe.teacher, data.num_classes, allow_untrained=dry_run)
    if student is None:
        student = _create("student", recipe.student, data.num_classes)
    names = (_name(recipe.student, student), _name(recipe.teacher, teacher))
    s_shapes = _probe("student", names[0], student, data.in_shape)
    t_shapes = _probe("teacher", names[1], teacher, data.in_shape) if teacher else None
    ctx = BuildContext(
        student=s_shapes,
        teacher=t_shapes,
        dataset_size=data.train_size,
        train_labels=data.train_labels,
        epochs=recipe.optim.epochs,
        student_name=names[0],
        teacher_name=names[1],
        in_shape=data.in_shape,
        num_classes=data.num_classes,
    )
    trained = student  # each term may put its own modules in the student's path (before builds)
    for term in recipe.loss:
        trained = term.wrap_student(trained, ctx)
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


def build_optimizer(cfg: OptimCfg, module: nn.Module) -> torch.optim.Optimizer:
    """SGD or AdamW over the trainable parameters of ``module`` (student, the terms' modules on it
    and their heads; never the teacher).

    With ``weight_decay_norm_bias`` off, 1-D parameters (normalisation layers' scales and shifts)
    and biases form a second group without weight decay, as timm's ``param_groups_weight_decay``:
    decaying them pulls BatchNorm scales towards zero and helps no fit. Otherwise one group holds
    every parameter, as the authors' code (and checkpoints of earlier runs) have it.
    """
    decayed: list[nn.Parameter] = []
    exempt: list[nn.Parameter] = []
    for name, p in module.named_parameters():
        if p.requires_grad:
            free = not cfg.weight_decay_norm_bias and (p.ndim <= 1 or name.endswith(".bias"))
            (exempt if free else decayed).append(p)
    groups = [
        {"params": decayed, "weight_decay": cfg.weight_decay},
        {"params": exempt, "weight_decay": 0.0},
    ]
    groups = [g for g in groups if g["params"]]
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps)
    return torch.optim.SGD(
        groups,
        lr=cfg.lr,
        momentum=cfg.momentum,
        nesterov=cfg.nesterov,
    )


def _name(cfg: ModelCfg | None, model: nn.Module | None) -> str:
    """The recipe's model name, or the class name for an object passed from Python."""
    if cfg is None or cfg.model == "external":
        return type(model).__name__
    return cfg.model


def _create(
    role: str, cfg: ModelCfg, num_classes: int, weights: Path | str | None = ""
) -> nn.Module:
    """create_model + local weights (or timm's pretrained ones), errors naming the recipe key.

    A student may start from weights whose classifier has another class count (fine-tuning
    ImageNet weights on 10 classes): that classifier starts fresh and one line says so. A
    teacher's classifier must fit the data, since a fresh one would teach noise.
    """
    key, source = "weights", {}
    if cfg.pretrained_file is not None:
        key, source = "pretrained_file", {"pretrained_file": cfg.pretrained_file}
    elif cfg.pretrained:
        key, source = "pretrained", {"pretrained": True}
    try:
        model = create_model(cfg.model, num_classes=num_classes, **source, **cfg.kwargs)
    except CheckpointError as err:
        raise CheckpointError(f"{role}.{key}: {err}") from None
    except UserError:
        raise
    except (TypeError, ValueError) as err:  # a keyword the constructor refuses
        raise ConfigError(
            f"{role}.kwargs {cfg.kwargs} do not fit model {cfg.model!r}: {err}"
        ) from None
    except (MemoryError, RuntimeError) as err:  # kwargs sizing it beyond this machine's memory
        if not isinstance(err, MemoryError) and "allocate" not in str(err):
            raise
        raise ConfigError(
            f"{role}.kwargs {str(cfg.kwargs)[:200]} make model {cfg.model!r} larger than this "
            f"machine's memory ({' '.join(str(err).split())[:160]})"
        ) from None
    if source:
        tensors, theirs = pretrained_report(model, num_classes)
        _one_classifier(role, key, theirs, num_classes, f"timm loaded {tensors:,} tensors")
    path = cfg.weights if weights == "" else weights
    if path is not None:
        try:
            loaded = fit_weights(model, path, new_head=True)
        except CheckpointError as err:
            raise CheckpointError(f"{role}.weights: {err}") from None
        theirs = loaded.checkpoint_classes if loaded.head else None
        _one_classifier(role, key, theirs, num_classes, f"loaded {loaded.tensors:,} tensors")
    return model


def _one_classifier(role: str, key: str, theirs: int | None, num_classes: int, loaded: str) -> None:
    """Say that a student's classifier was replaced; refuse a teacher whose one would be."""
    if theirs is None:
        if key != "weights":  # pretrained weights are worth a line even when all of them fit
            _say(f"{role}.{key}: {loaded}")
        return
    if role == "teacher":
        raise CheckpointError(
            f"teacher.{key}: its classifier has {theirs} classes and the data {num_classes}: a "
            "teacher needs a classifier trained on these classes (train one with normkd train, "
            "starting from these weights, then distil from its model.safetensors)"
        )
    _say(
        f"{role}.{key}: {loaded}; kept a new classifier ({num_classes} classes) instead of the "
        f"checkpoint's {theirs}"
    )


def _say(line: str) -> None:
    """Print on the first process only (under torchrun every rank builds the same models)."""
    if int(os.environ.get("RANK", "0")) == 0:
        logger.info(line)


def build_teacher(cfg: ModelCfg, num_classes: int, allow_untrained: bool = False) -> nn.Module:
    """The trained teacher; a dry run may go on with a random one (nothing is trained there).

    timm's pretrained weights count as trained when their classifier fits the data's classes.
    ``normkd wkd-cost`` builds its teacher here too, so its errors are a run's.
    """
    weights = cfg.weights
    pretrained = cfg.pretrained or cfg.pretrained_file is not None
    if weights is None and not pretrained and not allow_untrained:
        raise ConfigError(
            "teacher.weights: distillation needs a trained teacher; set it to a local "
            "checkpoint (normkd train writes RUN_DIR/model.safetensors)"
        )
    if allow_untrained and weights is not None and not Path(weights).is_file():
        logger.info(
            f"note: teacher weights {weights} not found; continuing with a random teacher "
            "(nothing is trained here)"
        )
        weights = None
    return _create("teacher", cfg, num_classes, weights)


def _probe(role: str, name: str, model: nn.Module, in_shape: tuple[int, ...]) -> Any:
    """Tap shapes of ``model`` on inputs of the data's shape (its taps found and cached first).

    A model that cannot run on them at all (a ViT built for another image size) is a recipe
    error too: it names the shape, and the keywords that set a ViT's."""
    try:
        return probe(model, in_shape)
    except ValueError as err:
        raise ConfigError(f"{role} {name}: {err}") from None
    except (AssertionError, RuntimeError) as err:
        raise ConfigError(
            f"{role} {name} cannot run on {'x'.join(map(str, in_shape))} inputs: {err} (a ViT "
            "is built for one image size: set it in the model's kwargs, e.g. img_size)"
        ) from None
