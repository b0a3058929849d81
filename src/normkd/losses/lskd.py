"""Logit-standardised KD (Sun et al., CVPR 2024, "Logit Standardization in Knowledge Distillation").

Hinton KD after a per-sample z-score of each model's logits with its *own* statistics:
``z -> (z - mean(z)) / (std(z) + 1e-7)`` (std unbiased, as in the authors' code), so the student
matches the teacher's logit *relations* rather than their range. Then the usual
``KL(teacher_T || student_T) * T^2`` at a shared temperature. The authors' CIFAR-100 KD configs
are tagged temperature 2 and KD weight 9 (``{kind: lskd, weight: 9}`` with CE weight 0.1).

Not to be confused with the NORM authors' ``logit_standardization`` recipe option, which layer-
normalises both logits before *every* term (CE included) and multiplies them by 2.5.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from pydantic import PositiveFloat

from normkd.losses.base import BuildContext, LossTerm, StepState, register_term
from normkd.losses.kd import KDLoss, KDTerm, kd_loss

EPS = 1e-7


def zscore(logits: torch.Tensor) -> torch.Tensor:
    """Each row minus its mean, over its (unbiased) standard deviation + 1e-7."""
    mean = logits.mean(dim=-1, keepdim=True)
    return (logits - mean) / (logits.std(dim=-1, keepdim=True) + EPS)


def lskd_loss(s_logits: torch.Tensor, t_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """KD (times T^2) between the z-scored student and teacher logits."""
    return kd_loss(zscore(s_logits), zscore(t_logits.detach()), temperature)


class LSKDLoss(KDLoss):
    """KD on logits standardised per sample, each model with its own mean and deviation."""

    def __init__(self, temperature: float = 2.0) -> None:
        super().__init__(temperature)

    def forward(self, state: StepState) -> torch.Tensor:
        assert state.teacher is not None
        return lskd_loss(state.student.logits, state.teacher.logits, self.temperature)


@register_term
class LSKDTerm(KDTerm):
    """Logit-standardised KD: z-scored logits, then Hinton KD at ``temperature``."""

    kind: Literal["lskd"] = "lskd"  # type: ignore[assignment]
    temperature: PositiveFloat = 2.0
    term: ClassVar[type[LossTerm]] = LSKDLoss
    label: ClassVar[str] = "LSKD"

    def build(self, ctx: BuildContext) -> LossTerm:
        return LSKDLoss(self.temperature)
