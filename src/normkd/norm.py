"""NORM: Knowledge Distillation via N-to-One Representation Matching (Liu et al., ICLR 2023).

The whole method, top to bottom:

1. :class:`FeatureTransform` (FT) sits after the student's last conv map: a 1x1 conv expands
   ``C_s -> N * C_t`` channels, a second 1x1 conv contracts ``N * C_t -> C_s``; the contracted map
   continues through the student's own global pooling and classifier. The authors' code adds a
   BatchNorm after each conv and a residual connection (both on by default here).
2. :func:`norm_loss` splits the expanded map into N consecutive segments of ``C_t`` channels and
   pulls each one to the same (frozen) teacher map with MSE; the loss is the sum over segments.
3. :func:`attach_ft` wires FT into any CNN classifier through the feature-tap contract (a forward
   hook on the module whose output global pooling reads), so no model code is edited.
4. :func:`merge_ft` folds FT, both BatchNorms (eval statistics) and the residual through global
   average pooling into a new classifier: the deployed student has exactly its original
   architecture and parameter count, and the same logits.

Beyond CNNs (normkd's own extension; the paper and the authors' code have CNNs only), FT takes
one of three *forms* (:data:`FORMS`), the same algebra in each, so the merge stays exact:

- ``map``: the paper's, on a conv map (1x1 convs, BatchNorm2d).
- ``tokens``: on a vision transformer's last token sequence (after its final norm) or Swin's
  channels-last map, per token: bias-free linear layers and BatchNorm over all tokens. Class and
  distillation tokens go through FT too (they make the logits); the patch tokens, on their grid,
  are what is matched to the teacher. Pooling a token (or averaging them) and the head are
  linear, so FT folds into the head (into each head: DeiT's two).
- ``pooled``: on the classifier's input, where a non-linear layer sits between pooling and the
  classifier (ConvNeXt's head LayerNorm, timm's ``fc_norm``): FT over the pooled vector, its N
  segments matched to the teacher's globally average-pooled map (:func:`pooled_norm_loss`).

:func:`ft_form` picks the form: the last representation's (map or tokens) when FT there commutes
with everything up to the classifier (:func:`check_linear_head`), else ``pooled``.

The authors' code has one multi-stage option, ``--use_layer3`` (which none of their scripts
passes): a second FT *in the student's path* after the stage before the last one, whose expanded
map is matched to the teacher's stage of the same depth (:func:`attach_inner_ft`, recipe
``loss: {kind: norm, stages: layer3}``). That FT feeds further convolutions, so it cannot be folded
away exactly: the deployed student keeps it (:class:`InnerFT`, rebuilt by
:func:`restore_inner_ft`).
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from normkd.models.taps import (
    TapShapes,
    TapSpec,
    _default_example,
    as_map,
    eval_mode,
    get_module,
    get_taps,
    probe,
    run_hooked,
)

__all__ = [
    "FORMS",
    "INNER_FT",
    "ExpandedMaps",
    "FTStudent",
    "FactoredMap",
    "FeatureTransform",
    "InnerFT",
    "PooledExpanded",
    "attach_ft",
    "attach_inner_ft",
    "check_linear_head",
    "ft_form",
    "inner_stage_count",
    "max_logit_diff",
    "merge_ft",
    "norm_loss",
    "pooled_norm_loss",
    "restore_inner_ft",
    "spatial_ratio",
]

# Name of the in-path inner FT's module on a student that carries one (its state_dict prefix).
INNER_FT = "norm_inner_ft"
# Where FT sits (see the module doc): a conv map, a token sequence, the classifier's input.
FORMS = ("map", "tokens", "pooled")
Form = Literal["map", "tokens", "pooled"]


def _check_positive_int(name: str, value: object) -> int:
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


def _bn_scale_shift(
    bn: nn.modules.batchnorm._BatchNorm, mean: torch.Tensor, var: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``bn`` normalising with ``mean`` / ``var`` as ``scale * z + shift`` per channel (what
    both the merge and the factored FT fold into their affine maps)."""
    weight = bn.weight.to(mean.dtype) if bn.affine else torch.ones_like(mean)
    bias = bn.bias.to(mean.dtype) if bn.affine else torch.zeros_like(mean)
    scale = weight / torch.sqrt(var + bn.eps)
    return scale, bias - scale * mean


def _bn_batch_affine(
    bn: nn.modules.batchnorm._BatchNorm, mean: torch.Tensor, var: torch.Tensor, count: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`_bn_scale_shift` of ``bn``'s forward on a ``z`` of ``count`` values per channel
    with batch ``mean`` / (biased) ``var``: in training the batch statistics, the running ones
    updated as BatchNorm does; in eval mode the running ones."""
    if not bn.training and bn.running_mean is not None and bn.running_var is not None:
        return _bn_scale_shift(bn, bn.running_mean.to(mean.dtype), bn.running_var.to(var.dtype))
    if bn.training and bn.running_mean is not None and bn.running_var is not None:
        assert bn.num_batches_tracked is not None
        with torch.no_grad():
            bn.num_batches_tracked.add_(1)
            f = bn.momentum if bn.momentum is not None else 1.0 / bn.num_batches_tracked
            bn.running_mean.mul_(1 - f).add_(mean.detach().to(bn.running_mean.dtype) * f)
            unbiased = var.detach() * (count / (count - 1))
            bn.running_var.mul_(1 - f).add_(unbiased.to(bn.running_var.dtype) * f)
    return _bn_scale_shift(bn, mean, var)


class FactoredMap(NamedTuple):
    """FT's expanded map ``(B, N*C_t, H, W)`` kept factored: at each of the ``B*H*W`` positions
    ``Y = weight @ centred + bias``, ``centred`` the student map's rows minus their mean.
    ``sq_sum`` is Y's square sum over the whole map. :func:`norm_loss` reads it as is."""

    centred: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor
    sq_sum: torch.Tensor
    size: tuple[int, int, int]

    @property
    def shape(self) -> torch.Size:
        b, h, w = self.size
        return torch.Size((b, self.weight.shape[0], h, w))

    def materialise(self) -> torch.Tensor:
        """The map itself (differentiable): what the direct form computes."""
        b, h, w = self.size
        rows = torch.addmm(self.bias, self.centred, self.weight.T)
        return rows.view(b, h, w, -1).permute(0, 3, 1, 2)


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
        if self._can_factor(x):
            return self._forward_factored(x)
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

    def _can_factor(self, x: torch.Tensor) -> bool:
        """The factored path needs a map, a plain BatchNorm2d (or none) after the expand conv
        (its statistics are computed here, so no SyncBatchNorm) and >1 position in training."""
        if not (self.factored and self.form == "map" and x.dim() == 4):
            return False
        if x.shape[1] != self.in_channels or 0 in x.shape:
            return False
        bn = self.expand[1] if len(self.expand) > 1 else None
        return bn is None or (type(bn) is nn.BatchNorm2d and (x.numel() > x.shape[1]))

    def _forward_factored(self, x: torch.Tensor) -> tuple[torch.Tensor, FactoredMap]:
        """FT without its N*C_t-channel map: per position the expand conv + BN is affine,
        ``Y = A (x - mean) + c``, so the contract conv folds to ``C_s x C_s`` and NORM's loss
        needs only Y's closed-form square sum (:func:`norm_loss`). Computed in float32 or wider
        (autocast off: batch variances from a covariance need it)."""
        b, c, h, w = x.shape
        dtype = torch.promote_types(x.dtype, torch.float32)
        with torch.autocast(x.device.type, enabled=False):
            rows = x.permute(0, 2, 3, 1).reshape(-1, c).to(dtype)
            mean = rows.mean(0)
            centred = rows - mean
            cov = centred.T @ centred / rows.shape[0]
            conv = self.expand[0]
            w1 = conv.weight.flatten(1).to(dtype)
            var = ((w1 @ cov) * w1).sum(1)  # each expanded channel's (biased) batch variance
            mu = w1 @ mean if conv.bias is None else w1 @ mean + conv.bias.to(dtype)
            scale, shift = None, mu  # Y = scale * (w1 @ centred + mu) + shift = a @ centred + c
            if len(self.expand) > 1:
                scale, shift = _bn_batch_affine(self.expand[1], mu, var, rows.shape[0])
                shift = shift + scale * mu
            a = w1 if scale is None else scale[:, None] * w1
            sq = rows.shape[0] * (
                (var if scale is None else scale.square() * var).sum() + shift.square().sum()
            )
            con = self.contract[0]
            w2 = con.weight.flatten(1).to(dtype)
            bias2 = w2 @ shift if con.bias is None else w2 @ shift + con.bias.to(dtype)
            z = torch.addmm(bias2, centred, (w2 @ a).T).view(b, h, w, -1).permute(0, 3, 1, 2)
        if len(self.contract) > 1:
            z = self.contract[1](z)
        out = z + x if self.residual else z
        return out.to(x.dtype), FactoredMap(centred, a, shift, sq, (b, h, w))

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
            return _factored_loss(expanded, _match_spatial(expanded, teacher, reduce)[1], n)
        expanded = expanded.materialise()  # a larger student map is pooled: it must exist
    student, teacher = _match_spatial(expanded, teacher, reduce)
    h, w = student.shape[-2:]
    # Broadcast the teacher over the N segments without materialising a tiled copy or a diff;
    # in at least fp32 (a bf16 mean of squares over N*C_t*H*W values loses digits).
    dtype = torch.promote_types(student.dtype, torch.float32)
    segments = student.reshape(b, n, ct, h, w).to(dtype)
    return F.mse_loss(segments, teacher.to(dtype).unsqueeze(1).expand_as(segments)) * n


def _factored_loss(f: FactoredMap, teacher: torch.Tensor, n: int) -> torch.Tensor:
    """:func:`norm_loss` of a factored map, same size as ``teacher``, never materialised:
    ``sum_n ||Y_n - t||^2 = ||Y||^2 - 2 <sum_n Y_n, t> + N ||t||^2``, where ``sum_n Y_n`` is the
    summed segments' affine map applied to the centred student rows."""
    b, h, w = f.size
    ct, cs = teacher.shape[1], f.centred.shape[1]
    with torch.autocast(teacher.device.type, enabled=False):
        t_rows = teacher.permute(0, 2, 3, 1).reshape(-1, ct).to(f.centred.dtype)
        a_sum = f.weight.view(n, ct, cs).sum(0)
        c_sum = f.bias.view(n, ct).sum(0)
        cross = ((t_rows.T @ f.centred) * a_sum).sum() + t_rows.sum(0) @ c_sum
        total = f.sq_sum - 2 * cross + n * t_rows.square().sum()
    return total / (b * ct * h * w)


class PooledExpanded(NamedTuple):
    """A ``pooled``-form FT's expanded vector ``(B, N*C_t)``: matched by :func:`pooled_norm_loss`
    to the teacher's pooled map, not by :func:`norm_loss` to the map itself."""

    vector: torch.Tensor


def pooled_norm_loss(vector: torch.Tensor, teacher_map: torch.Tensor, n: int) -> torch.Tensor:
    """N-to-one matching of a pooled-form student: each of the N segments of ``vector``
    ``(B, N*C_t)`` is pulled to the teacher's globally average-pooled map ``(B, C_t, H, W)``
    (a ViT teacher's map is its patch tokens, so that is their mean), by MSE summed over segments.

    The pooled vector has no spatial layout left to match, so the teacher's map gives its average,
    the vector the teacher's own global pooling would hand a linear head.
    """
    if vector.dim() != 2 or teacher_map.dim() != 4:
        raise ValueError(
            "pooled_norm_loss expects a (B, N*C_t) vector and a (B, C_t, H, W) teacher map: got "
            f"{tuple(vector.shape)} and {tuple(teacher_map.shape)}"
        )
    pooled = teacher_map.detach().mean((2, 3), keepdim=True)
    return norm_loss(vector[:, :, None, None], pooled, n)


def inner_stage_count(shapes: TapShapes) -> int:
    """How many of a model's stages lie before the one global pooling reads.

    The last stage is ``feat``'s own when it has ``feat``'s resolution (``feat`` itself, or the
    map ``feat`` is computed from, as WRN's block3 before its final BN-ReLU); a stage list that
    stops earlier has all its stages inner. Reading shapes, not ``stages[-1] == feat``, keeps the
    inner stages right for stage lists that follow the peers' feature lists.
    """
    n = len(shapes.stages)
    return n - 1 if n and tuple(shapes.stages[-1][1:]) == tuple(shapes.feat[1:]) else n


class ExpandedMaps(NamedTuple):
    """The expanded maps of one forward of a student with an inner FT, shallow to deep."""

    inner: torch.Tensor
    last: torch.Tensor | PooledExpanded


class InnerFT(nn.Module):
    """An FT kept in the student's path after an inner stage (the authors' ``--use_layer3``).

    It lives on the student itself (child :data:`INNER_FT`, a forward hook on ``stage``), so the
    deployed student keeps it: its contracted map feeds further convolutions (zero-padded, after
    BN-ReLU in pre-activation nets), through which its constant terms and channel mixing cannot
    be folded exactly, unlike the last FT's through pooling and the classifier. Two buffers record
    where it sits and whether it is residual, so a saved student rebuilds (:func:`restore_inner_ft`).
    While an :class:`FTStudent` runs, ``sink`` collects the expanded map for the loss; otherwise
    nothing is kept (no tensor outlives a forward, so the student deep-copies). Its hook is
    registered before any tap's, so the ``stages`` tap at ``stage`` reads its output (what the next
    stage reads): other terms (AT, FitNet) see the student as it is deployed.
    """

    def __init__(self, ft: FeatureTransform, stage: str) -> None:
        super().__init__()
        if not stage:
            raise ValueError("the inner FT needs a stage module name")
        self.ft = ft
        self.stage = stage
        name = torch.tensor(list(stage.encode()), dtype=torch.uint8)
        self.register_buffer("stage_name", name)
        self.register_buffer("residual", torch.tensor(int(ft.residual), dtype=torch.uint8))
        self.sink: list[torch.Tensor] | None = None

    def hook(self, _mod: nn.Module, _inp: object, out: torch.Tensor) -> torch.Tensor:
        """Forward hook on ``stage``: its map -> FT -> the contracted map the next stage reads."""
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"stage {self.stage!r} returned {type(out).__name__}, not a tensor")
        contracted, expanded = self.ft(out)
        if self.sink is not None:
            self.sink.append(expanded)
        return contracted


def _install_inner(model: nn.Module, ft: FeatureTransform, stage: str) -> InnerFT:
    """Make ``ft`` part of ``model`` for good: child :data:`INNER_FT` and a hook on ``stage``."""
    target = get_module(model, stage)
    inner = InnerFT(ft, stage)
    model.add_module(INNER_FT, inner)
    # A bound method: deepcopy (merge_ft) re-binds the copied hook to the copied InnerFT.
    target.register_forward_hook(inner.hook)
    return inner


class FTStudent(nn.Module):
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


def ft_form(model: nn.Module, example: torch.Tensor | None = None) -> Form:
    """The FT form ``model`` gets: ``map`` (a CNN) or ``tokens`` (a ViT) where FT after its last
    representation commutes with the path to its classifier (global pooling, a class token, a
    flatten: so it folds into the classifier), else ``pooled`` (a norm layer or an activation
    after pooling, as ConvNeXt's head). Raises ValueError for a model without readable taps."""
    spec = get_taps(model, example)
    if _path_error(model, spec, example) is not None:
        _classifier_width(get_module(model, spec.classifier))
        return "pooled"
    return "map" if spec.layout == "map" else "tokens"


def _classifier_width(fc: nn.Module) -> int:
    """The input width of a classifier FT can merge into, or ValueError."""
    if isinstance(fc, nn.Linear):
        return fc.in_features
    if isinstance(fc, nn.Conv2d) and fc.kernel_size == (1, 1) and fc.groups == 1:
        return fc.in_channels
    raise ValueError(
        f"classifier is {type(fc).__name__}; FT merges into an nn.Linear (or a 1x1 nn.Conv2d)"
    )


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


def restore_inner_ft(model: nn.Module, path: str | Path) -> nn.Module:
    """Give ``model`` (built by name) the inner FT a saved ``stages: layer3`` student carries.

    A no-op for files without one. The file's own buffers say where the FT sits and whether it is
    residual; its weights' shapes give its channels (only N * C_t matters to run it). The weights
    themselves are loaded afterwards, e.g. by ``normkd.models.load_weights``.
    """
    from normkd.models.weights import CheckpointError, read_state_dict

    state = read_state_dict(path)
    pre = INNER_FT + "."
    if not any(k.startswith(pre) for k in state):
        return model
    try:
        stage = bytes(state[pre + "stage_name"].tolist()).decode()
        residual = bool(state[pre + "residual"].item())
        w = state[pre + "ft.expand.0.weight"]
        ft = FeatureTransform(
            w.shape[1],
            w.shape[0],
            1,
            bn=pre + "ft.expand.1.weight" in state,
            residual=residual,
            init="pytorch",
        )
        _install_inner(model, ft, stage)
    except (KeyError, ValueError, UnicodeDecodeError, RuntimeError) as err:
        raise CheckpointError(
            f"{path}: its inner FT ({pre}*, NORM stages: layer3) cannot be rebuilt on "
            f"{type(model).__name__}: {err}"
        ) from None
    return model


@torch.no_grad()
def check_linear_head(
    model: nn.Module, spec: TapSpec, example: torch.Tensor | None = None, rtol: float = 1e-3
) -> None:
    """Raise ValueError unless FT after the ``feat`` map (or tokens) could be merged.

    FT can only be merged when everything between the last map and the classifier commutes with
    a per-position affine map: global pooling, a class token picked from the sequence, flatten,
    dropout. Checked on random maps: ``head_input(A m + c) == A head_input(m) + c`` for a random
    ``A``, ``c``. An activation, a LayerNorm or a BatchNorm after pooling (ConvNeXt, timm's
    ``fc_norm``, some conv heads) fails it, before any training time is spent; such models take
    FT on the pooled vector instead (:func:`ft_form`).
    """
    err = _path_error(model, spec, example, rtol)
    if err is not None:
        raise ValueError(
            f"{type(model).__name__}: the path from its last map {spec.feat!r} to its "
            f"classifier {spec.classifier!r} is not linear ({err}: an activation or a norm layer "
            "after global pooling?), so FT there could not be merged into the classifier after "
            "training; put FT on the pooled vector instead (form pooled), or use this model as "
            "the teacher"
        )


def _path_error(
    model: nn.Module, spec: TapSpec, example: torch.Tensor | None, rtol: float = 1e-3
) -> str | None:
    """Why FT on ``feat`` would not commute with the path to the classifiers, or None."""
    x = _default_example(model) if example is None else example
    shape = _head_inputs(model, spec, x, None)[0]
    c = spec.feat_channels
    axis = 1 if spec.layout == "map" else -1
    if len(shape) < 2 or shape[axis] != c:
        return f"its output {tuple(shape)} has not {c} channels in dim {axis}"
    gen = torch.Generator().manual_seed(0)
    m = torch.randn(shape, generator=gen).double()
    a = torch.randn(c, c, generator=gen).double() / c**0.5
    b = torch.randn(c, generator=gen).double()

    def affine(t: torch.Tensor, dim: int) -> torch.Tensor:
        return (t.movedim(dim, -1) @ a.T + b).movedim(-1, dim)

    plain = _head_inputs(model, spec, x, m)[1]
    moved = _head_inputs(model, spec, x, affine(m, axis))[1]
    heads = [get_module(model, name) for name in (spec.classifier, *spec.heads)]
    for got, want, head in zip(moved, plain, heads):
        dim = -1 if isinstance(head, nn.Linear) else 1
        if want.dim() < 2 or want.shape[dim] != c:
            return f"the classifier reads {tuple(want.shape)}, not {c} features"
        want = affine(want, dim)
        scale = float(want.abs().max()) + 1e-6
        if float((got - want).abs().max()) > rtol * scale:
            return "FT would not commute with it"
    return None


def _head_inputs(
    model: nn.Module, spec: TapSpec, x: torch.Tensor, replace: torch.Tensor | None
) -> tuple[torch.Size, list[torch.Tensor]]:
    """(``feat``'s output shape, each classifier's input in float64) of one eval-mode forward of
    ``x``, ``feat``'s output replaced by ``replace`` when given."""
    shapes: list[torch.Size] = []
    got: list[torch.Tensor] = []

    def on_feat(_m: nn.Module, _i: object, out: torch.Tensor) -> torch.Tensor | None:
        if not isinstance(out, torch.Tensor):
            raise ValueError(f"tap {spec.feat!r} returned {type(out).__name__}, not a tensor")
        shapes.append(out.shape)
        return None if replace is None else replace.to(out)

    def on_head(_m: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        got.append(args[0].detach().double())

    handles = [get_module(model, spec.feat).register_forward_hook(on_feat)]
    handles += [
        get_module(model, name).register_forward_pre_hook(on_head)
        for name in (spec.classifier, *spec.heads)
    ]
    run_hooked(model, x, handles)
    if not shapes or not got:
        raise ValueError(
            f"{type(model).__name__}: its taps {spec.feat!r} / "
            f"{spec.classifier!r} were not called in a forward"
        )
    return shapes[-1], got


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
    merged = copy.deepcopy(s_ft.student)
    a, c = s_ft.ft.as_affine()
    for name in (s_ft.spec.classifier, *s_ft.spec.heads):
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


@torch.no_grad()
def max_logit_diff(a: nn.Module, b: nn.Module, x: torch.Tensor) -> float:
    """Largest absolute logit difference between two models on ``x`` (both in eval mode)."""
    with eval_mode(a, b):
        return float((a(x).float() - b(x).float()).abs().max())
