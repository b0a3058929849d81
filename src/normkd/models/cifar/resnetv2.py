"""CIFAR-size Bottleneck ResNet50 (RepDistiller ``resnetv2.ResNet50``): 3x3 stem, no max-pool.

Module names and shapes mirror the published RepDistiller / mdistiller CIFAR-100 checkpoints
(``conv1``, ``bn1``, ``layer<k>.<i>.{conv,bn}{1,2,3}``, ``layer<k>.0.shortcut.{0,1}``,
``linear``).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from normkd.models.init import init_weights
from normkd.models.registry import register_model
from normkd.models.taps import TapSpec


class Bottleneck(nn.Module):
    """1x1 reduce -> 3x3 (carries the stride) -> 1x1 expand x4, ReLU after the residual add."""

    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        out_planes = self.expansion * planes
        self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out_planes, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)
        # An empty Sequential is the identity and keeps the reference's ``shortcut.{0,1}`` keys.
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != out_planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, out_planes, 1, stride, bias=False),
                nn.BatchNorm2d(out_planes),
            )
        # A module (not F.relu), parameter-free: its input is the tapped pre-activation sum.
        self.out_relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the block (no in-place ops, so hooked outputs are never overwritten)."""
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out)) + self.shortcut(x)
        return self.out_relu(out)


class ResNetV2(nn.Module):
    """Bottleneck ResNet for 32x32 inputs: widths 64/128/256/512 (x4 out), strides 1/2/2/2."""

    def __init__(
        self,
        num_blocks: tuple[int, int, int, int] = (3, 4, 6, 3),
        num_classes: int = 100,
        zero_init_residual: bool = False,
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU()
        in_planes = 64
        layers = []
        for planes, n, stride in zip((64, 128, 256, 512), num_blocks, (1, 2, 2, 2)):
            blocks = []
            for i in range(n):
                blocks.append(Bottleneck(in_planes, planes, stride if i == 0 else 1))
                in_planes = planes * Bottleneck.expansion
            layers.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(in_planes, num_classes)

        widths = tuple(p * Bottleneck.expansion for p in (64, 128, 256, 512))
        # preact as RepDistiller / mdistiller's preact_feats: the stem's output (what layer1
        # reads), then each stage's last block before its out_relu (bn3(conv3(.)) + shortcut).
        self.tap_spec = TapSpec(
            feat="layer4",
            feat_channels=in_planes,
            classifier="linear",
            stages=("relu", "layer1", "layer2", "layer3", "layer4"),
            stage_channels=(64, *widths),
            preact_stages=(
                "layer1",
                *(f"layer{k}.{n - 1}.out_relu" for k, n in enumerate(num_blocks, 1)),
            ),
        )
        self._init_weights(zero_init_residual)

    def _init_weights(self, zero_init_residual: bool) -> None:
        """Reference init: He-normal (fan-out) convs, unit BN; Linear keeps the PyTorch default."""
        init_weights(self, conv="kaiming", norms=(nn.BatchNorm2d, nn.GroupNorm))
        if zero_init_residual:
            # Each block then starts as the identity (Goyal et al., 2017).
            for m in self.modules():
                if isinstance(m, Bottleneck):
                    nn.init.zeros_(m.bn3.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return logits; ``layer4``'s output goes straight to pooling so it can be tapped."""
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return self.linear(torch.flatten(self.avgpool(out), 1))


@register_model("ResNet50")
def resnet50(num_classes: int = 100, **kwargs: object) -> nn.Module:
    """RepDistiller's CIFAR ``ResNet50`` (Bottleneck 3-4-6-3), a CRD-benchmark teacher."""
    return ResNetV2((3, 4, 6, 3), num_classes=num_classes, **kwargs)  # type: ignore[arg-type]
