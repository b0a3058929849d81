"""Atomic checkpoint writes and safe reads (weights_only / safetensors): a kill never corrupts."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from normkd.config import MAX_IMAGE_SIZE
from normkd.errors import UserError
from normkd.models.weights import CheckpointError, safe_torch_load

FORMAT = "normkd-checkpoint-v1"
TEMP_GLOB = ".*.tmp"  # what atomic_write's temp files look like; a kill -9 can leave one behind
STATE_KEYS = ("epoch", "distiller", "optimizer", "best_top1", "best_epoch", "recipe")


def atomic_write(path: Path, write: Callable[[str], Any]) -> None:
    """Write through a temp file in the same folder, fsync, then rename over ``path``.

    A reader sees the old file or the new one, never a partial one, whenever the writer dies.
    """
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as err:
        raise CheckpointError(f"cannot write {path}: {err.strerror or err}") from None
    os.close(fd)
    try:
        write(tmp)
        # mkstemp makes 0600 and some writers (safetensors) recreate the file: set the mode after
        # the write, since saved runs are ordinary files others may read
        os.chmod(tmp, 0o644)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as err:  # disk full (torch.save says so as RuntimeError),
        # folder removed, file-size limit, ...: the previous file is untouched
        Path(tmp).unlink(missing_ok=True)
        reason = err.strerror if isinstance(err, OSError) and err.strerror else str(err)
        raise CheckpointError(f"cannot write {path}: {' '.join(reason.split())[:200]}") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def remove_stale_temps(folder: Path) -> list[Path]:
    """Delete temp files that killed writers left in ``folder``; returns what was removed."""
    stale = sorted(folder.glob(TEMP_GLOB)) if folder.is_dir() else []
    for f in stale:
        f.unlink(missing_ok=True)
    return stale


def atomic_write_text(path: Path, text: str) -> None:
    """Replace a small text file (config.yaml, data.json, summary.json) whole."""
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Save a training state (tensors and plain data only, so it loads with weights_only)."""
    atomic_write(path, lambda tmp: torch.save({"format": FORMAT, **state}, tmp))


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Load a training state written by :func:`save_checkpoint`, never unpickling code."""
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    state = safe_torch_load(path)
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a normkd training checkpoint")
    missing = [k for k in STATE_KEYS if k not in state]
    if missing or not isinstance(state["distiller"], dict) or not isinstance(state["epoch"], int):
        raise CheckpointError(
            f"{path} is an incomplete normkd training checkpoint (missing {', '.join(missing)})"
            if missing
            else f"{path} is a malformed normkd training checkpoint"
        )
    return state


def save_model(path: Path, model: nn.Module, meta: dict[str, Any]) -> None:
    """Save deployable weights as safetensors, with the model's name/classes in the metadata."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={"normkd": json.dumps(meta)}))


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
    try:
        out = json.loads(meta)
    except ValueError:
        out = None
    ok = (
        isinstance(out, dict)
        and isinstance(out.get("model"), str)
        and type(out.get("num_classes")) is int
        and 1 <= out["num_classes"] <= MAX_CLASSES
        and (out.get("input_shape") is None or input_shape_ok(out["input_shape"]))
        and isinstance(out.get("kwargs", {}), dict)
        and not {"num_classes", "weights"} & set(out.get("kwargs", {}))
    )
    if not ok:
        raise CheckpointError(
            f"{path}: its normkd metadata must be JSON with model (a name), num_classes "
            f"(an integer in 1..{MAX_CLASSES:,}), kwargs (a mapping) and, if any, input_shape "
            f"(C,H,W each in 1..{MAX_IMAGE_SIZE}); got {meta[:200]!r}"
        )
    return out


MAX_CLASSES = 1_000_000  # a model file's class count: far beyond ImageNet-21k's 21,841


def input_shape_ok(shape: Any) -> bool:
    """Whether ``shape`` is C,H,W of integers in 1..MAX_IMAGE_SIZE (what an export allocates)."""
    return (
        isinstance(shape, list | tuple)
        and len(shape) == 3
        and all(type(s) is int and 1 <= s <= MAX_IMAGE_SIZE for s in shape)
    )


def load_model_file(path: Path) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a model saved by :func:`save_model` from its metadata and weights."""
    from normkd.models import create_model, load_weights

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"model file not found: {path}")
    meta = read_model_meta(path)
    if meta["model"] == "external":  # an object passed to normkd.distill, not a name
        raise CheckpointError(
            f"{path} holds a {meta.get('class', 'model')} passed from Python (normkd.distill), "
            "which normkd cannot rebuild by name: build that model yourself and load the weights "
            f"with normkd.models.load_weights(model, {str(path)!r})"
        )
    try:
        model = create_model(
            meta["model"], num_classes=meta["num_classes"], **meta.get("kwargs", {})
        )
    except UserError as err:  # an unknown model name
        raise CheckpointError(f"{path}: {err}") from None
    except (TypeError, ValueError) as err:  # kwargs the model's constructor refuses
        raise CheckpointError(f"{path}: its kwargs do not fit {meta['model']!r}: {err}") from None
    from normkd.losses import TERMS

    for term in TERMS.values():  # modules a term left in the deployed student's path
        term.restore(model, path)
    load_weights(model, path)
    return model.eval(), meta


__all__ = [
    "atomic_write",
    "atomic_write_text",
    "load_checkpoint",
    "load_file",
    "load_model_file",
    "read_model_meta",
    "remove_stale_temps",
    "save_checkpoint",
    "save_model",
]
