"""CIFAR MobileNetV2 (RepDistiller ``mobile_half``): expansion 6, width 0.5, 1280-d head.

Module names and shapes mirror the published RepDistiller / mdistiller CIFAR-100 checkpoints
(``conv1.*``, ``blocks.<stage>.<block>.conv.<i>.*``, ``conv2.*``, ``classifier.0.*``).
"""

from __future__ import annotations

import torch
from torch import nn

from normkd.models.init import init_weights
from normkd.models.registry import register_model
from normkd.models.taps import TapSpec

# (expansion, base channels, blocks, first stride) per stage; expansion None means "use T".
_STAGES: tuple[tuple[int | None, int, int, int], ...] = (
    (1, 16, 1, 1),
    (None, 24, 2, 1),
    (None, 32, 3, 2),
    (None, 64, 4, 2),
    (None, 96, 3, 1),
    (None, 160, 3, 2),
    (None, 320, 1, 1),
)
# Stages whose outputs RepDistiller / mdistiller return as features after the stem; the 1x1 head
# conv (``conv2``, what pooling reads) is no stage of theirs, so it is ``feat`` only.
_TAPPED_STAGES = (1, 2, 4, 6)


def _conv_bn_relu(in_ch: int, out_ch: int, kernel: int, stride: int) -> nn.Sequential:
    """Conv-BN-ReLU as an indexed Sequential so keys read ``<name>.0`` / ``<name>.1``."""
    return nn.Sequential(
        nn.Conv2d(in_ch, out_ch, kernel, stride, kernel // 2, bias=False),
        nn.BatchNorm2d(out_ch),
        nn.ReLU(),
    )


class InvertedResidual(nn.Module):
    """Expand (1x1) -> depthwise (3x3) -> linear project (1x1), residual when shapes allow."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, expansion: int) -> None:
        super().__init__()
        if stride not in (1, 2):
            raise ValueError(f"stride must be 1 or 2, got {stride}")
        hidden = in_ch * expansion
        self.use_residual = stride == 1 and in_ch == out_ch
        # Indices 0..7 are part of the checkpoint key names; keep this exact layer order.
        self.conv = nn.Sequential(
            nn.Conv2d(in_ch, hidden, 1, 1, 0, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(),
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(),
            nn.Conv2d(hidden, out_ch, 1, 1, 0, bias=False),
            nn.BatchNorm2d(out_ch),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the block; the projection is linear (no ReLU), as in MobileNetV2."""
        out = self.conv(x)
        return x + out if self.use_residual else out


class MobileNetV2(nn.Module):
    """MobileNetV2 for 32x32 inputs: stride-2 stem, four downsamplings in all, 1280-d head."""

    def __init__(self, num_classes: int = 100, expansion: int = 6, width_mult: float = 0.5) -> None:
        super().__init__()
        in_ch = int(32 * width_mult)
        self.conv1 = _conv_bn_relu(3, in_ch, 3, 2)

        self.blocks = nn.ModuleList()
        stage_out: list[int] = []
        for t, c, n, s in _STAGES:
            out_ch = int(c * width_mult)
            layers = []
            for i in range(n):
                layers.append(
                    InvertedResidual(
                        in_ch, out_ch, s if i == 0 else 1, expansion if t is None else t
                    )
                )
                in_ch = out_ch
            self.blocks.append(nn.Sequential(*layers))
            stage_out.append(out_ch)

        # The reference only widens the head for width_mult > 1.
        last_ch = int(1280 * width_mult) if width_mult > 1.0 else 1280
        self.conv2 = _conv_bn_relu(in_ch, last_ch, 1, 1)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Linear(last_ch, num_classes))

        self.tap_spec = TapSpec(
            feat="conv2",
            feat_channels=last_ch,
            classifier="classifier.0",
            stages=("conv1", *(f"blocks.{i}" for i in _TAPPED_STAGES)),
            stage_channels=(int(32 * width_mult), *(stage_out[i] for i in _TAPPED_STAGES)),
            # No distinct pre-activation map: the blocks end in a linear projection, and
            # RepDistiller's preact=True returns the same maps (mdistiller returns no
            # preact_feats). Declared as those maps, read as what the next module takes in.
            preact_stages=tuple(
                f"blocks.{i + 1}" if i + 1 < len(_STAGES) else "conv2"
                for i in (-1, *_TAPPED_STAGES)
            ),
        )
        self._init_weights()

    def _init_weights(self) -> None:
        """Reference init: He-normal (fan-out) convs, unit BN, N(0, 0.01) classifier."""
        init_weights(self, conv="fan_out", linear="normal")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return logits; ``conv2``'s output goes straight to pooling so it can be tapped."""
        out = self.conv1(x)
        for stage in self.blocks:
            out = stage(out)
        out = self.conv2(out)
        return self.classifier(torch.flatten(self.avgpool(out), 1))


@register_model("MobileNetV2")
def mobilenetv2(num_classes: int = 100, **kwargs: object) -> nn.Module:
    """RepDistiller's ``mobile_half`` (T=6, width 0.5), the CRD-benchmark MobileNetV2 student."""
    return MobileNetV2(num_classes=num_classes, **kwargs)  # type: ignore[arg-type]
