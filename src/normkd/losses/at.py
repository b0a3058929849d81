"""Attention transfer (Zagoruyko & Komodakis, ICLR 2017): match spatial attention maps.

The attention map of a stage is the mean over channels of ``|f|^p`` (p = 2), flattened and
L2-normalised per sample; the loss is the mean squared difference of the student's and teacher's
maps, summed over the stage pairs ``zip(student.stages[1:], teacher.stages[1:])`` (RepDistiller's
``feat[1:-1]``: every stage after the stem, none of the pooled vector). Weight 1000 on the CRD
CIFAR-100 benchmark (``--distill attention -b 1000``).

When a pair's spatial sizes differ, the larger *feature map* is adaptive-average-pooled to the
smaller size before its attention map is formed (as RepDistiller does), so mismatched
architectures (e.g. VGG -> MobileNetV2) still pair up.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import NonNegativeFloat, PositiveFloat

from normkd.losses.base import BuildContext, LossTerm, StepState, TermConfig, register_term


def attention_map(f: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    """``(B, C, H, W)`` map -> ``(B, H*W)`` unit-norm attention: normalised mean_c |f|^p."""
    return F.normalize(f.abs().pow(p).mean(1).flatten(1), dim=1)


def at_pair_loss(f_s: torch.Tensor, f_t: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    """Mean squared difference of the two attention maps (larger map pooled to the smaller).

    Computed in at least float32: under bf16 autocast the unit-norm maps would lose the small
    differences the loss measures.
    """
    dtype = torch.promote_types(f_s.dtype, torch.float32)
    f_s, f_t = f_s.to(dtype), f_t.detach().to(dtype)
    size = (min(f_s.shape[-2], f_t.shape[-2]), min(f_s.shape[-1], f_t.shape[-1]))
    if tuple(f_s.shape[-2:]) != size:
        f_s = F.adaptive_avg_pool2d(f_s, size)
    if tuple(f_t.shape[-2:]) != size:
        f_t = F.adaptive_avg_pool2d(f_t, size)
    return (attention_map(f_s, p) - attention_map(f_t, p)).pow(2).mean()


class ATLoss(LossTerm):
    """Sum over stage pairs (stem excluded) of the attention-map MSE."""

    student_taps = frozenset({"stages"})
    teacher_taps = frozenset({"stages"})

    def __init__(self, p: float = 2.0) -> None:
        super().__init__()
        self.p = p

    def forward(self, state: StepState) -> torch.Tensor:
        assert state.teacher is not None
        pairs = list(zip(state.student.stages[1:], state.teacher.stages[1:]))
        if not pairs:
            raise RuntimeError("AT needs at least two stages on both student and teacher")
        return torch.stack([at_pair_loss(s, t, self.p) for s, t in pairs]).sum()


@register_term
class ATTerm(TermConfig):
    """Attention transfer over the stage pairs after the stem."""

    kind: Literal["at"] = "at"
    weight: NonNegativeFloat = 1000.0  # RepDistiller CIFAR-100: -b 1000
    p: PositiveFloat = 2.0
    term: ClassVar[type[LossTerm]] = ATLoss
    label: ClassVar[str] = "AT"

    def build(self, ctx: BuildContext) -> LossTerm:
        return ATLoss(self.p)
