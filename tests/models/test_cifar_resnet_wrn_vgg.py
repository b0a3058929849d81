"""CIFAR ResNet/WRN/VGG zoo: shapes, tap contract, and checkpoint-compatible parameter layout."""

from __future__ import annotations

import functools

import pytest
import torch
from torch import nn

from normkd.models import create_model, list_models
from normkd.models.taps import capture

RESNETS = [f"resnet{d}" for d in (8, 14, 20, 32, 44, 56, 110)] + ["resnet8x4", "resnet32x4"]
WRNS = ["wrn_16_1", "wrn_16_2", "wrn_40_1", "wrn_40_2"]
VGGS = ["vgg8", "vgg11", "vgg13", "vgg16", "vgg19"]
ALL = RESNETS + WRNS + VGGS

# Exact counts for 100 classes. They match the sizes quoted for the CRD/RepDistiller CIFAR-100
# models (resnet56 0.86M, resnet110 1.74M, resnet8x4 1.23M, resnet32x4 7.43M, wrn_40_2 2.26M,
# wrn_16_2 0.70M, wrn_40_1 0.57M, vgg13 9.46M), and were cross-checked against a transcription of
# the reference architectures (identical state_dict keys, shapes and outputs).
PARAM_COUNTS = {
    "resnet8": 83_892,
    "resnet14": 181_108,
    "resnet20": 278_324,
    "resnet32": 472_756,
    "resnet44": 667_188,
    "resnet56": 861_620,
    "resnet110": 1_736_564,
    "resnet8x4": 1_233_540,
    "resnet32x4": 7_433_860,
    "wrn_16_1": 180_916,
    "wrn_16_2": 703_284,
    "wrn_40_1": 569_780,
    "wrn_40_2": 2_255_156,
    "vgg8": 3_965_028,
    "vgg11": 9_277_284,
    "vgg13": 9_462_180,
    "vgg16": 14_774_436,
    "vgg19": 20_086_692,
}

# Keys (and shapes) present in the published RepDistiller / mdistiller CIFAR-100 checkpoints.
EXPECTED_KEYS: dict[str, dict[str, tuple[int, ...]]] = {
    "resnet8x4": {
        "conv1.weight": (32, 3, 3, 3),
        "bn1.running_mean": (32,),
        "layer1.0.conv1.weight": (64, 32, 3, 3),
        "layer1.0.downsample.0.weight": (64, 32, 1, 1),
        "layer1.0.downsample.1.running_var": (64,),
        "layer2.0.conv1.weight": (128, 64, 3, 3),
        "layer3.0.conv2.weight": (256, 256, 3, 3),
        "layer3.0.downsample.0.weight": (256, 128, 1, 1),
        "layer3.0.bn2.num_batches_tracked": (),
        "fc.weight": (100, 256),
        "fc.bias": (100,),
    },
    "resnet32x4": {
        "conv1.weight": (32, 3, 3, 3),
        "layer1.0.downsample.0.weight": (64, 32, 1, 1),
        "layer1.4.bn2.weight": (64,),
        "layer2.0.downsample.1.weight": (128,),
        "layer3.0.downsample.0.weight": (256, 128, 1, 1),
        "layer3.4.conv2.weight": (256, 256, 3, 3),
        "layer3.4.bn2.running_mean": (256,),
        "fc.weight": (100, 256),
    },
    "resnet56": {
        "conv1.weight": (16, 3, 3, 3),
        "bn1.weight": (16,),
        "layer1.0.conv1.weight": (16, 16, 3, 3),
        "layer1.8.bn2.running_var": (16,),
        "layer2.0.downsample.0.weight": (32, 16, 1, 1),
        "layer3.0.downsample.0.weight": (64, 32, 1, 1),
        "layer3.8.conv2.weight": (64, 64, 3, 3),
        "fc.weight": (100, 64),
    },
    "wrn_40_2": {
        "conv1.weight": (16, 3, 3, 3),
        "block1.layer.0.bn1.weight": (16,),
        "block1.layer.0.conv1.weight": (32, 16, 3, 3),
        "block1.layer.0.convShortcut.weight": (32, 16, 1, 1),
        "block1.layer.5.conv2.weight": (32, 32, 3, 3),
        "block2.layer.0.convShortcut.weight": (64, 32, 1, 1),
        "block3.layer.0.bn1.running_mean": (64,),
        "block3.layer.0.convShortcut.weight": (128, 64, 1, 1),
        "block3.layer.5.bn2.running_var": (128,),
        "bn1.weight": (128,),
        "bn1.running_var": (128,),
        "fc.weight": (100, 128),
        "fc.bias": (100,),
    },
    "vgg13": {
        "block0.0.weight": (64, 3, 3, 3),
        "block0.0.bias": (64,),
        "block0.1.running_mean": (64,),
        "block0.3.weight": (64, 64, 3, 3),
        "block0.4.weight": (64,),
        "block1.0.weight": (128, 64, 3, 3),
        "block2.3.weight": (256, 256, 3, 3),
        "block3.0.weight": (512, 256, 3, 3),
        "block4.3.weight": (512, 512, 3, 3),
        "block4.4.num_batches_tracked": (),
        "classifier.weight": (100, 512),
        "classifier.bias": (100,),
    },
}

# Keys the published layout does NOT have (identity shortcuts, parameter-free ReLUs, last BN).
ABSENT_KEYS = {
    "resnet56": ["layer1.0.downsample.0.weight", "layer2.1.downsample.0.weight"],
    "wrn_40_2": ["block1.layer.1.convShortcut.weight"],
    "vgg13": ["block0.5.weight", "block4.5.weight"],
}


@functools.cache
def _model(name: str) -> nn.Module:
    torch.manual_seed(0)
    return create_model(name, num_classes=100).eval()


def test_all_registered() -> None:
    assert set(ALL) <= set(list_models())


@pytest.mark.parametrize("name", ["resnet8", "wrn_16_1", "vgg8"])
def test_num_classes_and_larger_input(name: str) -> None:
    model = create_model(name, num_classes=10).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
        assert model(torch.randn(1, 3, 48, 48)).shape == (1, 10)


def test_vgg_pools_before_block4_only_at_64() -> None:
    # Reference quirk: block4 runs at 4x4 for 32x32 input, and the extra pool is used at 64x64.
    model = _model("vgg8")
    spec = model.tap_spec
    for size, expected in ((32, 4), (64, 4), (48, 6)):
        with torch.no_grad(), capture(model, [spec.feat]) as maps:
            model(torch.randn(1, 3, size, size))
        assert maps[spec.feat].shape[-2:] == (expected, expected), size


@pytest.mark.parametrize("name", ALL)
def test_parameter_count(name: str) -> None:
    assert sum(p.numel() for p in _model(name).parameters()) == PARAM_COUNTS[name]


@pytest.mark.parametrize("name", sorted(EXPECTED_KEYS))
def test_checkpoint_key_layout(name: str) -> None:
    state = _model(name).state_dict()
    for key, shape in EXPECTED_KEYS[name].items():
        assert key in state, key
        assert tuple(state[key].shape) == shape, key
    for key in ABSENT_KEYS.get(name, []):
        assert key not in state, key
    # Only conv/BN/linear tensors: parameter-free tap modules add no keys.
    assert all(k.rsplit(".", 1)[-1] in _TENSOR_SUFFIXES for k in state)


_TENSOR_SUFFIXES = {"weight", "bias", "running_mean", "running_var", "num_batches_tracked"}


@pytest.mark.parametrize(("name", "n_keys"), [("resnet8x4", 62), ("wrn_40_2", 227), ("vgg13", 72)])
def test_state_dict_size_and_strict_reload(name: str, n_keys: int) -> None:
    state = _model(name).state_dict()
    assert len(state) == n_keys
    fresh = create_model(name, num_classes=100)
    fresh.load_state_dict(state, strict=True)
