"""What every loss term declares and sees, and the registry that makes a new term one new file.

A term is two small classes in one file under ``losses/``: the loss itself (a ``LossTerm``
module that declares the taps it reads) and its recipe entry (a ``TermConfig`` registered with
``@register_term``, whose fields are the term's settings and whose ``build`` makes the module).
The recipe's ``loss:`` list, its validation and error messages, the Python API's options and
whether a run needs a teacher all come from this registry.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from pydantic import NonNegativeFloat
from torch import nn

from normkd.models.taps import TAP_KINDS, Taps, TapShapes
from normkd.schema import Strict

__all__ = [
    "TAP_KINDS",
    "TERMS",
    "BuildContext",
    "LossTerm",
    "StepState",
    "TapShapes",
    "Taps",
    "TermConfig",
    "method_kinds",
    "method_label",
    "register_term",
]


@dataclass
class StepState:
    """Everything a term may read in one step; terms never talk to each other."""

    x: torch.Tensor
    y: torch.Tensor
    idx: torch.Tensor
    epoch: int
    student: Taps
    teacher: Taps | None
    # NORM: FT's expanded map of this step (ExpandedMaps(inner, last) with stages: layer3)
    expanded: Any = None


class LossTerm(nn.Module):
    """A named loss term; ``student_taps``/``teacher_taps`` declare what the distiller collects."""

    kind: ClassVar[str] = ""
    student_taps: ClassVar[frozenset[str]] = frozenset({"logits"})
    teacher_taps: ClassVar[frozenset[str]] = frozenset()

    def weight_at(self, epoch: int) -> float:
        """Multiplier on the recipe weight for this epoch (NORM ramps; most terms are constant)."""
        return 1.0

    def forward(self, state: StepState) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError


@dataclass(frozen=True)
class BuildContext:
    """What a term may need at construction, measured once when the run is assembled."""

    student: TapShapes  # the plain student (FT keeps its channel counts)
    teacher: TapShapes | None
    dataset_size: int = 0
    train_labels: torch.Tensor | None = None
    epochs: int = 1
    student_name: str = "student"
    teacher_name: str = "teacher"

    def pair(self, kind: str) -> tuple[TapShapes, TapShapes]:
        """Student and teacher shapes for a term that sizes its modules from both."""
        if self.teacher is None:
            raise ValueError(f"loss term {kind!r} sizes its modules from the teacher's taps")
        return self.student, self.teacher


class TermConfig(Strict):
    """A term's entry in a recipe's ``loss:`` list. Subclasses add ``kind: Literal[...]``."""

    weight: NonNegativeFloat = 1.0
    term: ClassVar[type[LossTerm]] = LossTerm
    label: ClassVar[str] = ""  # how tables name it (KD, NORM, ...)

    @classmethod
    def kind_name(cls) -> str:
        return cls.model_fields["kind"].default

    @classmethod
    def needs_teacher(cls) -> bool:
        """Whether the term reads the teacher: its module declares teacher taps."""
        return bool(cls.term.teacher_taps)

    def build(self, ctx: BuildContext) -> LossTerm:  # pragma: no cover - interface
        raise NotImplementedError


TERMS: dict[str, type[TermConfig]] = {}


def register_term(cls: type[TermConfig]) -> type[TermConfig]:
    """Make ``cls`` a valid ``kind`` in recipes (class decorator)."""
    kind = cls.kind_name()
    if not kind or kind in TERMS:
        raise ValueError(f"loss term kind {kind!r} is empty or registered twice")
    TERMS[kind] = cls
    return cls


def method_kinds(method: str) -> list[str]:
    """``"norm+kd"`` (also ``norm_kd``, ``"norm kd"``) -> the term kinds it adds to CE, in order.

    ``vanilla`` (or ``ce``) adds none. Raises ValueError naming what is unknown.
    """
    tokens = [t for t in re.split(r"[+_ ]+", str(method).strip().lower()) if t]
    if tokens in (["vanilla"], ["ce"]):
        return []
    known = [k for k in TERMS if k != "ce"]
    bad = [t for t in tokens if t not in known]
    if not tokens or bad:
        raise ValueError(
            f"unknown method {method!r}"
            + (f" (unknown: {', '.join(bad)})" if bad else "")
            + f"; use 'vanilla' or terms joined with '+' from {', '.join(known)}"
        )
    if len(set(tokens)) != len(tokens):
        raise ValueError(f"method {method!r} names a term twice")
    return tokens


def method_label(method: str) -> str:
    """How tables name a method: ``norm_kd`` -> ``NORM+KD``; names that are no method stay."""
    try:
        kinds = method_kinds(method)
    except ValueError:
        return method
    return "+".join(TERMS[k].label for k in kinds) or "vanilla (CE only)"
