"""DIST (Huang et al., NeurIPS 2022): match *relations* of predictions, not their values.

With ``Y = softmax(Z / tau)`` for a batch of ``B`` samples and ``C`` classes, the loss is

    beta * tau^2 * (1 - mean_i pearson(Y_s[i, :], Y_t[i, :]))    (inter-class relation)
  + gamma * tau^2 * (1 - mean_j pearson(Y_s[:, j], Y_t[:, j]))   (intra-class relation)

so a student that ranks classes (per sample) and samples (per class) as the teacher does pays
nothing, whatever the scale of its probabilities. The Pearson denominator carries ``+ 1e-8`` as
the authors' code does (hunto/image_classification_sota ``lib/models/losses/dist_kd.py``).

Settings follow the authors' configs: beta = gamma = 1; ImageNet ``kd: dist`` (tau 1), CIFAR-100
``kd: dist_t4`` (tau 4), both with CE weight 1 and DIST weight 2.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from pydantic import NonNegativeFloat, PositiveFloat

from normkd.losses.base import BuildContext, LossTerm, StepState, TermConfig, register_term

EPS = 1e-8


def pearson_rows(a: torch.Tensor, b: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """Pearson correlation of each row of ``a`` with the same row of ``b`` -> ``(rows,)``."""
    a = a - a.mean(1, keepdim=True)
    b = b - b.mean(1, keepdim=True)
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1) + eps)


def dist_parts(
    s_logits: torch.Tensor, t_logits: torch.Tensor, tau: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(inter-class, intra-class) relation losses, each already times ``tau^2``.

    Computed in at least float32: correlations of bf16 probabilities lose the small
    differences the loss measures."""
    dtype = torch.promote_types(s_logits.dtype, torch.float32)
    y_s = (s_logits.to(dtype) / tau).softmax(1)
    y_t = (t_logits.detach().to(dtype) / tau).softmax(1)
    inter = 1 - pearson_rows(y_s, y_t).mean()
    intra = 1 - pearson_rows(y_s.t(), y_t.t()).mean()
    return inter * tau**2, intra * tau**2


class DISTLoss(LossTerm):
    """``beta * inter + gamma * intra`` relation loss on temperature-softened predictions."""

    teacher_taps = frozenset({"logits"})

    def __init__(self, beta: float = 1.0, gamma: float = 1.0, tau: float = 1.0) -> None:
        super().__init__()
        self.beta, self.gamma, self.tau = beta, gamma, tau

    def forward(self, state: StepState) -> torch.Tensor:
        assert state.teacher is not None and state.teacher.logits is not None
        inter, intra = dist_parts(state.student.logits, state.teacher.logits, self.tau)
        return self.beta * inter + self.gamma * intra


@register_term
class DISTTerm(TermConfig):
    """DIST: Pearson-correlation relations between and within classes, times tau^2."""

    kind: Literal["dist"] = "dist"
    weight: NonNegativeFloat = 2.0  # authors' kd_loss_weight (ImageNet and CIFAR-100)
    beta: NonNegativeFloat = 1.0  # inter-class relation
    gamma: NonNegativeFloat = 1.0  # intra-class relation
    tau: PositiveFloat = 1.0  # ImageNet 1 (kd: dist); CIFAR-100 4 (kd: dist_t4)
    term: ClassVar[type[LossTerm]] = DISTLoss
    label: ClassVar[str] = "DIST"

    def build(self, ctx: BuildContext) -> LossTerm:
        return DISTLoss(self.beta, self.gamma, self.tau)
