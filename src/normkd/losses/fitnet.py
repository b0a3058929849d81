"""FitNets hints (Romero et al., ICLR 2015): a student stage regressed onto a teacher stage.

As on the CRD CIFAR-100 benchmark (RepDistiller ``--distill hint --hint_layer 2 -b 100``): the
student's stage ``2`` (our ``TapSpec.stages`` is RepDistiller's feature list without the final
pooled vector, so the indices agree) goes through a learned regressor that matches the teacher's
channels *and* spatial size, then BatchNorm and ReLU; the loss is the MSE to the teacher's stage.
The regressor belongs to the term: it is trained with the student and never deployed.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import NonNegativeFloat
from torch import nn

from normkd.errors import ConfigError
from normkd.losses.base import BuildContext, LossTerm, StepState, TermConfig, register_term


def hint_regressor(s_shape: tuple[int, ...], t_shape: tuple[int, ...]) -> nn.Sequential:
    """Conv (or deconv) + BN + ReLU taking a ``(C_s, H_s, W_s)`` map to ``(C_t, H_t, W_t)``.

    Halving the size uses a 3x3 stride-2 conv, doubling it a 4x4 stride-2 transposed conv, and
    any other shrink a valid conv whose kernel absorbs the difference (1x1 for equal sizes).
    """
    (sc, sh, sw), (tc, th, tw) = s_shape, t_shape
    conv: nn.Module
    if (sh, sw) == (2 * th, 2 * tw):
        conv = nn.Conv2d(sc, tc, kernel_size=3, stride=2, padding=1)
    elif (2 * sh, 2 * sw) == (th, tw):
        conv = nn.ConvTranspose2d(sc, tc, kernel_size=4, stride=2, padding=1)
    elif sh >= th and sw >= tw:
        conv = nn.Conv2d(sc, tc, kernel_size=(1 + sh - th, 1 + sw - tw))
    else:
        raise ValueError(
            f"FitNet: cannot regress a student map of {sh}x{sw} onto a teacher map of {th}x{tw} "
            "(the teacher map may be at most twice as large); pick another stage"
        )
    return nn.Sequential(conv, nn.BatchNorm2d(tc), nn.ReLU())


class FitNetLoss(LossTerm):
    """MSE between ``regressor(student stage)`` and the (frozen) teacher stage."""

    student_taps = frozenset({"stages"})
    teacher_taps = frozenset({"stages"})

    def __init__(
        self,
        s_shape: tuple[int, ...],
        t_shape: tuple[int, ...],
        stage: int = 2,
        teacher_stage: int | None = None,
    ) -> None:
        super().__init__()
        self.stage = stage
        self.teacher_stage = stage if teacher_stage is None else teacher_stage
        self.regressor = hint_regressor(tuple(s_shape), tuple(t_shape))

    def forward(self, state: StepState) -> torch.Tensor:
        assert state.teacher is not None
        f_s = self.regressor(state.student.stages[self.stage])
        f_t = state.teacher.stages[self.teacher_stage].detach()
        return F.mse_loss(f_s, f_t.to(f_s.dtype))


@register_term
class FitNetTerm(TermConfig):
    """FitNets hint: a student stage through a learned regressor, MSE to the teacher's stage."""

    kind: Literal["fitnet"] = "fitnet"
    weight: NonNegativeFloat = 100.0  # RepDistiller CIFAR-100: -b 100 with CE weight 1
    stage: int = 2  # index into TapSpec.stages (RepDistiller --hint_layer 2); negative from end
    teacher_stage: int | None = None  # default: the same index as the student's
    term: ClassVar[type[LossTerm]] = FitNetLoss
    label: ClassVar[str] = "FitNet"

    def build(self, ctx: BuildContext) -> LossTerm:
        s, t = ctx.pair(self.kind)
        ti = self.stage if self.teacher_stage is None else self.teacher_stage
        s_shape = _stage(s.stages, self.stage, f"stage of student {ctx.student_name}")
        t_shape = _stage(t.stages, ti, f"teacher_stage of teacher {ctx.teacher_name}")
        try:
            return FitNetLoss(s_shape, t_shape, self.stage, ti)
        except ValueError as err:
            raise ConfigError(f"loss fitnet: {err}") from None


def _stage(stages: tuple[tuple[int, ...], ...], i: int, what: str) -> tuple[int, ...]:
    n = len(stages)
    if not -n <= i < n:
        raise ConfigError(
            f"loss fitnet: {what}: index {i} is out of range; valid: {-n}..{n - 1} ({n} stages)"
        )
    return stages[i]
