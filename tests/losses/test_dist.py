"""DIST against the paper's Eq.: 1 - mean Pearson correlation over rows (inter) and columns (intra)."""

import pytest
import torch

from normkd.losses import StepState, Taps
from normkd.losses.dist import DISTLoss, DISTTerm, dist_parts


def _pearson(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The textbook correlation of two vectors: cov(u, v) / (std(u) std(v))."""
    return torch.corrcoef(torch.stack([u, v]))[0, 1]


def _by_hand(s, t, beta, gamma, tau):
    y_s, y_t = torch.softmax(s / tau, 1), torch.softmax(t / tau, 1)
    inter = 1 - torch.stack([_pearson(y_s[i], y_t[i]) for i in range(len(s))]).mean()
    intra = 1 - torch.stack([_pearson(y_s[:, j], y_t[:, j]) for j in range(s.shape[1])]).mean()
    return tau**2 * (beta * inter + gamma * intra)


@pytest.mark.parametrize(("beta", "gamma", "tau"), [(1.0, 1.0, 1.0), (2.0, 0.5, 4.0)])
def test_dist_equals_the_papers_relation_losses(beta, gamma, tau):
    g = torch.Generator().manual_seed(3)
    s = torch.randn(8, 7, generator=g, dtype=torch.float64) * 3
    t = torch.randn(8, 7, generator=g, dtype=torch.float64) * 3
    state = StepState(s, torch.zeros(8, dtype=torch.long), torch.arange(8), 0, Taps(s), Taps(t))
    got = DISTLoss(beta, gamma, tau)(state)
    assert got.dtype == torch.float64
    assert torch.allclose(got, _by_hand(s, t, beta, gamma, tau), rtol=1e-6, atol=1e-9)


def test_dist_is_zero_for_the_teachers_own_logits_and_ignores_a_logit_shift():
    t = torch.randn(6, 5, dtype=torch.float64)
    inter, intra = dist_parts(t, t, 4.0)  # not exactly 0: the authors' 1e-8 in the denominator
    assert 0 <= float(inter) < 1e-3 and 0 <= float(intra) < 1e-3
    # Softmax ignores a per-sample shift, so the relations (and the loss) do too.
    s = torch.randn(6, 5, dtype=torch.float64)
    shifted = dist_parts(s + torch.randn(6, 1, dtype=torch.float64) * 10, t, 4.0)
    assert torch.allclose(torch.stack(shifted), torch.stack(dist_parts(s, t, 4.0)), rtol=1e-9)
    assert float(sum(dist_parts(s, t, 4.0))) > 0.1


def test_teacher_logits_get_no_gradient():
    s = torch.randn(4, 6, requires_grad=True)
    t = torch.randn(4, 6, requires_grad=True)
    sum(dist_parts(s, t, 2.0)).backward()
    assert s.grad is not None and s.grad.abs().sum() > 0 and t.grad is None


def test_recipe_defaults_are_the_authors_imagenet_setting():
    d = DISTTerm()
    assert (d.weight, d.beta, d.gamma, d.tau) == (2.0, 1.0, 1.0, 1.0)


def test_norm_plus_dist_trains_through_the_real_assembler(zoo_step, check_grads):
    check_grads(zoo_step([{"kind": "ce"}, {"kind": "dist"}]), "dist")
    d = zoo_step([{"kind": "ce"}, {"kind": "norm"}, {"kind": "dist", "tau": 4.0}])
    assert set(d.terms) == {"ce", "norm", "dist"} and d.terms["dist"].tau == 4.0
    stem = d.student.student.conv1.weight  # the student inside FT
    assert stem.grad is not None and stem.grad.abs().sum() > 0
    assert all(p.grad is None for p in d.teacher.parameters())


@pytest.mark.parametrize("pair", ["resnet20__resnet8", "resnet32x4__resnet8x4"])
def test_norm_dist_recipe_is_norm_plus_the_dist_recipes_term(pair, tmp_path, norm_combo_recipe):
    norm_combo_recipe(pair, "dist", tmp_path)
