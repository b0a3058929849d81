"""Cross-entropy with the ground-truth labels."""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from normkd.losses.base import BuildContext, LossTerm, StepState, TermConfig, register_term


class CELoss(LossTerm):
    """Plain (optionally label-smoothed) cross-entropy on the student's logits."""

    def __init__(self, label_smoothing: float = 0.0) -> None:
        super().__init__()
        self.label_smoothing = label_smoothing

    def forward(self, state: StepState) -> torch.Tensor:
        return F.cross_entropy(state.student.logits, state.y, label_smoothing=self.label_smoothing)


@register_term
class CETerm(TermConfig):
    """Cross-entropy with the labels."""

    kind: Literal["ce"] = "ce"
    label_smoothing: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.0
    term: ClassVar[type[LossTerm]] = CELoss
    label: ClassVar[str] = "CE"

    def build(self, ctx: BuildContext) -> LossTerm:
        return CELoss(self.label_smoothing)
