"""Optional extras: which pip extra brings which package, and the one line when it is missing.

normkd's core (training, NORM, merge, CIFAR/ImageNet/folder data) needs torch, torchvision,
numpy, pydantic, PyYAML, tqdm and safetensors. Heavier packages only some features use are
extras (``pip install 'normkd[digits,plots,tensorboard,onnx,timm]'``; ``make demo`` and
``make test`` install them all).
"""

from __future__ import annotations

import importlib
from types import ModuleType

from normkd.errors import UserError

# import name -> (extra, what needs it)
EXTRAS = {
    "sklearn": ("digits", "the embedded digits data (scikit-learn ships it)"),
    "matplotlib": ("plots", "PNG plots (demo, reproduce, benchmarks)"),
    "tensorboard": ("tensorboard", "TensorBoard event files"),
    "onnx": ("onnx", "ONNX export"),
    "onnxruntime": ("onnx", "checking an ONNX export against PyTorch"),
    "timm": ("timm", "timm models (timm:<name>)"),
}


def missing_line(module: str) -> str:
    """The line that names the extra to install for ``module``."""
    top = module.split(".")[0]
    extra, what = EXTRAS[top]
    return f"{what}: install the optional extra, pip install 'normkd[{extra}]' ({top} is missing)"


def require(module: str) -> ModuleType:
    """``import module``, or a one-line UserError naming the extra that brings it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise UserError(missing_line(module)) from None


def available(module: str) -> bool:
    """Whether ``module`` imports (for features that go on without it, saying so once)."""
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True
