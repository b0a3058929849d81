"""NORM as a loss term: FT's expanded map vs the teacher's last conv map, with the epoch ramp."""

from __future__ import annotations

from typing import Literal

import torch

from normkd.losses.base import LossTerm, StepState
from normkd.norm import norm_loss

# w(epoch) of the authors' training scripts: (end epoch exclusive, weight) pieces.
RAMPS: dict[str, tuple[tuple[int, float], ...]] = {
    "none": (),
    "cifar": ((10, 0.1), (20, 0.5), (180, 1.0), (210, 0.5), (240, 0.1)),
    "imagenet": ((5, 0.1), (15, 0.5), (60, 0.9), (80, 0.5), (100, 0.1)),
}


def ramp_weight(ramp: str, epoch: int, epochs: int | None = None) -> float:
    """The NORM weight multiplier at ``epoch``; ramps are stretched to ``epochs`` when given."""
    pieces = RAMPS[ramp]
    if not pieces:
        return 1.0
    span = pieces[-1][0]
    e = epoch * span / epochs if epochs else epoch
    for end, w in pieces:
        if e < end:
            return w
    return pieces[-1][1]


class NORMLoss(LossTerm):
    """Sum over N segments of MSE(segment, teacher map); FT itself lives on the student."""

    kind = "norm"
    teacher_taps = frozenset({"feat"})

    def __init__(
        self,
        n: int,
        reduce: Literal["max", "avg"] = "max",
        ramp: str = "none",
        epochs: int | None = None,
    ) -> None:
        super().__init__()
        if ramp not in RAMPS:
            raise ValueError(f"unknown NORM ramp {ramp!r}; valid: {', '.join(RAMPS)}")
        self.n = n
        self.reduce = reduce
        self.ramp = ramp
        self.epochs = epochs

    def weight_at(self, epoch: int) -> float:
        return ramp_weight(self.ramp, epoch, self.epochs)

    def forward(self, state: StepState) -> torch.Tensor:
        if state.expanded is None or state.teacher is None or state.teacher.feat is None:
            raise RuntimeError("NORM term needs the student's FT (attach_ft) and the teacher map")
        return norm_loss(state.expanded, state.teacher.feat, self.n, reduce=self.reduce)
