"""Safe loading of published checkpoints (RepDistiller / mdistiller / torchvision layouts)."""

from __future__ import annotations

import argparse
import contextlib
import pickle
import re
import warnings
from collections.abc import Iterator, Mapping
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


def load_weights(model: nn.Module, path: str | Path, strict: bool = True) -> nn.Module:
    """Load a checkpoint into ``model``; all mismatches are reported in one readable error."""
    state = read_state_dict(path)
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong_shape = sorted(
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in set(own) & set(state)
        if state[k].shape != own[k].shape
    )
    if wrong_shape or (strict and (missing or unexpected)):
        parts = []
        for label, items in (
            ("missing keys", missing),
            ("unexpected keys", unexpected),
            ("shape mismatches", wrong_shape),
        ):
            if items:
                shown = ", ".join(items[:8]) + (
                    f", ... ({len(items)} in all)" if len(items) > 8 else ""
                )
                parts.append(f"{label}: {shown}")
        raise CheckpointError(
            f"checkpoint {path} does not fit {type(model).__name__} (another architecture?): "
            + "; ".join(parts)
        )
    model.load_state_dict(state, strict=strict)
    return model
