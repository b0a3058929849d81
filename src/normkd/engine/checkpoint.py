"""Atomic checkpoint writes and safe reads (weights_only / safetensors): a kill never corrupts."""

from __future__ import annotations

import json
import os
import pickle
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from normkd.models.weights import CheckpointError

FORMAT = "normkd-checkpoint-v1"


def _atomic(path: Path, write) -> None:
    """Write through a temp file in the same folder, fsync, then rename over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Save a training state (tensors and plain data only, so it loads with weights_only)."""
    _atomic(path, lambda tmp: torch.save({"format": FORMAT, **state}, tmp))


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Load a training state written by :func:`save_checkpoint`, never unpickling code."""
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise CheckpointError(
            f"refused to load {path}: it holds objects other than tensors and plain data"
        ) from err
    except (RuntimeError, EOFError, OSError) as err:
        raise CheckpointError(
            f"cannot read checkpoint {path} (corrupt or truncated?): {err}"
        ) from err
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a normkd training checkpoint")
    return state


def save_model(path: Path, model: nn.Module, meta: dict[str, Any]) -> None:
    """Save deployable weights as safetensors, with the model's name/classes in the metadata."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    _atomic(path, lambda tmp: save_file(tensors, tmp, metadata={"normkd": json.dumps(meta)}))


def read_model_meta(path: Path) -> dict[str, Any]:
    """The metadata :func:`save_model` stored (model name, num_classes, ...)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = (fh.metadata() or {}).get("normkd")
    except Exception as err:  # safetensors raises several error types
        raise CheckpointError(f"cannot read {path} as safetensors: {err}") from err
    if meta is None:
        raise CheckpointError(f"{path} has no normkd metadata (was it written by normkd?)")
    return json.loads(meta)


def load_model_file(path: Path) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a model saved by :func:`save_model` from its metadata and weights."""
    from normkd.models import create_model, load_weights

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"model file not found: {path}")
    meta = read_model_meta(path)
    model = create_model(
        meta["model"], num_classes=int(meta["num_classes"]), **meta.get("kwargs", {})
    )
    load_weights(model, path)
    return model.eval(), meta


__all__ = [
    "load_checkpoint",
    "load_file",
    "load_model_file",
    "read_model_meta",
    "save_checkpoint",
    "save_model",
]
