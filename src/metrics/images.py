"""Image checks and conversions shared by the feature extractors (pixels in [-1, 1], docs/data.md#pixels-and-latents)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def to_rgb01(images: Tensor) -> Tensor:
    """(B, 1 or 3, H, W) pixels in [-1, 1] -> (B, 3, H, W) float32 in [0, 1] (grey repeated to 3 channels)."""
    if not isinstance(images, Tensor) or images.ndim != 4 or images.shape[1] not in (1, 3):
        shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise ValueError(f"images must be a (B, C, H, W) tensor with C = 1 or 3, got {shape}")
    x = ((images.float() + 1.0) / 2.0).clamp(0.0, 1.0)
    return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x


def to_uint8(images: Tensor) -> Tensor:
    """(B, 1 or 3, H, W) pixels in [-1, 1] -> (B, 3, H, W) uint8, rounded as when saving a PNG."""
    return (to_rgb01(images) * 255.0).round().to(torch.uint8)


def resize_center_crop(x: Tensor, size: tuple[int, int]) -> Tensor:
    """Resize the shorter side to fit `size` (bicubic, antialiased), then centre-crop (open_clip's default)."""
    h, w = x.shape[-2:]
    if (h, w) == tuple(size):
        return x
    scale = max(size[0] / h, size[1] / w)
    new = (max(size[0], round(h * scale)), max(size[1], round(w * scale)))
    x = F.interpolate(x, size=new, mode="bicubic", align_corners=False, antialias=True).clamp(0.0, 1.0)
    top, left = (new[0] - size[0]) // 2, (new[1] - size[1]) // 2
    return x[..., top : top + size[0], left : left + size[1]]
