"""Plain vision transformers for CIFAR-sized inputs: the zoo's ViT students and teachers.

The "simple ViT" of Beyer, Zhai & Kolesnikov (2022, "Better plain ViT baselines for
ImageNet-1k"): a patch-embedding conv, fixed 2-D sin-cos position embeddings (so one model takes
any image size), pre-norm transformer blocks, a final LayerNorm, global average pooling over the
patch tokens (no class token) and a linear head. Each block reads and returns its tokens laid out
on their patch grid, ``(B, D, H/p, W/p)``, so the zoo's tap contract holds as for a CNN: the
final norm's output is the map global pooling reads, FT takes its ``map`` form and merges into
the head. (ViTs with a class token, as timm's, are read as token sequences: see
:mod:`normkd.models.taps`.)

Registered: ``vit_nano_p2`` (digits-sized, ~0.1M parameters), ``vit_mini_p4`` (CPU-sized for
CIFAR, ~0.2M parameters), ``vit_tiny_p4`` and ``vit_small_p4`` (DeiT-Tiny / -Small widths and
depth at patch size 4, 64 tokens at 32x32).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from normkd.models.registry import register_model
from normkd.models.taps import TapSpec


def sincos_2d(dim: int, h: int, w: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Fixed 2-D sin-cos position embeddings ``(dim, h, w)`` (a quarter of the channels each for
    sin/cos of rows/columns, frequencies 1 / 10000^(i / (dim/4)))."""
    if dim % 4:
        raise ValueError(f"ViT width must be a multiple of 4 for 2-D sin-cos embeddings, got {dim}")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, device=device, dtype=torch.float32) / (dim // 4))
    ys = torch.arange(h, device=device, dtype=torch.float32)[:, None] * omega  # (h, dim/4)
    xs = torch.arange(w, device=device, dtype=torch.float32)[:, None] * omega  # (w, dim/4)
    parts = [
        xs.sin().T[:, None, :].expand(-1, h, -1),
        xs.cos().T[:, None, :].expand(-1, h, -1),
        ys.sin().T[:, :, None].expand(-1, -1, w),
        ys.cos().T[:, :, None].expand(-1, -1, w),
    ]
    return torch.cat(parts, 0).to(dtype)


class PatchEmbed(nn.Module):
    """Non-overlapping ``p x p`` patches -> ``dim`` channels, plus the position embeddings."""

    def __init__(self, patch_size: int, dim: int, in_chans: int = 3) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, dim, patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x)
        return x + sincos_2d(x.shape[1], x.shape[2], x.shape[3], x.device, x.dtype)


class Attention(nn.Module):
    """Multi-head self-attention over a ``(B, T, D)`` sequence."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"ViT width {dim} is not a multiple of its {heads} heads")
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        b, n, d = t.shape
        q, k, v = self.qkv(t).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class Block(nn.Module):
    """Pre-norm transformer block on tokens held as a ``(B, D, H, W)`` grid."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, d, h, w = x.shape
        t = x.flatten(2).transpose(1, 2)
        t = t + self.attn(self.norm1(t))
        t = t + self.mlp(self.norm2(t))
        return t.transpose(1, 2).reshape(b, d, h, w)


class GridNorm(nn.LayerNorm):
    """LayerNorm over the channels of each token of a ``(B, D, H, W)`` grid."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def quarter_blocks(depth: int) -> tuple[int, ...]:
    """Indices of the blocks that end the first three quarters of ``depth`` blocks (ResNet-like
    stages for AT / FitNet; fewer for shallow models)."""
    k = min(depth, 4)
    return tuple(round(depth * j / k) - 1 for j in range(1, k))


class ViT(nn.Module):
    """Simple ViT: patches + sin-cos positions, ``depth`` blocks, LayerNorm, mean pool, head."""

    def __init__(
        self,
        num_classes: int = 100,
        patch_size: int = 4,
        dim: int = 192,
        depth: int = 12,
        heads: int = 3,
        mlp_ratio: float = 4.0,
    ) -> None:
        super().__init__()
        for key, v in (
            ("patch_size", patch_size),
            ("dim", dim),
            ("depth", depth),
            ("heads", heads),
        ):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"ViT {key} must be a positive integer, got {v!r}")
        self.patch_embed = PatchEmbed(patch_size, dim)
        self.blocks = nn.Sequential(*(Block(dim, heads, mlp_ratio) for _ in range(depth)))
        self.norm = GridNorm(dim)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(dim, num_classes)
        stages = (*(f"blocks.{i}" for i in quarter_blocks(depth)), "norm")
        self.tap_spec = TapSpec(
            feat="norm",
            feat_channels=dim,
            classifier="head",
            stages=stages,
            stage_channels=(dim,) * len(stages),
        )
        self.apply(_init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(self.blocks(self.patch_embed(x)))
        return self.head(self.pool(x).flatten(1))


def _init(m: nn.Module) -> None:
    """timm's ViT init: truncated-normal (std 0.02) linear weights, zero biases; the patch conv
    as a linear layer on the flattened patch (LeCun-normal-like fan-in scaling)."""
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        nn.init.zeros_(m.bias)
    elif isinstance(m, nn.Conv2d):
        fan_in = m.in_channels * m.kernel_size[0] * m.kernel_size[1]
        nn.init.trunc_normal_(m.weight, std=math.sqrt(1.0 / fan_in))
        nn.init.zeros_(m.bias)


def _build(defaults: dict[str, int], num_classes: int, kwargs: dict[str, object]) -> ViT:
    allowed = {"patch_size", "dim", "depth", "heads", "mlp_ratio"}
    unknown = sorted(set(kwargs) - allowed)
    if unknown:
        raise ValueError(f"ViT got unexpected arguments {unknown}; it takes {sorted(allowed)}")
    return ViT(num_classes, **{**defaults, **kwargs})  # type: ignore[arg-type]


@register_model("vit_nano_p2")
def vit_nano_p2(num_classes: int = 10, **kwargs: object) -> ViT:
    """Width 64, 2 blocks, 2 heads, patch 2: a ~0.1M-parameter ViT for 8x8 digits (4x4 tokens)."""
    return _build({"patch_size": 2, "dim": 64, "depth": 2, "heads": 2}, num_classes, kwargs)


@register_model("vit_mini_p4")
def vit_mini_p4(num_classes: int = 100, **kwargs: object) -> ViT:
    """Width 64, 4 blocks, 2 heads, patch 4: a ~0.2M-parameter ViT whose CIFAR step costs about
    what resnet8's does, so a mixed pair trains on a 2-core CPU."""
    return _build({"patch_size": 4, "dim": 64, "depth": 4, "heads": 2}, num_classes, kwargs)


@register_model("vit_tiny_p4")
def vit_tiny_p4(num_classes: int = 100, **kwargs: object) -> ViT:
    """DeiT-Tiny's width and depth (192, 12 blocks, 3 heads) on 4x4 patches: ~5.4M parameters."""
    return _build({"patch_size": 4, "dim": 192, "depth": 12, "heads": 3}, num_classes, kwargs)


@register_model("vit_small_p4")
def vit_small_p4(num_classes: int = 100, **kwargs: object) -> ViT:
    """DeiT-Small's width and depth (384, 12 blocks, 6 heads) on 4x4 patches: ~21M parameters."""
    return _build({"patch_size": 4, "dim": 384, "depth": 12, "heads": 6}, num_classes, kwargs)
