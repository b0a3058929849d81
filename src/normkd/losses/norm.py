"""NORM as a loss term: FT's expanded map vs the teacher's last conv map, with the epoch ramp.

``stages: all`` (the authors' ImageNet option) also matches the inner stages, deepest first: each
inner student stage gets its own expand head (1x1 conv + BN, ``C_s -> N * C_t``) whose N segments
are matched to the teacher stage of the same depth. These heads sit *beside* the student, not in
its forward path, so they are dropped at deployment and the merge stays exact; an in-path FT at an
inner stage could not be folded exactly into the next (zero-padded) convolution.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from pydantic import PositiveInt
from torch import nn

from normkd.errors import ConfigError
from normkd.losses.base import BuildContext, LossTerm, StepState, TermConfig, register_term
from normkd.norm import norm_loss, spatial_ratio

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


@register_term
class NormTerm(TermConfig):
    """NORM: FT after the student's last conv map, N segments matched to the teacher map."""

    kind: Literal["norm"] = "norm"
    n: PositiveInt = 8
    bn: bool = True
    residual: bool = True
    reduce: Literal["max", "avg"] = "max"
    ramp: Literal["none", "cifar", "imagenet"] = "none"
    # last: the paper (FT after the last conv map). all: also match inner stages, deepest first,
    # through training-only expand heads (the authors' ImageNet option, see NORMLoss).
    stages: Literal["last", "all"] = "last"
    # FT's conv init: the authors' Kaiming normal (fan_out), or PyTorch's default (normkd <= 0.1)
    init: Literal["authors", "pytorch"] = "authors"
    term: ClassVar[type[LossTerm]] = NORMLoss
    label: ClassVar[str] = "NORM"

    def build(self, ctx: BuildContext) -> LossTerm:
        inner = None
        if self.stages == "all":
            s, t = ctx.pair(self.kind)
            pairs = list(zip(s.stages[-2::-1], t.stages[-2::-1]))
            for depth, (ss, ts) in enumerate(pairs, start=1):
                if spatial_ratio(ss[1:], ts[1:]) is None:
                    raise ConfigError(
                        f"loss norm: stages 'all': inner stage {depth} (from the end) of student "
                        f"{ctx.student_name} is {ss[1]}x{ss[2]} and of teacher "
                        f"{ctx.teacher_name} {ts[1]}x{ts[2]}: no integer size ratio; use "
                        "stages: last"
                    )
            inner = [(ss[0], ts[0]) for ss, ts in pairs]
        return NORMLoss(self.n, self.reduce, self.ramp, ctx.epochs, inner=inner)
