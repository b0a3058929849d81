"""CIFAR ResNets (6n+2 BasicBlock nets) laid out so RepDistiller/mdistiller checkpoints load as-is.

State-dict keys follow the published CRD-family teachers: ``conv1``, ``bn1``, ``layerK.i.conv1``,
``layerK.i.bn1``, ``layerK.i.conv2``, ``layerK.i.bn2``, ``layerK.0.downsample.{0,1}`` and ``fc``.
"""

from __future__ import annotations

import torch
from torch import nn

from normkd.models.init import init_weights
from normkd.models.registry import register_model
from normkd.models.taps import TapSpec

__all__ = ["BasicBlock", "CifarResNet"]

_WIDTHS_X1 = (16, 16, 32, 64)
_WIDTHS_X4 = (32, 64, 128, 256)


def _conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    """Post-activation residual block: two 3x3 conv-BN pairs, ReLU after the shortcut sum."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        """Build the block; a 1x1 conv-BN projection shortcut is added when the shape changes."""
        super().__init__()
        self.conv1 = _conv3x3(in_planes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_planes != planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_planes, planes, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(planes),
            )
        # Parameter-free, not in-place: the block's output is a tapped stage map.
        self.out_relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Residual sum followed by ReLU."""
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.out_relu(out + shortcut)


class CifarResNet(nn.Module):
    """Stem conv-BN-ReLU, three stages of ``(depth - 2) / 6`` BasicBlocks, global pool, linear."""

    def __init__(
        self, depth: int, widths: tuple[int, int, int, int], num_classes: int = 100
    ) -> None:
        """Build a ResNet of ``depth`` layers with stem/stage widths ``widths``."""
        super().__init__()
        if depth < 8 or (depth - 2) % 6 != 0:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2 with n >= 1, got {depth}")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(3, widths[0], kernel_size=3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU()  # stem output is a tapped stage; keep it out-of-place
        self.layer1 = self._make_stage(widths[0], widths[1], n, stride=1)
        self.layer2 = self._make_stage(widths[1], widths[2], n, stride=2)
        self.layer3 = self._make_stage(widths[2], widths[3], n, stride=2)
        # Equals the reference AvgPool2d(8) at 32x32 input, and works for larger inputs too.
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[3], num_classes)

        init_weights(self, conv="kaiming")

        # Pre-activation maps as RepDistiller / mdistiller's ``preact_feats``: the stem's output
        # (no ReLU-free version is returned; it is what layer1 reads), then each stage's last
        # block before its out_relu (bn2(conv2(.)) + shortcut).
        self.tap_spec = TapSpec(
            feat="layer3",
            feat_channels=widths[3],
            classifier="fc",
            stages=("relu", "layer1", "layer2", "layer3"),
            stage_channels=tuple(widths),
            preact_stages=("layer1", *(f"layer{k}.{n - 1}.out_relu" for k in (1, 2, 3))),
        )

    @staticmethod
    def _make_stage(in_planes: int, planes: int, blocks: int, stride: int) -> nn.Sequential:
        layers = [BasicBlock(in_planes, planes, stride)]
        layers += [BasicBlock(planes, planes) for _ in range(blocks - 1)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return logits; ``layer3``'s output goes straight to pooling and ``fc``."""
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


@register_model("resnet8")
def resnet8(num_classes: int = 100, **kwargs: object) -> CifarResNet:
    """ResNet-8 (widths 16/16/32/64), a CRD-benchmark student."""
    return CifarResNet(8, _WIDTHS_X1, num_classes=num_classes, **kwargs)


@register_model("resnet14")
def resnet14(num_classes: int = 100, **kwargs: object) -> CifarResNet:
    """ResNet-14 (widths 16/16/32/64), a CRD-benchmark student."""
    return CifarResNet(14, _WIDTHS_X1, num_classes=num_classes, **kwargs)


@register_model("resnet20")
def resnet20(num_classes: int = 100, **kwargs: object) -> CifarResNet:
    """ResNet-20 (widths 16/16/32/64), student of resnet56/resnet110."""
    return CifarResNet(20, _WIDTHS_X1, num_classes=num_classes, **kwargs)


@register_model("resnet32")
def resnet32(num_classes: int = 100, **kwargs: object) -> CifarResNet:
    """ResNet-32 (widths 16/16/32/64), student of resnet110."""
    return CifarResNet(32, _WIDTHS_X1, num_classes=num_classes, **kwargs)


@register_model("resnet44")
def resnet44(num_classes: int = 100, **kwargs: object) -> CifarResNet:
    """ResNet-44 (widths 16/16/32/64), a CRD-benchmark student."""
    return CifarResNet(44, _WIDTHS_X1, num_classes=num_classes, **kwargs)


@register_model("resnet56")
def resnet56(num_classes: int = 100, **kwargs: object) -> CifarResNet:
    """ResNet-56 (widths 16/16/32/64), a published CRD teacher."""
    return CifarResNet(56, _WIDTHS_X1, num_classes=num_classes, **kwargs)


@register_model("resnet110")
def resnet110(num_classes: int = 100, **kwargs: object) -> CifarResNet:
    """ResNet-110 (widths 16/16/32/64), a published CRD teacher."""
    return CifarResNet(110, _WIDTHS_X1, num_classes=num_classes, **kwargs)


@register_model("resnet8x4")
def resnet8x4(num_classes: int = 100, **kwargs: object) -> CifarResNet:
    """ResNet-8 at 4x width (32/64/128/256), the usual student of resnet32x4."""
    return CifarResNet(8, _WIDTHS_X4, num_classes=num_classes, **kwargs)


@register_model("resnet32x4")
def resnet32x4(num_classes: int = 100, **kwargs: object) -> CifarResNet:
    """ResNet-32 at 4x width (32/64/128/256), the strongest published CRD teacher."""
    return CifarResNet(32, _WIDTHS_X4, num_classes=num_classes, **kwargs)
