"""FT wired into any classifier through the feature-tap contract, and merged out of it again.

:func:`attach_ft` puts FT on a student by forward hooks (no model code is edited), on its last
map, its last tokens, or its classifier's input (:func:`~normkd.norm.forms.ft_form`);
:func:`merge_ft` folds it into the classifier (:func:`~normkd.norm.paper.fold_ft`);
:func:`attach_inner_ft` adds the authors' in-path inner FT (:mod:`normkd.norm.inner`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Literal

import torch
from torch import nn

from normkd.models.taps import (
    StudentWrapper,
    TapSpec,
    _default_example,
    as_map,
    get_module,
    get_taps,
    probe,
)
from normkd.norm.factored import FactoredMap
from normkd.norm.forms import PooledExpanded, _classifier_width, check_linear_head, ft_form
from normkd.norm.inner import INNER_FT, ExpandedMaps, InnerFT, _install_inner, inner_stage_count
from normkd.norm.paper import FeatureTransform, Form, fold_ft


class FTStudent(StudentWrapper):
    """A student whose logits flow through FT; ``expanded`` holds the last forward's expanded map.

    FT is inserted by a forward hook on the student's ``feat`` module (``form`` ``map`` or
    ``tokens``) or by forward pre-hooks on its classifiers (``pooled``), registered only for the
    duration of each forward, so ``self.student`` stays the model to deploy (what
    :func:`merge_ft` copies): the plain student, or with ``stages: layer3`` the student with its
    in-path :class:`InnerFT`, when ``expanded`` is :class:`ExpandedMaps` (inner, last). The
    expanded output is kept as a ``(B, N*C_t, H, W)`` map (a ViT's patch tokens on their grid) or,
    for ``pooled``, as :class:`PooledExpanded`. The hooks are plain methods, so the wrapper works
    under DDP and deepcopy.
    """

    def __init__(self, student: nn.Module, ft: FeatureTransform, spec: TapSpec) -> None:
        super().__init__()
        self.student = student
        self.ft = ft
        self.spec = spec
        self.expanded: torch.Tensor | ExpandedMaps | PooledExpanded | None = None
        self._sink: list[torch.Tensor] | None = None  # FT runs in the hooks only while a list
        self._kept: list[torch.utils.hooks.RemovableHandle] | None = None  # see hooks_kept

    @property
    def form(self) -> Form:
        """Where FT sits: ``map``, ``tokens`` or ``pooled`` (see the module doc)."""
        return self.ft.form

    @property
    def inner(self) -> InnerFT | None:
        """The in-path inner FT the student carries (see :func:`attach_inner_ft`), if any."""
        mod = self.student._modules.get(INNER_FT)
        return mod if isinstance(mod, InnerFT) else None

    def handed(self) -> torch.Tensor | ExpandedMaps | PooledExpanded | FactoredMap | None:
        """The last forward's expanded map: what the NORM term reads (its ``wrapper`` tap)."""
        return self.expanded

    def describe(self) -> str:
        return f"FT on its {self.form}"

    def _insert_ft(self, _mod: nn.Module, _inp: object, out: torch.Tensor) -> torch.Tensor:
        if not isinstance(out, torch.Tensor):
            raise TypeError(
                f"tap {self.spec.feat!r} returned {type(out).__name__}, not a tensor; "
                "point the tap spec at a module that returns the last conv map"
            )
        if self._sink is None:  # a plain forward of the student while the hooks are kept
            return out
        contracted, expanded = self.ft(out)
        self._sink.append(
            expanded if isinstance(expanded, FactoredMap) else as_map(expanded, self.spec)
        )
        return contracted

    def _insert_pooled(self, _mod: nn.Module, args: tuple[torch.Tensor, ...]) -> tuple:
        if self._sink is None:
            return args
        contracted, expanded = self.ft(args[0])
        self._sink.append(expanded)
        return (contracted, *args[1:])

    def _hooks(self) -> list[torch.utils.hooks.RemovableHandle]:
        if self.form != "pooled":
            return [get_module(self.student, self.spec.feat).register_forward_hook(self._insert_ft)]
        return [
            get_module(self.student, name).register_forward_pre_hook(self._insert_pooled)
            for name in (self.spec.classifier, *self.spec.heads)
        ]

    @contextlib.contextmanager
    def hooks_kept(self) -> Iterator[None]:
        """Keep FT's hooks on the student for the block (``Distiller.hooks_kept``): forwards of
        this wrapper inside it register none; the plain student's own forwards pass FT by."""
        if self._kept is not None:
            yield
            return
        self._kept = self._hooks()
        try:
            yield
        finally:
            for handle in self._kept:
                handle.remove()
            self._kept = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        inner = self.inner
        sink: list[torch.Tensor] = []
        if inner is not None:
            inner.sink = sink
        self._sink = mine = []
        handles = self._hooks() if self._kept is None else []
        try:
            logits = self.student(x)
        finally:
            for handle in handles:
                handle.remove()
            if inner is not None:
                inner.sink = None
            self._sink = None
        # pooled: the class head's call, the first (DeiT's distillation head reads its own token).
        got = mine[0 if self.form == "pooled" else -1] if mine else None
        self.expanded = PooledExpanded(got) if self.form == "pooled" and got is not None else got
        if sink:
            assert self.expanded is not None
            self.expanded = ExpandedMaps(sink[-1], self.expanded)
        return logits


def attach_ft(
    student: nn.Module,
    teacher_channels: int,
    n: int,
    bn: bool = True,
    residual: bool = True,
    example: torch.Tensor | None = None,
    init: Literal["authors", "pytorch"] = "authors",
    form: Literal["auto", "feat", "pooled"] = "auto",
    factored: bool = False,
) -> FTStudent:
    """Wrap ``student`` so its logits flow through a new FT after its last map (or tokens).

    The student's taps come from its declared ``tap_spec`` or are discovered with one forward pass
    (on ``example`` if given), so zoo, torchvision, timm and other CNN and ViT classifiers all
    work. ``form``: ``feat`` puts FT on the last representation (a conv map or a token sequence)
    and refuses a student whose path from there to the classifier would not let FT merge;
    ``pooled`` puts it on the classifier's input; ``auto`` (default) takes ``feat`` where it
    merges, else ``pooled`` (:func:`ft_form`). ``factored``: a conv-map FT hands ``expanded`` on
    as a :class:`FactoredMap` (same NORM loss, ~6x cheaper at N=8; the trainer's choice).
    """
    if isinstance(student, FTStudent):
        raise ValueError("student already has a FeatureTransform attached")
    if form not in ("auto", "feat", "pooled"):
        raise ValueError(f"form must be 'auto', 'feat' or 'pooled', got {form!r}")
    spec = get_taps(student, example)
    if form == "feat":
        check_linear_head(student, spec, example)
    kind = ft_form(student, example) if form == "auto" else form
    if kind == "pooled":
        in_channels = _classifier_width(get_module(student, spec.classifier))
    else:
        kind = "map" if spec.layout == "map" else "tokens"
        in_channels = spec.feat_channels
    ft = FeatureTransform(
        in_channels, teacher_channels, n, bn=bn, residual=residual, init=init, form=kind,
        factored=factored,
    )  # fmt: skip
    param = next(student.parameters(), None)
    if param is not None:
        ft = ft.to(device=param.device, dtype=param.dtype)
    return FTStudent(student, ft, spec)


def attach_inner_ft(
    s_ft: FTStudent,
    teacher_channels: int,
    example: torch.Tensor | None = None,
    init: Literal["authors", "pytorch"] = "authors",
) -> InnerFT:
    """Put a second FT in the student's path after its stage before the last one (in place).

    The authors' ``--use_layer3``: same FeatureTransform (N, BatchNorm, residual of ``s_ft.ft``,
    the same ``init``), its expanded map matched to the teacher's stage of the same depth
    (``teacher_channels`` channels). The stage is the student's last inner stage
    (:func:`inner_stage_count`, measured on ``example``). Unlike FT, it stays in the deployed
    student (:class:`InnerFT`); ``s_ft.student`` is changed in place.
    """
    if not isinstance(s_ft, FTStudent):
        raise TypeError(
            f"attach_inner_ft expects the result of attach_ft, got {type(s_ft).__name__}"
        )
    student = s_ft.student
    if INNER_FT in student._modules:
        raise ValueError("student already has an inner FeatureTransform attached")
    if s_ft.spec.layout != "map":
        raise ValueError(
            f"the in-path inner FT (stages: layer3) needs conv stages; {type(student).__name__} "
            f"has {s_ft.spec.layout} stages (use stages: last or side_heads)"
        )
    in_shape = tuple((_default_example(student) if example is None else example).shape[1:])
    shapes = probe(student, in_shape)
    k = inner_stage_count(shapes)
    if k == 0:
        raise ValueError(
            f"{type(student).__name__} has no stage before its last one (stages "
            f"{list(s_ft.spec.stages)}), so there is nowhere to put an inner FT"
        )
    ft = FeatureTransform(
        shapes.stages[k - 1][0],
        teacher_channels,
        s_ft.ft.n,
        bn=s_ft.ft.bn,
        residual=s_ft.ft.residual,
        init=init,
        factored=s_ft.ft.factored,
    )
    param = s_ft.ft.expand[0].weight
    return _install_inner(
        student, ft.to(device=param.device, dtype=param.dtype), s_ft.spec.stages[k - 1]
    )


@torch.no_grad()
def merge_ft(s_ft: FTStudent) -> nn.Module:
    """Fold FT into the classifier: ``fc(gap(FT(x))) == fc'(gap(x))`` for the eval-mode student.

    Valid because FT (1x1 convs or per-token linear layers, eval-mode BatchNorm, residual), global
    average pooling (or picking the class token) and the classifier are all linear; a ``pooled``
    FT sits on the classifier's input itself. Every classifier reading the representation takes
    it (DeiT's two heads). Returns a new student of the same class; ``s_ft`` is left untouched.
    Its parameter count is the plain student's, plus the inner FT's when the student carries one
    (``stages: layer3``: that FT stays, in the copy's path). Returned in eval mode.
    """
    if not isinstance(s_ft, FTStudent):
        raise TypeError(f"merge_ft expects the result of attach_ft, got {type(s_ft).__name__}")
    return fold_ft(s_ft.student, s_ft.ft, (s_ft.spec.classifier, *s_ft.spec.heads))
