"""Model zoos (CIFAR-100 KD benchmark family, ImageNet) behind one registry and one tap contract.

Importing this package imports every module in it, so a zoo model is one ``@register_model`` in
a module here; the registry imports none of them. The lazy zoos (``registry.LAZY_ZOO``: the
ImageNet one, which needs torchvision) are imported when one of their names is asked for.
"""

import importlib
import pkgutil

from normkd.models.factory import create_model
from normkd.models.registry import LAZY_ZOO, UnknownModelError, list_models, register_model
from normkd.models.taps import (
    TapShapes,
    TapSpec,
    capture,
    discover_taps,
    eval_mode,
    get_taps,
    probe,
)
from normkd.models.weights import CheckpointError, load_weights, read_state_dict

for _module in pkgutil.iter_modules(__path__):
    if f"{__name__}.{_module.name}" not in LAZY_ZOO:
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = [
    "CheckpointError",
    "TapShapes",
    "TapSpec",
    "UnknownModelError",
    "capture",
    "create_model",
    "discover_taps",
    "eval_mode",
    "get_taps",
    "list_models",
    "load_weights",
    "probe",
    "read_state_dict",
    "register_model",
]
