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

The authors' code has one multi-stage option, ``--use_layer3`` (which none of their scripts
passes): a second FT *in the student's path* after the stage before the last one, whose expanded
map is matched to the teacher's stage of the same depth (:func:`attach_inner_ft`, recipe
``loss: {kind: norm, stages: layer3}``). That FT feeds further convolutions, so it cannot be folded
away exactly: the deployed student keeps it (:class:`InnerFT`, rebuilt by
:func:`restore_inner_ft`).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from normkd.models.taps import (
    TapShapes,
    TapSpec,
    _default_example,
    eval_mode,
    get_module,
    get_taps,
    probe,
)

__all__ = [
    "INNER_FT",
    "ExpandedMaps",
    "FTStudent",
    "FeatureTransform",
    "InnerFT",
    "attach_ft",
    "attach_inner_ft",
    "check_linear_head",
    "inner_stage_count",
    "max_logit_diff",
    "merge_ft",
    "norm_loss",
    "restore_inner_ft",
    "spatial_ratio",
]

# Name of the in-path inner FT's module on a student that carries one (its state_dict prefix).
INNER_FT = "norm_inner_ft"


def _check_positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def _conv1x1(cin: int, cout: int, bn: bool) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, kernel_size=1, bias=not bn)]
    if bn:
        layers.append(nn.BatchNorm2d(cout))
    return nn.Sequential(*layers)


class FeatureTransform(nn.Module):
    """Expand ``C_s -> N*C_t`` (the N views matched to the teacher), contract back to ``C_s``.

    ``bn=False, residual=False`` is the paper's plain two-linear-layer form; the defaults follow the
    authors' code (bias-free conv + BatchNorm for each layer, contracted map added to the input,
    convs drawn Kaiming-normal fan-out; ``init="pytorch"`` keeps PyTorch's default conv init).
    ``forward`` returns ``(contracted, expanded)``.
    """

    def __init__(
        self,
        in_channels: int,
        teacher_channels: int,
        n: int,
        bn: bool = True,
        residual: bool = True,
        init: Literal["authors", "pytorch"] = "authors",
    ) -> None:
        super().__init__()
        self.in_channels = _check_positive_int("in_channels", in_channels)
        self.teacher_channels = _check_positive_int("teacher_channels", teacher_channels)
        self.n = _check_positive_int("n (the expansion factor)", n)
        if init not in ("authors", "pytorch"):
            raise ValueError(f"init must be 'authors' or 'pytorch', got {init!r}")
        self.bn = bool(bn)
        self.residual = bool(residual)
        self.expand = _conv1x1(in_channels, n * teacher_channels, bn)
        self.contract = _conv1x1(n * teacher_channels, in_channels, bn)
        if init == "authors":
            # The authors' model init loop covers FT too: Kaiming normal (fan_out, relu). PyTorch's
            # default conv init gives the contract conv ~7x smaller weights at N*C_t inputs.
            for block in (self.expand, self.contract):
                nn.init.kaiming_normal_(block[0].weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if x.dim() != 4 or x.shape[1] != self.in_channels or 0 in x.shape:
            raise ValueError(
                f"FeatureTransform expects a non-empty (B, {self.in_channels}, H, W) map, "
                f"got {tuple(x.shape)}"
            )
        expanded = self.expand(x)
        out = self.contract(expanded)
        if self.residual:
            out = out + x
        return out, expanded

    @torch.no_grad()
    def as_affine(self) -> tuple[torch.Tensor, torch.Tensor]:
        """FT in eval mode as ``y = A @ x + c`` per pixel (float64), the form the merge folds."""

        def affine(block: nn.Sequential) -> tuple[torch.Tensor, torch.Tensor]:
            conv = block[0]
            w = conv.weight.detach().double().flatten(1)  # (out, in)
            b = (
                conv.bias.detach().double()
                if conv.bias is not None
                else torch.zeros(w.shape[0], dtype=torch.float64, device=w.device)
            )
            if len(block) > 1:
                bn: nn.BatchNorm2d = block[1]
                if bn.running_var is None or bn.running_mean is None:
                    raise ValueError("cannot merge a BatchNorm without running statistics")
                scale = bn.weight.detach().double() if bn.affine else torch.ones_like(b)
                shift = bn.bias.detach().double() if bn.affine else torch.zeros_like(b)
                s = scale / torch.sqrt(bn.running_var.double() + bn.eps)
                w = s[:, None] * w
                b = s * (b - bn.running_mean.double()) + shift
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
    student: torch.Tensor, teacher: torch.Tensor, reduce: Literal["max", "avg"]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pool the spatially larger map down to the smaller one by an integer ratio."""
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
    expanded: torch.Tensor,
    teacher_map: torch.Tensor,
    n: int,
    reduce: Literal["max", "avg"] = "max",
) -> torch.Tensor:
    """N-to-one matching: sum over the N segments of ``MSE(segment_i, teacher_map)``.

    ``expanded`` is FT's expanded map ``(B, N*C_t, H, W)``; ``teacher_map`` is ``(B, C_t, H', W')``.
    The teacher map is detached (the teacher never learns) and, when spatially larger, reduced to
    the student's size by ``reduce`` pooling with the integer ratio (the authors use max).
    Equals ``N * MSE(expanded, teacher_map tiled N times)``.
    """
    n = _check_positive_int("n (the expansion factor)", n)
    if reduce not in ("max", "avg"):
        raise ValueError(f"reduce must be 'max' or 'avg', got {reduce!r}")
    if expanded.dim() != 4 or teacher_map.dim() != 4:
        raise ValueError(
            "norm_loss expects 4-D maps (B, C, H, W): got student expanded map "
            f"{tuple(expanded.shape)} and teacher map {tuple(teacher_map.shape)}"
        )
    if 0 in expanded.shape or 0 in teacher_map.shape:
        raise ValueError(
            "norm_loss expects non-empty maps: got student expanded map "
            f"{tuple(expanded.shape)} and teacher map {tuple(teacher_map.shape)}"
        )
    b, c, _, _ = expanded.shape
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
    student, teacher = _match_spatial(expanded, teacher_map.detach(), reduce)
    h, w = student.shape[-2:]
    # Broadcast the teacher over the N segments without materialising a tiled copy or a diff.
    segments = student.reshape(b, n, ct, h, w)
    return F.mse_loss(segments, teacher.to(student.dtype).unsqueeze(1).expand_as(segments)) * n


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
    last: torch.Tensor


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

    FT is inserted by a forward hook on the student's ``feat`` module, registered only for the
    duration of each forward, so ``self.student`` stays the model to deploy (what
    :func:`merge_ft` copies): the plain student, or with ``stages: layer3`` the student with its
    in-path :class:`InnerFT`, when ``expanded`` is :class:`ExpandedMaps` (inner, last). The hook
    is a plain method, so the wrapper works under DDP and deepcopy.
    """

    def __init__(self, student: nn.Module, ft: FeatureTransform, spec: TapSpec) -> None:
        super().__init__()
        self.student = student
        self.ft = ft
        self.spec = spec
        self.expanded: torch.Tensor | ExpandedMaps | None = None

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
        contracted, self.expanded = self.ft(out)
        return contracted

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        inner = self.inner
        sink: list[torch.Tensor] = []
        if inner is not None:
            inner.sink = sink
        handle = get_module(self.student, self.spec.feat).register_forward_hook(self._insert_ft)
        try:
            logits = self.student(x)
        finally:
            handle.remove()
            if inner is not None:
                inner.sink = None
        if sink:
            assert isinstance(self.expanded, torch.Tensor)
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
) -> FTStudent:
    """Wrap ``student`` so its logits flow through a new FT after its last conv map.

    The student's taps come from its declared ``tap_spec`` or are discovered with one forward pass
    (on ``example`` if given), so zoo, torchvision and other CNN classifiers all work.
    """
    if isinstance(student, FTStudent):
        raise ValueError("student already has a FeatureTransform attached")
    spec = get_taps(student, example)
    check_linear_head(student, spec, example)
    ft = FeatureTransform(
        spec.feat_channels, teacher_channels, n, bn=bn, residual=residual, init=init
    )
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
    """Raise ValueError unless the classifier's input is an affine function of the ``feat`` map.

    FT can only be merged when everything between the last conv map and the classifier is
    affine (global pooling, flatten, eval-mode BatchNorm, dropout). Checked on random maps by
    the midpoint rule ``g((a + b) / 2) == (g(a) + g(b)) / 2``; an activation or a LayerNorm after
    pooling (ConvNeXt, some conv heads) fails it, before any training time is spent.
    """
    x = _default_example(model) if example is None else example
    feat_mod = get_module(model, spec.feat)
    head = get_module(model, spec.classifier)
    shape: list[torch.Size] = []
    replace: list[torch.Tensor | None] = [None]
    got: list[torch.Tensor] = []

    def on_feat(_m: nn.Module, _i: object, out: torch.Tensor) -> torch.Tensor | None:
        shape.append(out.shape)
        return replace[0]

    def on_head(_m: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        got.append(args[0].detach().double())

    h1 = feat_mod.register_forward_hook(on_feat)
    h2 = head.register_forward_pre_hook(on_head)
    try:
        with eval_mode(model):
            model(x)
            gen = torch.Generator().manual_seed(0)
            a, b = (torch.randn(shape[0], generator=gen).to(x) for _ in range(2))
            outs = []
            for m in (a, b, (a + b) / 2):
                replace[0] = m
                got.clear()
                model(x)
                outs.append(got[-1])
    finally:
        h1.remove()
        h2.remove()
    ga, gb, gm = outs
    err = float((gm - (ga + gb) / 2).abs().max())
    scale = float(torch.stack([ga.abs().max(), gb.abs().max()]).max()) + 1e-6
    if err > rtol * scale:
        raise ValueError(
            f"{type(model).__name__}: the path from its last conv map {spec.feat!r} to its "
            f"classifier {spec.classifier!r} is not linear (an activation or a norm layer after "
            "global pooling?), so FT could not be merged into the classifier after training; "
            "use this model as the teacher, or a student whose pooled map feeds the classifier "
            "directly"
        )


@torch.no_grad()
def merge_ft(s_ft: FTStudent) -> nn.Module:
    """Fold FT into the classifier: ``fc(gap(FT(x))) == fc'(gap(x))`` for the eval-mode student.

    Valid because FT (1x1 convs, eval-mode BatchNorm, residual), global average pooling and the
    classifier are all linear. Returns a new student of the same class; ``s_ft`` is left
    untouched. Its parameter count is the plain student's, plus the inner FT's when the student
    carries one (``stages: layer3``: that FT stays, in the copy's path). Returned in eval mode.
    """
    if not isinstance(s_ft, FTStudent):
        raise TypeError(f"merge_ft expects the result of attach_ft, got {type(s_ft).__name__}")
    merged = copy.deepcopy(s_ft.student)
    fc = get_module(merged, s_ft.spec.classifier)
    is_conv = isinstance(fc, nn.Conv2d) and fc.kernel_size == (1, 1) and fc.groups == 1
    if not (isinstance(fc, nn.Linear) or is_conv):
        raise TypeError(
            f"classifier {s_ft.spec.classifier!r} is {type(fc).__name__}; merge needs an "
            "nn.Linear (or a 1x1 nn.Conv2d on the pooled map)"
        )
    a, c = s_ft.ft.as_affine()
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
    fc.weight.copy_((w @ a).view_as(fc.weight))  # ``merged`` is a copy: edit its layer in place
    if fc.bias is not None:
        fc.bias.copy_(new_bias)
    return merged.eval()


@torch.no_grad()
def max_logit_diff(a: nn.Module, b: nn.Module, x: torch.Tensor) -> float:
    """Largest absolute logit difference between two models on ``x`` (both in eval mode)."""
    with eval_mode(a, b):
        return float((a(x).float() - b(x).float()).abs().max())
