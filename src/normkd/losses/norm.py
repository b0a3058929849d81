"""NORM as a loss term: FT's expanded map vs the teacher's last conv map, with the epoch ramp.

``stages: all`` (the authors' ImageNet option) also matches the inner stages, deepest first: each
inner student stage gets its own expand head (1x1 conv + BN, ``C_s -> N * C_t``) whose N segments
are matched to the teacher stage of the same depth. These heads sit *beside* the student, not in
its forward path, so they are dropped at deployment and the merge stays exact; an in-path FT at an
inner stage could not be folded exactly into the next (zero-padded) convolution.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

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
    """Sum over N segments of MSE(segment, teacher map); FT itself lives on the student.

    ``inner``: (student channels, teacher channels) of the inner stage pairs to match as well,
    deepest first (``stages: all``); empty for the paper's last-stage NORM.
    """

    kind = "norm"
    teacher_taps = frozenset({"feat"})

    def __init__(
        self,
        n: int,
        reduce: Literal["max", "avg"] = "max",
        ramp: str = "none",
        epochs: int | None = None,
        inner: list[tuple[int, int]] | None = None,
    ) -> None:
        super().__init__()
        if ramp not in RAMPS:
            raise ValueError(f"unknown NORM ramp {ramp!r}; valid: {', '.join(RAMPS)}")
        self.n = n
        self.reduce = reduce
        self.ramp = ramp
        self.epochs = epochs
        self.heads = nn.ModuleList(
            nn.Sequential(nn.Conv2d(cs, n * ct, 1, bias=False), nn.BatchNorm2d(n * ct))
            for cs, ct in inner or []
        )
        if self.heads:
            self.student_taps = frozenset({"logits", "stages"})
            self.teacher_taps = frozenset({"feat", "stages"})

    def weight_at(self, epoch: int) -> float:
        return ramp_weight(self.ramp, epoch, self.epochs)

    def forward(self, state: StepState) -> torch.Tensor:
        if state.expanded is None or state.teacher is None or state.teacher.feat is None:
            raise RuntimeError("NORM term needs the student's FT (attach_ft) and the teacher map")
        loss = norm_loss(state.expanded, state.teacher.feat, self.n, reduce=self.reduce)
        if self.heads:
            # Inner stages, deepest first: stages[-1] is the last map, handled by FT above.
            s_inner = state.student.stages[-2::-1]
            t_inner = state.teacher.stages[-2::-1]
            for head, s_map, t_map in zip(self.heads, s_inner, t_inner):
                loss = loss + norm_loss(head(s_map), t_map, self.n, reduce=self.reduce)
        return loss
