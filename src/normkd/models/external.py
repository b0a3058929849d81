"""Models from outside the zoo: ``timm:<name>``, ``torchvision:<name>`` and ``external``.

timm and torchvision models are built with random initialisation; trained weights come from a
local file (``weights=PATH``) as for the zoo. A timm model may instead start from timm's own
pretrained weights through timm's loader: ``pretrained=True`` (timm fetches them into its cache:
the one download normkd lets happen, and only when asked) or ``pretrained_file=PATH`` (the same
weights from a local file, offline); timm replaces their classifier when ``num_classes`` differs.
timm is an optional extra (``pip install 'normkd[timm]'``), imported only when a ``timm:`` name
is used. ``external`` names a model object passed from Python (``normkd.distill``).
"""

from __future__ import annotations

import difflib
import warnings
from pathlib import Path
from typing import Any

from torch import nn

from normkd.errors import UserError
from normkd.extras import require
from normkd.models.registry import UnknownModelError
from normkd.models.weights import CheckpointError

PREFIX = "timm:"
TV_PREFIX = "torchvision:"
EXTERNAL = "external"
EXTERNAL_HELP = (
    f"'{EXTERNAL}' stands for a model object passed from Python (normkd.distill), which normkd "
    "cannot rebuild by name: build the same model yourself and load the weights with "
    "normkd.models.load_weights(model, PATH)"
)


def _timm() -> Any:
    return require("timm")


def check_timm_name(name: str) -> str:
    """``name`` (without the ``timm:`` prefix) if timm knows it, else an error with close matches."""
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


def create_timm(
    name: str,
    num_classes: int,
    *,
    pretrained: bool = False,
    pretrained_file: str | Path | None = None,
    **kwargs: Any,
) -> nn.Module:
    """``timm.create_model(name, num_classes=...)``: random init, or timm's pretrained weights.

    timm's own loader is used for pretrained weights because it knows each model's quirks (its
    checkpoint filter, input-channel adaptation, the classifier to drop when ``num_classes``
    differs from the weights'). ``pretrained_file`` points it at a local copy through
    ``pretrained_cfg_overlay=dict(file=PATH)``, loaded with ``weights_only``.
    """
    check_timm_name(name)
    opts: dict[str, Any] = {}
    where = "its pretrained weights"
    if pretrained_file is not None:
        path = Path(pretrained_file).expanduser()
        if not path.is_file():
            raise CheckpointError(f"{PREFIX}{name}: pretrained_file not found: {path}")
        opts = {"pretrained": True, "pretrained_cfg_overlay": {"file": str(path)}}
        where = f"pretrained_file {path}"
    elif pretrained:
        opts = {"pretrained": True}
    try:
        with warnings.catch_warnings():  # plain pickles (protocol > 2) warn on every load
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            model = _timm().create_model(name, num_classes=num_classes, **opts, **kwargs)
    except TypeError as err:
        raise UserError(f"{PREFIX}{name}: cannot build it with keywords {kwargs}: {err}") from None
    except Exception as err:  # timm, torch and huggingface_hub each raise their own types
        if not opts:
            raise
        if "weights_only" in str(err):  # torch's weights_only unpickler refused the file
            raise CheckpointError(
                f"{PREFIX}{name}: refused to load {where}: it holds objects other than tensors "
                "and plain data (normkd never unpickles code)"
            ) from None
        raise CheckpointError(f"{PREFIX}{name}: cannot load {where}: {_one_line(err)}") from None
    if pretrained_file is not None:
        _check_covered(model, Path(pretrained_file).expanduser(), name)
    return model


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= 400 else text[:400] + " ..."


def pretrained_report(model: nn.Module, num_classes: int) -> tuple[int, int | None]:
    """(tensors timm loaded, the weights' class count if timm replaced their classifier).

    What timm's loader read comes from its ``pretrained_cfg``: the weights' class count and the
    classifier it drops when ``num_classes`` differs (every other tensor was loaded).
    """
    own = model.state_dict()
    theirs = (getattr(model, "pretrained_cfg", None) or {}).get("num_classes")
    if not isinstance(theirs, int) or theirs == num_classes:
        return len(own), None
    head = tuple(h + "." for h in _head_names(model))
    return sum(not k.startswith(head) for k in own), theirs


def _head_names(model: nn.Module) -> tuple[str, ...]:
    """timm's name(s) of the classifier it drops when the class counts differ."""
    names = (getattr(model, "pretrained_cfg", None) or {}).get("classifier") or ()
    return (names,) if isinstance(names, str) else tuple(names)


def _check_covered(model: nn.Module, path: Path, name: str) -> None:
    """Refuse a pretrained_file that left part of the model at random init.

    When the class counts differ timm loads without ``strict`` (it has dropped the classifier),
    so a file of another model whose keys barely overlap would load silently; every tensor but
    the classifier's must come from the file.
    """
    from normkd.models.weights import checkpoint_keys

    head = _head_names(model)
    own = model.state_dict()
    missing = sorted(
        k
        for k in set(own) - checkpoint_keys(path)
        if not k.startswith(tuple(h + "." for h in head))
    )
    if missing:
        shown = ", ".join(missing[:6]) + (
            f", ... ({len(missing)} in all)" if len(missing) > 6 else ""
        )
        raise CheckpointError(
            f"{PREFIX}{name}: pretrained_file {path} lacks {shown}: is it the weights file of "
            f"another model? (a checkpoint of your own goes in weights: instead)"
        )


def _tv_names() -> list[str]:
    import torchvision.models as tvm

    return tvm.list_models(module=tvm)  # classification models only


def check_torchvision_name(name: str) -> str:
    """``name`` (without ``torchvision:``) if torchvision has that classifier, else close matches."""
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


def _layout(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _same_layout(build: Any, model: nn.Module) -> bool:
    """Whether ``build()``, made on the meta device (no memory, no init), has ``model``'s class
    and exactly its tensors and shapes, so ``load_weights`` restores ``model`` from its file."""
    import torch

    try:
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            other = build()
    except Exception:  # a builder that refuses these arguments is not the one
        return False
    return type(other) is type(model) and _layout(other) == _layout(model)


def name_of(model: nn.Module, num_classes: int) -> str | None:
    """The ``torchvision:<name>`` / ``timm:<name>`` that rebuilds a model object passed from
    Python (same class, tensors and shapes), so ``normkd eval/export`` can open its run; None
    for anything else (your own class): it stays ``external``."""
    module = type(model).__module__
    if module.startswith("torchvision.models"):
        import inspect

        import torchvision.models as tvm

        for name in _tv_names():
            fn = tvm.get_model_builder(name)
            if (
                getattr(inspect.signature(fn).return_annotation, "__name__", None)
                != type(model).__name__
            ):
                continue  # the builder makes another class: no need to build it
            if _same_layout(lambda fn=fn: fn(weights=None, num_classes=num_classes), model):
                return TV_PREFIX + name
    elif module.startswith("timm."):
        arch = (getattr(model, "pretrained_cfg", None) or {}).get("architecture")
        if isinstance(arch, str) and _same_layout(
            lambda: _timm().create_model(arch, num_classes=num_classes), model
        ):
            return PREFIX + arch
    return None
