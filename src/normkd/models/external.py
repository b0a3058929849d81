"""Models from outside the zoo: ``timm:<name>``, ``torchvision:<name>`` and ``external``.

timm and torchvision models are always built with random initialisation (normkd never
downloads); trained weights come from a local file (``weights=PATH``) as for the zoo. timm is an
optional extra (``pip install 'normkd[timm]'``), imported only when a ``timm:`` name is used.
``external`` names a model object passed from Python (``normkd.distill``), which has no name.
"""

from __future__ import annotations

import difflib
from typing import Any

from torch import nn

from normkd.errors import UserError

PREFIX = "timm:"
TV_PREFIX = "torchvision:"
EXTERNAL = "external"
EXTERNAL_HELP = (
    f"'{EXTERNAL}' stands for a model object passed from Python (normkd.distill), which normkd "
    "cannot rebuild by name: build the same model yourself and load the weights with "
    "normkd.models.load_weights(model, PATH)"
)


def _timm() -> Any:
    try:
        import timm
    except ImportError:
        raise UserError("timm models need the optional extra: pip install 'normkd[timm]'") from None
    return timm


def check_timm_name(name: str) -> str:
    """``name`` (without the ``timm:`` prefix) if timm knows it, else an error with close matches."""
    from normkd.models.registry import UnknownModelError

    timm = _timm()
    names = timm.list_models()
    base = name.split(".", 1)[0]  # a pretrained tag (resnet10t.c3_in1k) names the same model
    if base not in names:
        close = difflib.get_close_matches(base, names, n=6, cutoff=0.6)
        hint = (
            f"close matches: {', '.join(PREFIX + c for c in close)}" if close else "no close match"
        )
        raise UnknownModelError(
            f"unknown timm model {PREFIX}{name}; {hint} (timm.list_models() lists all "
            f"{len(names)} names)"
        )
    return name


def create_timm(name: str, num_classes: int, **kwargs: Any) -> nn.Module:
    """``timm.create_model(name, pretrained=False, num_classes=...)`` with readable errors."""
    if kwargs.pop("pretrained", False):
        raise UserError(
            f"{PREFIX}{name}: pretrained=True would download weights, and normkd never downloads; "
            "save them to a local file and pass weights=PATH"
        )
    check_timm_name(name)
    try:
        return _timm().create_model(name, pretrained=False, num_classes=num_classes, **kwargs)
    except TypeError as err:
        raise UserError(f"{PREFIX}{name}: cannot build it with keywords {kwargs}: {err}") from None


def _tv_names() -> list[str]:
    import torchvision.models as tvm

    return tvm.list_models(module=tvm)  # classification models only


def check_torchvision_name(name: str) -> str:
    """``name`` (without ``torchvision:``) if torchvision has that classifier, else close matches."""
    from normkd.models.registry import UnknownModelError

    names = _tv_names()
    if name not in names:
        close = difflib.get_close_matches(name, names, n=6, cutoff=0.6)
        hint = ", ".join(TV_PREFIX + c for c in close) if close else ", ".join(names)
        raise UnknownModelError(
            f"unknown torchvision model {TV_PREFIX}{name}; "
            + ("close matches: " if close else "valid names: ")
            + hint
        )
    return name


def create_torchvision(name: str, num_classes: int, **kwargs: Any) -> nn.Module:
    """``torchvision.models.get_model(name, weights=None, num_classes=...)``, random init."""
    import torchvision.models as tvm

    check_torchvision_name(name)
    try:
        return tvm.get_model(name, weights=None, num_classes=num_classes, **kwargs)
    except (TypeError, ValueError) as err:
        raise UserError(
            f"{TV_PREFIX}{name}: cannot build it with keywords {kwargs}: {err}"
        ) from None


def check_name(name: str) -> bool:
    """True for a valid ``timm:`` / ``torchvision:`` name or ``external``; raises for a bad one;
    False for anything else (a zoo name, checked by the registry)."""
    if name.startswith(PREFIX):
        check_timm_name(name[len(PREFIX) :])
        return True
    if name.startswith(TV_PREFIX):
        check_torchvision_name(name[len(TV_PREFIX) :])
        return True
    return name == EXTERNAL
