"""One registry of model constructors (timm-style): names -> builders with the same keywords.

It imports no zoo module: the zoo modules import it (``@register_model``) and the package
(``normkd/models/__init__.py``) imports every zoo module but the lazy ones below.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

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
    return sorted(set(_REGISTRY).union(*LAZY_ZOO.values()))


def model_entrypoint(name: str) -> Callable[..., nn.Module] | None:
    """The builder registered as ``name`` (its lazy zoo module imported first), or None."""
    if name not in _REGISTRY:
        for module, names in LAZY_ZOO.items():
            if name in names:
                importlib.import_module(module)  # by name: the registry depends on no zoo module
    return _REGISTRY.get(name)


def unknown_model_message(name: str) -> str:
    """The error for a name that is neither in the zoo nor ``timm:...``: lists what is valid."""
    return (  # the prefixes first: a clipped message (config.MAX_MESSAGE) still names them
        f"unknown model {name!r}; valid names: torchvision:<any torchvision classifier>, "
        f"timm:<any timm model> (with normkd[timm]), or a zoo name: {', '.join(list_models())}"
    )
