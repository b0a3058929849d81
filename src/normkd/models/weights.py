"""Safe loading of published checkpoints (RepDistiller / mdistiller / torchvision layouts)."""

from __future__ import annotations

import pickle
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from normkd.errors import UserError

_WRAPPER_KEYS = ("model", "net", "state_dict", "model_state_dict", "student")


class CheckpointError(UserError):
    """A checkpoint that cannot be read or does not fit the model; the message says why."""


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a tensor dict from ``path`` without running any code from the file.

    Accepts safetensors files and torch files holding a bare state_dict or one wrapped as
    ``{'model': ...}``, ``{'net': ...}`` or ``{'state_dict': ...}``. A ``module.`` prefix (from
    DataParallel) is stripped.
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
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as err:
            raise CheckpointError(
                f"refused to load {path}: it holds objects other than tensors and plain data "
                f"(weights_only=True). normkd never unpickles code. Detail: {str(err).splitlines()[0]}"
            ) from err
        except (RuntimeError, EOFError, OSError) as err:
            raise CheckpointError(
                f"cannot read checkpoint {path} (corrupt or truncated?): {err}"
            ) from err
    state = _unwrap(obj, path)
    if all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    return state


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
        parts = [f"checkpoint {path} does not fit {type(model).__name__}:"]
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
        raise CheckpointError("; ".join(parts))
    model.load_state_dict(state, strict=strict)
    return model
