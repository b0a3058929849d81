"""The wiring between recipe and training step: what reaches each loss term, and how it is weighted.

These tests pin behaviour that a rewiring of recipe -> terms -> distiller -> trainer could silently
drop while every loss formula stays correct on its own: per-epoch weights (NORM's ramp, DKD's
warm-up) and recipe weights applied by the distiller, logit standardisation reaching the terms,
each term's recipe settings reaching the term, the frozen teacher following the distiller's
dtype, and the Python API handing CRD the dataset's own sample indices.

Every distiller built from a recipe goes through :func:`build_from_recipe`, the one place that
knows today's build calls; the rest uses public formulas (``normkd.losses``, ``normkd.norm``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, SubsetRandomSampler

import normkd
from normkd.config import Recipe, recipe_from_dict
from normkd.distiller import Distiller
from normkd.engine.checkpoint import load_checkpoint
from normkd.losses import dkd_parts, kd_loss, ramp_weight
from normkd.models import capture, create_model, get_taps, load_weights
from normkd.norm import norm_loss
from support import build_job

Batch = tuple[Tensor, Tensor, Tensor]


def build_from_recipe(recipe: Recipe) -> tuple[Distiller, Batch]:
    """A distiller assembled from ``recipe`` the way a run assembles it, and one training batch.

    The only place this file touches the engine's build steps: a redesign changes this function.
    The teacher may be untrained (these are wiring checks, not accuracy checks).
    """
    job = build_job(recipe, untrained_teacher=True)
    x, y, idx = next(iter(job.data.train))
    return job.distiller, (x, y, idx)


def _recipe(loss: list[dict[str, Any]], student: str = "tinycnn", **extra: Any) -> Recipe:
    """Digits (8x8, 10 classes) recipe: tinycnn teacher, a small student, 24 epochs."""
    student_cfg: dict[str, Any] = {"model": student}
    if student == "tinycnn":
        student_cfg["kwargs"] = {"width": 8}
    return recipe_from_dict(
        {
            "name": "wiring",
            "data": {"kind": "digits", "n_train": 100, "batch_size": 16},
            "teacher": {"model": "tinycnn"},
            "student": student_cfg,
            "loss": loss,
            "optim": {"epochs": 24, "schedule": "cosine"},
            "engine": {"device": "cpu", "quiet": True},
            **extra,
        }
    )


def _step(d: Distiller, batch: Batch, epoch: int = 0) -> tuple[Tensor, dict[str, Tensor]]:
    """One training-mode forward (no backward): student BN uses batch statistics, so the same
    batch gives the same outputs at every call."""
    d.train()
    x, y, idx = batch
    logits, losses = d(x, y, idx, epoch)
    return logits.detach(), {k: v.detach() for k, v in losses.items()}


@torch.no_grad()
def _teacher_logits(d: Distiller, x: Tensor) -> Tensor:
    assert d.teacher is not None
    return d.teacher(x)


def _far(a: Tensor | float, b: Tensor | float, rel: float = 1e-3) -> bool:
    """``a`` and ``b`` differ by more than ``rel`` relative: a setting visibly changes the value."""
    a, b = float(a), float(b)
    return abs(a - b) > rel * max(abs(a), abs(b))


# ------------------------------------------------------------------ per-epoch and recipe weights

# The paper's CIFAR ramp (ends 10/20/180/210/240 of 240 epochs) stretched to a 24-epoch recipe:
# epoch e sits at e * 10 of the 240-epoch schedule. DKD: warm-up 4 -> min((e + 1) / 4, 1).
# epoch: (NORM multiplier, DKD multiplier); epoch 5 is the reference (both 1).
MULTIPLIERS = {0: (0.1, 0.25), 1: (0.5, 0.5), 2: (1.0, 0.75), 19: (0.5, 1.0), 22: (0.1, 1.0)}
REF_EPOCH = 5
RAMPED = [
    {"kind": "ce", "weight": 1.0},
    {"kind": "norm", "weight": 1.0, "n": 2, "ramp": "cifar"},
    {"kind": "dkd", "weight": 1.0, "warmup": 4},
]


def test_table_is_the_papers_ramp_and_mdistillers_warmup() -> None:
    """The multipliers the next test expects are those of ``ramp_weight`` stretched to the
    recipe's 24 epochs, and mdistiller's warm-up, so the table and the library agree."""
    for epoch, (norm_w, dkd_w) in {**MULTIPLIERS, REF_EPOCH: (1.0, 1.0)}.items():
        assert ramp_weight("cifar", epoch, 24) == norm_w
        assert min((epoch + 1) / 4, 1.0) == dkd_w


def test_distiller_applies_norm_ramp_and_dkd_warmup_per_epoch() -> None:
    """Same batch at different epochs: NORM's loss scales by the ramp stretched to optim.epochs
    and DKD's by its linear warm-up (ratios to a full-weight epoch); CE does not change. Fails if
    the distiller drops ``weight_at(epoch)`` or the builder does not pass the recipe's epochs."""
    d, batch = build_from_recipe(_recipe(RAMPED))
    _, ref = _step(d, batch, REF_EPOCH)
    assert all(float(v) > 0 for v in ref.values()), ref
    for epoch, (norm_w, dkd_w) in MULTIPLIERS.items():
        _, losses = _step(d, batch, epoch)
        assert float(losses["norm"] / ref["norm"]) == pytest.approx(norm_w, rel=1e-6), epoch
        assert float(losses["dkd"] / ref["dkd"]) == pytest.approx(dkd_w, rel=1e-6), epoch
        assert float(losses["ce"]) == pytest.approx(float(ref["ce"]), rel=1e-6), epoch


def test_distiller_applies_the_recipe_weight_of_every_term() -> None:
    """The same models (same seed) with every recipe weight 0.5 give half of each term of the
    weight-1 recipe, at an epoch where the per-epoch multipliers are 1."""
    torch.manual_seed(0)
    full, batch = build_from_recipe(_recipe(RAMPED))
    half_loss = [{**t, "weight": 0.5} for t in RAMPED]
    torch.manual_seed(0)
    half, _ = build_from_recipe(_recipe(half_loss))
    logits_full, l_full = _step(full, batch, REF_EPOCH)
    logits_half, l_half = _step(half, batch, REF_EPOCH)
    assert torch.equal(logits_full, logits_half)  # the same models: only the weights differ
    for kind in ("ce", "norm", "dkd"):
        assert float(l_half[kind] / l_full[kind]) == pytest.approx(0.5, rel=1e-6), kind


# ------------------------------------------------------------------ logit standardisation


def _standardised(z: Tensor, scale: float) -> Tensor:
    """The authors' logit standardisation, written out: z-score over classes, times ``scale``."""
    mean = z.mean(-1, keepdim=True)
    var = z.var(-1, unbiased=False, keepdim=True)
    return (z - mean) / torch.sqrt(var + 1e-7) * scale


def test_logit_standardisation_reaches_ce_and_kd_for_student_and_teacher() -> None:
    """With ``logit_standardization: {enabled: true, scale: 2.5}``, CE and KD equal their formulas
    on standardised student AND teacher logits (and differ from the raw-logit values), while the
    distiller's first output stays the raw student logits (accuracy is measured on those)."""
    recipe = _recipe(
        [{"kind": "ce"}, {"kind": "kd", "temperature": 4.0}],
        logit_standardization={"enabled": True, "scale": 2.5},
    )
    d, batch = build_from_recipe(recipe)
    x, y, _ = batch
    logits, losses = _step(d, batch)
    with torch.no_grad():
        assert torch.allclose(logits, d.student(x), atol=1e-6)  # raw, not standardised
        s, t = logits, _teacher_logits(d, x)
        s_std, t_std = _standardised(s, 2.5), _standardised(t, 2.5)
        ce, kd = F.cross_entropy(s_std, y), kd_loss(s_std, t_std, 4.0)
    assert float(losses["ce"]) == pytest.approx(float(ce), rel=1e-5)
    assert float(losses["kd"]) == pytest.approx(float(kd), rel=1e-5)
    # Standardising changes both terms, and standardising only one side is not the same thing.
    assert _far(losses["ce"], F.cross_entropy(s, y))
    assert _far(losses["kd"], kd_loss(s, t, 4.0))
    assert _far(losses["kd"], kd_loss(s_std, t, 4.0))
    assert _far(losses["kd"], kd_loss(s, t_std, 4.0))


# ------------------------------------------------------------------ recipe settings reach terms


def test_kd_temperature_from_the_recipe() -> None:
    """KD ``temperature: 2`` (default 4) is the temperature the term uses."""
    d, batch = build_from_recipe(_recipe([{"kind": "ce"}, {"kind": "kd", "temperature": 2.0}]))
    x = batch[0]
    logits, losses = _step(d, batch)
    t = _teacher_logits(d, x)
    assert float(losses["kd"]) == pytest.approx(float(kd_loss(logits, t, 2.0)), rel=1e-6)
    assert _far(losses["kd"], kd_loss(logits, t, 4.0))


def test_dkd_alpha_beta_temperature_from_the_recipe() -> None:
    """DKD ``alpha 0.5, beta 3, temperature 2`` (defaults 1, 8, 4) are what the term uses; each
    one reset to its default gives a different value. Warm-up 0: multiplier 1 at epoch 0."""
    loss = [{"kind": "ce"}, {"kind": "dkd", "alpha": 0.5, "beta": 3.0, "temperature": 2.0}]
    d, batch = build_from_recipe(_recipe([*loss[:1], {**loss[1], "warmup": 0}]))
    x, y, _ = batch
    logits, losses = _step(d, batch)
    t = _teacher_logits(d, x)

    def dkd(alpha: float, beta: float, temperature: float) -> float:
        tckd, nckd = dkd_parts(logits, t, y, temperature)
        return float(alpha * tckd + beta * nckd)

    assert float(losses["dkd"]) == pytest.approx(dkd(0.5, 3.0, 2.0), rel=1e-6)
    assert _far(losses["dkd"], dkd(1.0, 3.0, 2.0))  # alpha ignored
    assert _far(losses["dkd"], dkd(0.5, 8.0, 2.0))  # beta ignored
    assert _far(losses["dkd"], dkd(0.5, 3.0, 4.0))  # temperature ignored


def test_ce_label_smoothing_from_the_recipe() -> None:
    """CE ``label_smoothing: 0.2`` (default 0) is what the term uses."""
    d, batch = build_from_recipe(_recipe([{"kind": "ce", "label_smoothing": 0.2}]))
    y = batch[1]
    logits, losses = _step(d, batch)
    expected = F.cross_entropy(logits, y, label_smoothing=0.2)
    assert float(losses["ce"]) == pytest.approx(float(expected), rel=1e-6)
    assert _far(losses["ce"], F.cross_entropy(logits, y))


@pytest.mark.parametrize("reduce", ["max", "avg"])
def test_norm_reduce_from_the_recipe(reduce: str) -> None:
    """NORM ``reduce`` pools the larger teacher map (tinycnn: 2x2 on digits) to the student's
    (MobileNetV2: 1x1): the term equals ``norm_loss`` with that reduce, not with the other."""
    other = {"max": "avg", "avg": "max"}[reduce]
    recipe = _recipe(
        [{"kind": "ce"}, {"kind": "norm", "n": 2, "reduce": reduce}], student="MobileNetV2"
    )
    d, batch = build_from_recipe(recipe)
    x = batch[0]
    _, losses = _step(d, batch)
    expanded = d.student.expanded  # FT's expanded map of the step just taken
    assert d.teacher is not None
    spec = get_taps(d.teacher)
    with torch.no_grad(), capture(d.teacher, [spec.feat]) as maps:
        d.teacher(x)
    t_map = maps[spec.feat]
    assert t_map.shape[-2:] == (2, 2) and expanded.shape[-2:] == (1, 1)  # pooling happens
    with torch.no_grad():
        expected = norm_loss(expanded, t_map, 2, reduce=reduce)
        wrong = norm_loss(expanded, t_map, 2, reduce=other)
    assert float(losses["norm"]) == pytest.approx(float(expected), rel=1e-6)
    assert _far(losses["norm"], wrong)


# ------------------------------------------------------------------ teacher follows the distiller


def test_teacher_follows_double_but_stays_out_of_parameters_and_state_dict() -> None:
    """``distiller.double()`` converts the frozen teacher too (every floating parameter and
    buffer float64) so a float64 step works, while the teacher is in neither ``parameters()``
    (never optimised) nor ``state_dict()`` (never checkpointed); ``.float()`` converts it back."""
    d, batch = build_from_recipe(_recipe([{"kind": "ce"}, {"kind": "kd"}]))
    teacher = d.teacher
    assert teacher is not None
    t_params = list(teacher.parameters())
    t_tensors = t_params + [b for b in teacher.buffers() if b.is_floating_point()]
    assert t_params and len(t_tensors) > len(t_params)  # BN buffers are checked too

    assert d.double() is d
    assert d.teacher is teacher
    assert all(t.dtype == torch.float64 for t in teacher.parameters())
    assert all(b.dtype == torch.float64 for b in teacher.buffers() if b.is_floating_point())
    x, y, idx = batch
    d.train()
    logits, losses = d(x.double(), y, idx, 0)
    assert logits.dtype == torch.float64
    assert all(v.dtype == torch.float64 and torch.isfinite(v) for v in losses.values())

    trained = {id(p) for p in d.parameters()}
    assert not any(id(p) in trained for p in teacher.parameters())
    saved = d.state_dict()
    assert not any(k.startswith("teacher") for k in saved)
    teacher_ptrs = {t.data_ptr() for t in teacher.state_dict().values()}
    assert not any(v.data_ptr() in teacher_ptrs for v in saved.values())

    d.float()
    assert all(t.dtype == torch.float32 for t in teacher.parameters())


# ------------------------------------------------------------------ API: CRD sees dataset indices


class _Indexed(Dataset):
    """64 small random images; item i is ``(x_i, y_i, i)``, and ``targets`` exposes the labels."""

    def __init__(self, n: int = 64) -> None:
        g = torch.Generator().manual_seed(1)
        self.x = torch.randn(n, 3, 8, 8, generator=g)
        self.targets = [i % 3 for i in range(n)]

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[Tensor, int, int]:
        return self.x[i], self.targets[i], i


def _crd_banks(tmp_path: Path, name: str, seen: range, models: tuple) -> dict[str, Tensor]:
    """One epoch of ``normkd.distill(method='crd')`` seeing only dataset items ``seen``; the CRD
    memory banks of the run's last checkpoint."""
    teacher, student = models
    loader = DataLoader(_Indexed(), batch_size=8, sampler=SubsetRandomSampler(list(seen)))
    normkd.distill(
        teacher,
        student,
        loader,
        method="crd",
        epochs=1,
        check_teacher=False,
        out_dir=tmp_path,
        run_name=name,
        quiet=True,
        device="cpu",
        workers=0,
    )
    state = load_checkpoint(tmp_path / name / "last.pt")["distiller"]
    return {b: state[f"terms.crd.{b}"] for b in ("bank_s", "bank_t")}


def test_distill_api_hands_crd_the_datasets_own_indices(tmp_path: Path) -> None:
    """A DataLoader whose sampler draws only items 32..47 of a 64-item dataset yielding
    ``(x, y, idx)``: after one CRD epoch exactly bank rows 32..47 moved (both banks), and they
    are unit-norm momentum mixes. The initial banks (seeded, the same in every run) come from
    runs that saw other items: a row's reference is taken from a run that did not see it."""
    torch.manual_seed(0)
    models = (create_model("tinycnn", num_classes=3), create_model("tinycnn", num_classes=3))
    subset, other, third = range(32, 48), range(0, 16), range(56, 64)
    banks = _crd_banks(tmp_path, "a", subset, models)
    ref_b = _crd_banks(tmp_path, "b", other, models)
    ref_c = _crd_banks(tmp_path, "c", third, models)
    in_other = torch.zeros(64, dtype=torch.bool)
    in_other[list(other)] = True
    for name, bank in banks.items():
        assert bank.shape[0] == 64, name
        initial = torch.where(in_other[:, None], ref_c[name], ref_b[name])
        changed = (bank != initial).any(dim=1).nonzero().flatten().tolist()
        assert changed == list(subset), name
        norms = bank[list(subset)].norm(dim=1)
        assert torch.allclose(norms, torch.ones_like(norms), atol=1e-5), name


def test_the_teacher_stays_frozen_in_eval_mode_while_the_student_trains(demo_teacher: Path) -> None:
    """``distiller.train()`` leaves the teacher in eval mode: its BatchNorm uses (and never
    updates) its running statistics, so its logits are those of the saved teacher."""
    recipe = _recipe([{"kind": "ce"}, {"kind": "kd"}])
    recipe.teacher.model, recipe.teacher.weights = "resnet8", demo_teacher
    d, (x, y, idx) = build_from_recipe(recipe)
    before = {k: v.clone() for k, v in d.teacher.state_dict().items()}
    d.train()
    assert not d.teacher.training and d.student.training
    d(x, y, idx, 0)
    after = d.teacher.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    saved = create_model("resnet8", num_classes=10).eval()
    load_weights(saved, demo_teacher)
    with torch.no_grad():
        torch.testing.assert_close(d.teacher(x), saved(x), rtol=0, atol=0)


def test_recipe_weight_files_reach_teacher_and_student(demo_teacher: Path) -> None:
    """``teacher.weights`` and ``student.weights`` are loaded into the models the run trains."""
    recipe = _recipe([{"kind": "ce"}, {"kind": "kd"}], student="resnet8")
    recipe.teacher.model, recipe.teacher.weights = "resnet8", demo_teacher
    recipe.student.weights = demo_teacher  # start the student from the same checkpoint
    d, _batch = build_from_recipe(recipe)
    saved = load_file(demo_teacher)
    for model in (d.teacher, d.student):
        state = model.state_dict()
        assert set(state) == set(saved)
        assert all(torch.equal(state[k], saved[k]) for k in saved)
