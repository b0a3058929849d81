"""NORM as a loss term: FT's expanded map vs the teacher's last conv map, with the epoch ramp.

Both maps may come from either family: a ViT's patch tokens arrive on their grid (see
:mod:`normkd.models.taps`), and a student whose FT sits on its pooled vector (``pooled`` form,
:func:`normkd.norm.ft_form`) is matched to the teacher's average-pooled map.

``stages`` chooses what else is matched:

- ``last`` (default): the paper, FT after the last conv map only.
- ``layer3``: the authors' only multi-stage option (``--use_layer3`` in OSVAI/NORM
  ``train_imagenet_student.py``, passed by none of their scripts): a second FT *in the student's
  path* after its stage before the last one (:func:`normkd.norm.attach_inner_ft`), its expanded map
  matched to the teacher's stage of the same depth and added to this term. The last FT is merged
  as usual; the inner one stays in the deployed student (it cannot be folded away exactly).
- ``side_heads``: normkd's own idea, not the authors': every inner stage, deepest first, gets a
  training-only expand head (1x1 conv + BN, ``C_s -> N * C_t``) whose N segments are matched to
  the teacher stage of the same depth. The heads sit *beside* the student, so they are dropped at
  deployment and the merge stays exact. (``all`` is a deprecated alias.)

Inner stages are counted back from the stage global pooling reads
(:func:`normkd.norm.inner_stage_count`), so stage lists that end before a model's head work too.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import ClassVar, Literal, NamedTuple

import torch
from pydantic import PositiveInt, field_validator
from torch import nn

from normkd.errors import ConfigError
from normkd.losses.base import (
    BuildContext,
    LossTerm,
    StepState,
    TapShapes,
    TermConfig,
    register_term,
)
from normkd.norm import (
    ExpandedMaps,
    FTStudent,
    PooledExpanded,
    attach_ft,
    attach_inner_ft,
    ft_form,
    inner_stage_count,
    merge_ft,
    norm_loss,
    pooled_norm_loss,
    restore_inner_ft,
    spatial_ratio,
)

MAX_FT_PARAMS = 2**30  # 4 GiB of FT weights in float32: far beyond any sensible N

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


class StagePair(NamedTuple):
    """A student stage and the teacher stage it is matched to: indices into ``stages``, channels."""

    student: int
    teacher: int
    s_channels: int
    t_channels: int


def _pair_or_refuse(s: TapShapes, t: TapShapes, i: int, j: int, what: str) -> StagePair:
    """The (student i, teacher j) stage pair; ConfigError when no integer size ratio links them."""
    ss, ts = s.stages[i], t.stages[j]
    if spatial_ratio(ss[1:], ts[1:]) is None:
        raise ConfigError(
            f"{what} is {ss[1]}x{ss[2]} on the student and {ts[1]}x{ts[2]} on the teacher: no "
            "integer size ratio; use stages: last"
        )
    return StagePair(i, j, ss[0], ts[0])


def side_head_pairs(s: TapShapes, t: TapShapes, names: tuple[str, str]) -> list[StagePair]:
    """Inner stage pairs, deepest first, as many as the shallower of the two models has."""
    ks, kt = inner_stage_count(s), inner_stage_count(t)
    what = "loss norm: stages side_heads: inner stage {} (from the end) of {} / {}"
    return [
        _pair_or_refuse(s, t, ks - d, kt - d, what.format(d, *names))
        for d in range(1, min(ks, kt) + 1)
    ]


def layer3_pair(s: TapShapes, t: TapShapes, names: tuple[str, str]) -> StagePair:
    """The stage before the last of each model: where the inner FT sits / what it is matched to."""
    ks, kt = inner_stage_count(s), inner_stage_count(t)
    if ks == 0 or kt == 0:
        who = f"student {names[0]}" if ks == 0 else f"teacher {names[1]}"
        raise ConfigError(f"loss norm: stages layer3: {who} has no stage before its last one")
    what = f"loss norm: stages layer3: the stage before the last of {names[0]} / {names[1]}"
    return _pair_or_refuse(s, t, ks - 1, kt - 1, what)


def _expand_head(cin: int, cout: int) -> nn.Sequential:
    """A side head: FT's expand half (1x1 conv + BN), trained beside the student, never deployed."""
    return nn.Sequential(nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout))


class NORMLoss(LossTerm):
    """Sum over N segments of MSE(segment, teacher map); FT itself lives on the student.

    ``side_heads``: the inner stage pairs matched through training-only expand heads, deepest
    first (``stages: side_heads``). ``layer3``: the teacher stage index the student's in-path
    inner FT is matched to (``stages: layer3``; the student's expanded maps then arrive as
    :class:`~normkd.norm.ExpandedMaps`). Neither: the paper's last-stage NORM.
    """

    student_taps = frozenset({"logits", "wrapper"})  # wrapper: FT's expanded map (FTStudent)
    teacher_taps = frozenset({"feat"})

    def __init__(
        self,
        n: int,
        reduce: Literal["max", "avg"] = "max",
        ramp: str = "none",
        epochs: int | None = None,
        side_heads: Sequence[StagePair] | None = None,
        layer3: int | None = None,
    ) -> None:
        super().__init__()
        if ramp not in RAMPS:
            raise ValueError(f"unknown NORM ramp {ramp!r}; valid: {', '.join(RAMPS)}")
        self.n = n
        self.reduce = reduce
        self.ramp = ramp
        self.epochs = epochs
        self.pairs = list(side_heads or [])
        self.heads = nn.ModuleList(_expand_head(p.s_channels, n * p.t_channels) for p in self.pairs)
        self.layer3 = layer3
        if self.heads:
            self.student_taps = frozenset({"logits", "stages", "wrapper"})
        if self.heads or layer3 is not None:
            self.teacher_taps = frozenset({"feat", "stages"})

    def weight_at(self, epoch: int) -> float:
        return ramp_weight(self.ramp, epoch, self.epochs)

    def _last_and_inner(self, state: StepState) -> torch.Tensor:
        """The last FT's loss, plus the in-path inner FT's for ``stages: layer3``."""
        t, expanded = state.teacher, state.student.wrapper
        if expanded is None or t is None or t.feat is None:
            raise RuntimeError("NORM term needs the student's FT (attach_ft) and the teacher map")
        if self.layer3 is None:
            if isinstance(expanded, ExpandedMaps):
                raise RuntimeError("the student carries an inner FT but loss norm is not layer3")
            return self._last(expanded, t.feat)
        if not isinstance(expanded, ExpandedMaps):
            raise RuntimeError("NORM stages layer3 needs the student's inner FT (attach_inner_ft)")
        inner_t = t.stages[self.layer3]
        return self._last(expanded.last, t.feat) + norm_loss(
            expanded.inner, inner_t, self.n, reduce=self.reduce
        )

    def _last(self, expanded: torch.Tensor | PooledExpanded, t_map: torch.Tensor) -> torch.Tensor:
        """The last FT's loss: its expanded map vs the teacher's, or (FT on the pooled vector)
        its expanded vector vs the teacher's average-pooled map."""
        if isinstance(expanded, PooledExpanded):
            return pooled_norm_loss(expanded.vector, t_map, self.n)
        return norm_loss(expanded, t_map, self.n, reduce=self.reduce)

    def forward(self, state: StepState) -> torch.Tensor:
        loss = self._last_and_inner(state)
        if self.heads:
            assert state.teacher is not None
            s_st, t_st = state.student.stages, state.teacher.stages
            maps = [(s_st[p.student], t_st[p.teacher]) for p in self.pairs]
            for head, (s_map, t_map) in zip(self.heads, maps):
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
    # last: the paper (FT after the last conv map). layer3: the authors' --use_layer3, a second FT
    # in the student's path after its stage before the last, kept when deployed. side_heads:
    # normkd's own, every inner stage through training-only expand heads (see the module doc).
    stages: Literal["last", "layer3", "side_heads"] = "last"
    # FT's conv init: the authors' Kaiming normal (fan_out), or PyTorch's default (normkd <= 0.1)
    init: Literal["authors", "pytorch"] = "authors"
    term: ClassVar[type[LossTerm]] = NORMLoss
    label: ClassVar[str] = "NORM"

    @field_validator("stages", mode="before")
    @classmethod
    def _all_is_side_heads(cls, value: object) -> object:
        """``all`` was this option's old name; it never was the authors' option."""
        if value == "all":
            warnings.warn(
                "loss norm stages: 'all' is deprecated; it is 'side_heads' (normkd's training-only "
                "heads, not the authors' option; theirs is 'layer3')",
                FutureWarning,
                stacklevel=2,
            )
            return "side_heads"
        return value

    def build(self, ctx: BuildContext) -> LossTerm:
        names = (ctx.student_name, ctx.teacher_name)
        pairs, layer3 = None, None
        if self.stages == "side_heads":
            pairs = side_head_pairs(*ctx.pair(self.kind), names)
        elif self.stages == "layer3":
            layer3 = layer3_pair(*ctx.pair(self.kind), names).teacher
        return NORMLoss(self.n, self.reduce, self.ramp, ctx.epochs, side_heads=pairs, layer3=layer3)

    def wrap_student(self, student: nn.Module, ctx: BuildContext) -> nn.Module:
        """The student with FT after its last map (:func:`normkd.norm.attach_ft`), factored.

        FT's form follows the student (:func:`normkd.norm.ft_form`): after a CNN's last map or a
        ViT's last tokens, matched to the teacher's map (integer size ratio); or, where a norm
        layer follows pooling (ConvNeXt), on the classifier's input, matched to the teacher's
        pooled map (any size). ``stages: layer3`` also puts the authors' in-path inner FT after the
        student's stage before the last, sized to the teacher's stage of the same depth; it
        changes ``student`` in place, so the deployed student (and its parameter count) keeps it.
        """
        s_shapes, t_shapes = ctx.pair(self.kind)
        names, in_shape = (ctx.student_name, ctx.teacher_name), ctx.in_shape
        param = next(student.parameters())
        example = torch.zeros(2, *in_shape, device=param.device)
        try:
            form = ft_form(student, example)
        except ValueError as err:
            raise ConfigError(f"student {names[0]} cannot take NORM's FT: {err}") from None
        (s_hw, t_hw) = s_shapes.feat[1:], t_shapes.feat[1:]
        if form != "pooled" and spatial_ratio(s_hw, t_hw) is None:
            raise ConfigError(
                f"teacher {names[1]} last map is {t_hw[0]}x{t_hw[1]} and student {names[0]} last "
                f"map is {s_hw[0]}x{s_hw[1]} for {in_shape[1]}x{in_shape[2]} inputs: NORM needs an "
                "integer size ratio"
            )
        c_s = s_shapes.pooled[0] if form == "pooled" else s_shapes.feat[0]
        c_t = t_shapes.feat[0]
        self._check_size(c_s, c_t)
        # Refused before the student is touched: the pair layer3 matches must exist and fit.
        inner = layer3_pair(s_shapes, t_shapes, names) if self.stages == "layer3" else None
        try:
            s_ft = attach_ft(
                student, c_t, self.n, self.bn, self.residual, example, self.init,
                form="pooled" if form == "pooled" else "feat", factored=True,
            )  # fmt: skip
            if inner is not None:
                attach_inner_ft(s_ft, inner.t_channels, example, self.init)
        except ValueError as err:
            raise ConfigError(f"student {names[0]} cannot take NORM's FT: {err}") from None
        return s_ft

    def _check_size(self, c_s: int, c_t: int) -> None:
        """Refuse an FT too large to be meant (n typed wrong) before it is allocated."""
        ft_params = 2 * c_s * self.n * c_t
        if ft_params > MAX_FT_PARAMS:
            raise ConfigError(
                f"loss norm: n={self.n} makes FT {ft_params:,} parameters "
                f"({ft_params * 4 / 2**30:,.0f} GiB in float32) for student channels {c_s} and "
                f"teacher channels {c_t}; use n <= {MAX_FT_PARAMS // (2 * c_s * c_t):,} (the "
                "paper uses 4 to 8)"
            )

    def deploy(self, trained: nn.Module) -> nn.Module:
        """FT folded into the classifier (:func:`normkd.norm.merge_ft`)."""
        return merge_ft(trained) if isinstance(trained, FTStudent) else trained

    @classmethod
    def restore(cls, model: nn.Module, path: Path) -> None:
        """A ``stages: layer3`` student keeps its inner FT: rebuilt from the file's own buffers."""
        restore_inner_ft(model, path)
