"""CIFAR stage lists are the peers' feature lists, so AT / FitNet pair the published baselines' maps.

RepDistiller ``models/*.py`` ``forward(x, is_feat=True)`` (and mdistiller's ``feats["feats"]``)
return the stage maps followed by the pooled vector; ``TapSpec.stages`` is that list without the
pooled vector, so AT's ``stages[1:]`` is their ``feat[1:-1]`` and FitNet's index 2 their
``--hint_layer 2``. ``feat`` stays what global pooling reads (NORM's FT and merge need it): for
WRN the post-BN-ReLU map after block3, for MobileNetV2 / ShuffleV2 the 1x1 head conv's map.
"""

import pytest
import torch
import torch.nn.functional as F

from normkd.models import capture, create_model

_RESNET = ("relu", "layer1", "layer2", "layer3")
_WRN = ("conv1", "block1", "block2", "block3")
_VGG = ("relu0", "relu1", "relu2", "relu3", "relu4")
# name -> (stages, their channels, feat): the peers' lists for every CIFAR zoo model.
PEER_STAGES = {
    **{f"resnet{d}": (_RESNET, (16, 16, 32, 64), "layer3") for d in (8, 14, 20, 32, 44, 56, 110)},
    "resnet8x4": (_RESNET, (32, 64, 128, 256), "layer3"),
    "resnet32x4": (_RESNET, (32, 64, 128, 256), "layer3"),
    "ResNet50": ((*_RESNET, "layer4"), (64, 256, 512, 1024, 2048), "layer4"),
    "wrn_16_1": (_WRN, (16, 16, 32, 64), "relu"),
    "wrn_40_1": (_WRN, (16, 16, 32, 64), "relu"),
    "wrn_16_2": (_WRN, (16, 32, 64, 128), "relu"),
    "wrn_40_2": (_WRN, (16, 32, 64, 128), "relu"),
    **{f"vgg{d}": (_VGG, (64, 128, 256, 512, 512), "relu4") for d in (8, 11, 13, 16, 19)},
    "MobileNetV2": (
        ("conv1", "blocks.1", "blocks.2", "blocks.4", "blocks.6"),
        (16, 12, 16, 48, 160),
        "conv2",
    ),
    "ShuffleV1": (_RESNET, (24, 240, 480, 960), "layer3"),
    "ShuffleV2": (_RESNET, (24, 116, 232, 464), "final_relu"),
}


@pytest.mark.parametrize("name", sorted(PEER_STAGES))
def test_stage_list_is_the_peers_feature_list(name):
    spec = create_model(name, num_classes=10).tap_spec
    stages, channels, feat = PEER_STAGES[name]
    assert (spec.stages, spec.stage_channels, spec.feat) == (stages, channels, feat)


def _peer_features(name: str, model: torch.nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """The maps the peers' ``forward(is_feat=True)`` returns, recomputed from normkd's modules."""
    if name.startswith("wrn"):
        f0 = model.conv1(x)
        f1 = model.block1(f0)
        f2 = model.block2(f1)
        return [f0, f1, f2, model.block3(f2)]  # block3 raw: before the final BN-ReLU
    if name == "MobileNetV2":
        out, feats = model.conv1(x), []
        feats.append(out)
        for i, stage in enumerate(model.blocks):
            out = stage(out)
            if i in (1, 2, 4, 6):
                feats.append(out)
        return feats  # conv2 (the 1x1 head conv) is not among them
    assert name == "ShuffleV2"
    f0 = F.relu(model.bn1(model.conv1(x)))
    f1 = model.layer1(f0)
    f2 = model.layer2(f1)
    return [f0, f1, f2, model.layer3(f2)]  # the conv2-bn2-ReLU head is not among them


@pytest.mark.parametrize("name", ["wrn_16_2", "MobileNetV2", "ShuffleV2"])
def test_stage_maps_are_the_maps_the_peers_return(name):
    """The models whose last stage is not ``feat``: each tapped map equals the peers' map."""
    torch.manual_seed(0)
    model = create_model(name, num_classes=10).eval()
    spec = model.tap_spec
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad(), capture(model, [*spec.stages, spec.feat]) as maps:
        model(x)
    with torch.no_grad():  # outside the capture: these calls must not refill ``maps``
        want = _peer_features(name, model, x)
    assert len(want) == len(spec.stages)
    for stage, ref in zip(spec.stages, want, strict=True):
        torch.testing.assert_close(maps[stage], ref, rtol=0, atol=0)
    # feat is still what pooling reads, a map of the last stage's resolution but not that map
    assert maps[spec.feat].shape[-2:] == maps[spec.stages[-1]].shape[-2:]
    assert not torch.equal(maps[spec.feat], maps[spec.stages[-1]])
