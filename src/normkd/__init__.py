"""normkd: knowledge distillation with NORM (N-to-One Representation Matching) and strong baselines.

``normkd.distill(teacher, student, train_loader, val_loader, method="norm+kd")`` runs your own
models and data through the training engine (see :mod:`normkd.api`).
"""

from typing import Any

__version__ = "0.1.0"
__all__ = ["Result", "__version__", "distill", "export"]


def __getattr__(name: str) -> Any:
    # Lazy, so `import normkd` (and the CLI's start-up) does not pull in torch and the engine.
    if name in ("distill", "export", "Result"):
        from normkd import api

        return getattr(api, name)
    raise AttributeError(f"module 'normkd' has no attribute {name!r}")
