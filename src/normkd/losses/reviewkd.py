"""ReviewKD (Chen et al., CVPR 2021): each student stage learns from the teacher's stage *and*
every deeper one, through a residual chain of attention-based fusion (ABF) modules.

The student's features are its stage maps from ``first_stage`` on (shallow to deep) and, last, its
pooled feature as a 1x1 map; the teacher's are the same list from ``teacher_first_stage``. The
review runs from deep to shallow. At each level an ABF takes the student's map through a 1x1 conv
+ BN to ``mid`` channels; below the deepest level it fuses that with the residual handed down from
the level above (upsampled, nearest, to the student map's size): a 1x1 conv over both, with a
sigmoid, gives two attention maps that weight the two before they are summed. The fused map
(resized, nearest, to the teacher's map size) is the residual for the next level down, and a 3x3
conv + BN of it to the teacher's channels is the level's output. Each output is compared with the
teacher's map of its level by the hierarchical context loss (HCL): the MSE of the full maps plus,
for each ``l`` of 4, 2, 1 smaller than the map's height, the MSE of both maps adaptive-average-
pooled to ``l x l``, weighted 1, 1/2, 1/4, ... and divided by the sum of those weights; the term is
the sum of the levels' HCLs. ``mid`` is ``min(512, C)`` for ``C`` the student's pooled channels;
the 1x1 and 3x3 convs are Kaiming-uniform (a = 1) initialised. The ABFs are the term's modules:
trained with the student, never deployed.

Facts from the authors' code (dvlab-research/ReviewKD ``CIFAR-100/model/reviewkd.py``,
``CIFAR-100/train.py``, ``ImageNet/``) and mdistiller (``mdistiller/distillers/ReviewKD.py``,
``engine/cfg.py``, ``configs/``): CE weight 1; the ReviewKD weight ramps in linearly over
``warmup`` epochs, mdistiller's ``min(epoch / 20, 1)`` with epochs counted from 1 (the authors'
CIFAR script counts from 0, so its first epoch has weight 0; one epoch of 240 apart); ImageNet has
no warm-up. The CIFAR zoo's ``TapSpec.stages`` is RepDistiller's feature list (stem first), so
``first_stage: 1`` reviews the same stages as the authors (3 of a ResNet, 4 of a VGG / MobileNetV2);
torchvision's ResNets list no stem, so their recipes say ``first_stage: 0``.

**Pre-activation maps.** As the authors, the teacher's stage maps are read *before* their last
ReLU (``teacher_preact``, on by default: mdistiller reviews the teacher's ``preact_feats``
always, the authors' CIFAR code runs the teacher with ``preact=True``) and the student's after it
(``student_preact``, off by default: mdistiller's ``STU_PREACT`` default, which its CIFAR config
keeps; its ImageNet configs turn it on, and the authors' ImageNet blocks leave the ReLU out).
These are the ``preact`` tap, the maps a model declares in ``TapSpec.preact_stages``: the CIFAR
zoo declares RepDistiller / mdistiller's, stem first, so ``first_stage`` indexes them as it does
the stages; torchvision's ResNets declare each stage's last residual sum (mdistiller's ImageNet
``preact_feats``), so the ImageNet recipe reviews both sides before the ReLU, as the authors. A
model that declares none (discovered taps: timm's, torchvision's MobileNetV2) is refused when its
side asks for them, with the option to turn off named.
The pooled features are the classifier's input on both sides, as in the authors' code (with
NORM's FT on the student, the student's is taken after FT).
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import NonNegativeFloat, NonNegativeInt, PositiveInt
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

HCL_LEVELS = (4, 2, 1)  # the pooled grid sizes of the hierarchical context loss
MAX_MID = 512  # the authors' cap on the ABFs' width
# Which maps each side reviews by default, the authors' CIFAR choice: the teacher's before their
# last ReLU (mdistiller reads its preact_feats always), the student's after it (mdistiller
# engine/cfg.py REVIEWKD.STU_PREACT False, which configs/cifar100/reviewkd.yaml keeps).
TEACHER_PREACT = True
STUDENT_PREACT = False


def _tap_kinds(preact: bool) -> frozenset[str]:
    """The taps one side hands ReviewKD: its pre-activation or its stage maps, and pooled."""
    return frozenset({"preact" if preact else "stages", "pooled"})


def hcl_loss(
    f_s: torch.Tensor, f_t: torch.Tensor, levels: tuple[int, ...] = HCL_LEVELS
) -> torch.Tensor:
    """Hierarchical context loss of one level: full-map MSE plus halving-weight MSEs of ``l x l``
    average-pooled maps (only ``l`` below the map's height), over the sum of the weights.

    Computed in at least float32: under bf16 the small differences late in training vanish."""
    dtype = torch.promote_types(f_s.dtype, torch.float32)
    f_s, f_t = f_s.to(dtype), f_t.detach().to(dtype)
    loss, weight, total = F.mse_loss(f_s, f_t), 1.0, 1.0
    for size in levels:
        if size >= f_s.shape[2]:
            continue
        weight /= 2
        pooled = F.mse_loss(F.adaptive_avg_pool2d(f_s, size), F.adaptive_avg_pool2d(f_t, size))
        loss, total = loss + weight * pooled, total + weight
    return loss / total


class ABF(nn.Module):
    """Attention-based fusion: a student map (and the residual from the level above) -> this
    level's output at the teacher's channels and size, and the residual for the level below."""

    def __init__(self, in_channels: int, mid_channels: int, out_channels: int, fuse: bool) -> None:
        super().__init__()
        self.conv1 = nn.Sequential(
            nn.Conv2d(in_channels, mid_channels, 1, bias=False), nn.BatchNorm2d(mid_channels)
        )
        self.conv2 = nn.Sequential(
            nn.Conv2d(mid_channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
        )
        # Two attention maps from both inputs; the deepest level has nothing to fuse.
        self.att = nn.Sequential(nn.Conv2d(2 * mid_channels, 2, 1), nn.Sigmoid()) if fuse else None
        nn.init.kaiming_uniform_(self.conv1[0].weight, a=1)
        nn.init.kaiming_uniform_(self.conv2[0].weight, a=1)

    def forward(
        self, x: torch.Tensor, out_size: tuple[int, int], residual: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(output, residual) for a student map ``x``; the output is ``out_size``."""
        x = self.conv1(x)
        if self.att is not None:
            assert residual is not None, "a fusing ABF needs the residual of the level above"
            residual = F.interpolate(residual, size=x.shape[-2:], mode="nearest")
            a = self.att(torch.cat([x, residual], 1))
            x = x * a[:, :1] + residual * a[:, 1:]
        if tuple(x.shape[-2:]) != tuple(out_size):
            x = F.interpolate(x, size=tuple(out_size), mode="nearest")
        return self.conv2(x), x


def _levels(stages: list[torch.Tensor], pooled: torch.Tensor, first: int) -> list[torch.Tensor]:
    """The reviewed maps, shallow to deep: stages from ``first`` on, then the pooled feature 1x1."""
    return [*stages[first:], pooled.reshape(pooled.shape[0], -1, 1, 1)]


class ReviewKDLoss(LossTerm):
    """Sum over levels of HCL(ABF chain output, teacher map), the chain run deep to shallow."""

    student_taps = _tap_kinds(STUDENT_PREACT)
    teacher_taps = _tap_kinds(TEACHER_PREACT)

    def __init__(
        self,
        s_shapes: list[tuple[int, ...]],
        t_shapes: list[tuple[int, ...]],
        first_stage: int = 1,
        teacher_first_stage: int | None = None,
        mid_channels: int | None = None,
        warmup: int = 20,
        teacher_preact: bool = TEACHER_PREACT,
        student_preact: bool = STUDENT_PREACT,
    ) -> None:
        """``s_shapes``/``t_shapes``: the reviewed maps' (C, H, W), shallow to deep, pooled last;
        ``*_preact``: that side reviews its pre-activation maps (the ``preact`` tap)."""
        super().__init__()
        self.teacher_preact, self.student_preact = teacher_preact, student_preact
        self.student_taps = _tap_kinds(student_preact)
        self.teacher_taps = _tap_kinds(teacher_preact)
        if len(s_shapes) != len(t_shapes) or len(s_shapes) < 2:
            raise ValueError(
                f"the student reviews {len(s_shapes)} maps and the teacher gives {len(t_shapes)}; "
                "they must be equal and at least one stage plus the pooled feature"
            )
        mid = mid_channels or min(MAX_MID, s_shapes[-1][0])
        deepest = len(s_shapes) - 1
        self.abfs = nn.ModuleList(  # shallow to deep, as the authors build them
            ABF(s[0], mid, t[0], fuse=i < deepest)
            for i, (s, t) in enumerate(zip(s_shapes, t_shapes, strict=True))
        )
        self.out_sizes = [tuple(t[1:]) for t in t_shapes]
        self.first_stage = first_stage
        self.teacher_first_stage = (
            first_stage if teacher_first_stage is None else teacher_first_stage
        )
        self.warmup = warmup

    def weight_at(self, epoch: int) -> float:
        """mdistiller's ``min(epoch / warmup, 1)`` with epochs counted from 1 (ours from 0)."""
        return 1.0 if self.warmup <= 0 else min((epoch + 1) / self.warmup, 1.0)

    def review(self, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        """The ABF chain's outputs, shallow to deep, for the student's maps ``feats``."""
        outs: list[torch.Tensor] = []
        residual = None
        for i in reversed(range(len(feats))):
            out, residual = self.abfs[i](feats[i], self.out_sizes[i], residual)
            outs.append(out)
        return outs[::-1]

    def forward(self, state: StepState) -> torch.Tensor:
        assert state.teacher is not None and state.student.pooled is not None
        assert state.teacher.pooled is not None
        student, teacher = state.student, state.teacher
        s_maps = student.preact if self.student_preact else student.stages
        t_maps = teacher.preact if self.teacher_preact else teacher.stages
        s = _levels(s_maps, student.pooled, self.first_stage)
        t = _levels(t_maps, teacher.pooled, self.teacher_first_stage)
        if len(s) != len(self.abfs) or len(t) != len(self.abfs):
            raise ValueError(
                f"ReviewKD: built for {len(self.abfs)} levels, got {len(s)} / {len(t)}"
            )
        outs = self.review(s)
        return torch.stack([hcl_loss(o, f) for o, f in zip(outs, t, strict=True)]).sum()


@register_term
class ReviewKDTerm(TermConfig):
    """ReviewKD: ABF review chain over the student's stages, HCL to the teacher's, warmed up."""

    kind: Literal["reviewkd"] = "reviewkd"
    weight: NonNegativeFloat = 1.0  # authors' default, ImageNet R34->R18; CIFAR: see recipes
    first_stage: NonNegativeInt = 1  # TapSpec.stages index of the shallowest; 1 skips a stem
    teacher_first_stage: NonNegativeInt | None = None  # default: the student's
    mid_channels: PositiveInt | None = None  # ABF width; None: min(512, student's pooled channels)
    warmup: NonNegativeInt = 20  # linear ramp epochs (mdistiller WARMUP_EPOCHS); 0 or 1: none
    teacher_preact: bool = TEACHER_PREACT  # the teacher's maps before their last ReLU
    student_preact: bool = STUDENT_PREACT  # the student's too (mdistiller STU_PREACT)
    term: ClassVar[type[LossTerm]] = ReviewKDLoss
    label: ClassVar[str] = "ReviewKD"

    def build(self, ctx: BuildContext) -> LossTerm:
        s, t = ctx.pair(self.kind)
        t_first = self.first_stage if self.teacher_first_stage is None else self.teacher_first_stage
        s_who, t_who = f"student {ctx.student_name}", f"teacher {ctx.teacher_name}"
        s_stages = _stage_shapes(s, self.student_preact, s_who, "student_preact")
        t_stages = _stage_shapes(t, self.teacher_preact, t_who, "teacher_preact")
        s_maps = _reviewed(s_stages, s.pooled, self.first_stage, s_who)
        t_maps = _reviewed(t_stages, t.pooled, t_first, t_who)
        if len(s_maps) != len(t_maps):
            raise ConfigError(
                f"loss reviewkd: student {ctx.student_name} reviews {len(s_maps) - 1} stages from "
                f"first_stage {self.first_stage}, teacher {ctx.teacher_name} gives "
                f"{len(t_maps) - 1} from {t_first}; set teacher_first_stage so they agree"
            )
        return ReviewKDLoss(
            s_maps,
            t_maps,
            self.first_stage,
            t_first,
            self.mid_channels,
            self.warmup,
            teacher_preact=self.teacher_preact,
            student_preact=self.student_preact,
        )


def _stage_shapes(
    shapes: TapShapes, preact: bool, who: str, option: str
) -> tuple[tuple[int, ...], ...]:
    """(C, H, W) of one side's stage maps: its pre-activation ones when ``preact``, which a model
    must declare (``TapSpec.preact_stages``)."""
    if not preact:
        return shapes.stages
    if not shapes.preact:
        raise ConfigError(
            f"loss reviewkd: {who} declares no pre-activation stage maps; set {option}: false "
            "to review its stage maps after their ReLU"
        )
    return shapes.preact


def _reviewed(
    stages: tuple[tuple[int, ...], ...], pooled: tuple[int, ...], first: int, who: str
) -> list[tuple[int, ...]]:
    """(C, H, W) of the maps a model hands ReviewKD: stages from ``first``, pooled as C x 1 x 1."""
    n = len(stages)
    if not first < n:
        raise ConfigError(
            f"loss reviewkd: {who}: first stage {first} is out of range; valid: 0..{n - 1} "
            f"({n} stage maps)"
        )
    channels = 1
    for d in pooled:
        channels *= d
    return [*stages[first:], (channels, 1, 1)]
