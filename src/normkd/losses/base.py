"""What every loss term sees and declares: the taps of one training step."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn

# Tap kinds a term may ask for, on the student or the teacher:
#   logits  - the model's output (standardised when the recipe says so);
#   feat    - the last conv map (what global pooling reads; the student's is taken before FT);
#   stages  - the stage maps, shallow to deep;
#   pooled  - the classifier's input (the student's is taken after FT).
TAP_KINDS = ("logits", "feat", "stages", "pooled")


@dataclass
class Taps:
    """The maps one model produced in this step."""

    logits: torch.Tensor | None = None
    feat: torch.Tensor | None = None
    stages: list[torch.Tensor] = field(default_factory=list)
    pooled: torch.Tensor | None = None


@dataclass(frozen=True)
class TapShapes:
    """Per-sample tap shapes of one model, so terms can size their own modules at construction."""

    feat: tuple[int, ...]
    stages: tuple[tuple[int, ...], ...]
    pooled: tuple[int, ...]

    @classmethod
    def of(cls, taps: Taps) -> TapShapes:
        """Shapes of example taps (the batch dimension dropped)."""
        if taps.feat is None or taps.pooled is None:
            raise ValueError("TapShapes.of needs taps with feat and pooled collected")
        return cls(
            feat=tuple(taps.feat.shape[1:]),
            stages=tuple(tuple(s.shape[1:]) for s in taps.stages),
            pooled=tuple(taps.pooled.shape[1:]),
        )


@dataclass
class StepState:
    """Everything a term may read in one step; terms never talk to each other."""

    x: torch.Tensor
    y: torch.Tensor
    idx: torch.Tensor
    epoch: int
    student: Taps
    teacher: Taps | None
    expanded: torch.Tensor | None = None  # NORM: FT's expanded map of this step


class LossTerm(nn.Module):
    """A named loss term; ``student_taps``/``teacher_taps`` declare what the distiller collects."""

    kind: ClassVar[str] = ""
    student_taps: ClassVar[frozenset[str]] = frozenset({"logits"})
    teacher_taps: ClassVar[frozenset[str]] = frozenset()

    def weight_at(self, epoch: int) -> float:
        """Multiplier on the recipe weight for this epoch (NORM ramps; most terms are constant)."""
        return 1.0

    def forward(self, state: StepState) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError
