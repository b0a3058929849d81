"""The weight initialisations of the reference architectures, written once.

Each zoo model names the scheme its reference code uses; the two conv schemes draw the same
distribution but are kept apart because they compute the standard deviation differently
(``sqrt(2 / fan_out)`` vs ``sqrt(2) / sqrt(fan_out)``), and published-accuracy reproductions
start from the reference's exact draws.
"""

from __future__ import annotations

import math
from typing import Literal

from torch import nn


def init_weights(
    model: nn.Module,
    conv: Literal["kaiming", "fan_out"],
    linear: Literal["default", "zero_bias", "normal"] = "default",
    norms: tuple[type[nn.Module], ...] = (nn.BatchNorm2d,),
) -> None:
    """He-normal (fan-out) convs, unit-scale zero-shift norms, and the classifier as asked.

    conv: ``kaiming`` is torchvision's ``kaiming_normal_(mode="fan_out")`` (conv bias kept);
    ``fan_out`` is RepDistiller's ``normal_(0, sqrt(2 / (k*k*out)))`` with conv bias zeroed.
    linear: ``default`` keeps PyTorch's init, ``zero_bias`` zeroes the bias, ``normal`` draws
    N(0, 0.01) weights and a zero bias.
    """
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            if conv == "kaiming":
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            else:
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        elif isinstance(m, norms):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear) and linear != "default":
            if linear == "normal":
                nn.init.normal_(m.weight, 0.0, 0.01)
            nn.init.zeros_(m.bias)
