"""Loss terms: one file each, each a small nn.Module that declares the taps it reads."""

from normkd.losses.at import ATLoss, at_pair_loss, attention_map
from normkd.losses.base import TAP_KINDS, LossTerm, StepState, Taps, TapShapes
from normkd.losses.ce import CELoss
from normkd.losses.crd import CRDLoss, nce_loss
from normkd.losses.dkd import DKDLoss, dkd_parts
from normkd.losses.fitnet import FitNetLoss, hint_regressor
from normkd.losses.kd import KDLoss, kd_loss
from normkd.losses.norm import NORMLoss, ramp_weight

__all__ = [
    "TAP_KINDS",
    "ATLoss",
    "CELoss",
    "CRDLoss",
    "DKDLoss",
    "FitNetLoss",
    "KDLoss",
    "LossTerm",
    "NORMLoss",
    "StepState",
    "TapShapes",
    "Taps",
    "at_pair_loss",
    "attention_map",
    "dkd_parts",
    "hint_regressor",
    "kd_loss",
    "nce_loss",
    "ramp_weight",
]
