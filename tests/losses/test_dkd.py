"""DKD against its definition: TCKD and NCKD from the binary and non-target distributions."""

import pytest
import torch

from normkd.losses import DKDLoss, StepState, Taps, dkd_parts, kd_loss
from normkd.losses.dkd import DKDTerm


def _softmax(z: torch.Tensor) -> torch.Tensor:
    e = torch.exp(z - z.max(1, keepdim=True).values)
    return e / e.sum(1, keepdim=True)


def _kl(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Per-row KL(p || q)."""
    return (p * (torch.log(p) - torch.log(q))).sum(1)


def _by_hand(s, t, y, temperature):
    """(per-sample TCKD, per-sample NCKD, teacher's non-target mass), without the T^2 factor."""
    p_s, p_t = _softmax(s / temperature), _softmax(t / temperature)
    gt = torch.nn.functional.one_hot(y, s.shape[1]).bool()
    b_s = torch.stack([p_s[gt], 1 - p_s[gt]], 1)
    b_t = torch.stack([p_t[gt], 1 - p_t[gt]], 1)
    q_s = p_s[~gt].view(len(y), -1)
    q_t = p_t[~gt].view(len(y), -1)
    q_s, q_t = q_s / q_s.sum(1, keepdim=True), q_t / q_t.sum(1, keepdim=True)
    return _kl(b_t, b_s), _kl(q_t, q_s), 1 - p_t[gt]


@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_tckd_and_nckd_equal_their_definitions_and_the_term_their_weighted_sum(temperature):
    g = torch.Generator().manual_seed(1)
    s = torch.randn(6, 5, generator=g, dtype=torch.float64) * 2
    t = torch.randn(6, 5, generator=g, dtype=torch.float64) * 2
    y = torch.tensor([0, 1, 2, 3, 4, 0])
    tckd, nckd, _ = _by_hand(s, t, y, temperature)
    want_t, want_n = tckd.mean() * temperature**2, nckd.mean() * temperature**2
    got_t, got_n = dkd_parts(s, t, y, temperature)
    assert torch.allclose(got_t, want_t, rtol=1e-9)
    assert torch.allclose(got_n, want_n, rtol=1e-9)
    term = DKDLoss(alpha=1.5, beta=8.0, temperature=temperature)
    state = StepState(s, y, torch.arange(6), 0, Taps(s), Taps(t))
    assert torch.allclose(term(state), 1.5 * want_t + 8.0 * want_n, rtol=1e-9)


def test_kd_decomposes_into_tckd_plus_non_target_mass_times_nckd():
    # The paper's Eq. (1): KD = TCKD + (1 - p_t) NCKD, per sample.
    s, t = torch.randn(1, 6, dtype=torch.float64), torch.randn(1, 6, dtype=torch.float64)
    y = torch.tensor([2])
    tckd, _nckd, rest = _by_hand(s, t, y, 4.0)
    got_t, got_n = dkd_parts(s, t, y, 4.0)
    assert torch.allclose(got_t + rest[0] * got_n, kd_loss(s, t, 4.0), rtol=1e-9)
    assert torch.allclose(got_t, tckd[0] * 16, rtol=1e-9)


def test_dkd_stays_finite_on_confident_logits():
    s = torch.tensor([[80.0, -80.0, 0.0], [0.0, 0.0, 0.0]])
    t = torch.tensor([[-90.0, 90.0, 0.0], [100.0, 0.0, 0.0]])
    tckd, nckd = dkd_parts(s, t, torch.tensor([0, 0]), 1.0)
    assert torch.isfinite(tckd) and torch.isfinite(nckd) and tckd > 0


def test_warmup_is_linear_over_the_first_epochs_counted_from_one():
    term = DKDLoss(warmup=20)
    # mdistiller: min(epoch / 20, 1) with its epochs 1..240; ours are 0-based.
    assert term.weight_at(0) == pytest.approx(1 / 20)
    assert term.weight_at(9) == pytest.approx(0.5)
    assert term.weight_at(19) == 1.0
    assert term.weight_at(200) == 1.0
    assert DKDLoss(warmup=0).weight_at(0) == 1.0


def test_recipe_defaults_are_the_papers():
    d = DKDTerm()
    assert (d.weight, d.alpha, d.beta, d.temperature, d.warmup) == (1.0, 1.0, 8.0, 4.0, 20)


def test_dkd_gradients_reach_the_student_not_the_teacher(zoo_step, check_grads):
    check_grads(zoo_step([{"kind": "ce"}, {"kind": "dkd"}]), "dkd")
