"""Logit-standardised KD (LSKD) against its formula, written out here with explicit statistics.

Also the proof that a new loss term is one new file: ``lskd`` is valid in recipes, builds
through the registry and trains end to end without any other file naming it.
"""

import math

import pytest
import torch

from normkd.config import recipe_from_dict
from normkd.losses import TERMS, StepState, Taps, kd_loss
from normkd.losses.lskd import LSKDLoss, lskd_loss


def _zscore(z: torch.Tensor) -> torch.Tensor:
    """Per row: (z - mean) / (unbiased std + 1e-7), from sums, not torch.std."""
    k = z.shape[1]
    mean = z.sum(1, keepdim=True) / k
    std = torch.sqrt(((z - mean) ** 2).sum(1, keepdim=True) / (k - 1))
    return (z - mean) / (std + 1e-7)


def _kl_t2(s: torch.Tensor, t: torch.Tensor, temperature: float) -> torch.Tensor:
    log_p_s = torch.log_softmax(s / temperature, 1)
    p_t = torch.softmax(t / temperature, 1)
    return (p_t * (torch.log(p_t) - log_p_s)).sum() / s.shape[0] * temperature**2


@pytest.mark.parametrize("temperature", [1.0, 2.0, 4.0])
def test_lskd_is_kd_on_each_models_own_z_scores(temperature):
    s = torch.randn(6, 10, dtype=torch.float64) * 0.5 + 1.0
    t = torch.randn(6, 10, dtype=torch.float64) * 7.0 - 3.0  # another range and offset
    want = _kl_t2(_zscore(s), _zscore(t), temperature)
    assert torch.allclose(lskd_loss(s, t, temperature), want, rtol=1e-10)
    state = StepState(s, torch.zeros(6, dtype=torch.long), torch.arange(6), 0, Taps(s), Taps(t))
    assert torch.allclose(LSKDLoss(temperature)(state), want, rtol=1e-10)
    # It is not plain KD: the teacher's scale and offset are gone.
    assert not math.isclose(float(kd_loss(s, t, temperature)), float(want), rel_tol=1e-3)


def test_lskd_ignores_each_sides_scale_and_offset_and_never_trains_the_teacher():
    s = torch.randn(4, 5, requires_grad=True)
    t = torch.randn(4, 5)
    a = lskd_loss(s, t, 2.0)
    assert torch.allclose(a, lskd_loss(s * 3.0 + 1.0, t * 0.2 - 5.0, 2.0), atol=1e-5)
    t.requires_grad_(True)
    lskd_loss(s, t, 2.0).backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert t.grad is None


def test_lskd_is_a_registered_recipe_kind_that_needs_a_teacher():
    assert "lskd" in TERMS and TERMS["lskd"].needs_teacher()
    recipe = recipe_from_dict(
        {
            "name": "lskd",
            "teacher": {"model": "resnet8"},
            "student": {"model": "resnet8"},
            "loss": [{"kind": "ce", "weight": 0.1}, {"kind": "lskd", "weight": 9.0}],
        }
    )
    assert recipe.loss[1].temperature == 2.0 and recipe.loss[1].weight == 9.0


def test_lskd_gradients_reach_the_student_not_the_teacher(zoo_step, check_grads):
    check_grads(zoo_step([{"kind": "lskd"}]), "lskd")
