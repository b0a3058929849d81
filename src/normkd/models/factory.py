"""``create_model``: the one front door to zoo, ``timm:`` and ``torchvision:`` models (timm's
``_factory`` to the registry): it imports the registry, never the other way round."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from normkd.models import external as ext
from normkd.models.registry import UnknownModelError, model_entrypoint, unknown_model_message
from normkd.models.weights import load_weights


def create_model(
    name: str, num_classes: int = 100, weights: str | Path | None = None, **kwargs: object
) -> nn.Module:
    """Build a zoo model, ``timm:<name>`` or ``torchvision:<name>`` (random init); ``weights`` is a
    local checkpoint loaded safely (never downloaded)."""
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
    if name.startswith(ext.PREFIX):
        model = ext.create_timm(name[len(ext.PREFIX) :], num_classes=num_classes, **kwargs)
    elif name.startswith(ext.TV_PREFIX):
        model = ext.create_torchvision(name[len(ext.TV_PREFIX) :], num_classes, **kwargs)
    elif name == ext.EXTERNAL:
        raise UnknownModelError(ext.EXTERNAL_HELP)
    elif (build := model_entrypoint(name)) is None:
        raise UnknownModelError(unknown_model_message(name))
    else:
        model = build(num_classes=num_classes, **kwargs)
    if weights is not None:
        load_weights(model, weights)
    return model
