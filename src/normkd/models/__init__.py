"""Model zoos (CIFAR-100 KD benchmark family, ImageNet) behind one registry and one tap contract."""

from normkd.models.registry import UnknownModelError, create_model, list_models, register_model
from normkd.models.taps import TapSpec, capture, discover_taps, get_taps
from normkd.models.weights import CheckpointError, load_weights, read_state_dict

__all__ = [
    "CheckpointError",
    "TapSpec",
    "UnknownModelError",
    "capture",
    "create_model",
    "discover_taps",
    "get_taps",
    "list_models",
    "load_weights",
    "read_state_dict",
    "register_model",
]
