"""Hinton KD against its defining formula, computed here with explicit softmax and logs."""

import pytest
import torch

from normkd.losses import KDLoss, StepState, Taps, kd_loss


def _softmax(z: torch.Tensor) -> torch.Tensor:
    e = torch.exp(z - z.max(1, keepdim=True).values)
    return e / e.sum(1, keepdim=True)


@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_kd_equals_t2_times_batch_mean_kl_of_softened_distributions(temperature):
    s, t = torch.randn(5, 7, dtype=torch.float64), torch.randn(5, 7, dtype=torch.float64) * 3
    p_s, p_t = _softmax(s / temperature), _softmax(t / temperature)
    want = (p_t * (torch.log(p_t) - torch.log(p_s))).sum() / 5 * temperature**2
    assert torch.allclose(kd_loss(s, t, temperature), want, rtol=1e-10)
    state = StepState(s, torch.zeros(5, dtype=torch.long), torch.arange(5), 0, Taps(s), Taps(t))
    assert torch.allclose(KDLoss(temperature)(state), want, rtol=1e-10)


def test_kd_is_zero_for_identical_logits_and_never_trains_the_teacher():
    z = torch.randn(3, 4)
    assert kd_loss(z, z.clone(), 4.0).abs() < 1e-6
    s = torch.randn(3, 4, requires_grad=True)
    t = torch.randn(3, 4, requires_grad=True)
    kd_loss(s, t, 4.0).backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert t.grad is None


def test_kd_gradients_reach_the_student_not_the_teacher(zoo_step, check_grads):
    check_grads(zoo_step([{"kind": "kd"}]), "kd")
