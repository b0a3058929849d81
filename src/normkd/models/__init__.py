"""Model zoos (CIFAR-100 KD benchmark family, ImageNet) behind one registry and one tap contract."""

from normkd.models.registry import UnknownModelError, create_model, list_models, register_model
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
