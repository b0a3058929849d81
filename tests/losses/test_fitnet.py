"""FitNets: the regressor matches the teacher's shape; the loss is MSE to the teacher's stage."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from normkd.errors import ConfigError
from normkd.losses import FitNetLoss, StepState, Taps, hint_regressor
from normkd.losses.fitnet import FitNetTerm


@pytest.mark.parametrize(
    "s_shape,t_shape,conv",
    [
        ((8, 8, 8), (16, 8, 8), nn.Conv2d),  # same size: 1x1 conv
        ((8, 8, 8), (16, 4, 4), nn.Conv2d),  # halve: stride-2 conv
        ((8, 4, 4), (16, 8, 8), nn.ConvTranspose2d),  # double: stride-2 deconv
        ((8, 7, 6), (16, 4, 4), nn.Conv2d),  # other shrink: valid conv
    ],
)
def test_regressor_maps_student_shape_to_teacher_shape(s_shape, t_shape, conv):
    reg = hint_regressor(s_shape, t_shape)
    assert isinstance(reg[0], conv)
    assert isinstance(reg[1], nn.BatchNorm2d) and isinstance(reg[2], nn.ReLU)
    assert reg(torch.randn(2, *s_shape)).shape == (2, *t_shape)


def test_regressor_refuses_a_teacher_map_more_than_twice_larger():
    with pytest.raises(ValueError, match=r"2x2 onto a teacher map of 8x8"):
        hint_regressor((8, 2, 2), (16, 8, 8))


def test_loss_is_mse_of_conv_bn_relu_output_and_the_teachers_chosen_stage():
    s_shape, t_shape = (4, 8, 8), (6, 4, 4)
    term = FitNetLoss(s_shape, t_shape, stage=1).double()
    s_stages = [torch.randn(3, 2, 16, 16), torch.randn(3, *s_shape), torch.randn(3, 9, 2, 2)]
    t_stages = [torch.randn(3, 2, 16, 16), torch.randn(3, *t_shape), torch.randn(3, 9, 2, 2)]
    s_stages = [f.double() for f in s_stages]
    t_stages = [f.double() for f in t_stages]
    state = StepState(
        torch.zeros(3),
        torch.zeros(3),
        torch.arange(3),
        0,
        Taps(stages=s_stages),
        Taps(stages=t_stages),
    )
    conv, bn = term.regressor[0], term.regressor[1]
    with torch.no_grad():  # non-trivial BN affine parameters
        bn.weight.uniform_(0.5, 2.0)
        bn.bias.uniform_(-0.5, 0.5)
    z = F.conv2d(s_stages[1], conv.weight, conv.bias, stride=2, padding=1)
    mean = z.mean((0, 2, 3), keepdim=True)
    var = ((z - mean) ** 2).mean((0, 2, 3), keepdim=True)  # batch statistics, biased
    z = (z - mean) / torch.sqrt(var + bn.eps) * bn.weight.view(1, -1, 1, 1) + bn.bias.view(
        1, -1, 1, 1
    )
    want = ((z.clamp(min=0) - t_stages[1]) ** 2).mean()
    term.train()
    assert torch.allclose(term(state), want, rtol=1e-9)


def test_teacher_stage_is_never_trained():
    term = FitNetLoss((4, 4, 4), (4, 4, 4), stage=0)
    s = torch.randn(2, 4, 4, 4, requires_grad=True)
    t = torch.randn(2, 4, 4, 4, requires_grad=True)
    state = StepState(
        torch.zeros(2), torch.zeros(2), torch.arange(2), 0, Taps(stages=[s]), Taps(stages=[t])
    )
    term(state).backward()
    assert s.grad is not None and t.grad is None


def test_recipe_defaults_are_the_crd_benchmarks():
    f = FitNetTerm()
    assert (f.weight, f.stage, f.teacher_stage) == (100.0, 2, None)


def test_fitnet_gradients_reach_student_and_regressor_not_teacher(zoo_step, check_grads):
    d = zoo_step([{"kind": "fitnet"}])
    check_grads(d, "fitnet")
    # resnet8 stage 2 (32 ch, 4x4 on 8x8 digits) -> resnet8x4 stage 2 (128 ch, 4x4).
    assert d.terms["fitnet"].regressor[0].weight.shape == (128, 32, 1, 1)


def test_out_of_range_stage_names_the_valid_indices(zoo_step):
    with pytest.raises(ConfigError, match=r"index 4 is out of range; valid: -4\.\.3"):
        zoo_step([{"kind": "fitnet", "stage": 4}])


def test_teacher_stage_picks_the_teachers_map_and_stage_the_students():
    """With ``teacher_stage`` set, the student's ``stage`` is regressed onto the teacher's
    ``teacher_stage`` (another index), not onto the teacher's map at the student's index."""
    term = FitNetLoss((4, 4, 4), (4, 4, 4), stage=0, teacher_stage=1).double().eval()
    s = [torch.randn(2, 4, 4, 4, dtype=torch.float64), torch.randn(2, 4, 4, 4, dtype=torch.float64)]
    t = [torch.randn(2, 4, 4, 4, dtype=torch.float64), torch.randn(2, 4, 4, 4, dtype=torch.float64)]
    state = StepState(
        torch.zeros(2), torch.zeros(2), torch.arange(2), 0, Taps(stages=s), Taps(stages=t)
    )
    with torch.no_grad():
        regressed = term.regressor(s[0])
        want = F.mse_loss(regressed, t[1])
        other = F.mse_loss(regressed, t[0])
        got = term(state)
    assert torch.allclose(got, want, rtol=1e-12) and not torch.allclose(got, other)
