"""A tiny CNN for the embedded digits set, tests and DDP checks (optionally without BatchNorm).

Without BatchNorm every sample's gradient is independent of the others in its batch, so a run
split over K processes equals the single-process run exactly (no SyncBatchNorm needed, which
PyTorch supports only on GPUs).
"""

from __future__ import annotations

import torch
from torch import nn

from normkd.models.registry import register_model
from normkd.models.taps import TapSpec


class TinyCNN(nn.Module):
    """conv-(norm)-relu x 3 stages (stride 1, 2, 2), global average pooling, linear classifier."""

    def __init__(self, num_classes: int = 10, width: int = 16, norm: str = "bn") -> None:
        super().__init__()
        if norm not in ("bn", "none"):
            raise ValueError(f"TinyCNN norm must be 'bn' or 'none', got {norm!r}")
        if width < 1:
            raise ValueError(f"TinyCNN width must be >= 1, got {width}")
        widths = (width, 2 * width, 4 * width)
        stages = []
        cin = 3
        for i, c in enumerate(widths):
            layers: list[nn.Module] = [
                nn.Conv2d(cin, c, 3, stride=1 if i == 0 else 2, padding=1, bias=norm == "none")
            ]
            if norm == "bn":
                layers.append(nn.BatchNorm2d(c))
            layers.append(nn.ReLU())
            stages.append(nn.Sequential(*layers))
            cin = c
        self.stage1, self.stage2, self.stage3 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)
        self.tap_spec = TapSpec(
            feat="stage3",
            feat_channels=widths[-1],
            classifier="fc",
            stages=("stage1", "stage2", "stage3"),
            stage_channels=widths,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stage3(self.stage2(self.stage1(x)))
        return self.fc(self.pool(x).flatten(1))


@register_model("tinycnn")
def tinycnn(
    num_classes: int = 10, width: int = 16, norm: str = "bn", **kwargs: object
) -> nn.Module:
    """A ~25k-parameter CNN (width 16) for digits-sized inputs."""
    if kwargs:
        raise ValueError(f"tinycnn got unexpected arguments: {sorted(kwargs)}")
    return TinyCNN(num_classes=num_classes, width=width, norm=norm)
