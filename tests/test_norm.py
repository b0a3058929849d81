"""NORM core: FeatureTransform, norm_loss, attach_ft and merge_ft against their definitions."""

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from normkd.norm import FeatureTransform, FTStudent, attach_ft, max_logit_diff, merge_ft, norm_loss


def _n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def _train_a_few_steps(s_ft: FTStudent, shape: tuple[int, ...], tc: int, n: int, steps: int = 3):
    """SGD steps on random data, then BN statistics re-estimated, so nothing is at its init."""
    opt = torch.optim.SGD(s_ft.parameters(), lr=0.01, momentum=0.9)
    s_ft.train()
    for _ in range(steps):
        x = torch.randn(*shape)
        logits = s_ft(x)
        h, w = s_ft.expanded.shape[-2:]
        teacher = torch.randn(shape[0], tc, h, w)
        loss = norm_loss(s_ft.expanded, teacher, n) + F.cross_entropy(
            logits, torch.randint(0, logits.shape[1], (shape[0],))
        )
        opt.zero_grad()
        loss.backward()
        opt.step()
    # Cumulative BN statistics over a few batches, as after a real epoch (not 3 momentum updates).
    bns = [m for m in s_ft.modules() if isinstance(m, nn.BatchNorm2d)]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None
    with torch.no_grad():
        for _ in range(4):
            s_ft(torch.randn(*shape))
    for bn in bns:
        bn.momentum = 0.1
    s_ft.eval()


def test_norm_loss_equals_tiled_mse_times_n():
    n, ct = 4, 6
    expanded = torch.randn(3, n * ct, 5, 5)
    teacher = torch.randn(3, ct, 5, 5)
    want = F.mse_loss(expanded, teacher.repeat(1, n, 1, 1)) * n
    assert torch.allclose(norm_loss(expanded, teacher, n), want, rtol=1e-6)
    # ... and equals the sum over the N segments of the per-segment MSE.
    segs = sum(F.mse_loss(expanded[:, i * ct : (i + 1) * ct], teacher) for i in range(n))
    assert torch.allclose(norm_loss(expanded, teacher, n), segs, rtol=1e-6)


@pytest.mark.parametrize("reduce,pool", [("max", F.max_pool2d), ("avg", F.avg_pool2d)])
def test_norm_loss_reduces_larger_teacher_map(reduce, pool):
    expanded = torch.randn(2, 8, 4, 4)
    teacher = torch.randn(2, 4, 8, 8)
    want = F.mse_loss(expanded, pool(teacher, 2, 2).repeat(1, 2, 1, 1)) * 2
    assert torch.allclose(norm_loss(expanded, teacher, 2, reduce=reduce), want, rtol=1e-6)


def test_norm_loss_reduces_larger_student_map():
    expanded = torch.randn(2, 8, 8, 8)
    teacher = torch.randn(2, 4, 4, 4)
    want = F.mse_loss(F.max_pool2d(expanded, 2, 2), teacher.repeat(1, 2, 1, 1)) * 2
    assert torch.allclose(norm_loss(expanded, teacher, 2), want, rtol=1e-6)


def test_norm_loss_bad_shapes_say_which():
    with pytest.raises(ValueError, match=r"32 channels but n \* teacher channels = 4 \* 6 = 24"):
        norm_loss(torch.randn(2, 32, 4, 4), torch.randn(2, 6, 4, 4), 4)
    with pytest.raises(ValueError, match="non-integer ratio"):
        norm_loss(torch.randn(2, 8, 3, 3), torch.randn(2, 4, 4, 4), 2)
    with pytest.raises(ValueError, match="batch sizes differ"):
        norm_loss(torch.randn(2, 8, 4, 4), torch.randn(3, 4, 4, 4), 2)
    with pytest.raises(ValueError, match="4-D maps"):
        norm_loss(torch.randn(2, 8), torch.randn(2, 4), 2)
    with pytest.raises(ValueError, match="positive integer"):
        norm_loss(torch.randn(2, 8, 4, 4), torch.randn(2, 4, 4, 4), 0)
    with pytest.raises(ValueError, match="reduce"):
        norm_loss(torch.randn(2, 8, 4, 4), torch.randn(2, 4, 8, 8), 2, reduce="min")


@pytest.mark.parametrize("kwargs", [{"n": 0}, {"n": -1}, {"teacher_channels": 0}, {"n": 1.5}])
def test_feature_transform_rejects_bad_arguments(kwargs):
    args = {"in_channels": 8, "teacher_channels": 4, "n": 2} | kwargs
    with pytest.raises(ValueError, match="positive integer"):
        FeatureTransform(**args)


def test_feature_transform_shapes_and_plain_form():
    ft = FeatureTransform(8, 5, 3, bn=False, residual=False)
    out, expanded = ft(torch.randn(2, 8, 4, 4))
    assert out.shape == (2, 8, 4, 4) and expanded.shape == (2, 15, 4, 4)
    assert len(ft.expand) == 1 and ft.expand[0].bias is not None
    with pytest.raises(ValueError, match="expects a"):
        ft(torch.randn(2, 7, 4, 4))


def test_gradients_reach_ft_and_student_never_teacher():
    student = torchvision.models.resnet18(num_classes=5)
    teacher = torchvision.models.resnet18(num_classes=5).eval()
    s_ft = attach_ft(student, teacher_channels=512, n=2)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        feats = {}
        h = teacher.layer4.register_forward_hook(lambda m, i, o: feats.setdefault("t", o))
        teacher(x)
        h.remove()
    s_ft(x)
    loss = norm_loss(s_ft.expanded, feats["t"].requires_grad_(), 2)
    loss.backward()
    assert s_ft.ft.expand[0].weight.grad.abs().sum() > 0
    assert student.conv1.weight.grad.abs().sum() > 0
    assert feats["t"].grad is None
    assert all(p.grad is None for p in teacher.parameters())


@pytest.mark.parametrize(
    "bn,residual", [(True, True), (True, False), (False, True), (False, False)]
)
def test_merge_exact_on_torchvision_resnet18(bn, residual):
    student = torchvision.models.resnet18(num_classes=10)
    plain_params = _n_params(student)
    s_ft = attach_ft(student, teacher_channels=64, n=4, bn=bn, residual=residual)
    _train_a_few_steps(s_ft, (4, 3, 32, 32), 64, 4)
    merged = merge_ft(s_ft)
    assert type(merged) is type(student)
    assert _n_params(merged) == plain_params
    diff = max_logit_diff(s_ft, merged, torch.randn(6, 3, 32, 32))
    assert diff <= 1e-4, diff


def test_merge_leaves_ft_student_untouched_and_ft_changes_logits():
    student = torchvision.models.resnet18(num_classes=10)
    s_ft = attach_ft(student, teacher_channels=32, n=2)
    _train_a_few_steps(s_ft, (4, 3, 32, 32), 32, 2)
    before = {k: v.clone() for k, v in s_ft.state_dict().items()}
    merge_ft(s_ft)
    assert all(torch.equal(before[k], v) for k, v in s_ft.state_dict().items())
    # The FT student's logits are not the plain student's: the merge test above is not vacuous.
    x = torch.randn(2, 3, 32, 32)
    assert max_logit_diff(s_ft, s_ft.student, x) > 1e-3


def test_attach_twice_and_merge_of_plain_model_are_refused():
    s_ft = attach_ft(torchvision.models.resnet18(num_classes=3), teacher_channels=8, n=1)
    with pytest.raises(ValueError, match="already"):
        attach_ft(s_ft, teacher_channels=8, n=1)
    with pytest.raises(TypeError, match="attach_ft"):
        merge_ft(torchvision.models.resnet18(num_classes=3))


def test_ft_convs_start_from_the_authors_kaiming_fan_out_init():
    """The authors' init loop draws FT's convs N(0, 2 / fan_out) (fan_out = out channels of a
    1x1 conv); PyTorch's default (init="pytorch") is ~7x smaller for the contract conv here."""
    torch.manual_seed(0)
    ft = FeatureTransform(64, 64, 8)  # expand 64 -> 512, contract 512 -> 64
    for conv in (ft.expand[0], ft.contract[0]):
        want = (2.0 / conv.out_channels) ** 0.5
        assert abs(float(conv.weight.detach().std()) / want - 1) < 0.05
    old = FeatureTransform(64, 64, 8, init="pytorch")
    ratio = float(ft.contract[0].weight.detach().std() / old.contract[0].weight.detach().std())
    assert 5 < ratio < 9
    with pytest.raises(ValueError, match="init must be"):
        FeatureTransform(4, 4, 2, init="xavier")
