"""NORM core: FeatureTransform, norm_loss, attach_ft and merge_ft against their definitions."""

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from normkd.engine.checkpoint import load_model_file, save_model
from normkd.models import CheckpointError, capture, create_model, load_weights
from normkd.models.taps import TapShapes, TapSpec
from normkd.norm import (
    INNER_FT,
    ExpandedMaps,
    FeatureTransform,
    FTStudent,
    attach_ft,
    attach_inner_ft,
    inner_stage_count,
    max_logit_diff,
    merge_ft,
    norm_loss,
    restore_inner_ft,
)


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


# ------------------------------------------------------------------ the authors' inner FT (layer3)


def _layer3_student(tc: int = 16, n: int = 2, **kw) -> FTStudent:
    """The zoo resnet18 (stages layer1..4) with FT after layer4 and the inner FT after layer3."""
    torch.manual_seed(0)
    s_ft = attach_ft(create_model("resnet18", num_classes=10), teacher_channels=8, n=n, **kw)
    attach_inner_ft(s_ft, teacher_channels=tc, example=torch.zeros(2, 3, 32, 32))
    return s_ft


def _train_layer3(s_ft: FTStudent, steps: int = 3) -> None:
    """SGD on both expanded maps + CE, then BN statistics re-estimated (as after an epoch)."""
    opt = torch.optim.SGD(s_ft.parameters(), lr=0.01, momentum=0.9)
    s_ft.train()
    for _ in range(steps):
        logits = s_ft(torch.randn(4, 3, 32, 32))
        maps = s_ft.expanded
        assert isinstance(maps, ExpandedMaps)
        loss = F.cross_entropy(logits, torch.randint(0, 10, (4,)))
        for m, ct in ((maps.inner, s_ft.inner.ft.teacher_channels), (maps.last, 8)):
            loss = loss + norm_loss(m, torch.randn(4, ct, *m.shape[-2:]), s_ft.ft.n)
        opt.zero_grad()
        loss.backward()
        opt.step()
    bns = [m for m in s_ft.modules() if isinstance(m, nn.BatchNorm2d)]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None
    with torch.no_grad():
        for _ in range(4):
            s_ft(torch.randn(4, 3, 32, 32))
    s_ft.eval()


def test_inner_stage_count_counts_back_from_the_stage_pooling_reads():
    def shapes(*stages, feat):
        return TapShapes(feat=feat, stages=stages, pooled=(feat[0],))

    # the last stage is feat's own (WRN: block3 before the final BN-ReLU, same 8x8): 3 inner
    wrn = shapes((16, 32, 32), (32, 32, 32), (64, 16, 16), (128, 8, 8), feat=(128, 8, 8))
    assert inner_stage_count(wrn) == 3
    # a stage list that stops before feat's resolution: every listed stage is inner
    assert inner_stage_count(shapes((16, 32, 32), (32, 16, 16), feat=(64, 8, 8))) == 2
    assert inner_stage_count(shapes(feat=(64, 8, 8))) == 0


def test_inner_ft_sits_in_the_path_after_the_stage_before_the_last():
    s_ft = _layer3_student()
    inner = s_ft.inner
    assert inner is not None and inner.stage == "layer3" and inner.ft.n == 2
    raw, fed = {}, {}
    h1 = s_ft.student.layer3[-1].register_forward_hook(lambda m, i, o: raw.setdefault("x", o))
    h2 = s_ft.student.layer4.register_forward_pre_hook(lambda m, a: fed.setdefault("x", a[0]))
    s_ft.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad(), capture(s_ft.student, ["layer3"]) as taps:
        before = s_ft(x)
    h1.remove()
    h2.remove()
    with torch.no_grad():
        contracted, expanded = inner.ft(raw["x"])
    assert s_ft.expanded.inner.shape == (2, 2 * 16, 2, 2)
    torch.testing.assert_close(s_ft.expanded.inner, expanded)
    torch.testing.assert_close(fed["x"], contracted)  # layer4 reads the inner FT's output
    torch.testing.assert_close(taps["layer3"], contracted)  # and so does the stages tap
    with torch.no_grad():
        inner.ft.contract[0].weight.mul_(3.0)
        assert (s_ft(x) - before).abs().max() > 1e-3  # the inner FT is in the logits' path
    assert inner.sink is None  # nothing kept outside an FTStudent forward


@pytest.mark.parametrize("bn,residual", [(True, True), (False, False)])
def test_last_ft_merges_exactly_and_the_inner_ft_stays(bn, residual):
    plain = _n_params(create_model("resnet18", num_classes=10))
    s_ft = _layer3_student(bn=bn, residual=residual)
    _train_layer3(s_ft)
    inner_params = _n_params(s_ft.inner)
    merged = merge_ft(s_ft)
    x = torch.randn(6, 3, 32, 32)
    assert max_logit_diff(s_ft, merged, x) <= 1e-4
    kept = getattr(merged, INNER_FT)
    assert kept is not s_ft.inner and kept.stage == "layer3"
    assert _n_params(merged) == plain + inner_params > plain
    for a, b in zip(kept.parameters(), s_ft.inner.parameters(), strict=True):
        assert torch.equal(a, b)
    # The merged copy's hook drives the copy's inner FT, not the trained one.
    ft_logits = s_ft(x)
    with torch.no_grad():
        kept.ft.contract[0].weight.mul_(3.0)
    assert max_logit_diff(s_ft, merged, x) > 1e-3
    assert torch.equal(s_ft(x), ft_logits)


@pytest.mark.parametrize("bn,residual", [(True, True), (False, False)])
def test_saved_layer3_student_rebuilds_by_name(tmp_path, bn, residual):
    s_ft = _layer3_student(bn=bn, residual=residual)
    _train_layer3(s_ft)
    merged = merge_ft(s_ft)
    path = tmp_path / "model.safetensors"
    save_model(path, merged, {"model": "resnet18", "num_classes": 10, "kwargs": {}})
    loaded, _ = load_model_file(path)
    inner = getattr(loaded, INNER_FT)
    assert (inner.ft.bn, inner.ft.residual, inner.stage) == (bn, residual, "layer3")
    x = torch.randn(3, 3, 32, 32)
    assert max_logit_diff(loaded, merged, x) <= 1e-6
    # A plain file rebuilds plain (no inner FT); a plain model refuses the layer3 weights.
    plain = create_model("resnet18", num_classes=10)
    save_model(tmp_path / "plain.safetensors", plain, {"model": "resnet18", "num_classes": 10})
    assert restore_inner_ft(plain, tmp_path / "plain.safetensors") is plain
    assert INNER_FT not in plain._modules
    with pytest.raises(CheckpointError, match=INNER_FT):
        load_weights(create_model("resnet18", num_classes=10), path)


def test_attach_inner_ft_refusals():
    s_ft = _layer3_student()
    with pytest.raises(ValueError, match="already"):
        attach_inner_ft(s_ft, teacher_channels=8)
    with pytest.raises(TypeError, match="attach_ft"):
        attach_inner_ft(create_model("resnet18", num_classes=3), teacher_channels=8)
    tiny = create_model("tinycnn", num_classes=3)
    tiny.tap_spec = TapSpec("stage3", 64, "fc", ("stage3",), (64,))  # the last stage alone
    with pytest.raises(ValueError, match="no stage before its last"):
        attach_inner_ft(attach_ft(tiny, teacher_channels=4, n=1), teacher_channels=4)
