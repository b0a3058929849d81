"""Teacher + student + loss terms -> a dict of named, weighted losses. No training loop here.

The distiller only collects the taps the terms declare, calls each term and weights it; the
trainer sums, logs and steps. The teacher is frozen, always in eval mode, run under no_grad, and
kept out of ``parameters()``/``state_dict()`` so optimisers, DDP and checkpoints never see it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from normkd.losses.base import LossTerm, StepState
from normkd.models.taps import StudentWrapper, TapHooks, Taps, TapSpec, collect_taps, get_taps


def standardize_logits(logits: torch.Tensor, scale: float) -> torch.Tensor:
    """The authors' logit standardisation: layer norm over classes (no affine), times ``scale``."""
    return F.layer_norm(logits, logits.shape[-1:], eps=1e-7) * scale


def _at_least_fp32(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.promote_types(t.dtype, torch.float32))


class Distiller(nn.Module):
    """Holds the student (as its terms wrap it: NORM's FT), the frozen teacher, weighted terms."""

    def __init__(
        self,
        student: nn.Module,
        terms: dict[str, LossTerm],
        weights: dict[str, float],
        teacher: nn.Module | None = None,
        logit_scale: float | None = None,
    ) -> None:
        super().__init__()
        if set(terms) != set(weights):
            raise ValueError("every loss term needs a weight")
        self.student = student
        self.terms = nn.ModuleDict(terms)
        self.weights = dict(weights)
        self.logit_scale = logit_scale
        plain = student.student if isinstance(student, StudentWrapper) else student
        self.s_spec: TapSpec = get_taps(plain)
        self._s_plain = [plain]  # a list keeps it from being registered twice
        self.s_needs = frozenset().union(*(t.student_taps for t in terms.values()))
        self.t_needs = frozenset().union(*(t.teacher_taps for t in terms.values()))
        if self.t_needs and teacher is None:
            raise ValueError(f"loss terms {sorted(terms)} need a teacher")
        object.__setattr__(self, "teacher", teacher)  # not a submodule: never trained or saved
        self._kept: dict[str, TapHooks] | None = None  # see hooks_kept
        self.t_spec: TapSpec | None = None
        if teacher is not None:
            teacher.eval()
            teacher.requires_grad_(False)
            self.t_spec = get_taps(teacher)

    # The teacher follows .to()/.half() etc. but stays out of parameters() and state_dict().
    def _apply(self, fn, recurse: bool = True):  # type: ignore[override]
        super()._apply(fn, recurse)
        if self.teacher is not None:
            self.teacher._apply(fn)
        return self

    def train(self, mode: bool = True) -> Distiller:
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()
        return self

    @contextlib.contextmanager
    def hooks_kept(self) -> Iterator[None]:
        """Keep the tap hooks (and the student wrapper's) registered for the block, so no forward
        inside it registers any: what lets ``torch.compile`` trace a whole step as one graph. The
        trainer holds them over its epochs; outside the block each forward registers its own."""
        if self._kept is not None:
            yield
            return
        kept = {"student": TapHooks(self._s_plain[0], self.s_spec, self.s_needs)}
        if self.teacher is not None and self.t_needs:
            assert self.t_spec is not None
            kept["teacher"] = TapHooks(self.teacher, self.t_spec, self.t_needs)
        wrapper = self.student.hooks_kept() if isinstance(self.student, StudentWrapper) else None
        self._kept = kept
        try:
            with wrapper if wrapper is not None else contextlib.nullcontext():
                yield
        finally:
            self._kept = None
            for hooks in kept.values():
                hooks.remove()

    def _taps(self, role: str) -> contextlib.AbstractContextManager[Taps]:
        if self._kept is not None:
            return self._kept[role].collect()
        if role == "teacher":
            assert self.teacher is not None and self.t_spec is not None
            return collect_taps(self.teacher, self.t_spec, self.t_needs)
        return collect_taps(self._s_plain[0], self.s_spec, self.s_needs)

    def forward(
        self, x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor, epoch: int
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """One step's student logits and ``{term: weight * w(epoch) * value}``."""
        t_taps = None
        if self.teacher is not None and self.t_needs:
            with torch.no_grad(), self._taps("teacher") as t_taps:
                t_taps.logits = self.teacher(x)
        with self._taps("student") as s_taps:
            logits = self.student(x)
        # The terms read logits in at least fp32: a softmax / KL of bf16 logits (CPU autocast
        # keeps them bf16) loses enough to turn KD's KL negative; (B, classes) is cheap to upcast.
        s_taps.logits = _at_least_fp32(logits)
        if t_taps is not None and t_taps.logits is not None:
            t_taps.logits = _at_least_fp32(t_taps.logits)
        if self.logit_scale is not None:
            s_taps.logits = standardize_logits(s_taps.logits, self.logit_scale)
            if t_taps is not None and t_taps.logits is not None:
                t_taps.logits = standardize_logits(t_taps.logits, self.logit_scale)
        if "wrapper" in self.s_needs and isinstance(self.student, StudentWrapper):
            s_taps.wrapper = self.student.handed()  # what the term's modules on the student made
        state = StepState(x, y, idx, epoch, s_taps, t_taps)
        losses = {
            name: term(state) * (self.weights[name] * term.weight_at(epoch))
            for name, term in self.terms.items()
        }
        return logits, losses
