"""CIFAR MobileNetV2 / ShuffleV1 / ShuffleV2 / ResNet50: taps, shapes and checkpoint layout."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from normkd.models import create_model, list_models
from normkd.models.taps import get_module

NAMES = ["MobileNetV2", "ShuffleV1", "ShuffleV2", "ResNet50"]

# Spatial side of each declared stage map for a 32x32 input.
STAGE_SIZES = {
    "MobileNetV2": [16, 16, 8, 4, 2],
    "ShuffleV1": [32, 16, 8, 4],
    "ShuffleV2": [32, 16, 8, 4],
    "ResNet50": [32, 32, 16, 8, 4],
}

# Keys (and shapes) of the published RepDistiller / mdistiller CIFAR-100 checkpoints (100 classes).
# Key lists were checked to equal, in order and shape, those of the reference model code.
CHECKPOINT_KEYS: dict[str, dict[str, tuple[int, ...]]] = {
    "MobileNetV2": {
        "conv1.0.weight": (16, 3, 3, 3),
        "conv1.1.running_mean": (16,),
        "blocks.0.0.conv.0.weight": (16, 16, 1, 1),
        "blocks.0.0.conv.3.weight": (16, 1, 3, 3),
        "blocks.0.0.conv.6.weight": (8, 16, 1, 1),
        "blocks.1.0.conv.0.weight": (48, 8, 1, 1),
        "blocks.6.0.conv.6.weight": (160, 480, 1, 1),
        "blocks.6.0.conv.7.running_var": (160,),
        "conv2.0.weight": (1280, 160, 1, 1),
        "conv2.1.weight": (1280,),
        "classifier.0.weight": (100, 1280),
        "classifier.0.bias": (100,),
    },
    "ShuffleV1": {
        "conv1.weight": (24, 3, 1, 1),
        "bn1.weight": (24,),
        "layer1.0.conv1.weight": (54, 24, 1, 1),
        "layer1.0.conv2.weight": (54, 1, 3, 3),
        "layer1.0.conv3.weight": (216, 18, 1, 1),
        "layer1.1.conv1.weight": (60, 80, 1, 1),
        "layer2.0.conv1.weight": (60, 80, 1, 1),
        "layer2.7.bn3.running_mean": (480,),
        "layer3.3.conv3.weight": (960, 80, 1, 1),
        "linear.weight": (100, 960),
        "linear.bias": (100,),
    },
    "ShuffleV2": {
        "conv1.weight": (24, 3, 1, 1),
        "bn1.running_var": (24,),
        "layer1.0.conv1.weight": (24, 1, 3, 3),
        "layer1.0.conv2.weight": (58, 24, 1, 1),
        "layer1.0.conv3.weight": (58, 24, 1, 1),
        "layer1.0.conv4.weight": (58, 1, 3, 3),
        "layer1.0.bn5.weight": (58,),
        "layer1.3.conv2.weight": (58, 1, 3, 3),
        "layer2.7.conv3.weight": (116, 116, 1, 1),
        "layer3.3.bn3.weight": (232,),
        "conv2.weight": (1024, 464, 1, 1),
        "bn2.running_mean": (1024,),
        "linear.weight": (100, 1024),
    },
    "ResNet50": {
        "conv1.weight": (64, 3, 3, 3),
        "layer1.0.conv1.weight": (64, 64, 1, 1),
        "layer1.0.shortcut.0.weight": (256, 64, 1, 1),
        "layer1.0.shortcut.1.running_var": (256,),
        "layer2.0.conv2.weight": (128, 128, 3, 3),
        "layer2.0.shortcut.0.weight": (512, 256, 1, 1),
        "layer3.5.bn3.weight": (1024,),
        "layer4.2.conv3.weight": (2048, 512, 1, 1),
        "linear.weight": (100, 2048),
    },
}

# Keys an identity shortcut must NOT create (the reference uses an empty Sequential there).
ABSENT_KEYS = {"ResNet50": ["layer1.1.shortcut.0.weight"]}

# (parameters, state_dict entries) at 100 classes; equal to the reference implementations'.
SIZES = {
    "MobileNetV2": (812_836, 320),
    "ShuffleV1": (949_258, 296),
    "ShuffleV2": (1_355_528, 338),
    "ResNet50": (23_705_252, 320),
}


@pytest.fixture(scope="module")
def models() -> dict[str, nn.Module]:
    """Build each model once: ResNet50 init dominates this file's run time."""
    torch.manual_seed(0)
    return {name: create_model(name).eval() for name in NAMES}


def test_registered() -> None:
    """The four builders are reachable through the registry under their benchmark names."""
    assert set(NAMES) <= set(list_models())


@pytest.mark.parametrize("name", NAMES)
def test_larger_inputs(name: str, models: dict[str, nn.Module]) -> None:
    """Adaptive pooling lets inputs above 32x32 (and not multiples of 32) run."""
    with torch.no_grad():
        assert models[name](torch.randn(1, 3, 40, 40)).shape == (1, 100)


@pytest.mark.parametrize("name", NAMES)
def test_checkpoint_layout(name: str, models: dict[str, nn.Module]) -> None:
    """state_dict keys/shapes match the published checkpoints, so they load with strict=True."""
    state = models[name].state_dict()
    for key, shape in CHECKPOINT_KEYS[name].items():
        assert key in state, key
        assert tuple(state[key].shape) == shape, key
    for key in ABSENT_KEYS.get(name, []):
        assert not any(k.startswith(key) for k in state), key
    params, entries = SIZES[name]
    assert sum(p.numel() for p in models[name].parameters()) == params
    assert len(state) == entries


def test_num_classes_and_reference_init() -> None:
    """num_classes sizes the head; MobileNetV2 keeps the reference N(0, 0.01) / zero-bias head."""
    torch.manual_seed(0)
    model = create_model("MobileNetV2", num_classes=10)
    head = get_module(model, "classifier.0")
    assert isinstance(head, nn.Linear) and head.out_features == 10
    assert torch.count_nonzero(head.bias) == 0
    assert 0.008 < float(head.weight.detach().std()) < 0.012


def test_bad_kwargs_rejected() -> None:
    """Unknown or invalid builder options fail loudly instead of being ignored."""
    with pytest.raises(TypeError):
        create_model("ShuffleV1", depth=3)
    with pytest.raises(ValueError, match="net_size"):
        create_model("ShuffleV2", net_size=0.75)
