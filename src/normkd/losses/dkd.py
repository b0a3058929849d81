"""Decoupled knowledge distillation (Zhao et al., CVPR 2022): KD split into TCKD and NCKD.

TCKD is the KL between the teacher's and student's *binary* distributions (target class vs. all
others); NCKD is the KL between their distributions over the *non-target* classes only. Both are
temperature-softened, averaged over the batch and scaled by T^2; the term is
``alpha * TCKD + beta * NCKD``, ramped in linearly over the first ``warmup`` epochs.

Defaults follow mdistiller (``mdistiller/engine/cfg.py``): alpha 1, beta 8, T 4, warm-up 20, CE
weight 1. Its CIFAR-100 configs override beta per pair: 2 for resnet56->resnet20 and
resnet110->resnet32; 6 for vgg13->vgg8, vgg13->MobileNetV2, wrn_40_2->wrn_16_2 and
wrn_40_2->wrn_40_1; 8 (the default) for the resnet32x4, ResNet50 and wrn_40_2->ShuffleV1 pairs.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import NonNegativeFloat, NonNegativeInt, PositiveFloat

from normkd.losses.base import BuildContext, LossTerm, StepState, TermConfig, register_term


def _binary_log_probs(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``(B, 2)`` log-probabilities of (target class, any other class), computed stably."""
    all_lse = logits.logsumexp(1)
    log_gt = logits.gather(1, target[:, None]).squeeze(1) - all_lse
    others = logits.masked_fill(F.one_hot(target, logits.shape[1]).bool(), float("-inf"))
    log_rest = others.logsumexp(1) - all_lse
    return torch.stack([log_gt, log_rest], dim=1)


def _non_target(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``(B, C-1)`` logits with each row's target class removed."""
    keep = ~F.one_hot(target, logits.shape[1]).bool()
    return logits[keep].view(logits.shape[0], logits.shape[1] - 1)


def dkd_parts(
    s_logits: torch.Tensor, t_logits: torch.Tensor, target: torch.Tensor, temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(TCKD, NCKD), each ``KL(teacher || student)`` averaged over the batch, times T^2."""
    t_logits = t_logits.detach()
    s, t = s_logits / temperature, t_logits.to(s_logits.dtype) / temperature
    tckd = F.kl_div(
        _binary_log_probs(s, target),
        _binary_log_probs(t, target),
        reduction="batchmean",
        log_target=True,
    )
    nckd = F.kl_div(
        F.log_softmax(_non_target(s, target), dim=1),
        F.log_softmax(_non_target(t, target), dim=1),
        reduction="batchmean",
        log_target=True,
    )
    return tckd * temperature**2, nckd * temperature**2


class DKDLoss(LossTerm):
    """``alpha * TCKD + beta * NCKD`` with mdistiller's linear warm-up."""

    teacher_taps = frozenset({"logits"})

    def __init__(
        self, alpha: float = 1.0, beta: float = 8.0, temperature: float = 4.0, warmup: int = 20
    ) -> None:
        super().__init__()
        self.alpha = alpha
        self.beta = beta
        self.temperature = temperature
        self.warmup = warmup

    def weight_at(self, epoch: int) -> float:
        """mdistiller's ``min(epoch / warmup, 1)`` with epochs counted from 1 (ours from 0)."""
        if self.warmup <= 0:
            return 1.0
        return min((epoch + 1) / self.warmup, 1.0)

    def forward(self, state: StepState) -> torch.Tensor:
        assert state.teacher is not None and state.teacher.logits is not None
        tckd, nckd = dkd_parts(
            state.student.logits, state.teacher.logits, state.y, self.temperature
        )
        return self.alpha * tckd + self.beta * nckd


@register_term
class DKDTerm(TermConfig):
    """Decoupled KD: alpha * TCKD + beta * NCKD, linearly warmed up over ``warmup`` epochs."""

    kind: Literal["dkd"] = "dkd"
    alpha: NonNegativeFloat = 1.0
    beta: NonNegativeFloat = 8.0  # mdistiller CIFAR-100 configs use 2, 6 or 8 depending on the pair
    temperature: PositiveFloat = 4.0
    warmup: NonNegativeInt = 20  # epochs; 0 disables the warm-up
    term: ClassVar[type[LossTerm]] = DKDLoss
    label: ClassVar[str] = "DKD"

    def build(self, ctx: BuildContext) -> LossTerm:
        return DKDLoss(self.alpha, self.beta, self.temperature, self.warmup)
