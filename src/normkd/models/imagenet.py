"""ImageNet zoo: torchvision teachers plus the MobileNetV1 / ResNet50-1/4 students of the KD papers.

Every builder makes an untrained model (``weights=None`` always; nothing is ever downloaded) whose
state_dict keys match the published layout, so local checkpoints load through
``create_model(name, weights=path)``. Each model carries a declared :class:`TapSpec`.
"""

from __future__ import annotations

from typing import Any

import torchvision
from torch import Tensor, nn
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

from normkd.models.init import init_weights
from normkd.models.registry import register_model
from normkd.models.taps import TapSpec

__all__ = ["MobileNetV1", "SlimResNet"]


def _refuse_download(kwargs: dict[str, Any]) -> None:
    """Stop torchvision builders from fetching weights; checkpoints come from local files only."""
    if "weights" in kwargs or "pretrained" in kwargs:
        raise ValueError(
            "normkd never downloads weights; build the model and pass a local checkpoint: "
            "create_model(name, weights='path/to/file.pth')"
        )


def _block_channels(block: nn.Module) -> int:
    """Output channels of a torchvision residual block (the last conv of its main branch)."""
    if isinstance(block, Bottleneck):
        return block.conv3.out_channels
    if isinstance(block, BasicBlock):
        return block.conv2.out_channels
    raise TypeError(f"unexpected ResNet block type {type(block).__name__}")


def _resnet_taps(model: ResNet) -> ResNet:
    """Declare ResNet taps (stages layer1..4, feat layer4, classifier fc) for the distillers.

    Pre-activation maps (mdistiller's ImageNet ``preact_feats``, whose blocks leave the last ReLU
    out): each stage's last block's residual sum, the input of that block's ``relu``. torchvision
    calls that one module after each BN and last on the sum, and a tap keeps the last call."""
    stages = ("layer1", "layer2", "layer3", "layer4")
    model.tap_spec = TapSpec(
        feat="layer4",
        feat_channels=model.fc.in_features,
        classifier="fc",
        stages=stages,
        stage_channels=tuple(_block_channels(getattr(model, s)[-1]) for s in stages),
        preact_stages=tuple(f"{s}.{len(getattr(model, s)) - 1}.relu" for s in stages),
    )
    return model


# --------------------------------------------------------------------------------------------
# torchvision teachers (state_dict identical to torchvision's ImageNet checkpoints)
# --------------------------------------------------------------------------------------------


@register_model("resnet18")
def resnet18(num_classes: int = 1000, **kwargs: Any) -> nn.Module:
    """torchvision ResNet-18, so torchvision checkpoint files load unchanged."""
    _refuse_download(kwargs)
    model = torchvision.models.resnet18(weights=None, num_classes=num_classes, **kwargs)
    return _resnet_taps(model)


@register_model("resnet34")
def resnet34(num_classes: int = 1000, **kwargs: Any) -> nn.Module:
    """torchvision ResNet-34, the teacher of the ResNet34 -> ResNet18 ImageNet setting."""
    _refuse_download(kwargs)
    model = torchvision.models.resnet34(weights=None, num_classes=num_classes, **kwargs)
    return _resnet_taps(model)


@register_model("resnet50")
def resnet50(num_classes: int = 1000, **kwargs: Any) -> nn.Module:
    """torchvision ResNet-50, the teacher of the ResNet50 -> MobileNet ImageNet setting."""
    _refuse_download(kwargs)
    model = torchvision.models.resnet50(weights=None, num_classes=num_classes, **kwargs)
    return _resnet_taps(model)


# Last block of each resolution in torchvision's MobileNetV2 ``features`` (1/4, 1/8, 1/16 of the
# input); the 1/32 stage ends with the final 1x1 conv, i.e. ``features`` itself.
_MBV2_STAGE_ENDS = (3, 6, 13)


@register_model("mobilenet_v2")
def mobilenet_v2(num_classes: int = 1000, **kwargs: Any) -> nn.Module:
    """torchvision MobileNetV2; classifier.0 is Dropout (identity in eval) before the Linear."""
    _refuse_download(kwargs)
    model = torchvision.models.mobilenet_v2(weights=None, num_classes=num_classes, **kwargs)
    stages = (*(f"features.{i}" for i in _MBV2_STAGE_ENDS), "features")
    blocks = [model.features[i] for i in _MBV2_STAGE_ENDS] + [model.features[-1]]
    model.tap_spec = TapSpec(
        feat="features",
        feat_channels=model.classifier[-1].in_features,
        classifier="classifier.1",
        stages=stages,
        stage_channels=tuple(int(b.out_channels) for b in blocks),
    )
    return model


# --------------------------------------------------------------------------------------------
# MobileNetV1 student (layout of the ResNet50 -> MobileNet ImageNet setting of OFD / CRD / NORM)
# --------------------------------------------------------------------------------------------

# (in, out, stride) of the 13 depthwise-separable blocks that follow the 3x3 stem (3 -> 32, s2).
_MBV1_BLOCKS: tuple[tuple[int, int, int], ...] = (
    (32, 64, 1),
    (64, 128, 2),
    (128, 128, 1),
    (128, 256, 2),
    (256, 256, 1),
    (256, 512, 2),
    *((512, 512, 1),) * 5,
    (512, 1024, 2),
    (1024, 1024, 1),
)


def _conv_bn_relu(inp: int, out: int, stride: int) -> nn.Sequential:
    """Full 3x3 conv stem unit; indices 0/1/2 give the published ``model.0.{0,1}`` keys."""
    return nn.Sequential(
        nn.Conv2d(inp, out, 3, stride, 1, bias=False),
        nn.BatchNorm2d(out),
        nn.ReLU(inplace=True),
    )


def _depthwise_separable(inp: int, out: int, stride: int) -> nn.Sequential:
    """3x3 depthwise + 1x1 pointwise unit; indices 0..5 give the published ``model.i.{0,1,3,4}``."""
    return nn.Sequential(
        nn.Conv2d(inp, inp, 3, stride, 1, groups=inp, bias=False),
        nn.BatchNorm2d(inp),
        nn.ReLU(inplace=True),
        nn.Conv2d(inp, out, 1, 1, 0, bias=False),
        nn.BatchNorm2d(out),
        nn.ReLU(inplace=True),
    )


class MobileNetV1(nn.Module):
    """MobileNet (V1, width 1.0) with the ``model.<i>`` / ``fc`` keys of the KD papers' student.

    ``model`` holds the stem and the 13 separable blocks (indices 0..13) and returns the
    1024-channel map that global average pooling reads. The reference code pools with a fixed
    ``AvgPool2d(7)`` stored as ``model.14``; it has no parameters, so pooling adaptively outside
    ``model`` keeps the state_dict identical while accepting any input size.
    """

    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__()
        self.model = nn.Sequential(
            _conv_bn_relu(3, 32, 2), *(_depthwise_separable(i, o, s) for i, o, s in _MBV1_BLOCKS)
        )
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(_MBV1_BLOCKS[-1][1], num_classes)
        init_weights(self, conv="kaiming", linear="normal")  # fc is the last module

    def forward(self, x: Tensor) -> Tensor:
        """Features -> global average pool -> linear classifier, nothing in between."""
        return self.fc(self.avgpool(self.model(x)).flatten(1))


@register_model("mobilenet_v1")
def mobilenet_v1(num_classes: int = 1000, **kwargs: Any) -> nn.Module:
    """MobileNetV1 student of the ResNet50 -> MobileNet setting, stages at 1/4..1/32 resolution."""
    _refuse_download(kwargs)
    model = MobileNetV1(num_classes=num_classes, **kwargs)
    # Same four stage maps (128/256/512/1024 channels) that OFD distils, read after the ReLU.
    model.tap_spec = TapSpec(
        feat="model",
        feat_channels=1024,
        classifier="fc",
        stages=("model.3", "model.5", "model.11", "model"),
        stage_channels=(128, 256, 512, 1024),
    )
    return model


# --------------------------------------------------------------------------------------------
# ResNet50-1/4 student
# --------------------------------------------------------------------------------------------


class SlimResNet(ResNet):
    """torchvision ResNet with configurable stem/stage widths (ResNet only offers 64/128/256/512).

    Reuses torchvision's blocks, ``_make_layer`` and ``forward``, so module names and state_dict
    keys follow torchvision's ResNet layout exactly; only the channel counts differ.
    """

    def __init__(
        self,
        block: type[BasicBlock | Bottleneck],
        layers: list[int],
        widths: tuple[int, int, int, int],
        stem_width: int,
        num_classes: int = 1000,
        zero_init_residual: bool = False,
    ) -> None:
        # ResNet.__init__ hard-codes the widths, so set up the state _make_layer needs directly.
        nn.Module.__init__(self)
        self._norm_layer = nn.BatchNorm2d
        self.inplanes = stem_width
        self.dilation = 1
        self.groups = 1
        self.base_width = 64
        self.conv1 = nn.Conv2d(3, stem_width, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(stem_width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, widths[0], layers[0])
        self.layer2 = self._make_layer(block, widths[1], layers[1], stride=2)
        self.layer3 = self._make_layer(block, widths[2], layers[2], stride=2)
        self.layer4 = self._make_layer(block, widths[3], layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(widths[3] * block.expansion, num_classes)
        init_weights(self, conv="kaiming")
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, Bottleneck):
                    nn.init.zeros_(m.bn3.weight)
                elif isinstance(m, BasicBlock):
                    nn.init.zeros_(m.bn2.weight)


@register_model("resnet50_1_4")
def resnet50_1_4(num_classes: int = 1000, stem_width: int = 64, **kwargs: Any) -> nn.Module:
    """ResNet50 with stage widths / 4 (planes 16..128, final map 512); 64-ch stem as NORM's student."""
    _refuse_download(kwargs)
    model = SlimResNet(
        Bottleneck, [3, 4, 6, 3], (16, 32, 64, 128), stem_width, num_classes=num_classes, **kwargs
    )
    return _resnet_taps(model)
