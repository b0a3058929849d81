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
from pathlib import Path
from typing import ClassVar

import torch
from pydantic import NonNegativeFloat
from torch import nn

from normkd.models.taps import TAP_KINDS, StudentWrapper, Taps, TapShapes
from normkd.schema import Strict

__all__ = [
    "TAP_KINDS",
    "TERMS",
    "BuildContext",
    "LossTerm",
    "StepState",
    "StudentWrapper",
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


class LossTerm(nn.Module):
    """A named loss term; ``student_taps``/``teacher_taps`` declare what the distiller collects."""

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
    in_shape: tuple[int, ...] = ()  # one input's shape (C, H, W)
    num_classes: int | None = None  # the classifier's outputs (None: not known when built)

    def pair(self, kind: str) -> tuple[TapShapes, TapShapes]:
        """Student and teacher shapes for a term that sizes its modules from both."""
        if self.teacher is None:
            raise ValueError(f"loss term {kind!r} sizes its modules from the teacher's taps")
        return self.student, self.teacher


class TermConfig(Strict):
    """A term's entry in a recipe's ``loss:`` list. Subclasses add ``kind: Literal[...]``: the
    term's kind lives there only (its default), as do its settings' defaults."""

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

    def wrap_student(self, student: nn.Module, ctx: BuildContext) -> nn.Module:
        """The student as this term trains it (a :class:`StudentWrapper` with the term's modules in
        its path, NORM's FT); called for every term before any builds and before the optimizer is
        made, so those modules train with the student. Default: the student unchanged."""
        return student

    @classmethod
    def changes_student(cls) -> bool:
        """Whether the term wraps the student (so a trained run has something to deploy from)."""
        return cls.wrap_student is not TermConfig.wrap_student

    def deploy(self, trained: nn.Module) -> nn.Module:
        """The module to ship from the trained student (NORM: FT merged into the classifier);
        a new module, ``trained`` left as it is. Default: ``trained`` itself."""
        return trained

    @classmethod
    def restore(cls, model: nn.Module, path: Path) -> None:
        """Give ``model`` (rebuilt by name from a saved model file at ``path``) the modules this
        term left in the deployed student (NORM ``stages: layer3``: its inner FT). Default: none."""


TERMS: dict[str, type[TermConfig]] = {}


KIND_PATTERN = re.compile(r"[a-z][a-z0-9]*(_[a-z0-9]+)*")


def register_term(cls: type[TermConfig]) -> type[TermConfig]:
    """Make ``cls`` a valid ``kind`` in recipes (class decorator).

    A kind may hold ``_`` (``wkd_l``) as long as a method name still reads one way: it may not
    be other kinds joined by ``_`` (``norm_kd`` is NORM + KD), nor ``vanilla``."""
    kind = cls.kind_name()
    if not kind or kind in TERMS:
        raise ValueError(f"loss term kind {kind!r} is empty or registered twice")
    if not KIND_PATTERN.fullmatch(kind) or kind == "vanilla":
        raise ValueError(f"loss term kind {kind!r}: use lower-case letters, digits and '_'")
    parts = kind.split("_")
    for cut in range(1, len(parts)):  # kinds joined by '_' would read as a method of several
        head, tail = "_".join(parts[:cut]), "_".join(parts[cut:])
        if head in TERMS and _parses(tail):
            raise ValueError(f"loss term kind {kind!r} reads as the method {head}+{tail}")
    TERMS[kind] = cls
    return cls


def _parses(name: str) -> bool:
    try:
        return bool(_split_kinds(name.split("_")))
    except ValueError:
        return False


def _split_kinds(parts: list[str]) -> list[str]:
    """``["norm", "wkd", "l"]`` -> ``["norm", "wkd_l"]``: longest registered kind first."""
    kinds: list[str] = []
    while parts:
        for end in range(len(parts), 0, -1):
            name = "_".join(parts[:end])
            if name in TERMS and name != "ce":
                kinds.append(name)
                parts = parts[end:]
                break
        else:
            raise ValueError("_".join(parts))
    return kinds


def method_kinds(method: str) -> list[str]:
    """``"norm+kd"`` (also ``norm_kd``, ``"norm kd"``) -> the term kinds it adds to CE, in order.

    ``vanilla`` (or ``ce``) adds none; kinds that hold ``_`` (``norm+wkd_l``, ``norm_wkd_l``) are
    read longest first. Raises ValueError naming what is unknown.
    """
    chunks = [c for c in re.split(r"[+ ]+", str(method).strip().lower()) if c]
    if chunks in (["vanilla"], ["ce"]):
        return []
    known = [k for k in TERMS if k != "ce"]
    tokens, bad = [], []
    for chunk in chunks:
        parts = [p for p in chunk.split("_") if p]
        try:
            tokens += _split_kinds(parts)
        except ValueError as err:
            bad.append(str(err))
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
