"""Wasserstein distillation (Lv et al., NeurIPS 2024): WKD-L on logits, WKD-F on features.

**WKD-L** splits the prediction as DKD does. The target class is matched by the teacher-weighted
log-likelihood ``-mean_b p_t(y_b) log p_s(y_b)`` (T = 1, weight 1). The non-target classes are
matched by an entropic (Sinkhorn) Wasserstein distance between the temperature-softened
distributions over the ``C - 1`` other classes, under a class-to-class cost ``M``; it carries the
weight ``gamma``. The authors run ``iters`` Sinkhorn sweeps from ``u = 1 / (C - 1)`` with kernel
``exp(-M / lam)`` and ``1e-8`` in each division, use ``relu(M) + 1e-8`` as the cost, and let the
gradient flow through the sweeps. ``gamma`` is cosine-decayed to 0 from ``decay_from`` to the last
epoch (the authors' ``COSINE_DECAY_EPOCH``, with their 1-based epochs).

The cost ``M``: the authors compute it offline from the *teacher* (JiamingLv/WKD
``tools/generate_class_proto.py``, ``tools/generate_cost_matrix.py``). For each class they stack
the teacher's representation of its training images, read without augmentation (CIFAR-100: the
last stage's map of all 500 images, every spatial position a row; ImageNet: the logits, each class
cut to the smallest class's count), set ``M_ij = 1 - linearCKA(F_i, F_j)`` with rows paired in
that order, and sharpen it at training, ``M <- 1 - exp(-kappa M)`` (``COST_MATRIX_SHARPEN`` 1).
Their files (``wkd_cost_matrix/``, the raw ``1 - CKA`` as a plain tensor) load here with
``cost_matrix: PATH`` and are sharpened by ``sharpen``. :func:`teacher_class_features` and
:func:`cka_cost_matrix` make the same raw matrix for any teacher (``.safetensors``, key ``cost``;
``normkd wkd-cost RECIPE`` makes the file from a recipe's teacher and data: normkd/wkd_cost.py).
Their other option is ``1 - cosine`` between the rows of the teacher's classifier
(:func:`classifier_cost_matrix`).

**The term cannot make the published cost itself**: it is built from the models' tap *shapes*
(``BuildContext``) and never sees the teacher's weights or the training images, so ``cost_matrix:
uniform`` (the default) is cost 1 between any two distinct classes: WKD-L without class relations,
**not the published method**, and a run says so in a warning. What would let it: the frozen teacher
module and an un-augmented pass over the training set in ``BuildContext`` (engine/job.py), for the
CKA cost; the teacher module alone, for the classifier cost.

**WKD-F** passes the student's last stage through a projector (``conv1x1``: the FitNet
regressor, conv + BN + ReLU; ``bottleneck``: 1x1 -> 3x3 -> 1x1 through 256 channels, + BN + ReLU)
and matches each channel's mean and standard deviation (``sqrt(var + eps)``, unbiased variance)
with the teacher's last stage: the Wasserstein-2 distance between diagonal Gaussians,
``ratio * |mu_s - mu_t|^2 + |sigma_s - sigma_t|^2``, summed over channels and averaged over the
batch; with ``grid`` > 1 the statistics are taken per cell of an adaptive ``grid x grid`` split
and averaged over cells too. The projector is the term's: trained with the student, never deployed.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import ClassVar, Literal, get_args

import torch
import torch.nn.functional as F
from pydantic import NonNegativeFloat, NonNegativeInt, PositiveFloat, PositiveInt
from torch import nn

from normkd.errors import ConfigError
from normkd.log import logger
from normkd.losses.base import BuildContext, LossTerm, StepState, TermConfig, register_term
from normkd.losses.fitnet import hint_regressor
from normkd.models.taps import TapSpec, collect_taps, eval_mode, example_input, get_taps

# ---------------------------------------------------------------- the cost matrix (WKD-L)

Source = Literal["last_stage", "logits"]  # the teacher's rows a class is described by
SOURCES: tuple[str, ...] = get_args(Source)


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Linear CKA of two ``(n, d)`` feature matrices whose rows are paired samples."""
    x, y = x - x.mean(0, keepdim=True), y - y.mean(0, keepdim=True)
    hsic = _gram(y, x).pow(2).sum()
    return hsic / (_self_norm(x) * _self_norm(y))


# The CKA's temporaries stay within this (or within two classes' rows where those are larger), so
# making a cost takes the rows plus this, whatever the class count.
CKA_WORKSPACE = 512 * 2**20


def cka_cost_matrix(
    class_feats: torch.Tensor,
    sharpen: float = 0.0,
    workspace: int = CKA_WORKSPACE,
    progress: Callable[[int, int], None] | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """``(C, n, d)`` teacher features per class -> ``(C, C)`` cost ``1 - CKA`` (with ``sharpen``
    k > 0: ``1 - exp(-k (1 - CKA))``; keep 0 for a file the term loads, since it sharpens).

    :func:`linear_cka` of every pair without a loop over pairs: each class centred as it centres
    and its normaliser taken once, the cross terms ``||Yc^T Xc||_F^2`` from GEMMs over blocks of
    classes in the cheaper of two forms (:func:`cka_form`). The feature form rounds as
    linear_cka does (its GEMMs and sums; on MKL the old pair loop's costs bit for bit); the kernel
    form sums in float64, within half a float32 ulp of the exact cost, where linear_cka's float32
    ``norm`` of a ``(d, d)`` Gram drifts beyond d ~ 100. ``workspace`` bounds the temporaries'
    bytes; ``progress(done, total)`` is called after each block. ``device`` (default: the rows'):
    where the GEMMs run, a block at a time, while the rows stay where they are (``wkd-cost``
    passes the teacher's device: resnet32x4's CIFAR-100 pairs would take about 6 minutes of a
    CPU core, scaled from resnet20's measured 23 s); the cost comes back beside the rows."""
    c, n, d = class_feats.shape
    if c < 2:
        return torch.zeros(c, c, dtype=class_feats.dtype)
    dev = torch.device(device) if device is not None else class_feats.device
    means = torch.stack([f.mean(0, keepdim=True) for f in class_feats])  # (C, 1, d)
    if cka_form(c, n, d) == "feature":
        hsic = _feature_hsic(class_feats, means, workspace, progress, dev)
        norms = torch.stack(
            [
                _self_norm((f - m).to(dev)).to(f.device)
                for f, m in zip(class_feats, means, strict=True)
            ]
        )
    else:  # float64 sums, rounded to the rows' dtype once at the end
        hsic = _kernel_hsic(class_feats, means, workspace, progress, dev)
        norms = hsic.diagonal().sqrt()  # ||Xc Xc^T||_F = ||Xc^T Xc||_F
    upper = torch.triu(1 - hsic / (norms[:, None] * norms[None, :]), 1).to(class_feats.dtype)
    return sharpen_cost(upper + upper.t(), sharpen)  # symmetric, 0 on the diagonal


def cka_form(c: int, n: int, d: int) -> Literal["feature", "kernel"]:
    """The cheaper way to the cross terms, by multiply-adds: ``feature`` forms each pair's
    ``(d, d)`` ``Yc^T Xc`` (``C^2 n d^2 / 2``); ``kernel`` each class's ``(n, n)`` ``Xc Xc^T`` and
    every pair's ``<Kx, Ky>_F`` from products over K's rows (``C n^2 d + C^2 n^2``). CIFAR's last stage
    (n = 32,000 rows of d = 64) takes the feature form, ImageNet's logits (n ~ 732, d = 1,000)
    the kernel form."""
    return "feature" if c * n * d * d / 2 <= n * n * (d + c) else "kernel"


def cka_workspace_bytes(
    c: int, n: int, d: int, itemsize: int = 4, workspace: int = CKA_WORKSPACE
) -> int:
    """The most the temporaries of :func:`cka_cost_matrix` take at once on ``(C, n, d)`` rows."""
    if cka_form(c, n, d) == "kernel":  # a chunk of every K, a class's rows, the (C, C) sums
        return itemsize * (c * _kernel_step(c, n, d, itemsize, workspace) * n + n * d + 6 * c * c)
    per = _block_classes(n, d, itemsize, workspace)  # two blocks, a tile and its reordered copy
    return itemsize * 2 * (per * n * d + (per * d) ** 2)


def _gram(y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``Y^T X`` as :func:`linear_cka` forms it (the same GEMM, so the same float rounding)."""
    return y.t() @ x


def _self_norm(xc: torch.Tensor) -> torch.Tensor:
    """``||Xc^T Xc||_F`` of centred rows, as :func:`linear_cka` takes it."""
    return _gram(xc, xc).norm()


def _block_classes(n: int, d: int, itemsize: int, workspace: int) -> int:
    """Classes per block of the feature form: its centred rows ``(n, b d)`` and its tile
    ``(b d, b d)`` each within a quarter of ``workspace`` (at least one class)."""
    quarter = workspace // 4 // itemsize
    return max(1, min(quarter // (n * d), math.isqrt(quarter) // d))


def _kernel_step(c: int, n: int, d: int, itemsize: int, workspace: int) -> int:
    """Rows of every class's ``K`` the kernel form takes at a time (at least one)."""
    return max(1, min(n, (workspace // itemsize - n * d - 6 * c * c) // (c * n)))


def _centred_block(
    feats: torch.Tensor, means: torch.Tensor, i0: int, i1: int, device: torch.device
) -> torch.Tensor:
    """Classes ``i0:i1``'s centred rows side by side on ``device``, ``(n, (i1 - i0) d)``: a
    tile's operand."""
    n, d = feats.shape[1:]
    out = torch.empty(n, i1 - i0, d, dtype=feats.dtype, device=device)
    rows, centres = feats[i0:i1].to(device), means[i0:i1].to(device)
    torch.sub(rows.transpose(0, 1), centres.transpose(0, 1), out=out)
    return out.view(n, -1)


def _feature_hsic(
    feats: torch.Tensor,
    means: torch.Tensor,
    workspace: int,
    progress: Callable[[int, int], None] | None,
    device: torch.device,
) -> torch.Tensor:
    """``||Yc^T Xc||_F^2`` of every class pair (upper triangle), one GEMM per pair of blocks."""
    c, n, d = feats.shape
    per = _block_classes(n, d, feats.element_size(), workspace)
    starts = range(0, c, per)
    total, done = len(starts) * (len(starts) + 1) // 2, 0
    hsic = torch.zeros(c, c, dtype=feats.dtype, device=feats.device)
    for a, i0 in enumerate(starts):
        i1 = min(i0 + per, c)
        left = _centred_block(feats, means, i0, i1, device)
        for j0 in starts[a:]:
            j1 = min(j0 + per, c)
            right = left if j0 == i0 else _centred_block(feats, means, j0, j1, device)
            # (J d, I d) -> (J, I, d, d): each pair's Y^T X contiguous, summed as linear_cka sums
            tile = _gram(right, left).view(j1 - j0, d, i1 - i0, d).transpose(1, 2).contiguous()
            hsic[i0:i1, j0:j1] = tile.pow_(2).flatten(2).sum(2).t().to(hsic.device)
            del tile, right
            done += 1
            if progress is not None:
                progress(done, total)
    return hsic


def _kernel_hsic(
    feats: torch.Tensor,
    means: torch.Tensor,
    workspace: int,
    progress: Callable[[int, int], None] | None,
    device: torch.device,
) -> torch.Tensor:
    """``<Kx, Ky>_F`` (``= ||Yc^T Xc||_F^2``) of every class pair, ``K = Xc Xc^T``: a chunk of
    rows of every class's K at a time, all pairs from one ``(C, n) x (n, C)`` product per row.
    Each product sums n terms, as linear_cka's ``Y^T X`` does, and the rows add up in float64:
    the n^2 terms of a whole K in one float32 sum drift (18 ulps on 20 classes of 500 x 100)."""
    c, n, d = feats.shape
    step = _kernel_step(c, n, d, feats.element_size(), workspace)
    starts = range(0, n, step)
    hsic = torch.zeros(c, c, dtype=torch.float64, device=device)
    for done, r0 in enumerate(starts, 1):
        r1 = min(r0 + step, n)
        k = torch.empty(c, r1 - r0, n, dtype=feats.dtype, device=device)
        for i in range(c):  # each class centred again per chunk: n d work against r n d
            xc = feats[i].to(device) - means[i].to(device)
            torch.mm(xc[r0:r1], xc.t(), out=k[i])
        for a in range(r1 - r0):  # k[:, a], (C, n): one row of every class's K
            hsic += k[:, a] @ k[:, a].t()
        del k  # (no view of it left: the next chunk's is not on top of it)
        if progress is not None:
            progress(done, len(starts))
    return hsic.to(feats.device)


def classifier_cost_matrix(weight: torch.Tensor, sharpen: float = 0.0) -> torch.Tensor:
    """``(C, D)`` teacher classifier rows -> ``(C, C)`` cost from their cosine distances."""
    w = F.normalize(weight.detach(), dim=1)
    return sharpen_cost(1 - w @ w.t(), sharpen)


def images_per_class(counts: torch.Tensor, source: Source) -> int:
    """Images each class keeps: all of them for ``last_stage`` (whose rows pair the images of two
    classes one to one, so every class needs as many), the smallest count for ``logits``."""
    low, high = int(counts.min()), int(counts.max())
    if low == 0 or (source == "last_stage" and low != high):
        raise ValueError(f"class image counts {low} to {high}: every class needs the same, > 0")
    return low


def _image_rows(teacher: nn.Module, spec: TapSpec, x: torch.Tensor, source: Source) -> torch.Tensor:
    """The teacher's ``(B, rows, d)`` rows of images ``x`` (eval mode is the caller's)."""
    with collect_taps(teacher, spec, frozenset({"stages"})) as taps:
        logits = teacher(x)
    if source == "logits":
        return logits.float().unsqueeze(1)
    return taps.stages[-1].float().flatten(2).transpose(1, 2)  # (B, C, H, W) -> (B, H W, C)


@torch.no_grad()
def image_row_shape(
    teacher: nn.Module, in_shape: tuple[int, ...], source: Source
) -> tuple[int, int]:
    """``(rows, d)`` the teacher gives one image of ``in_shape``: one probe forward, so the
    rows' memory is known before the pass."""
    example = example_input(teacher, in_shape, batch=1)
    with eval_mode(teacher):
        rows = _image_rows(teacher, get_taps(teacher, example), example, source)
    return rows.shape[1], rows.shape[2]


@torch.no_grad()
def teacher_class_features(
    teacher: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    counts: torch.Tensor,
    source: Source = "last_stage",
) -> torch.Tensor:
    """The ``(C, n, d)`` input of :func:`cka_cost_matrix`, as the authors make it.

    ``batches`` yields ``(images, labels)`` of the training set without augmentation; ``counts``
    holds its images per class (``bincount`` of the labels), which sizes one ``(C, n, d)`` tensor
    up front, so the rows are held once. ``last_stage`` (their CIFAR-100 files): the teacher's
    last stage map (``TapSpec.stages[-1]``, their ``feats[-1]``) of every image, each spatial
    position a row, image by image; every class needs the same image count. ``logits`` (their
    ImageNet files): one row per image, each class cut to the smallest class's count. Rows keep
    the order the images came in (theirs: CIFAR-100 in the dataset's order, ImageNet shuffled
    with seed 0), which pairs the rows of two classes for CKA. Runs the teacher in eval mode; the
    rows stay on the CPU (CIFAR-100 from resnet32x4: 100 x 32,000 x 256 floats, 3.3 GB)."""
    keep = images_per_class(counts, source)
    seen = [0] * len(counts)
    spec, rows = get_taps(teacher), None
    with eval_mode(teacher):
        for x, y in batches:
            feats = _image_rows(teacher, spec, x, source).cpu()
            per_image = feats.shape[1]
            if rows is None:  # the first batch tells the rows' shape
                rows = feats.new_empty(len(counts), keep * per_image, feats.shape[2])
            for f, label in zip(feats, y.tolist(), strict=True):
                k = seen[label]
                if k < keep:
                    rows[label, k * per_image : (k + 1) * per_image] = f
                seen[label] = k + 1
    if rows is None or seen != counts.tolist():
        raise ValueError(f"the batches' class image counts are not the {len(counts)} counts given")
    return rows


def sharpen_cost(cost: torch.Tensor, sharpen: float) -> torch.Tensor:
    """The authors' ``1 - exp(-k M)`` (k = 0 leaves ``M`` as it is)."""
    return cost if sharpen == 0 else 1 - torch.exp(-sharpen * cost)


def load_cost_matrix(path: str) -> torch.Tensor:
    """A ``(C, C)`` cost from a tensor file (.safetensors key ``cost``, or a torch file)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(
            f"loss wkd_l: cost_matrix {path!r} not found; use a (C, C) teacher class-distance "
            "file (e.g. JiamingLv/WKD wkd_cost_matrix/...), or cost_matrix: uniform"
        )
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            cost = load_file(str(p)).get("cost")
        else:
            cost = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as err:  # not a tensor file (or one that needs unpickling code)
        reason = " ".join(str(err).split())[:160]
        raise ConfigError(f"loss wkd_l: cannot read cost_matrix {path!r}: {reason}") from None
    if cost is None:
        raise ConfigError(f"loss wkd_l: cost_matrix {path!r} has no tensor named 'cost'")
    if not isinstance(cost, torch.Tensor) or cost.dim() != 2 or cost.shape[0] != cost.shape[1]:
        shape = tuple(cost.shape) if isinstance(cost, torch.Tensor) else type(cost).__name__
        raise ConfigError(f"loss wkd_l: cost_matrix {path!r} holds {shape}, not a (C, C) matrix")
    return cost.detach().float()


# ---------------------------------------------------------------- WKD-L

UNIFORM_WARNING = (
    "loss wkd_l: cost_matrix uniform puts cost 1 between any two classes: WKD-L without class "
    "relations, not the published method. For that, name the teacher's (C, C) 1 - CKA file: "
    "cost_matrix: PATH (the authors' wkd_cost_matrix/*.pth, or one made for your teacher by "
    "normkd wkd-cost RECIPE)"
)


def sinkhorn_distance(
    p: torch.Tensor, q: torch.Tensor, cost: torch.Tensor, lam: float, iters: int
) -> torch.Tensor:
    """Per-row entropic OT cost ``<P, M>`` between ``(B, N)`` marginals ``p`` and ``q``.

    ``cost`` is ``(B, N, N)``; the plan is ``diag(u) K diag(v)`` with ``K = exp(-M / lam)``
    after ``iters`` alternating scalings started from ``u = 1 / N``."""
    k = torch.exp(-cost / lam)
    u = torch.full_like(p, 1.0 / p.shape[1]).unsqueeze(2)
    p, q = p.unsqueeze(2), q.unsqueeze(2)
    for _ in range(iters):
        v = q / (k.transpose(1, 2) @ u + 1e-8)
        u = p / (k @ v + 1e-8)
    plan = u * k * v.transpose(1, 2)
    return (plan * cost).sum((1, 2))


def wkd_logit_parts(
    s_logits: torch.Tensor,
    t_logits: torch.Tensor,
    target: torch.Tensor,
    cost: torch.Tensor,
    temperature: float,
    lam: float = 0.05,
    iters: int = 10,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(target-class term, non-target Sinkhorn distance), each averaged over the batch."""
    dtype = torch.promote_types(s_logits.dtype, torch.float32)
    s, t = s_logits.to(dtype), t_logits.detach().to(dtype)
    b, c = s.shape
    gt = F.one_hot(target, c).bool()
    target_term = -(t.softmax(1)[gt] * s.log_softmax(1)[gt]).mean()
    keep = ~gt
    p_s = (s[keep].view(b, c - 1) / temperature).softmax(1)
    p_t = (t[keep].view(b, c - 1) / temperature).softmax(1)
    m = F.relu(cost.to(device=s.device, dtype=dtype)) + 1e-8
    pair = keep.unsqueeze(1) & keep.unsqueeze(2)  # (B, C, C): rows and columns of other classes
    m = m.expand(b, c, c)[pair].view(b, c - 1, c - 1)
    return target_term, sinkhorn_distance(p_s, p_t, m, lam, iters).mean()


def cosine_decay(epoch: int, start: int, epochs: int) -> float:
    """The authors' weight factor: 1 up to epoch ``start`` (1-based), then a half cosine to 0."""
    e = epoch + 1  # their epochs count from 1
    if e <= start or epochs <= start:
        return 1.0
    return 0.5 * (1 + math.cos((e - start) / (epochs - start) * math.pi))


class WKDLogitLoss(LossTerm):
    """Target-class likelihood + ``gamma`` x Sinkhorn distance over the non-target classes."""

    teacher_taps = frozenset({"logits"})

    def __init__(
        self,
        cost: torch.Tensor | None,
        gamma: float,
        temperature: float,
        lam: float = 0.05,
        iters: int = 10,
        decay_from: int | None = None,
        epochs: int = 1,
    ) -> None:
        super().__init__()
        self.register_buffer("cost", cost, persistent=False)  # None: unit cost, sized on use
        self.gamma, self.temperature, self.lam, self.iters = gamma, temperature, lam, iters
        self.decay_from, self.epochs = decay_from, epochs

    def forward(self, state: StepState) -> torch.Tensor:
        assert state.teacher is not None and state.teacher.logits is not None
        c = state.student.logits.shape[1]
        if self.cost is None:
            self.cost = 1 - torch.eye(c, device=state.student.logits.device)
        if tuple(self.cost.shape) != (c, c):
            raise ConfigError(
                f"loss wkd_l: the cost_matrix is {tuple(self.cost.shape)} for {c} classes; make "
                "one for this teacher and data"
            )
        target_term, wd = wkd_logit_parts(
            state.student.logits, state.teacher.logits, state.y, self.cost,
            self.temperature, self.lam, self.iters,
        )  # fmt: skip
        decay = 1.0
        if self.decay_from is not None:
            decay = cosine_decay(state.epoch, self.decay_from, self.epochs)
        return target_term + self.gamma * decay * wd


@register_term
class WKDLogitTerm(TermConfig):
    """WKD-L: DKD-style split, Sinkhorn Wasserstein distance over the non-target classes."""

    kind: Literal["wkd_l"] = "wkd_l"
    gamma: NonNegativeFloat = 10.0  # ImageNet 10 with WKD-F, 30 alone; CIFAR 200 / 600
    temperature: PositiveFloat = 2.0  # ImageNet 2; CIFAR-100 8
    sinkhorn_lambda: PositiveFloat = 0.05
    sinkhorn_iters: PositiveInt = 10
    cost_matrix: str = "uniform"  # a (C, C) 1 - CKA file (published); uniform: NOT published
    sharpen: NonNegativeFloat = 1.0  # 1 - exp(-k M) on a loaded file (COST_MATRIX_SHARPEN)
    decay_from: NonNegativeInt | None = 0  # cosine decay of gamma from this epoch; None: never
    term: ClassVar[type[LossTerm]] = WKDLogitLoss
    label: ClassVar[str] = "WKD-L"

    def build(self, ctx: BuildContext) -> LossTerm:
        cost = None  # uniform: 1 - I, sized by the first logits
        if self.cost_matrix != "uniform":
            cost = sharpen_cost(load_cost_matrix(self.cost_matrix), self.sharpen)
            if ctx.num_classes is not None and cost.shape[0] != ctx.num_classes:
                raise ConfigError(
                    f"loss wkd_l: cost_matrix {self.cost_matrix!r} is {tuple(cost.shape)} for "
                    f"{ctx.num_classes} classes; make one for this teacher and data"
                )
        else:
            logger.warning(UNIFORM_WARNING)
        return WKDLogitLoss(
            cost, self.gamma, self.temperature, self.sinkhorn_lambda, self.sinkhorn_iters,
            self.decay_from, ctx.epochs,
        )  # fmt: skip


# ---------------------------------------------------------------- WKD-F


def _cells(size: int, grid: int) -> list[tuple[int, int]]:
    """Adaptive-pooling windows ``[floor(i n / g), ceil((i + 1) n / g))`` along one axis."""
    return [((i * size) // grid, -((-(i + 1) * size) // grid)) for i in range(grid)]


def _check_grid(shape: tuple[int, ...], grid: int) -> None:
    """Refuse a grid whose cells hold one pixel (an unbiased variance of one value is NaN)."""
    h, w = shape[-2], shape[-1]

    def smallest(g: int) -> int:
        return min(b - a for a, b in _cells(h, g)) * min(b - a for a, b in _cells(w, g))

    if smallest(grid) < 2:
        fits = max((g for g in range(1, grid) if smallest(g) >= 2), default=None)
        raise ValueError(
            f"grid {grid} splits the {h}x{w} maps into cells of one pixel, whose variance is "
            + (f"undefined; use grid <= {fits}" if fits else "undefined; the maps are too small")
        )


def mean_std(
    f: torch.Tensor, grid: int = 1, eps: float = 1e-5
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and ``sqrt(unbiased var + eps)`` of a ``(B, C, H, W)`` map, per cell of
    an adaptive ``grid x grid`` split -> two ``(B, C, grid, grid)`` tensors."""
    if grid == 1:
        return f.mean((2, 3), keepdim=True), (f.var((2, 3), keepdim=True) + eps).sqrt()
    means, stds = [], []
    for h0, h1 in _cells(f.shape[2], grid):
        for w0, w1 in _cells(f.shape[3], grid):
            cell = f[:, :, h0:h1, w0:w1]
            means.append(cell.mean((2, 3)))
            stds.append((cell.var((2, 3)) + eps).sqrt())
    shape = (f.shape[0], f.shape[1], grid, grid)
    return torch.stack(means, 2).view(shape), torch.stack(stds, 2).view(shape)


def gaussian_w2_parts(
    f_s: torch.Tensor, f_t: torch.Tensor, grid: int = 1, eps: float = 1e-5
) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean part, std part) of the diagonal-Gaussian Wasserstein-2 distance: squared
    differences summed over channels, averaged over samples and grid cells."""
    mu_s, sd_s = mean_std(f_s, grid, eps)
    mu_t, sd_t = mean_std(f_t.detach(), grid, eps)
    n = f_s.shape[0] * grid * grid
    return (mu_s - mu_t).pow(2).sum() / n, (sd_s - sd_t).pow(2).sum() / n


def bottleneck_projector(s_shape: tuple[int, ...], t_shape: tuple[int, ...]) -> nn.Sequential:
    """1x1 -> 3x3 -> 1x1 through 256 channels, then BN + ReLU (maps of equal size only)."""
    (sc, sh, sw), (tc, th, tw) = s_shape, t_shape
    if (sh, sw) != (th, tw):
        raise ValueError(
            f"the bottleneck projector needs equal map sizes, got {sh}x{sw} / {th}x{tw}"
        )
    return nn.Sequential(
        nn.Conv2d(sc, 256, 1),
        nn.Conv2d(256, 256, 3, padding=1),
        nn.Conv2d(256, tc, 1),
        nn.BatchNorm2d(tc),
        nn.ReLU(),
    )


class WKDFeatureLoss(LossTerm):
    """``ratio * |mu_s - mu_t|^2 + |sigma_s - sigma_t|^2`` on the projected last stage."""

    student_taps = frozenset({"stages"})
    teacher_taps = frozenset({"stages"})

    def __init__(
        self,
        s_shape: tuple[int, ...],
        t_shape: tuple[int, ...],
        ratio: float = 2.0,
        grid: int = 1,
        projector: str = "conv1x1",
        eps: float = 1e-5,
        decay_from: int | None = None,
        epochs: int = 1,
    ) -> None:
        super().__init__()
        _check_grid(tuple(t_shape), grid)
        make = hint_regressor if projector == "conv1x1" else bottleneck_projector
        self.projector = make(tuple(s_shape), tuple(t_shape))
        self.ratio, self.grid, self.eps = ratio, grid, eps
        self.decay_from, self.epochs = decay_from, epochs

    def weight_at(self, epoch: int) -> float:
        """The authors' cosine decay of the WKD-F weight (none when ``decay_from`` is None)."""
        return 1.0 if self.decay_from is None else cosine_decay(epoch, self.decay_from, self.epochs)

    def forward(self, state: StepState) -> torch.Tensor:
        assert state.teacher is not None
        f_s = self.projector(state.student.stages[-1])
        dtype = torch.promote_types(f_s.dtype, torch.float32)  # statistics in at least fp32
        f_s = f_s.to(dtype)
        f_t = state.teacher.stages[-1].detach().to(dtype)
        mean_part, std_part = gaussian_w2_parts(f_s, f_t, self.grid, self.eps)
        return self.ratio * mean_part + std_part


@register_term
class WKDFeatureTerm(TermConfig):
    """WKD-F: Gaussian Wasserstein distance between projected student and teacher last stages."""

    kind: Literal["wkd_f"] = "wkd_f"
    weight: NonNegativeFloat = 1.0  # WKD_FEAT_WEIGHT: ImageNet 1; CIFAR-100 0.08
    ratio: NonNegativeFloat = 2.0  # MEAN_COV_RATIO: ImageNet 2; CIFAR-100 4 (8 with WKD-L)
    grid: PositiveInt = 4  # SPATIAL_GRID: ImageNet 4 (default); CIFAR-100 1
    projector: Literal["conv1x1", "bottleneck"] = "bottleneck"  # ImageNet default; CIFAR conv1x1
    eps: PositiveFloat = 1e-5
    decay_from: NonNegativeInt | None = 0  # COSINE_DECAY_EPOCH (CIFAR-100 150); None: never
    term: ClassVar[type[LossTerm]] = WKDFeatureLoss
    label: ClassVar[str] = "WKD-F"

    def build(self, ctx: BuildContext) -> LossTerm:
        s, t = ctx.pair(self.kind)
        if not s.stages or not t.stages:
            raise ConfigError("loss wkd_f: student and teacher need stage taps")
        try:
            return WKDFeatureLoss(
                s.stages[-1], t.stages[-1], self.ratio, self.grid, self.projector, self.eps,
                self.decay_from, ctx.epochs,
            )  # fmt: skip
        except ValueError as err:
            raise ConfigError(f"loss wkd_f: {err}") from None
