"""CIFAR VGGs with BatchNorm (RepDistiller's ``vggN_bn``) laid out so published checkpoints load.

Five conv blocks ``block0``..``block4`` are ``nn.Sequential`` runs of [conv3x3 (with bias), BN,
ReLU], without the final ReLU, so keys read ``blockK.{3j}.weight/bias`` for the j-th conv and
``blockK.{3j+1}.*`` for its BN; the only linear layer is ``classifier`` (512 -> classes).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from normkd.models.init import init_weights
from normkd.models.registry import register_model
from normkd.models.taps import TapSpec

__all__ = ["VGG"]

# Output widths of the convs in each of the five blocks.
_CFGS: dict[str, tuple[tuple[int, ...], ...]] = {
    "vgg8": ((64,), (128,), (256,), (512,), (512,)),
    "vgg11": ((64,), (128,), (256, 256), (512, 512), (512, 512)),
    "vgg13": ((64, 64), (128, 128), (256, 256), (512, 512), (512, 512)),
    "vgg16": ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512)),
    "vgg19": (
        (64, 64),
        (128, 128),
        (256, 256, 256, 256),
        (512, 512, 512, 512),
        (512, 512, 512, 512),
    ),
}


def _make_block(widths: Sequence[int], in_channels: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for w in widths:
        layers += [
            nn.Conv2d(in_channels, w, kernel_size=3, padding=1),
            nn.BatchNorm2d(w),
            nn.ReLU(inplace=True),
        ]
        in_channels = w
    # The block ends at BN: its ReLU is applied outside (relu0..relu4), giving tappable maps.
    return nn.Sequential(*layers[:-1])


class VGG(nn.Module):
    """Five conv-BN blocks separated by max-pools, global average pool, one linear classifier.

    As in the reference, at 32x32 input the pool after ``block3`` is skipped (``block4`` runs at
    4x4); it is applied only for 64x64 input (Tiny-ImageNet). Other sizes skip it as well.
    """

    def __init__(self, cfg: Sequence[Sequence[int]], num_classes: int = 100) -> None:
        """Build the net from per-block conv widths ``cfg`` (five blocks)."""
        super().__init__()
        if len(cfg) != 5:
            raise ValueError(f"VGG needs five blocks of conv widths, got {len(cfg)}")
        in_ch = [3] + [block[-1] for block in cfg[:-1]]
        self.block0 = _make_block(cfg[0], in_ch[0])
        self.block1 = _make_block(cfg[1], in_ch[1])
        self.block2 = _make_block(cfg[2], in_ch[2])
        self.block3 = _make_block(cfg[3], in_ch[3])
        self.block4 = _make_block(cfg[4], in_ch[4])
        # Parameter-free, out-of-place ReLUs: their outputs are the stage maps.
        self.relu0 = nn.ReLU()
        self.relu1 = nn.ReLU()
        self.relu2 = nn.ReLU()
        self.relu3 = nn.ReLU()
        self.relu4 = nn.ReLU()
        self.pool0 = nn.MaxPool2d(kernel_size=2, stride=2)
        self.pool1 = nn.MaxPool2d(kernel_size=2, stride=2)
        self.pool2 = nn.MaxPool2d(kernel_size=2, stride=2)
        self.pool3 = nn.MaxPool2d(kernel_size=2, stride=2)
        self.pool4 = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(cfg[4][-1], num_classes)

        init_weights(self, conv="fan_out", linear="normal")

        self.tap_spec = TapSpec(
            feat="relu4",
            feat_channels=cfg[4][-1],
            classifier="classifier",
            stages=("relu0", "relu1", "relu2", "relu3", "relu4"),
            stage_channels=tuple(block[-1] for block in cfg),
            # RepDistiller / mdistiller's preact_feats: the stem's post-ReLU map (what pool0
            # reads), then each block's BN output before its ReLU.
            preact_stages=("pool0", "relu1", "relu2", "relu3", "relu4"),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return logits; ``relu4``'s output goes straight to pooling and ``classifier``."""
        pool_before_last = x.shape[2] == 64
        x = self.pool0(self.relu0(self.block0(x)))
        x = self.pool1(self.relu1(self.block1(x)))
        x = self.pool2(self.relu2(self.block2(x)))
        x = self.relu3(self.block3(x))
        if pool_before_last:
            x = self.pool3(x)
        x = self.relu4(self.block4(x))
        return self.classifier(torch.flatten(self.pool4(x), 1))


@register_model("vgg8")
def vgg8(num_classes: int = 100, **kwargs: object) -> VGG:
    """VGG-8 with BN (RepDistiller ``vgg8_bn``), the usual student of vgg13."""
    return VGG(_CFGS["vgg8"], num_classes=num_classes, **kwargs)


@register_model("vgg11")
def vgg11(num_classes: int = 100, **kwargs: object) -> VGG:
    """VGG-11 with BN (RepDistiller ``vgg11_bn``)."""
    return VGG(_CFGS["vgg11"], num_classes=num_classes, **kwargs)


@register_model("vgg13")
def vgg13(num_classes: int = 100, **kwargs: object) -> VGG:
    """VGG-13 with BN (RepDistiller ``vgg13_bn``), a published CRD teacher."""
    return VGG(_CFGS["vgg13"], num_classes=num_classes, **kwargs)


@register_model("vgg16")
def vgg16(num_classes: int = 100, **kwargs: object) -> VGG:
    """VGG-16 with BN (RepDistiller ``vgg16_bn``)."""
    return VGG(_CFGS["vgg16"], num_classes=num_classes, **kwargs)


@register_model("vgg19")
def vgg19(num_classes: int = 100, **kwargs: object) -> VGG:
    """VGG-19 with BN (RepDistiller ``vgg19_bn``)."""
    return VGG(_CFGS["vgg19"], num_classes=num_classes, **kwargs)
