"""CIFAR ShuffleNetV2 (RepDistiller ``ShuffleV2``: the 1x net, widths 116/232/464, 1024-d head).

Module names and shapes mirror the published RepDistiller / mdistiller CIFAR-100 checkpoints
(``conv1``, ``bn1``, ``layer<k>.0`` down units with ``conv1..5``, ``layer<k>.<i>`` basic units
with ``conv1..3``, ``conv2``, ``bn2``, ``linear``).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from normkd.models.registry import register_model
from normkd.models.taps import TapSpec

# net_size -> (stage widths, head width), (basic units per stage), as in the reference configs.
CONFIGS: dict[float, tuple[tuple[int, int, int, int], tuple[int, int, int]]] = {
    0.2: ((40, 80, 160, 512), (3, 3, 3)),
    0.3: ((40, 80, 160, 512), (3, 7, 3)),
    0.5: ((48, 96, 192, 1024), (3, 7, 3)),
    1: ((116, 232, 464, 1024), (3, 7, 3)),
    1.5: ((176, 352, 704, 1024), (3, 7, 3)),
    2: ((224, 488, 976, 2048), (3, 7, 3)),
}


def channel_shuffle(x: torch.Tensor, groups: int = 2) -> torch.Tensor:
    """Interleave the two branches' channels so the next split mixes information."""
    n, c, h, w = x.shape
    return x.view(n, groups, c // groups, h, w).transpose(1, 2).reshape(n, c, h, w)


class Merge(nn.Module):
    """A unit's end: the kept half and the branch's ReLU, concatenated, then shuffled.

    A parameter-free module so its inputs, the kept half and the branch before its ReLU, can
    be tapped (concatenated, they are the reference's pre-activation map of the unit)."""

    def forward(self, keep: torch.Tensor, branch: torch.Tensor) -> torch.Tensor:
        return channel_shuffle(torch.cat([keep, F.relu(branch)], 1))


class BasicBlock(nn.Module):
    """Stride-1 unit: half the channels pass through, the other half goes 1x1 -> dw 3x3 -> 1x1."""

    def __init__(self, channels: int, split_ratio: float = 0.5) -> None:
        super().__init__()
        self.split_ratio = split_ratio
        c = int(channels * split_ratio)
        self.conv1 = nn.Conv2d(c, c, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, 1, 1, groups=c, bias=False)
        self.bn2 = nn.BatchNorm2d(c)
        self.conv3 = nn.Conv2d(c, c, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(c)
        self.merge = Merge()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the unit: the kept half comes first in the concatenation, then shuffle."""
        c = int(x.size(1) * self.split_ratio)
        keep, work = x[:, :c], x[:, c:]
        out = F.relu(self.bn1(self.conv1(work)))
        out = self.bn2(self.conv2(out))
        return self.merge(keep, self.bn3(self.conv3(out)))


class DownBlock(nn.Module):
    """Stride-2 unit: two branches over the full input, each giving half the output channels."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        mid = out_channels // 2
        # Left branch: dw 3x3 (stride 2) -> 1x1.
        self.conv1 = nn.Conv2d(in_channels, in_channels, 3, 2, 1, groups=in_channels, bias=False)
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv2 = nn.Conv2d(in_channels, mid, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        # Right branch: 1x1 -> dw 3x3 (stride 2) -> 1x1.
        self.conv3 = nn.Conv2d(in_channels, mid, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(mid)
        self.conv4 = nn.Conv2d(mid, mid, 3, 2, 1, groups=mid, bias=False)
        self.bn4 = nn.BatchNorm2d(mid)
        self.conv5 = nn.Conv2d(mid, mid, 1, bias=False)
        self.bn5 = nn.BatchNorm2d(mid)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply both branches (no ReLU after the depthwise convs), concatenate, shuffle."""
        left = F.relu(self.bn2(self.conv2(self.bn1(self.conv1(x)))))
        right = F.relu(self.bn3(self.conv3(x)))
        right = F.relu(self.bn5(self.conv5(self.bn4(self.conv4(right)))))
        return channel_shuffle(torch.cat([left, right], 1))


class ShuffleNetV2(nn.Module):
    """ShuffleNetV2 for 32x32 inputs: 1x1 stem (no stride), three stride-2 stages, 1x1 head."""

    def __init__(self, num_classes: int = 100, net_size: float = 1) -> None:
        super().__init__()
        if net_size not in CONFIGS:
            raise ValueError(f"net_size must be one of {sorted(CONFIGS)}, got {net_size!r}")
        widths, num_blocks = CONFIGS[net_size]
        self.conv1 = nn.Conv2d(3, 24, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        self.relu = nn.ReLU()
        in_ch = 24
        layers = []
        for out_ch, n in zip(widths[:3], num_blocks):
            layers.append(
                nn.Sequential(DownBlock(in_ch, out_ch), *(BasicBlock(out_ch) for _ in range(n)))
            )
            in_ch = out_ch
        self.layer1, self.layer2, self.layer3 = layers
        self.conv2 = nn.Conv2d(widths[2], widths[3], 1, bias=False)
        self.bn2 = nn.BatchNorm2d(widths[3])
        # A module (not F.relu) so the final map can be tapped; no parameters, so no new keys.
        self.final_relu = nn.ReLU()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(widths[3], num_classes)

        # Stages are RepDistiller / mdistiller's feature maps (stem, layer1..3); the 1x1 head
        # (conv2-bn2-ReLU, what pooling reads) is no stage of theirs, so it is ``feat`` only.
        self.tap_spec = TapSpec(
            feat="final_relu",
            feat_channels=widths[3],
            classifier="linear",
            stages=("relu", "layer1", "layer2", "layer3"),
            stage_channels=(24, *widths[:3]),
            # RepDistiller / mdistiller's preact_feats: the stem's output (what layer1 reads),
            # then each stage's last unit's [kept half, branch before its ReLU], *not shuffled*
            # (their stage maps are): the inputs of its merge, concatenated.
            preact_stages=("layer1", *(f"layer{k}.{n}.merge" for k, n in enumerate(num_blocks, 1))),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return logits; ``final_relu``'s output goes straight to pooling so it can be tapped."""
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        out = self.final_relu(self.bn2(self.conv2(out)))
        return self.linear(torch.flatten(self.avgpool(out), 1))


@register_model("ShuffleV2")
def shufflev2(num_classes: int = 100, **kwargs: object) -> nn.Module:
    """RepDistiller's ``ShuffleV2`` (net_size 1), a CRD-benchmark student."""
    return ShuffleNetV2(num_classes=num_classes, **kwargs)  # type: ignore[arg-type]
