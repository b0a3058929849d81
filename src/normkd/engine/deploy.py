"""From a trained student to what ships: FT merged, weights + metadata in safetensors, ONNX.

One path for the end of a run, ``normkd merge``, ``normkd export`` and ``normkd.distill``: the
deployable model is the student's own architecture (NORM's FT folded into the classifier, checked
against the FT student on real inputs), saved with the metadata ``load_model_file`` rebuilds it by.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from normkd.config import Recipe
from normkd.errors import UserError
from normkd.norm import FTStudent, max_logit_diff, merge_ft


def deployable(student: nn.Module) -> nn.Module:
    """The plain student: FT merged into the classifier when there is one, else the student."""
    return merge_ft(student) if isinstance(student, FTStudent) else student


def merge_checked(student: FTStudent, x: torch.Tensor) -> tuple[nn.Module, float]:
    """(merged plain student, max |logit difference| to the FT student on ``x``)."""
    merged = merge_ft(student)
    return merged, max_logit_diff(student, merged, x)


def model_meta(recipe: Recipe, plain: nn.Module, num_classes: int, merged: bool) -> dict[str, Any]:
    """What ``normkd.engine.checkpoint.load_model_file`` needs to rebuild the model by name."""
    meta: dict[str, Any] = {
        "model": recipe.student.model,
        "class": f"{type(plain).__module__}.{type(plain).__qualname__}",
        "num_classes": num_classes,
        "kwargs": recipe.student.kwargs,
        "recipe": recipe.name,
    }
    if merged:
        meta["merged_from_ft"] = True
    return meta


def export_onnx(model: nn.Module, path: Path, input_shape: tuple[int, ...]) -> float | None:
    """Export to ONNX (batch axis dynamic); returns onnxruntime's max |logit diff| vs PyTorch,
    or None when onnxruntime is not installed. A difference above 1e-3 is refused."""
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
