"""One training step and one evaluation pass: the only code that touches a batch.

``train_step`` never waits for the device: no ``.item()``, no printing. Whether the losses are
finite is read where metrics are read (``EpochMeter.check``), so a GPU is never stalled per step;
the benchmarks time this very function.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from normkd.engine.runtime import Runtime, autocast
from normkd.errors import UserError
from normkd.models.taps import eval_mode

if TYPE_CHECKING:
    from normkd.engine.job import Job


class NonFiniteLossError(UserError):
    """A loss term became NaN/inf; training stops and the last good checkpoint is kept."""


@dataclass
class StepOut:
    """What one step leaves for the meters: detached, still on the device."""

    logits: torch.Tensor
    losses: dict[str, torch.Tensor]
    total: torch.Tensor


def train_step(
    job: Job, x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor, epoch: int, lr: float
):
    """lr -> autocast forward -> weighted terms -> sum -> backward -> (clip) -> optimizer step.

    ``optim.grad_clip`` bounds the global gradient norm of the true gradients: under fp16 they
    are unscaled first (``scaler.step`` then does not unscale them twice, and still skips a step
    whose gradients overflowed). ``clip_grad_norm_`` stays on the device: no host sync.
    """
    for group in job.optimizer.param_groups:
        group["lr"] = lr
    with job.runtime.autocast():
        logits, losses = job.step_module(x, y, idx, epoch)
    total = sum(losses.values())
    job.optimizer.zero_grad(set_to_none=True)
    scaler = job.runtime.scaler
    scaler.scale(total).backward()
    clip = job.recipe.optim.grad_clip
    if clip > 0:
        scaler.unscale_(job.optimizer)
        params = [p for group in job.optimizer.param_groups for p in group["params"]]
        torch.nn.utils.clip_grad_norm_(params, clip)
    scaler.step(job.optimizer)
    scaler.update()
    return StepOut(logits.detach(), {k: v.detach() for k, v in losses.items()}, total.detach())


class EpochMeter:
    """Per-epoch sums on the device, and the first step whose loss was not finite.

    ``add`` queues a few tiny device ops (no host sync); ``check`` and ``means`` read them.
    """

    def __init__(self, names: list[str], device: torch.device) -> None:
        self.names = names
        self.sums = torch.zeros(len(names) + 2, device=device)  # terms..., total, correct
        self.first_bad = torch.full((), -1, dtype=torch.long, device=device)
        self.bad_terms = torch.zeros(len(names), dtype=torch.bool, device=device)
        self.seen = 0

    def add(self, step: int, out: StepOut, y: torch.Tensor) -> None:
        b = y.shape[0]
        terms = torch.stack([out.losses[k].float() for k in self.names])
        correct = (out.logits.argmax(1) == y).sum().float()
        self.sums += torch.cat([terms * b, (out.total.float() * b)[None], correct[None]])
        bad = ~torch.isfinite(terms)
        first = (self.first_bad < 0) & ~torch.isfinite(out.total)
        self.bad_terms = torch.where(first, bad, self.bad_terms)
        self.first_bad = torch.where(first, step, self.first_bad)
        self.seen += b

    def check(self, epoch: int) -> None:
        """Raise NonFiniteLossError naming the terms and the first step that went non-finite."""
        step = int(self.first_bad)
        if step < 0:
            return
        bad = [k for k, flag in zip(self.names, self.bad_terms.tolist()) if flag]
        raise NonFiniteLossError(
            f"loss term(s) {', '.join(bad) or 'total'} became non-finite at epoch {epoch + 1}, "
            f"step {step + 1}; stopped, the last good checkpoint is kept (try a lower lr)"
        )

    def totals(self) -> dict[str, Any]:
        """This process's sums (terms and ``loss`` times samples, ``correct``, ``seen``)."""
        values = self.sums.tolist()
        out = dict(zip([*self.names, "loss", "correct"], values))
        return out | {"seen": float(self.seen)}


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: Any,
    device: torch.device,
    amp: str = "off",
    ranks: Runtime | None = None,
) -> dict[str, float]:
    """Top-1 / top-5 accuracy (%) and mean CE over a loader of ``(x, y, idx)`` batches.

    ``ranks``: the loader is this rank's shard of the test set; counts are summed over ranks.
    """
    n = correct1 = correct5 = 0
    loss_sum = 0.0
    with eval_mode(model):
        for x, y, _idx in loader:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with autocast(device, amp):
                logits = model(x)
            logits = logits.float()
            loss_sum += float(F.cross_entropy(logits, y, reduction="sum"))
            top = logits.topk(min(5, logits.shape[1]), dim=1).indices
            hit = top.eq(y[:, None])
            correct1 += int(hit[:, 0].sum())
            correct5 += int(hit.any(dim=1).sum())
            n += y.numel()
    if ranks is not None:
        c = ranks.sum({"n": n, "c1": correct1, "c5": correct5, "loss": loss_sum})
        n, correct1, correct5, loss_sum = c["n"], c["c1"], c["c5"], c["loss"]
    n = max(n, 1)
    return {"top1": 100.0 * correct1 / n, "top5": 100.0 * correct5 / n, "loss": loss_sum / n}
