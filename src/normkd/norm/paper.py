"""NORM: Knowledge Distillation via N-to-One Representation Matching (Liu et al., ICLR 2023).

1. :class:`FeatureTransform` (FT) sits after the student's last conv map: a 1x1 conv expands
   ``C_s -> N * C_t`` channels, a second 1x1 conv contracts ``N * C_t -> C_s``; the contracted map
   continues through the student's own global pooling and classifier. The authors' code adds a
   BatchNorm after each conv and a residual connection (both on by default here).
2. :func:`norm_loss` splits the expanded map into N consecutive segments of ``C_t`` channels and
   pulls each one to the same (frozen) teacher map with MSE; the loss is the sum over segments.
3. :func:`fold_ft` folds FT, both BatchNorms (eval statistics) and the residual through global
   average pooling into a new classifier: the deployed student has exactly its original
   architecture and parameter count, and the same logits.

FT's wiring into a model (``student.py``: ``attach_ft``, ``merge_ft``), its token and pooled forms
(``forms.py``), the factored speed path (``factored.py``) and the authors' inner FT (``inner.py``)
each have their own file; the tests prove each equal to the paper's form here.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from normkd.models.taps import get_module
from normkd.norm.factored import (
    FactoredMap,
    _bn_scale_shift,
    can_factor,
    factored_loss,
    forward_factored,
)

# Where FT sits (see normkd.norm.forms): a conv map, a token sequence, the classifier's input.
FORMS = ("map", "tokens", "pooled")
Form = Literal["map", "tokens", "pooled"]


def _check_positive_int(name: str, value: object) -> int:
    """``value`` if it is a positive int (not a bool), else ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def _conv1x1(cin: int, cout: int, bn: bool) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, kernel_size=1, bias=not bn)]
    if bn:
        layers.append(nn.BatchNorm2d(cout))
    return nn.Sequential(*layers)


def _linear(cin: int, cout: int, bn: bool) -> nn.Sequential:
    """The 1x1 conv's twin for features on the last axis: a linear layer (+ BatchNorm1d)."""
    layers: list[nn.Module] = [nn.Linear(cin, cout, bias=not bn)]
    if bn:
        layers.append(nn.BatchNorm1d(cout))
    return nn.Sequential(*layers)


class FeatureTransform(nn.Module):
    """Expand ``C_s -> N*C_t`` (the N views matched to the teacher), contract back to ``C_s``.

    ``bn=False, residual=False`` is the paper's plain two-linear-layer form; the defaults follow the
    authors' code (bias-free conv + BatchNorm for each layer, contracted map added to the input,
    convs drawn Kaiming-normal fan-out; ``init="pytorch"`` keeps PyTorch's default conv init).
    ``form="map"`` works on ``(B, C, H, W)`` maps with 1x1 convs; ``tokens`` on features in the
    last axis, ``(B, ..., C)`` (tokens, channels-last maps), with linear layers and BatchNorm over
    all tokens; ``pooled`` likewise on a pooled ``(B, C)`` vector (or ``(B, C, 1, 1)``).
    ``forward`` returns ``(contracted, expanded)``, each in its input's layout.
    """

    def __init__(
        self,
        in_channels: int,
        teacher_channels: int,
        n: int,
        bn: bool = True,
        residual: bool = True,
        init: Literal["authors", "pytorch"] = "authors",
        form: Form = "map",
        factored: bool = False,
    ) -> None:
        super().__init__()
        self.in_channels = _check_positive_int("in_channels", in_channels)
        self.teacher_channels = _check_positive_int("teacher_channels", teacher_channels)
        self.n = _check_positive_int("n (the expansion factor)", n)
        if init not in ("authors", "pytorch"):
            raise ValueError(f"init must be 'authors' or 'pytorch', got {init!r}")
        if form not in FORMS:
            raise ValueError(f"form must be one of {', '.join(FORMS)}, got {form!r}")
        self.bn = bool(bn)
        self.residual = bool(residual)
        self.form = form
        # map form: hand the expanded map on factored (FactoredMap), never materialised
        self.factored = bool(factored)
        layer = _conv1x1 if form == "map" else _linear
        self.expand = layer(in_channels, n * teacher_channels, bn)
        self.contract = layer(n * teacher_channels, in_channels, bn)
        if init == "authors":
            # The authors' model init loop covers FT too: Kaiming normal (fan_out, relu). PyTorch's
            # default conv init gives the contract conv ~7x smaller weights at N*C_t inputs.
            for block in (self.expand, self.contract):
                nn.init.kaiming_normal_(block[0].weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | FactoredMap]:
        if can_factor(self, x):
            return forward_factored(self, x)
        if self.form == "map":
            if x.dim() != 4 or x.shape[1] != self.in_channels or 0 in x.shape:
                raise ValueError(
                    f"FeatureTransform expects a non-empty (B, {self.in_channels}, H, W) map, "
                    f"got {tuple(x.shape)}"
                )
            expanded = self.expand(x)
            out = self.contract(expanded)
        else:
            flat = self._rows(x)
            expanded = self.expand(flat)
            out = self.contract(expanded).view_as(x)
            lead = x.shape[:1] if self.form == "pooled" else x.shape[:-1]
            expanded = expanded.view(*lead, -1)
        if self.residual:
            out = out + x
        return out, expanded

    def _rows(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` as rows of ``in_channels`` features: one per token, or one per sample."""
        c = self.in_channels
        if self.form == "pooled":
            ok = x.dim() >= 2 and x.shape[1] == c and all(v == 1 for v in x.shape[2:])
            want = f"(B, {c}) pooled vector"
        else:
            ok = x.dim() >= 3 and x.shape[-1] == c
            want = f"(B, ..., {c}) token sequence"
        if not ok or 0 in x.shape:
            raise ValueError(f"FeatureTransform expects a non-empty {want}, got {tuple(x.shape)}")
        return x.reshape(x.shape[0], c) if self.form == "pooled" else x.reshape(-1, c)

    @torch.no_grad()
    def as_affine(self) -> tuple[torch.Tensor, torch.Tensor]:
        """FT in eval mode as ``y = A @ x + c`` per pixel / token / vector (float64), the form the
        merge folds."""

        def affine(block: nn.Sequential) -> tuple[torch.Tensor, torch.Tensor]:
            layer = block[0]
            w = layer.weight.detach().double().flatten(1)  # (out, in)
            b = (
                layer.bias.detach().double()
                if layer.bias is not None
                else torch.zeros(w.shape[0], dtype=torch.float64, device=w.device)
            )
            if len(block) > 1:
                bn: nn.modules.batchnorm._BatchNorm = block[1]
                if bn.running_var is None or bn.running_mean is None:
                    raise ValueError("cannot merge a BatchNorm without running statistics")
                s, shift = _bn_scale_shift(bn, bn.running_mean.double(), bn.running_var.double())
                w = s[:, None] * w
                b = s * b + shift
            return w, b

        w1, b1 = affine(self.expand)
        w2, b2 = affine(self.contract)
        a = w2 @ w1
        c = w2 @ b1 + b2
        if self.residual:
            a = a + torch.eye(a.shape[0], dtype=a.dtype, device=a.device)
        return a, c


def spatial_ratio(a_hw: Sequence[int], b_hw: Sequence[int]) -> tuple[int, int] | None:
    """The integer (h, w) factor by which the larger of two maps exceeds the smaller one, or
    None when there is none (a non-integer ratio, or each map larger in one dimension)."""
    (ha, wa), (hb, wb) = a_hw, b_hw
    if (ha - hb) * (wa - wb) < 0:
        return None
    (bh, bw), (sh, sw) = ((ha, wa), (hb, wb)) if ha >= hb and wa >= wb else ((hb, wb), (ha, wa))
    if sh == 0 or sw == 0 or bh % sh or bw % sw:
        return None
    return bh // sh, bw // sw


def _match_spatial(
    student: torch.Tensor | FactoredMap, teacher: torch.Tensor, reduce: Literal["max", "avg"]
) -> tuple[torch.Tensor | FactoredMap, torch.Tensor]:
    """Pool the spatially larger map down to the smaller one by an integer ratio (a
    :class:`FactoredMap` only ever with the teacher's the larger)."""
    (hs, ws), (ht, wt) = student.shape[-2:], teacher.shape[-2:]
    if (hs, ws) == (ht, wt):
        return student, teacher
    if (hs - ht) * (ws - wt) < 0:
        raise ValueError(
            f"norm_loss: student map {hs}x{ws} and teacher map {ht}x{wt} are larger in different "
            "dimensions; cannot reduce one to the other"
        )
    kernel = spatial_ratio((hs, ws), (ht, wt))
    if kernel is None:
        raise ValueError(
            f"norm_loss: teacher map {ht}x{wt} and student map {hs}x{ws} differ by a non-integer "
            "ratio; pooling needs an integer ratio (pick taps of compatible resolution)"
        )
    pool = F.max_pool2d if reduce == "max" else F.avg_pool2d
    if ht >= hs and wt >= ws:
        return student, pool(teacher, kernel, kernel)
    return pool(student, kernel, kernel), teacher


def norm_loss(
    expanded: torch.Tensor | FactoredMap,
    teacher_map: torch.Tensor,
    n: int,
    reduce: Literal["max", "avg"] = "max",
) -> torch.Tensor:
    """N-to-one matching: sum over the N segments of ``MSE(segment_i, teacher_map)``.

    ``expanded`` is FT's expanded map ``(B, N*C_t, H, W)``; ``teacher_map`` is ``(B, C_t, H', W')``.
    The teacher map is detached (the teacher never learns) and, when spatially larger, reduced to
    the student's size by ``reduce`` pooling with the integer ratio (the authors use max).
    Equals ``N * MSE(expanded, teacher_map tiled N times)``. A :class:`FactoredMap` (FT built
    with ``factored=True``) gives the same value without the map ever being built.
    """
    n = _check_positive_int("n (the expansion factor)", n)
    if reduce not in ("max", "avg"):
        raise ValueError(f"reduce must be 'max' or 'avg', got {reduce!r}")
    if len(expanded.shape) != 4 or teacher_map.dim() != 4:
        raise ValueError(
            "norm_loss expects 4-D maps (B, C, H, W): got student expanded map "
            f"{tuple(expanded.shape)} and teacher map {tuple(teacher_map.shape)}"
        )
    if 0 in expanded.shape or 0 in teacher_map.shape:
        raise ValueError(
            "norm_loss expects non-empty maps: got student expanded map "
            f"{tuple(expanded.shape)} and teacher map {tuple(teacher_map.shape)}"
        )
    b, c, hs, ws = expanded.shape
    ct = teacher_map.shape[1]
    if teacher_map.shape[0] != b:
        raise ValueError(
            f"norm_loss: batch sizes differ: student expanded map {tuple(expanded.shape)} vs "
            f"teacher map {tuple(teacher_map.shape)}"
        )
    if c != n * ct:
        raise ValueError(
            f"norm_loss: student expanded map has {c} channels but n * teacher channels = "
            f"{n} * {ct} = {n * ct} (shapes {tuple(expanded.shape)} vs {tuple(teacher_map.shape)})"
        )
    teacher = teacher_map.detach()
    if isinstance(expanded, FactoredMap):
        if teacher.shape[-2] >= hs and teacher.shape[-1] >= ws:  # only the teacher is pooled
            return factored_loss(expanded, _match_spatial(expanded, teacher, reduce)[1], n)
        expanded = expanded.materialise()  # a larger student map is pooled: it must exist
    student, teacher = _match_spatial(expanded, teacher, reduce)
    h, w = student.shape[-2:]
    # Broadcast the teacher over the N segments without materialising a tiled copy or a diff;
    # in at least fp32 (a bf16 mean of squares over N*C_t*H*W values loses digits).
    dtype = torch.promote_types(student.dtype, torch.float32)
    segments = student.reshape(b, n, ct, h, w).to(dtype)
    return F.mse_loss(segments, teacher.to(dtype).unsqueeze(1).expand_as(segments)) * n


@torch.no_grad()
def fold_ft(student: nn.Module, ft: FeatureTransform, classifiers: Sequence[str]) -> nn.Module:
    """Fold FT into the classifier: ``fc(gap(FT(x))) == fc'(gap(x))`` for the eval-mode student.

    Valid because FT (1x1 convs or per-token linear layers, eval-mode BatchNorm, residual), global
    average pooling (or picking the class token) and the classifier are all linear; a ``pooled``
    FT sits on the classifier's input itself. Every classifier named (the modules reading the
    representation, DeiT's two heads) takes it. Returns a copy of ``student`` in eval mode.
    """
    merged = copy.deepcopy(student)
    a, c = ft.as_affine()
    for name in classifiers:
        _fold_into(get_module(merged, name), name, a, c)
    return merged.eval()


def _fold_into(fc: nn.Module, name: str, a: torch.Tensor, c: torch.Tensor) -> None:
    """``fc(A v + c)`` as ``fc'(v)``: ``fc``'s weight and bias rewritten in place."""
    is_conv = isinstance(fc, nn.Conv2d) and fc.kernel_size == (1, 1) and fc.groups == 1
    if not (isinstance(fc, nn.Linear) or is_conv):
        raise TypeError(
            f"classifier {name!r} is {type(fc).__name__}; merge needs an "
            "nn.Linear (or a 1x1 nn.Conv2d on the pooled map)"
        )
    a, c = a.to(fc.weight.device), c.to(fc.weight.device)
    w = fc.weight.detach().double().flatten(1)  # (out, in); a 1x1 conv's (out, in, 1, 1) too
    new_bias = w @ c
    if fc.bias is not None:
        new_bias = new_bias + fc.bias.detach().double()
    elif torch.any(new_bias.abs() > 0):
        raise ValueError(
            "the classifier has no bias but FT adds a constant term (its BatchNorm shifts); "
            "merging would change the architecture. Use FeatureTransform(bn=False) for such students"
        )
    fc.weight.copy_((w @ a).view_as(fc.weight))  # a copy of the student: edit its layer in place
    if fc.bias is not None:
        fc.bias.copy_(new_bias)
