"""Hinton et al. (2015) knowledge distillation."""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import PositiveFloat

from normkd.losses.base import BuildContext, LossTerm, StepState, TermConfig, register_term


def kd_loss(s_logits: torch.Tensor, t_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(teacher_T || student_T) averaged over the batch, times T^2 (keeps gradient scale)."""
    log_p_s = F.log_softmax(s_logits / temperature, dim=1)
    log_p_t = F.log_softmax(t_logits.detach() / temperature, dim=1)
    kl = F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True)
    return kl * temperature**2


class KDLoss(LossTerm):
    """Soft-target KL between temperature-softened student and teacher distributions."""

    teacher_taps = frozenset({"logits"})

    def __init__(self, temperature: float = 4.0) -> None:
        super().__init__()
        self.temperature = temperature

    def forward(self, state: StepState) -> torch.Tensor:
        assert state.teacher is not None
        return kd_loss(state.student.logits, state.teacher.logits, self.temperature)


@register_term
class KDTerm(TermConfig):
    """Hinton KD: KL between temperature-softened distributions, times T^2."""

    kind: Literal["kd"] = "kd"
    temperature: PositiveFloat = 4.0
    term: ClassVar[type[LossTerm]] = KDLoss
    label: ClassVar[str] = "KD"

    def build(self, ctx: BuildContext) -> LossTerm:
        return KDLoss(self.temperature)
