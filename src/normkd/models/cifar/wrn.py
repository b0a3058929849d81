"""Wide ResNets (Zagoruyko & Komodakis 2016) laid out so RepDistiller/mdistiller checkpoints load.

State-dict keys follow the published CRD-family teachers: ``conv1``, ``blockK.layer.i.bn1``,
``blockK.layer.i.conv1``, ``blockK.layer.i.bn2``, ``blockK.layer.i.conv2``,
``blockK.layer.0.convShortcut`` (only where the width changes), then ``bn1`` and ``fc``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from normkd.models.init import init_weights
from normkd.models.registry import register_model
from normkd.models.taps import TapSpec

__all__ = ["NetworkBlock", "WideBasicBlock", "WideResNet"]


class WideBasicBlock(nn.Module):
    """Pre-activation block: BN-ReLU-conv3x3, BN-ReLU-conv3x3, plus identity or 1x1 shortcut."""

    def __init__(
        self, in_planes: int, out_planes: int, stride: int, drop_rate: float = 0.0
    ) -> None:
        """Build the block; the shortcut is a 1x1 conv exactly when the width changes."""
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_planes, out_planes, 3, stride=1, padding=1, bias=False)
        self.drop_rate = drop_rate
        # The key name is the reference's, so published checkpoints load unchanged.
        self.convShortcut: nn.Conv2d | None = None
        if in_planes != out_planes:
            self.convShortcut = nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Pre-activated residual sum (no activation after it)."""
        act = self.relu1(self.bn1(x))
        # A projection shortcut reads the pre-activated input, an identity one the raw input.
        shortcut = x if self.convShortcut is None else self.convShortcut(act)
        out = self.relu2(self.bn2(self.conv1(act)))
        if self.drop_rate > 0:
            out = F.dropout(out, p=self.drop_rate, training=self.training)
        return shortcut + self.conv2(out)


class NetworkBlock(nn.Module):
    """One WRN stage: ``num_layers`` blocks, the first one changing width and stride."""

    def __init__(
        self, num_layers: int, in_planes: int, out_planes: int, stride: int, drop_rate: float = 0.0
    ) -> None:
        """Build the stage; the blocks live under ``layer`` to match the checkpoint keys."""
        super().__init__()
        self.layer = nn.Sequential(
            *(
                WideBasicBlock(
                    in_planes if i == 0 else out_planes,
                    out_planes,
                    stride if i == 0 else 1,
                    drop_rate,
                )
                for i in range(num_layers)
            )
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Run the stage's blocks in order."""
        return self.layer(x)


class WideResNet(nn.Module):
    """WRN-depth-width: stem conv, three pre-activation stages, final BN-ReLU, pool, linear."""

    def __init__(
        self, depth: int, widen_factor: int, num_classes: int = 100, drop_rate: float = 0.0
    ) -> None:
        """Build WRN-``depth``-``widen_factor`` (depth must be 6n+4)."""
        super().__init__()
        if depth < 10 or (depth - 4) % 6 != 0:
            raise ValueError(f"WideResNet depth must be 6n+4 with n >= 1, got {depth}")
        n = (depth - 4) // 6
        widths = (16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor)
        self.conv1 = nn.Conv2d(3, widths[0], 3, stride=1, padding=1, bias=False)
        self.block1 = NetworkBlock(n, widths[0], widths[1], 1, drop_rate)
        self.block2 = NetworkBlock(n, widths[1], widths[2], 2, drop_rate)
        self.block3 = NetworkBlock(n, widths[2], widths[3], 2, drop_rate)
        self.bn1 = nn.BatchNorm2d(widths[3])
        self.relu = nn.ReLU()  # the tapped feat map; keep it out-of-place
        # Equals the reference avg_pool2d(8) at 32x32 input, and works for larger inputs too.
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[3], num_classes)

        init_weights(self, conv="fan_out", linear="zero_bias")  # its convs have no bias

        # Stages are the maps RepDistiller / mdistiller return (stem conv, then the raw block
        # outputs: pre-activation sums, block3 before the final BN-ReLU), so AT and FitNet pair
        # the published baselines' maps. feat is the post-BN-ReLU map pooling reads, the one
        # NORM's FT must follow for its merge into fc to be exact.
        # Their preact_feats are no map before a stage's own ReLU (a WRN stage ends in a sum):
        # the stem conv's output, then each stage's output through the BN the net applies next
        # (block2.layer[0].bn1, block3.layer[0].bn1, the final bn1), i.e. what the ReLU after
        # that BN reads. The reference calls those BNs a second time after the forward: the
        # same values (in training mode it also updates their running statistics twice; here
        # once). relu1 is in place, so the capture clones its input.
        self.tap_spec = TapSpec(
            feat="relu",
            feat_channels=widths[3],
            classifier="fc",
            stages=("conv1", "block1", "block2", "block3"),
            stage_channels=widths,
            preact_stages=("block1", "block2.layer.0.relu1", "block3.layer.0.relu1", "relu"),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return logits; the final ReLU's output goes straight to pooling and ``fc``."""
        out = self.block3(self.block2(self.block1(self.conv1(x))))
        out = self.relu(self.bn1(out))
        return self.fc(torch.flatten(self.avgpool(out), 1))


@register_model("wrn_16_1")
def wrn_16_1(num_classes: int = 100, **kwargs: object) -> WideResNet:
    """WRN-16-1, a CRD-benchmark student."""
    return WideResNet(16, 1, num_classes=num_classes, **kwargs)


@register_model("wrn_16_2")
def wrn_16_2(num_classes: int = 100, **kwargs: object) -> WideResNet:
    """WRN-16-2, the usual student of wrn_40_2."""
    return WideResNet(16, 2, num_classes=num_classes, **kwargs)


@register_model("wrn_40_1")
def wrn_40_1(num_classes: int = 100, **kwargs: object) -> WideResNet:
    """WRN-40-1, a student of wrn_40_2."""
    return WideResNet(40, 1, num_classes=num_classes, **kwargs)


@register_model("wrn_40_2")
def wrn_40_2(num_classes: int = 100, **kwargs: object) -> WideResNet:
    """WRN-40-2, a published CRD teacher."""
    return WideResNet(40, 2, num_classes=num_classes, **kwargs)
