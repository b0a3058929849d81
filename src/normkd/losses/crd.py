"""Contrastive representation distillation (Tian et al., ICLR 2020), as in RepDistiller's ``crd/``.

Student and teacher pooled features are embedded by linear heads into a shared 128-d space and
L2-normalised. Two momentum memory banks (one per side, one row per training image, indexed by
the sample indices each batch carries) supply negatives: with the teacher as anchor, its
embedding is scored against the student bank's row of the same image (positive) and ``nce_k``
other rows (negatives), and symmetrically with the student as anchor. Scores are
``exp(<v, m> / T) / Z`` with ``Z`` fixed from the first batch; the NCE loss of both directions is
summed. After scoring, the batch's bank rows move towards the new embeddings with momentum and
are renormalised. Defaults: 128-d, nce_k 16384, T 0.07, momentum 0.5, weight 0.8 (RepDistiller
``--distill crd -a 0 -b 0.8`` with CE weight 1).

Negatives are drawn with torch's global RNG (the engine re-seeds it per epoch, so a resumed run
stays bit-identical), never the anchor's own row; given the training labels they come from other
classes only (RepDistiller's default ``exact`` sampling), otherwise from any other image. Like
RepDistiller's sampler, each anchor's ``nce_k`` negatives are distinct rows (a uniform random
subset of its allowed rows), repeats being allowed only for an anchor with fewer allowed rows
than ``nce_k`` (mdistiller's ImageNet loader always draws with replacement: at 16,384 of 1.28M
rows, under 1% of its draws repeat). The banks and normalisers are buffers: saved in checkpoints
with the term, never part of the deployed student.
"""

from __future__ import annotations

import math
from typing import Annotated, ClassVar, Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from pydantic import Field, NonNegativeFloat, PositiveFloat, PositiveInt
from torch import nn

from normkd.errors import ConfigError
from normkd.losses.base import BuildContext, LossTerm, StepState, TermConfig, register_term

EPS = 1e-7
# Negatives without replacement: redraw the repeats when every anchor has at least _SPARSE times
# nce_k allowed rows (repeats then shrink ~16-fold per round); otherwise take the top nce_k of
# random keys over the allowed rows, at most _KEY_BUDGET keys (64 MB of int64) at a time.
_SPARSE = 16
_KEY_BUDGET = 2**23


def nce_loss(scores: torch.Tensor, n_data: int) -> torch.Tensor:
    """NCE over ``(B, 1 + K)`` scores (positive first) with a uniform noise distribution 1/n_data.

    Each score is classified as data vs. noise: ``-[log P(D=1|pos) + sum_k log P(D=0|neg_k)]``,
    averaged over the batch, with ``P(D=1|x) = x / (x + K / n_data)``.
    """
    noise = (scores.shape[1] - 1) / n_data
    pos, neg = scores[:, 0], scores[:, 1:]
    log_d1 = torch.log(pos / (pos + noise + EPS))
    log_d0 = torch.log(noise / (neg + noise + EPS))
    return -(log_d1.sum() + log_d0.sum()) / scores.shape[0]


def _uniform(count: torch.Tensor, k: int) -> torch.Tensor:
    """``(B, k)`` positions uniform in ``[0, count_b)`` per row, with replacement.

    The modulo bias of 2**62 draws is negligible.
    """
    draws = torch.randint(0, 2**62, (count.shape[0], k), device=count.device)
    return draws % count


def _distinct_by_keys(count: torch.Tensor, k: int, width: int) -> torch.Tensor:
    """``(B, k)`` distinct positions in ``[0, count_b)`` per row (each ``count_b >= k``).

    A row's positions are the ``k`` largest of random keys, positions past its count keyed out: a
    uniform ``k``-subset. The keys are 63-bit integers, so ties (which ``topk`` would settle by
    position, a bias) practically never happen. Anchors go in chunks of at most ``_KEY_BUDGET``
    keys, bounding the memory whatever the batch and training-set sizes.
    """
    pos = torch.arange(width, device=count.device)
    chunks = []
    for c in count.split(max(1, _KEY_BUDGET // width)):
        keys = torch.randint(0, 2**62, (c.shape[0], width), device=c.device)
        keys.masked_fill_(pos >= c, -1)
        chunks.append(keys.topk(k, dim=1, sorted=False).indices)
    return torch.cat(chunks)


def _distinct_by_redraw(count: torch.Tensor, k: int) -> torch.Tensor:
    """``(B, k)`` distinct positions in ``[0, count_b)`` per row, in O(B k) memory.

    Draw with replacement, then redraw every repeat until none is left. The rule looks only at
    which values are equal, never at the values themselves, so the final set is a uniform
    ``k``-subset. Meant for ``count_b >= _SPARSE * k`` (ImageNet: 16,384 of ~1.28M rows), where
    a few rounds suffice; the number of rounds follows the RNG, so it is reproducible too.
    """
    u = _uniform(count, k)
    while True:
        u = u.sort(dim=1).values
        repeat = torch.zeros_like(u, dtype=torch.bool)
        repeat[:, 1:] = u[:, 1:] == u[:, :-1]
        if not bool(repeat.any()):
            return u
        u = torch.where(repeat, _uniform(count, k), u)


def _all_gather(t: torch.Tensor) -> torch.Tensor:
    """Concatenate ``t`` over all ranks (equal shapes, as DDP's equal per-rank batches give)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return t
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts)


class CRDLoss(LossTerm):
    """Two-way NCE between embedded student/teacher pooled features and momentum memory banks.

    ``nce_k`` is capped at ``dataset_size - 1`` so small sets work (a 1,000-image digits split
    gets 999 negatives per anchor instead of 16,384). Pass ``labels`` (one per training image) to
    draw negatives from other classes only. An anchor's negatives are distinct rows whenever it
    has at least ``nce_k`` allowed rows.
    """

    student_taps = frozenset({"pooled"})
    teacher_taps = frozenset({"pooled"})

    def __init__(
        self,
        s_dim: int,
        t_dim: int,
        dataset_size: int,
        feat_dim: int = 128,
        nce_k: int = 16384,
        nce_t: float = 0.07,
        nce_m: float = 0.5,
        labels: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        if dataset_size < 2:
            raise ValueError(f"CRD needs at least 2 training images, got {dataset_size}")
        self.n_data = dataset_size
        self.nce_k = min(nce_k, dataset_size - 1)
        self.nce_t = nce_t
        self.nce_m = nce_m
        self.embed_s = nn.Linear(s_dim, feat_dim)
        self.embed_t = nn.Linear(t_dim, feat_dim)
        # Banks start uniform in [-a, a] with a = sqrt(3 / feat_dim): rows of unit norm on average.
        a = 1.0 / math.sqrt(feat_dim / 3)
        self.register_buffer("bank_s", torch.rand(dataset_size, feat_dim).mul_(2 * a).sub_(a))
        self.register_buffer("bank_t", torch.rand(dataset_size, feat_dim).mul_(2 * a).sub_(a))
        self.register_buffer("z", torch.full((2,), -1.0))  # (Z_student, Z_teacher); <0: unset
        # Sample i's negatives: positions of `order` outside the block [start[i], start[i]+skip[i]).
        if labels is None:
            order = torch.arange(dataset_size)
            start, skip = order.clone(), torch.ones(dataset_size, dtype=torch.long)
        else:
            labels = torch.as_tensor(labels, dtype=torch.long).cpu()
            if labels.shape != (dataset_size,):
                raise ValueError(
                    f"CRD: {tuple(labels.shape)} labels for a training set of {dataset_size}"
                )
            order = torch.argsort(labels, stable=True)
            counts = torch.bincount(labels)
            if int(counts.max()) == dataset_size:
                raise ValueError("CRD: negatives from other classes need at least two classes")
            first = torch.cumsum(counts, 0) - counts
            start, skip = first[labels], counts[labels]
        self.register_buffer("neg_order", order, persistent=False)
        self.register_buffer("neg_start", start, persistent=False)
        self.register_buffer("neg_skip", skip, persistent=False)
        # Fewest / most rows any anchor may draw from: they pick the sampling path once, here.
        self._min_count = dataset_size - int(skip.max())
        self._max_count = dataset_size - int(skip.min())

    def sample_negatives(self, idx: torch.Tensor) -> torch.Tensor:
        """``(B, nce_k)`` bank rows for anchors ``idx``: per anchor, a uniform subset of its rows.

        Distinct rows per anchor, as RepDistiller's sampler draws them; an anchor with fewer
        allowed rows than ``nce_k`` draws with replacement (RepDistiller does the same then).
        Positions ``[0, count)`` index the anchor's allowed rows: ``neg_order`` minus its block.
        """
        start, skip = self.neg_start[idx][:, None], self.neg_skip[idx][:, None]
        count, k = self.n_data - skip, self.nce_k
        if self._min_count >= _SPARSE * k:
            u = _distinct_by_redraw(count, k)
        elif self._max_count < k:
            u = _uniform(count, k)
        else:
            u = _distinct_by_keys(count, k, self._max_count)
            if self._min_count < k:  # rows too short for k distinct ones draw with replacement
                u = torch.where(count >= k, u, _uniform(count, k))
        return self.neg_order[u + skip * (u >= start)]

    def embed(
        self, pooled_s: torch.Tensor, pooled_t: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Unit-norm embeddings (in the banks' dtype, float32 under AMP) of both pooled features."""
        v_s = self.embed_s(pooled_s.flatten(1)).to(self.bank_s.dtype)
        v_t = self.embed_t(pooled_t.detach().flatten(1)).to(self.bank_s.dtype)
        return F.normalize(v_s, dim=1), F.normalize(v_t, dim=1)

    @torch.no_grad()
    def update_banks(self, idx: torch.Tensor, v_s: torch.Tensor, v_t: torch.Tensor) -> None:
        """Rows ``idx`` <- normalise(momentum * row + (1 - momentum) * new embedding).

        Under DDP every rank applies every rank's rows, so the banks stay identical everywhere
        (DDP re-broadcasts rank 0's buffers each step, which would otherwise drop the others').
        """
        idx, v_s, v_t = _all_gather(idx), _all_gather(v_s), _all_gather(v_t)
        for bank, v in ((self.bank_s, v_s), (self.bank_t, v_t)):
            row = bank[idx] * self.nce_m + v.detach().to(bank.dtype) * (1 - self.nce_m)
            bank.index_copy_(0, idx, F.normalize(row, dim=1))

    def forward(self, state: StepState) -> torch.Tensor:
        assert state.teacher is not None
        if state.student.pooled is None or state.teacher.pooled is None:
            raise RuntimeError("CRD needs the pooled features of student and teacher")
        v_s, v_t = self.embed(state.student.pooled, state.teacher.pooled)
        idx = state.idx.to(self.bank_s.device, torch.long)
        rows = torch.cat([idx[:, None], self.sample_negatives(idx)], dim=1)
        with torch.autocast(v_s.device.type, enabled=False):
            # Student anchor vs the teacher bank, and teacher anchor vs the student bank.
            e_s = torch.exp(torch.einsum("bkd,bd->bk", self.bank_t[rows], v_s) / self.nce_t)
            e_t = torch.exp(torch.einsum("bkd,bd->bk", self.bank_s[rows], v_t) / self.nce_t)
            with torch.no_grad():
                first = torch.stack([e_s.mean(), e_t.mean()]) * self.n_data
                self.z.copy_(torch.where(self.z < 0, first, self.z))
            loss = nce_loss(e_s / self.z[0], self.n_data) + nce_loss(e_t / self.z[1], self.n_data)
        if self.training:
            self.update_banks(idx, v_s, v_t)
        return loss


@register_term
class CRDTerm(TermConfig):
    """Contrastive representation distillation with momentum memory banks."""

    kind: Literal["crd"] = "crd"
    weight: NonNegativeFloat = 0.8  # RepDistiller CIFAR-100: -b 0.8 with CE weight 1
    feat_dim: Annotated[int, Field(ge=1, le=65536)] = 128  # banks: dataset x feat_dim x 2
    nce_k: PositiveInt = 16384  # capped at the training-set size - 1
    nce_t: PositiveFloat = 0.07
    nce_m: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.5
    negatives: Literal["other_classes", "any"] = "other_classes"
    term: ClassVar[type[LossTerm]] = CRDLoss
    label: ClassVar[str] = "CRD"

    def build(self, ctx: BuildContext) -> LossTerm:
        s, t = ctx.pair(self.kind)
        labels = ctx.train_labels if self.negatives == "other_classes" else None
        if self.negatives == "other_classes" and labels is None:
            raise ConfigError(
                "loss crd: negatives 'other_classes' needs the training labels, which this "
                "data source does not expose; set negatives: any"
            )
        return CRDLoss(
            s.pooled[0], t.pooled[0], ctx.dataset_size, self.feat_dim, self.nce_k, self.nce_t,
            self.nce_m, labels=labels,
        )  # fmt: skip
