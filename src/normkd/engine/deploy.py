"""From a trained student to what ships: the terms' deploy, weights + metadata in safetensors, ONNX.

One path for the end of a run, ``normkd merge``, ``normkd export`` and ``normkd.distill``: the
deployable model is what the recipe's terms make of the trained student (``TermConfig.deploy``;
the student itself when no term wraps it), checked against it on real inputs, saved with the
metadata ``load_model_file`` rebuilds it by.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from normkd.config import Recipe
from normkd.data.build import Data
from normkd.engine.checkpoint import atomic_write
from normkd.errors import UserError
from normkd.extras import require
from normkd.models.external import EXTERNAL, name_of
from normkd.models.taps import max_logit_diff

if TYPE_CHECKING:
    from normkd.engine.job import Job


def deploy_checked(job: Job, x: torch.Tensor) -> tuple[nn.Module, float]:
    """(the model to ship, max |logit difference| to the trained student on ``x``)."""
    model = job.deployable()
    return model, max_logit_diff(job.student, model, x)


def model_meta(recipe: Recipe, plain: nn.Module, data: Data, merged: bool) -> dict[str, Any]:
    """What ``normkd.engine.checkpoint.load_model_file`` needs to rebuild the model by name, and
    what a deployment needs to feed it (input shape, normalisation, class names, where known).
    A torchvision/timm object passed from Python is recorded by the name that rebuilds it."""
    name = recipe.student.model
    if name == EXTERNAL:
        name = name_of(plain, data.num_classes) or EXTERNAL
    meta: dict[str, Any] = {
        "model": name,
        "class": f"{type(plain).__module__}.{type(plain).__qualname__}",
        "num_classes": data.num_classes,
        "kwargs": recipe.student.kwargs,
        "recipe": recipe.name,
        "input_shape": list(data.in_shape),
    }
    if data.mean is not None and data.std is not None:
        meta |= {"mean": list(data.mean), "std": list(data.std)}
    if data.classes:
        meta["class_names"] = list(data.classes)
    if merged:  # a term's deploy made the model (the key's name: files already written use it)
        meta["merged_from_ft"] = True
    return meta


def export(
    model: nn.Module, meta: dict[str, Any], path: Path, input_shape: tuple[int, ...] | None = None
) -> float | None:
    """Export a deployable model to ONNX at the input shape its run used (``input_shape``
    overrides it), with the metadata a deployment needs in the file; returns the ONNX check."""
    shape = tuple(input_shape or meta.get("input_shape") or ())
    if len(shape) != 3 or min(shape) < 1:
        raise UserError(
            "the model file records no input shape (written before normkd stored it): "
            "give one as C,H,W (--input-shape / input_shape=)"
        )
    checked: list[float | None] = []

    def write(tmp: str) -> None:  # the file appears whole, checked and labelled, or not at all
        checked.append(export_onnx(model, Path(tmp), shape))
        _onnx_metadata(Path(tmp), {**meta, "input_shape": list(shape)})

    atomic_write(path, write)
    return checked[0]


ONNX_META = ("model", "num_classes", "input_shape", "mean", "std", "class_names", "recipe")


def _onnx_metadata(path: Path, meta: dict[str, Any]) -> None:
    """normkd's metadata as ONNX ``metadata_props`` (one JSON value per key), so a runtime reads
    the model's input size, normalisation and class names from the file itself."""
    import json

    import onnx

    proto = onnx.load(str(path))
    for key in ONNX_META:
        if key in meta:
            entry = proto.metadata_props.add()
            entry.key, entry.value = key, json.dumps(meta[key])
    onnx.save(proto, str(path))


def export_onnx(model: nn.Module, path: Path, input_shape: tuple[int, ...]) -> float | None:
    """Export to ONNX (batch axis dynamic); returns onnxruntime's max |logit diff| vs PyTorch,
    or None when onnxruntime is not installed. A difference above 1e-3 is refused."""
    require("onnx")  # the exporter and the metadata write through it: name the extra first
    x = torch.randn(1, *input_shape)
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        # The TorchScript exporter needs no extra package (the dynamo one needs onnxscript).
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            model,
            (x,),
            str(path),
            input_names=["images"],
            output_names=["logits"],
            dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}},
            dynamo=False,
        )
    try:
        import onnxruntime as ort
    except ImportError:
        return None
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    xb = torch.randn(4, *input_shape)
    got = torch.from_numpy(sess.run(None, {"images": xb.numpy()})[0])
    with torch.no_grad():
        want = model(xb)
    diff = float((got - want).abs().max())
    scale = max(1.0, float(want.abs().max()))  # float32 kernels differ relative to the logits
    if diff > 1e-3 * scale:
        raise UserError(
            f"ONNX output differs from PyTorch by {diff:.2e} (logits up to {scale:.3g})"
        )
    return diff
