"""Loss terms: one file each. Importing this package registers every term module in it, so a new
term is one new file here (its ``@register_term`` config makes it a recipe ``kind``)."""

import importlib
import pkgutil

from normkd.losses.base import (
    TAP_KINDS,
    TERMS,
    BuildContext,
    LossTerm,
    StepState,
    Taps,
    TapShapes,
    TermConfig,
    method_kinds,
    method_label,
    register_term,
)

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

from normkd.losses.at import ATLoss, at_pair_loss, attention_map  # noqa: E402
from normkd.losses.ce import CELoss  # noqa: E402
from normkd.losses.crd import CRDLoss, nce_loss  # noqa: E402
from normkd.losses.dkd import DKDLoss, dkd_parts  # noqa: E402
from normkd.losses.fitnet import FitNetLoss, hint_regressor  # noqa: E402
from normkd.losses.kd import KDLoss, kd_loss  # noqa: E402
from normkd.losses.norm import NORMLoss, ramp_weight  # noqa: E402

__all__ = [
    "TAP_KINDS",
    "TERMS",
    "ATLoss",
    "BuildContext",
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
    "TermConfig",
    "at_pair_loss",
    "attention_map",
    "dkd_parts",
    "hint_regressor",
    "kd_loss",
    "method_kinds",
    "method_label",
    "nce_loss",
    "ramp_weight",
    "register_term",
]
