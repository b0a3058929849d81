"""ImageNet zoo: shapes, the tap contract, parameter budgets and checkpoint-layout compatibility."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

from normkd.models import create_model, list_models

NAMES = ["resnet18", "resnet34", "resnet50", "mobilenet_v2", "mobilenet_v1", "resnet50_1_4"]


def _conv_params(model: nn.Module) -> int:
    """Conv weight count, the quantity 'width / 4' should shrink by ~16x."""
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Conv2d))


def test_all_registered() -> None:
    """Every ImageNet builder is reachable through the registry, and the names the registry
    lists without importing the module are exactly the ones the module registers."""
    import normkd.models.imagenet  # noqa: F401  (runs its @register_model decorators)
    from normkd.models.registry import _REGISTRY, LAZY_ZOO

    assert set(NAMES) <= set(list_models())
    registered = {n for n, fn in _REGISTRY.items() if fn.__module__ == "normkd.models.imagenet"}
    assert registered == set(LAZY_ZOO["normkd.models.imagenet"]) == set(NAMES)


def test_a_cifar_or_digits_model_does_not_import_torchvision() -> None:
    """torchvision (and the torch._dynamo it imports) costs every `normkd` process seconds; only
    the ImageNet zoo, torchvision:/timm: models and image folders need it."""
    import subprocess
    import sys

    code = (
        "import sys; from normkd.models import create_model, list_models; "
        "create_model('resnet8'); create_model('vit_nano_p2', num_classes=10); "
        "assert 'resnet50' in list_models(); import normkd.cli, normkd.engine; "
        "assert 'torchvision' not in sys.modules, 'torchvision imported'; "
        "create_model('resnet18'); assert 'torchvision' in sys.modules"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_resnet50_1_4_is_a_sixteenth() -> None:
    """Dividing every width by 4 divides conv parameters by ~16 (stem conv: only by 4)."""
    small = create_model("resnet50_1_4", num_classes=1000, stem_width=16)
    big = create_model("resnet50", num_classes=1000)
    stem = big.conv1.weight.numel()  # 3 input channels stay 3, so this conv shrinks by 4 only
    assert _conv_params(small) == (_conv_params(big) - stem) // 16 + stem // 4 == 1_467_696
    assert 1 / 17 < _conv_params(small) / _conv_params(big) < 1 / 15
    assert small.fc.in_features == 512
    assert small.conv1.out_channels == 16


def test_resnet50_1_4_keys_follow_torchvision() -> None:
    """The slim ResNet keeps torchvision's key names, so tooling for resnet50 keys applies."""
    small = create_model("resnet50_1_4", num_classes=1000, stem_width=16).state_dict()
    assert list(small) == list(torchvision.models.resnet50().state_dict())
    # With NORM's 64-channel stem, layer1 needs no projection shortcut: only those keys go.
    norm_style = create_model("resnet50_1_4", num_classes=1000).state_dict()
    assert set(small) - set(norm_style) == {k for k in small if k.startswith("layer1.0.downsample")}


def test_mobilenet_v1_size_and_layout() -> None:
    """~4.2M params, and the OFD/CRD student key layout (model.<i>.<j>, fc) so their files load."""
    model = create_model("mobilenet_v1", num_classes=1000)
    assert sum(p.numel() for p in model.parameters()) == 4_231_976
    expected = {f"model.0.{j}.weight" for j in (0, 1)}
    expected |= {f"model.{i}.{j}.weight" for i in range(1, 14) for j in (0, 1, 3, 4)}
    weights = {k for k in model.state_dict() if k.endswith(".weight") and k.startswith("model.")}
    assert weights == expected
    assert model.state_dict()["model.13.3.weight"].shape == (1024, 1024, 1, 1)
    assert set(model.state_dict()) - {k for k in model.state_dict() if k.startswith("model.")} == {
        "fc.weight",
        "fc.bias",
    }


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2"])
def test_torchvision_checkpoint_loads(name: str, tmp_path: Path) -> None:
    """A torchvision-layout state_dict file loads unchanged through create_model(weights=path)."""
    torch.manual_seed(0)
    reference = getattr(torchvision.models, name)()
    path = tmp_path / f"{name}.pth"
    torch.save(reference.state_dict(), path)
    model = create_model(name, num_classes=1000, weights=path)
    for key, value in reference.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key


def test_mobilenet_v1_checkpoint_roundtrip(tmp_path: Path) -> None:
    """A saved mobilenet_v1 (the published student layout) reloads strictly."""
    src = create_model("mobilenet_v1", num_classes=1000)
    path = tmp_path / "mbv1.pth"
    torch.save({"state_dict": src.state_dict()}, path)
    dst = create_model("mobilenet_v1", num_classes=1000, weights=path)
    assert torch.equal(dst.fc.weight, src.fc.weight)


def test_no_downloads() -> None:
    """Builders refuse torchvision's weights argument instead of fetching anything."""
    from normkd.models.imagenet import resnet18

    with pytest.raises(ValueError, match="never downloads"):
        resnet18(weights="IMAGENET1K_V1")


def test_resnet50_1_4_norm_stem() -> None:
    """The default (stem_width=64) rebuilds NORM's resnet50_4S backbone: a 64-channel stem."""
    model = create_model("resnet50_1_4", num_classes=1000)
    assert model.conv1.out_channels == 64
    assert model.layer1[0].conv1.in_channels == 64
    assert model.tap_spec.stage_channels == (64, 128, 256, 512)
