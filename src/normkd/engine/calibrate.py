"""BatchNorm recalibration: re-estimate a student's running statistics for its current weights.

BatchNorm trains on each batch's own statistics but evaluates with running averages. With a
small momentum (torchvision's and timm's MobileNets use 0.01, TensorFlow's 0.99 decay) or a
cumulative one (``momentum=None``), those averages trail the weights by hundreds of steps, and a
short run can score 95% on training batches yet near chance in eval mode. One pass without
gradients over some training batches, with the averages reset and accumulated as a plain mean,
gives the statistics of the final weights ("precise BN", Wu & Johnson 2021); nothing else of the
model changes.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

# PyTorch's default momentum: running averages that follow the weights within ~10 steps.
DEFAULT_MOMENTUM = 0.1


def batchnorms(model: nn.Module) -> list[_BatchNorm]:
    """The BatchNorm layers of ``model`` that keep running statistics (SyncBatchNorm included)."""
    return [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]


def wanted(mode: str, model: nn.Module) -> bool:
    """Whether ``engine.bn_recalibrate`` (auto | on | off) recalibrates ``model``.

    auto: when some BatchNorm averages more slowly than PyTorch's default (momentum below 0.1, or
    None: a mean over the whole run, early weights included). Models at the default (the zoo, the
    shipped recipes) keep exactly the runs they had.
    """
    if mode != "auto":
        return mode == "on"
    return any(m.momentum is None or m.momentum < DEFAULT_MOMENTUM for m in batchnorms(model))


@torch.no_grad()
def recalibrate(
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, ...]],
    max_batches: int,
    device: torch.device,
    autocast: Callable[[], AbstractContextManager[object]],
) -> int:
    """Reset the running statistics of ``model``'s BatchNorms and average them over up to
    ``max_batches`` of ``batches`` (``(x, ...)`` tuples); returns how many were used.

    Only the BatchNorms run in train mode; every other module stays in eval mode, so dropout and
    stochastic depth are off and the statistics are those of what evaluation feeds each layer.
    ``momentum=None`` makes each running statistic the plain mean over the pass; every layer's
    momentum and every module's mode are restored afterwards.
    """
    layers = batchnorms(model)
    if not layers:
        return 0
    modes = [(m, m.training) for m in model.modules()]
    momenta = [m.momentum for m in layers]
    model.eval()
    for m in layers:
        m.reset_running_stats()
        m.momentum = None
        m.train()
    used = 0
    try:
        for x, *_rest in itertools.islice(batches, max_batches):
            with autocast():
                model(x.to(device, non_blocking=True))
            used += 1
    finally:
        for m, momentum in zip(layers, momenta):
            m.momentum = momentum
        for m, mode in modes:
            m.training = mode
    return used
