"""Pre-activation stage maps (``TapSpec.preact_stages``): RepDistiller / mdistiller's ``preact_feats``.

Each CIFAR zoo model's captured map is checked against the map recomputed by hand from the
model's own submodules, following the reference's definition (its ``forward(..., preact=True)``):
the stem's output first, then each stage's last block before its final ReLU (WRN: the stage's
output through the BN the net applies next; MobileNetV2: its stage maps, which end in no ReLU).
The ``preact`` tap is hooked only when a term asks for it.
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from normkd.models import create_model, get_taps
from normkd.models.cifar.shufflenetv2 import channel_shuffle
from normkd.models.taps import TapHooks, TapSpec, capture, capture_inputs, collect_taps

RESNETS = ["resnet8", "resnet20", "resnet8x4", "resnet32x4"]
WRNS = ["wrn_16_1", "wrn_16_2", "wrn_40_1"]
VGGS = ["vgg8", "vgg13"]
OTHERS = ["ResNet50", "ShuffleV1", "ShuffleV2", "MobileNetV2"]
CIFAR = RESNETS + WRNS + VGGS + OTHERS
TORCHVISION_RESNETS = ["resnet18", "resnet50"]  # declared: each last block's sum before its relu
TORCHVISION = ["mobilenet_v2"]  # no preact declared


def _model(name: str) -> nn.Module:
    """The model in eval mode with random BN statistics and affines, so no BN is near identity."""
    torch.manual_seed(0)
    model = create_model(name, num_classes=10)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.normal_()
    return model.eval()


def _resnet_last(block: nn.Module, h: torch.Tensor) -> torch.Tensor:
    """A CIFAR ResNet BasicBlock's residual sum before its out_relu."""
    out = block.bn2(block.conv2(F.relu(block.bn1(block.conv1(h)))))
    return out + (h if block.downsample is None else block.downsample(h))


def _bottleneck_last(block: nn.Module, h: torch.Tensor) -> torch.Tensor:
    """ResNet50's Bottleneck residual sum before its out_relu."""
    out = F.relu(block.bn2(block.conv2(F.relu(block.bn1(block.conv1(h))))))
    return block.bn3(block.conv3(out)) + block.shortcut(h)


def _shufflev1_last(unit: nn.Module, h: torch.Tensor) -> torch.Tensor:
    """A stride-1 ShuffleNetV1 unit's sum before its ReLU (each stage's last unit has stride 1)."""
    assert unit.stride == 1
    out = F.relu(unit.bn1(unit.conv1(h)))
    n, c, hh, ww = out.shape
    g = unit.shuffle_groups
    out = out.reshape(n, g, c // g, hh, ww).permute(0, 2, 1, 3, 4).reshape(n, c, hh, ww)
    out = F.relu(unit.bn2(unit.conv2(out)))
    return unit.bn3(unit.conv3(out)) + h


def _shufflev2_last(unit: nn.Module, h: torch.Tensor) -> torch.Tensor:
    """The reference's ShuffleNetV2 preact: [kept half, branch before its ReLU], unshuffled."""
    c = h.shape[1] // 2
    out = unit.bn2(unit.conv2(F.relu(unit.bn1(unit.conv1(h[:, c:])))))
    return torch.cat([h[:, :c], unit.bn3(unit.conv3(out))], 1)


def _torchvision_last(block: nn.Module, h: torch.Tensor) -> torch.Tensor:
    """A torchvision BasicBlock's / Bottleneck's residual sum, before its last ``relu`` call."""
    out = F.relu(block.bn1(block.conv1(h)))
    if hasattr(block, "conv3"):
        out = block.bn3(block.conv3(F.relu(block.bn2(block.conv2(out)))))
    else:
        out = block.bn2(block.conv2(out))
    return out + (h if block.downsample is None else block.downsample(h))


def _staged(layers: list[nn.Sequential], h: torch.Tensor, last) -> list[torch.Tensor]:
    """Per stage: run all but its last block, then ``last`` by hand; the stage output goes on."""
    maps = []
    for layer in layers:
        h = layer[:-1](h)
        maps.append(last(layer[-1], h))
        h = layer[-1](h)
    return maps


def _by_hand(name: str, m: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """The reference's pre-activation list, recomputed from ``m``'s submodules."""
    if name.startswith("wrn"):
        f0 = m.conv1(x)
        f1 = m.block1(f0)
        f2 = m.block2(f1)
        f3 = m.block3(f2)
        return [f0, m.block2.layer[0].bn1(f1), m.block3.layer[0].bn1(f2), m.bn1(f3)]
    if name.startswith("vgg"):
        f0 = F.relu(m.block0(x))
        p1 = m.block1(m.pool0(f0))
        p2 = m.block2(m.pool1(F.relu(p1)))
        p3 = m.block3(m.pool2(F.relu(p2)))
        return [f0, p1, p2, p3, m.block4(F.relu(p3))]  # no pool before block4 at 32x32
    if name == "MobileNetV2":
        h, maps = m.conv1(x), []
        maps.append(h)
        for i, stage in enumerate(m.blocks):
            h = stage(h)
            if i in (1, 2, 4, 6):
                maps.append(h)
        return maps
    if name in TORCHVISION_RESNETS:  # no stem among their stages
        h = m.maxpool(F.relu(m.bn1(m.conv1(x))))
        return _staged([m.layer1, m.layer2, m.layer3, m.layer4], h, _torchvision_last)
    f0 = F.relu(m.bn1(m.conv1(x)))
    if name.startswith("resnet"):
        return [f0, *_staged([m.layer1, m.layer2, m.layer3], f0, _resnet_last)]
    if name == "ResNet50":
        return [f0, *_staged([m.layer1, m.layer2, m.layer3, m.layer4], f0, _bottleneck_last)]
    last = {"ShuffleV1": _shufflev1_last, "ShuffleV2": _shufflev2_last}[name]
    return [f0, *_staged([m.layer1, m.layer2, m.layer3], f0, last)]


def _captured(m: nn.Module, x: torch.Tensor) -> tuple[list, list, torch.Tensor]:
    """(preact maps, stage maps, feat) of one forward, through the taps."""
    spec = get_taps(m)
    with capture(m, [*spec.stages, spec.feat]) as out, capture_inputs(m, spec.preact_stages) as pre:
        m(x)
    return [pre[n] for n in spec.preact_stages], [out[n] for n in spec.stages], out[spec.feat]


@pytest.mark.parametrize("name", CIFAR)
@torch.no_grad()
def test_preact_maps_are_the_references_computed_by_hand(name):
    m = _model(name)
    x = torch.randn(2, 3, 32, 32)
    got, stages, feat = _captured(m, x)
    want = _by_hand(name, m, x)
    assert len(got) == len(want) == len(stages)
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        torch.testing.assert_close(g, w, rtol=0, atol=0, msg=f"{name} preact {i}")
    # How each relates to the stage map the other terms read.
    assert torch.equal(got[0], stages[0])  # the stem: the same map (the reference's f0)
    for pre, post in zip(got[1:], stages[1:], strict=True):
        assert pre.shape == post.shape
        if name.startswith(("resnet", "vgg")) or name in ("ResNet50", "ShuffleV1"):
            assert torch.equal(F.relu(pre), post) and pre.min() < 0  # post = ReLU(pre)
        elif name == "ShuffleV2":
            assert torch.equal(channel_shuffle(F.relu(pre)), post)  # theirs is not shuffled
        elif name == "MobileNetV2":
            assert torch.equal(pre, post)  # linear bottlenecks: no distinct pre-activation
    if name.startswith("wrn"):  # a BN after each stage's raw sum; the last one feeds feat
        assert not any(torch.equal(p, s) for p, s in zip(got[1:], stages[1:], strict=True))
        assert torch.equal(F.relu(got[-1]), feat)


@pytest.mark.parametrize("name", TORCHVISION_RESNETS)
@torch.no_grad()
def test_torchvision_resnets_give_each_stages_last_sum_before_its_relu(name):
    """mdistiller's ImageNet preact_feats: torchvision's block calls one in-place ``relu`` after
    each BN and last on the sum; the tap keeps that last call, unharmed by the in-place ReLU."""
    m = _model(name)
    x = torch.randn(2, 3, 64, 64)
    got, stages, feat = _captured(m, x)
    want = _by_hand(name, m, x)
    assert len(got) == len(want) == len(stages) == 4
    for i, (g, w, post) in enumerate(zip(got, want, stages, strict=True)):
        torch.testing.assert_close(g, w, rtol=0, atol=0, msg=f"{name} preact {i}")
        assert torch.equal(F.relu(g), post) and g.min() < 0
    assert torch.equal(stages[-1], feat)
    with collect_taps(m, get_taps(m), frozenset({"preact"})) as taps:  # the trainer's hooks
        m(x)
    torch.testing.assert_close(taps.preact, want, rtol=0, atol=0)


@pytest.mark.parametrize("name", CIFAR + TORCHVISION_RESNETS + TORCHVISION)
def test_declared_preact_stages_align_with_the_stages(name):
    spec = get_taps(create_model(name, num_classes=10))
    if name in TORCHVISION:
        assert spec.preact_stages == ()
        return
    assert len(spec.preact_stages) == len(spec.stages)
    with torch.no_grad():
        got, stages, _ = _captured(_model(name), torch.randn(1, 3, 32, 32))
    assert [p.shape for p in got] == [s.shape for s in stages]
    assert [p.shape[1] for p in got] == list(spec.stage_channels)


def test_a_preact_list_of_another_length_is_refused():
    with pytest.raises(ValueError, match="2 pre-activation stages for 3 stages"):
        TapSpec(
            "c", 4, "fc", stages=("a", "b", "c"), stage_channels=(1, 2, 4), preact_stages=("x", "y")
        )


def _pre_hooks(model: nn.Module) -> int:
    return sum(len(mod._forward_pre_hooks) for mod in model.modules())


def test_the_preact_tap_is_hooked_and_filled_only_when_asked():
    m = _model("resnet8")
    spec = get_taps(m)
    x = torch.randn(2, 3, 32, 32)
    hooks = TapHooks(m, spec, frozenset({"stages", "feat"}))
    assert _pre_hooks(m) == 0  # what every term but ReviewKD's preact side runs with
    with hooks.collect() as taps:
        m(x)
    hooks.remove()
    assert taps.preact == [] and len(taps.stages) == 4
    with collect_taps(m, spec, frozenset({"preact"})) as taps:
        assert _pre_hooks(m) == len(spec.preact_stages)
        m(x)
    assert _pre_hooks(m) == 0 and taps.stages == []
    torch.testing.assert_close(taps.preact, _by_hand("resnet8", m, x), rtol=0, atol=0)


def test_the_student_preact_map_carries_gradient_in_training_mode():
    """In training mode (batch statistics), the captured map is the one the loss backpropagates
    through: its gradient reaches the stem. WRN's in-place ReLU after it must not overwrite it."""
    m = _model("wrn_16_1").train()
    spec = get_taps(m)
    x = torch.randn(4, 3, 32, 32)
    with collect_taps(m, spec, frozenset({"preact"})) as taps:
        m(x)
    f1 = m.block1(m.conv1(x))
    want = F.batch_norm(
        f1, None, None, m.block2.layer[0].bn1.weight, m.block2.layer[0].bn1.bias, True
    )
    torch.testing.assert_close(taps.preact[1], want)
    assert taps.preact[1].min() < 0
    taps.preact[1].sum().backward()
    assert m.conv1.weight.grad is not None and m.conv1.weight.grad.abs().sum() > 0
