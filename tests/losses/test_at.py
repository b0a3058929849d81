"""Attention transfer against its definition: unit-norm channel-mean |f|^p maps, squared error."""

import pytest
import torch
import torch.nn.functional as F

from normkd.losses import ATLoss, StepState, Taps, at_pair_loss, attention_map
from normkd.losses.at import ATTerm


def _at_by_hand(f: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    b = f.shape[0]
    q = (f.abs() ** p).sum(1).reshape(b, -1) / f.shape[1]
    return q / torch.sqrt((q * q).sum(1, keepdim=True))


def _state(s_stages, t_stages) -> StepState:
    b = s_stages[0].shape[0]
    y = torch.zeros(b, dtype=torch.long)
    return StepState(
        torch.zeros(b), y, torch.arange(b), 0, Taps(stages=s_stages), Taps(stages=t_stages)
    )


@pytest.mark.parametrize("p", [1.0, 2.0])
def test_attention_maps_are_unit_norm_channel_means_of_abs_power(p):
    f = torch.randn(3, 5, 4, 6, dtype=torch.float64)
    a = attention_map(f, p)
    assert a.shape == (3, 24)
    assert torch.allclose(a.norm(dim=1), torch.ones(3, dtype=torch.float64))
    assert torch.allclose(a, _at_by_hand(f, p))


def test_loss_is_the_sum_over_stages_after_the_stem_of_the_mean_squared_map_difference():
    s = [torch.randn(2, c, h, h, dtype=torch.float64) for c, h in [(4, 8), (4, 8), (8, 4)]]
    t = [torch.randn(2, c, h, h, dtype=torch.float64) for c, h in [(6, 8), (16, 8), (32, 4)]]
    want = sum(((_at_by_hand(a) - _at_by_hand(b)) ** 2).mean() for a, b in zip(s[1:], t[1:]))
    assert torch.allclose(ATLoss()(_state(s, t)), want, rtol=1e-10)
    # The stem (stage 0) takes no part.
    s2 = [torch.randn(2, 4, 8, 8, dtype=torch.float64), *s[1:]]
    assert torch.allclose(ATLoss()(_state(s2, t)), want, rtol=1e-10)


def test_larger_feature_map_is_average_pooled_to_the_smaller_before_its_attention():
    f_s = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    f_t = torch.randn(2, 5, 4, 4, dtype=torch.float64)
    want = ((_at_by_hand(F.avg_pool2d(f_s, 2)) - _at_by_hand(f_t)) ** 2).mean()
    assert torch.allclose(at_pair_loss(f_s, f_t), want, rtol=1e-10)
    want = ((_at_by_hand(f_t) - _at_by_hand(F.avg_pool2d(f_s, 2))) ** 2).mean()
    assert torch.allclose(at_pair_loss(f_t, f_s), want, rtol=1e-10)


def test_identical_attention_gives_zero_and_the_teacher_map_gets_no_gradient():
    f = torch.randn(2, 3, 4, 4)
    # Scaling a map does not change its normalised attention.
    assert at_pair_loss(f, 3 * f).abs() < 1e-7
    s = torch.randn(2, 3, 4, 4, requires_grad=True)
    t = torch.randn(2, 3, 4, 4, requires_grad=True)
    at_pair_loss(s, t).backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert t.grad is None


def test_recipe_default_weight_is_the_crd_benchmarks():
    assert (ATTerm().weight, ATTerm().p) == (1000.0, 2.0)


def test_at_gradients_reach_the_student_not_the_teacher(zoo_step, check_grads):
    check_grads(zoo_step([{"kind": "at"}]), "at")
