"""One registry of model constructors (timm-style): names -> builders with the same keywords."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from torch import nn

from normkd.errors import UserError

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


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
    """All registered model names, sorted."""
    _load_zoo()
    return sorted(_REGISTRY)


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
    elif name not in _REGISTRY:
        raise UnknownModelError(unknown_model_message(name))
    else:
        model = _REGISTRY[name](num_classes=num_classes, **kwargs)
    if weights is not None:
        from normkd.models.weights import load_weights

        load_weights(model, weights)
    return model


def unknown_model_message(name: str) -> str:
    """The error for a name that is neither in the zoo nor ``timm:...``: lists what is valid."""
    _load_zoo()
    return (
        f"unknown model {name!r}; valid names: {', '.join(sorted(_REGISTRY))}, or "
        "torchvision:<any torchvision classifier>, or timm:<any timm model> (with normkd[timm])"
    )


def _load_zoo() -> None:
    # Importing the zoo modules runs their @register_model decorators.
    from normkd.models import cifar, imagenet, tiny, vit  # noqa: F401
