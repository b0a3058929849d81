"""One registry of model constructors (timm-style): names -> builders with the same keywords."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from torch import nn

from normkd.errors import UserError

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}
# Zoo modules imported only when one of their models is asked for: the ImageNet zoo builds on
# torchvision, whose import (it pulls in torch._dynamo) costs seconds that a CIFAR or digits run,
# and every `normkd` process for one, should not pay. tests/models check these lists are true.
LAZY_ZOO: dict[str, tuple[str, ...]] = {
    "normkd.models.imagenet": (
        "mobilenet_v1", "mobilenet_v2", "resnet18", "resnet34", "resnet50", "resnet50_1_4",
    ),
}  # fmt: skip


class UnknownModelError(UserError):
    """Raised for a model name that is not registered; the message lists the valid names."""


def register_model(name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator: register ``fn(num_classes=..., **kwargs) -> nn.Module`` under ``name``."""

    def deco(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} registered twice")
        _REGISTRY[name] = fn
        return fn

    return deco


def list_models() -> list[str]:
    """All registered model names, sorted (lazily loaded zoos named, not imported)."""
    _load_zoo()
    return sorted(set(_REGISTRY).union(*LAZY_ZOO.values()))


def create_model(
    name: str, num_classes: int = 100, weights: str | Path | None = None, **kwargs: object
) -> nn.Module:
    """Build a zoo model, ``timm:<name>`` or ``torchvision:<name>`` (random init); ``weights`` is a
    local checkpoint loaded safely (never downloaded)."""
    _load_zoo()
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
    from normkd.models import external as ext

    if name.startswith(ext.PREFIX):
        model = ext.create_timm(name[len(ext.PREFIX) :], num_classes=num_classes, **kwargs)
    elif name.startswith(ext.TV_PREFIX):
        model = ext.create_torchvision(name[len(ext.TV_PREFIX) :], num_classes, **kwargs)
    elif name == ext.EXTERNAL:
        raise UnknownModelError(ext.EXTERNAL_HELP)
    elif name not in _REGISTRY and not _load_lazy(name):
        raise UnknownModelError(unknown_model_message(name))
    else:
        model = _REGISTRY[name](num_classes=num_classes, **kwargs)
    if weights is not None:
        from normkd.models.weights import load_weights

        load_weights(model, weights)
    return model


def unknown_model_message(name: str) -> str:
    """The error for a name that is neither in the zoo nor ``timm:...``: lists what is valid."""
    return (
        f"unknown model {name!r}; valid names: {', '.join(list_models())}, or "
        "torchvision:<any torchvision classifier>, or timm:<any timm model> (with normkd[timm])"
    )


def _load_zoo() -> None:
    # Importing the zoo modules runs their @register_model decorators.
    from normkd.models import cifar, tiny, vit  # noqa: F401


def _load_lazy(name: str) -> bool:
    """Import the lazily loaded zoo module that provides ``name``; whether it registered it."""
    for module, names in LAZY_ZOO.items():
        if name in names:
            import importlib

            importlib.import_module(module)
            return name in _REGISTRY
    return False
