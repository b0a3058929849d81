"""Safe loading of published checkpoints (RepDistiller / mdistiller / torchvision layouts)."""

from __future__ import annotations

import argparse
import contextlib
import pickle
import re
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from normkd.errors import UserError

_WRAPPER_KEYS = ("model", "net", "state_dict", "model_state_dict", "student")
# RepDistiller's ``*_last.pth`` keep the run's argparse options under "opt": plain attributes only.
_SAFE_CLASSES = (argparse.Namespace,)
# mdistiller saves its whole DataParallel-wrapped distiller: student, teacher and the heads.
_DISTILLER_STUDENT = "module.student."


class CheckpointError(UserError):
    """A checkpoint that cannot be read or does not fit the model; the message says why."""


def safe_torch_load(path: Path) -> object:
    """``torch.load(weights_only=True)`` with its failures as one-line CheckpointErrors.

    A file holding anything but tensors and plain data (e.g. a pickle that would run code) is
    refused before any of it runs. The one class let through is ``argparse.Namespace`` (an
    attribute bag whose contents are vetted like everything else), so RepDistiller's
    ``*_last.pth`` load; it is allowed only for this call, never added to torch's global list.
    """
    try:
        with warnings.catch_warnings(), _allow(_SAFE_CLASSES):
            # plain pickles (protocol > 2) warn on every load
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        m = re.search(r"WeightsUnpickler error:\s*(.+?)(?:\.\s|\.?\n|$)", str(err), re.S)
        detail = m.group(1).strip() if m else str(err).strip().splitlines()[0]
        raise CheckpointError(
            f"refused to load {path}: it holds objects other than tensors and plain data "
            f"(normkd never unpickles code; {detail})"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as err:
        raise CheckpointError(
            f"cannot read checkpoint {path} (corrupt or truncated?): {_first_sentence(err)}"
        ) from None


@contextlib.contextmanager
def _allow(classes: tuple[type, ...]) -> Iterator[None]:
    """Allow ``classes`` through ``weights_only`` loads for the duration of the block only.

    Classes the caller already allowed globally are left out, so leaving the block does not take
    away an allowance it did not make. torch 2.4 lacks the scoped ``safe_globals``: there the
    global list is extended, then restored by hand.
    """
    ser = torch.serialization
    new = [c for c in classes if c not in ser.get_safe_globals()]
    if not new:
        yield
    elif hasattr(ser, "safe_globals"):
        with ser.safe_globals(new):
            yield
    else:
        ser.add_safe_globals(new)
        try:
            yield
        finally:
            kept = [g for g in ser.get_safe_globals() if g not in new]
            ser.clear_safe_globals()
            ser.add_safe_globals(kept)


def _first_sentence(err: BaseException) -> str:
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return text.split(". ")[0][:300]


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a tensor dict from ``path`` without running any code from the file.

    Accepts safetensors files and torch files holding a bare state_dict or one wrapped as
    ``{'model': ...}``, ``{'net': ...}`` or ``{'state_dict': ...}``. A ``module.`` prefix (from
    DataParallel) is stripped. An mdistiller whole-distiller checkpoint (every key under
    ``module.``, the student's under ``module.student.``) yields the student's entries alone.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            obj: object = load_file(str(path))
        except Exception as err:  # safetensors raises its own error types
            raise CheckpointError(f"cannot read safetensors file {path}: {err}") from err
    else:
        obj = safe_torch_load(path)
    return _strip_prefixes(_unwrap(obj, path))


def checkpoint_keys(path: str | Path) -> set[str]:
    """The tensor names of a checkpoint; of a safetensors file read from its header alone."""
    path = Path(path)
    if path.suffix == ".safetensors" and path.is_file():
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as fh:
                return set(_strip_prefixes(dict.fromkeys(fh.keys())))  # type: ignore[arg-type]
        except Exception as err:  # safetensors raises its own error types
            raise CheckpointError(f"cannot read safetensors file {path}: {err}") from err
    return set(read_state_dict(path))


def _strip_prefixes(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop DataParallel's ``module.``; of a wrapped distiller keep the student's entries.

    The teacher's and the distillation heads' entries are not the student's weights, so they are
    dropped without a word rather than reported as unexpected keys.
    """
    if not all(k.startswith("module.") for k in state):
        return state
    student = {
        k[len(_DISTILLER_STUDENT) :]: v
        for k, v in state.items()
        if k.startswith(_DISTILLER_STUDENT)
    }
    return student or {k[len("module.") :]: v for k, v in state.items()}


def _unwrap(obj: object, path: Path) -> dict[str, torch.Tensor]:
    if isinstance(obj, Mapping):
        if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            return dict(obj)
        for key in _WRAPPER_KEYS:
            inner = obj.get(key)
            if (
                isinstance(inner, Mapping)
                and inner
                and all(isinstance(v, torch.Tensor) for v in inner.values())
            ):
                return dict(inner)
    raise CheckpointError(
        f"{path} holds no state_dict: expected a dict of tensors, or one under a "
        f"{' / '.join(repr(k) for k in _WRAPPER_KEYS)} key"
    )


@dataclass(frozen=True)
class Loaded:
    """What :func:`fit_weights` put into a model: the tensors it loaded and, when the checkpoint's
    classifier had another class count, the keys of the fresh classifier kept instead."""

    tensors: int
    head: tuple[str, ...] = ()
    classes: int = 0  # the model's class count (when ``head`` is set)
    checkpoint_classes: int = 0  # the checkpoint's

    def note(self, role: str) -> str:
        """One line for the user, e.g. "student.weights: loaded 1,234 tensors; kept a new
        classifier (10 classes) instead of the checkpoint's 1000"."""
        line = f"{role}.weights: loaded {self.tensors:,} tensors"
        if self.head:
            line += (
                f"; kept a new classifier ({self.classes} classes) instead of the checkpoint's "
                f"{self.checkpoint_classes}"
            )
        return line


def load_weights(
    model: nn.Module, path: str | Path, strict: bool = True, *, new_head: bool = False
) -> nn.Module:
    """Load a checkpoint into ``model``; all mismatches are reported in one readable error.

    ``new_head``: a checkpoint whose classifier has another class count (ImageNet weights for a
    10-class student) loads everything else and keeps the model's fresh classifier, the usual
    start of fine-tuning (:func:`fit_weights` says what was kept).
    """
    fit_weights(model, path, strict, new_head=new_head)
    return model


def fit_weights(
    model: nn.Module, path: str | Path, strict: bool = True, *, new_head: bool = False
) -> Loaded:
    """:func:`load_weights`, returning what was loaded and which classifier keys were kept."""
    state = read_state_dict(path)
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = sorted(k for k in set(own) & set(state) if state[k].shape != own[k].shape)
    head = _head_keys(model, own, state, wrong) if new_head and wrong else None
    if (wrong and head is None) or (strict and (missing or unexpected)):
        shapes = [
            f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}" for k in wrong
        ]
        raise CheckpointError(
            f"checkpoint {path} does not fit {type(model).__name__} (another architecture?): "
            + "; ".join(
                f"{label}: {_shown(items)}"
                for label, items in (
                    ("missing keys", missing),
                    ("unexpected keys", unexpected),
                    ("shape mismatches", shapes),
                )
                if items
            )
        )
    if not head:
        model.load_state_dict(state, strict=strict)
        return Loaded(len(state))
    model.load_state_dict({k: v for k, v in state.items() if k not in head}, strict=False)
    first = head[0]
    return Loaded(len(state) - len(head), head, own[first].shape[0], state[first].shape[0])


def _shown(items: list[str]) -> str:
    return ", ".join(items[:8]) + (f", ... ({len(items)} in all)" if len(items) > 8 else "")


def _head_keys(
    model: nn.Module,
    own: Mapping[str, torch.Tensor],
    state: Mapping[str, torch.Tensor],
    wrong: list[str],
) -> tuple[str, ...] | None:
    """``wrong`` (the keys whose shapes differ) if they are all the classifier's class count.

    The classifier is the one the model's tap spec names (``get_taps(model).classifier``), or a
    layer after it (an MLP head's last Linear, as torchvision's MobileNetV3 ``classifier.3``);
    each of its tensors may differ in its first dimension only (classes), by the same counts.
    None when any mismatch lies elsewhere: then the checkpoint is of another architecture.
    """
    from normkd.models.taps import TapSpec, discover_taps

    spec = getattr(model, "tap_spec", None)
    if not isinstance(spec, TapSpec):
        try:  # not cached on the model: the run discovers it later on its own inputs
            spec = discover_taps(model)
        except (ValueError, RuntimeError):
            return None
    position = {k: i for i, k in enumerate(own)}
    start = next((position[k] for k in own if k.startswith(spec.classifier + ".")), None)
    if start is None or any(
        position[k] < start
        or own[k].ndim != state[k].ndim
        or own[k].ndim == 0
        or own[k].shape[1:] != state[k].shape[1:]
        for k in wrong
    ):
        return None
    if len({(own[k].shape[0], state[k].shape[0]) for k in wrong}) != 1:
        return None
    return tuple(wrong)
