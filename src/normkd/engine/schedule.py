"""Learning-rate schedules as pure functions of (epoch, step): nothing to save, exact on resume."""

from __future__ import annotations

import math

from normkd.config import OptimCfg


def lr_at(cfg: OptimCfg, epoch: int, step: int = 0, steps_per_epoch: int = 1) -> float:
    """Learning rate for ``step`` of ``epoch``: linear warm-up, then the configured decay."""
    t = epoch + step / max(steps_per_epoch, 1)
    if cfg.warmup_epochs and t < cfg.warmup_epochs:
        return cfg.lr * (t + 1 / max(steps_per_epoch, 1)) / cfg.warmup_epochs
    if cfg.schedule == "constant":
        return cfg.lr
    if cfg.schedule == "multistep":
        return cfg.lr * cfg.lr_decay ** sum(epoch >= m for m in cfg.milestones)
    if cfg.schedule == "step":
        return cfg.lr * cfg.lr_decay ** (epoch // cfg.step_size)
    # cosine over the epochs after warm-up, to zero at the end
    span = max(cfg.epochs - cfg.warmup_epochs, 1)
    progress = min(max(t - cfg.warmup_epochs, 0.0) / span, 1.0)
    return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * progress))
