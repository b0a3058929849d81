"""The factored FT (``factored=True``): the same NORM loss, gradients, BatchNorm statistics and
outputs as the direct form, in float64, without the N*C_t-channel map being built."""

from __future__ import annotations

import copy

import pytest
import torch

from normkd.norm import FactoredMap, FeatureTransform, norm_loss

N, CS, CT = 4, 16, 8


def _pair(bn: bool, momentum: float | None = 0.1) -> tuple[FeatureTransform, FeatureTransform]:
    torch.manual_seed(0)
    direct = FeatureTransform(CS, CT, N, bn=bn).double()
    for m in direct.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = momentum
            torch.nn.init.uniform_(m.weight, 0.5, 1.5)
            torch.nn.init.uniform_(m.bias, -0.5, 0.5)
    factored = copy.deepcopy(direct)
    factored.factored = True
    return direct, factored


def _run(ft: FeatureTransform, x: torch.Tensor, t: torch.Tensor, reduce: str = "max"):
    probe = torch.randn(x.shape, dtype=x.dtype, generator=torch.Generator().manual_seed(1))
    x = x.clone().requires_grad_()
    out, expanded = ft(x)
    loss = norm_loss(expanded, t, N, reduce=reduce)
    grads = torch.autograd.grad(loss + (out * probe).sum(), [x, *ft.parameters()])
    return expanded, loss, out, grads


@pytest.mark.parametrize("bn", [True, False])
@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("t_hw", [(4, 4), (8, 8)])
def test_factored_equals_direct_in_float64(bn: bool, momentum: float | None, t_hw) -> None:
    direct, factored = _pair(bn, momentum)
    gen = torch.Generator().manual_seed(2)
    for _ in range(2):  # two training steps: the running statistics follow BatchNorm's
        x = torch.relu(torch.randn(6, CS, 4, 4, dtype=torch.float64, generator=gen) + 0.3)
        t = torch.randn(6, CT, *t_hw, dtype=torch.float64, generator=gen).relu()
        e1, l1, o1, g1 = _run(direct, x, t)
        e2, l2, o2, g2 = _run(factored, x, t)
        assert isinstance(e2, FactoredMap) and not isinstance(e1, FactoredMap)
        assert e2.shape == e1.shape
        torch.testing.assert_close(e2.materialise(), e1, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(l2, l1, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(o2, o1, rtol=1e-10, atol=1e-10)
        for a, b in zip(g2, g1):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)
        for a, b in zip(factored.buffers(), direct.buffers()):
            torch.testing.assert_close(a.double(), b.double(), rtol=1e-10, atol=1e-12)
    direct.eval(), factored.eval()  # eval mode reads the running statistics
    x = torch.randn(3, CS, 4, 4, dtype=torch.float64, generator=gen)
    torch.testing.assert_close(factored(x)[0], direct(x)[0], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(factored(x)[1].materialise(), direct(x)[1], rtol=1e-10, atol=1e-10)


def test_larger_student_map_is_pooled_through_the_built_map() -> None:
    direct, factored = _pair(True)
    x = torch.rand(4, CS, 8, 8, dtype=torch.float64)
    t = torch.rand(4, CT, 4, 4, dtype=torch.float64)
    for reduce in ("max", "avg"):
        l1, l2 = _run(direct, x, t, reduce)[1], _run(factored, x, t, reduce)[1]
        torch.testing.assert_close(l2, l1, rtol=1e-10, atol=1e-12)


def test_float32_factored_loss_is_close_to_direct() -> None:
    """The closed form subtracts large sums: in float32 it still agrees to ~1e-5 relative."""
    torch.manual_seed(0)
    direct = FeatureTransform(256, 256, N)
    factored = copy.deepcopy(direct)
    factored.factored = True
    x = torch.relu(torch.randn(32, 256, 8, 8))
    t = torch.relu(torch.randn(32, 256, 8, 8))
    l1, l2 = (_run(m, x, t)[1].item() for m in (direct, factored))
    assert abs(l2 - l1) <= 1e-5 * abs(l1)


def test_one_position_in_training_falls_back_to_batchnorm_error() -> None:
    _, factored = _pair(True)
    with pytest.raises(ValueError, match="more than 1 value"):
        factored(torch.rand(1, CS, 1, 1, dtype=torch.float64))
