"""Loss terms: one file each, each a small nn.Module that declares the taps it reads."""

from normkd.losses.base import TAP_KINDS, LossTerm, StepState, Taps
from normkd.losses.ce import CELoss
from normkd.losses.kd import KDLoss, kd_loss
from normkd.losses.norm import NORMLoss, ramp_weight

__all__ = [
    "TAP_KINDS",
    "CELoss",
    "KDLoss",
    "LossTerm",
    "NORMLoss",
    "StepState",
    "Taps",
    "kd_loss",
    "ramp_weight",
]
