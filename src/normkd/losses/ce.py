"""Cross-entropy with the ground-truth labels."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from normkd.losses.base import LossTerm, StepState


class CELoss(LossTerm):
    """Plain (optionally label-smoothed) cross-entropy on the student's logits."""

    kind = "ce"

    def __init__(self, label_smoothing: float = 0.0) -> None:
        super().__init__()
        self.label_smoothing = label_smoothing

    def forward(self, state: StepState) -> torch.Tensor:
        return F.cross_entropy(state.student.logits, state.y, label_smoothing=self.label_smoothing)
