"""CIFAR ShuffleNetV1 (RepDistiller ``ShuffleV1``: groups 3, widths 240/480/960, 4/8/4 blocks).

Module names and shapes mirror the published RepDistiller / mdistiller CIFAR-100 checkpoints
(``conv1``, ``bn1``, ``layer<k>.<i>.{conv,bn}{1,2,3}``, ``linear``).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from normkd.models.registry import register_model
from normkd.models.taps import TapSpec


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    """Interleave channels across ``groups`` so grouped convs see every group's outputs."""
    n, c, h, w = x.shape
    return x.view(n, groups, c // groups, h, w).transpose(1, 2).reshape(n, c, h, w)


class Bottleneck(nn.Module):
    """ShuffleNet unit: grouped 1x1 -> shuffle -> depthwise 3x3 -> grouped 1x1, add or concat.

    A stride-2 unit concatenates the branch with a 3x3 average-pooled shortcut, so its branch
    produces ``out_planes`` channels that come on top of the input's.
    """

    def __init__(self, in_planes: int, out_planes: int, stride: int, groups: int) -> None:
        super().__init__()
        self.stride = stride
        mid = out_planes // 4
        # The reference keeps the first 1x1 ungrouped when it reads the 24-channel stem.
        self.shuffle_groups = 1 if in_planes == 24 else groups
        self.conv1 = nn.Conv2d(in_planes, mid, 1, groups=self.shuffle_groups, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.conv2 = nn.Conv2d(mid, mid, 3, stride, 1, groups=mid, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(mid, out_planes, 1, groups=groups, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)
        self.shortcut: nn.Module = (
            nn.AvgPool2d(3, stride=2, padding=1) if stride == 2 else nn.Identity()
        )
        # A module (not F.relu), parameter-free: its input is the tapped pre-activation merge.
        self.out_relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the unit; the ReLU comes after the merge, as in the reference."""
        out = F.relu(self.bn1(self.conv1(x)))
        out = channel_shuffle(out, self.shuffle_groups)
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        res = self.shortcut(x)
        out = torch.cat([out, res], 1) if self.stride == 2 else out + res
        return self.out_relu(out)


class ShuffleNetV1(nn.Module):
    """ShuffleNetV1 for 32x32 inputs: 1x1 stem (no downsampling), three stride-2 stages."""

    def __init__(
        self,
        num_classes: int = 100,
        out_planes: tuple[int, int, int] = (240, 480, 960),
        num_blocks: tuple[int, int, int] = (4, 8, 4),
        groups: int = 3,
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 24, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        self.relu = nn.ReLU()
        in_planes = 24
        layers = []
        for planes, n in zip(out_planes, num_blocks):
            blocks = []
            for i in range(n):
                # The first (stride-2) unit's branch only adds what the shortcut lacks.
                branch = planes - in_planes if i == 0 else planes
                blocks.append(Bottleneck(in_planes, branch, 2 if i == 0 else 1, groups))
                in_planes = planes
            layers.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = layers
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(out_planes[2], num_classes)

        self.tap_spec = TapSpec(
            feat="layer3",
            feat_channels=out_planes[2],
            classifier="linear",
            stages=("relu", "layer1", "layer2", "layer3"),
            stage_channels=(24, *out_planes),
            # RepDistiller / mdistiller's preact_feats: the stem's output (what layer1 reads),
            # then each stage's last unit before its out_relu (the sum, or the concatenation).
            preact_stages=(
                "layer1",
                *(f"layer{k}.{n - 1}.out_relu" for k, n in enumerate(num_blocks, 1)),
            ),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return logits; ``layer3``'s output goes straight to pooling so it can be tapped."""
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        return self.linear(torch.flatten(self.avgpool(out), 1))


@register_model("ShuffleV1")
def shufflev1(num_classes: int = 100, **kwargs: object) -> nn.Module:
    """RepDistiller's ``ShuffleV1`` (g=3), a CRD-benchmark student."""
    return ShuffleNetV1(num_classes=num_classes, **kwargs)  # type: ignore[arg-type]
