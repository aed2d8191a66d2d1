"""The in-memory form of a small captioned image dataset (digits, shapes) before it becomes shards."""

from __future__ import annotations

from dataclasses import dataclass

import torch

SPLITS = ("train", "eval")


@dataclass(frozen=True)
class CaptionedImages:
    """Images (N, C, H, W) float32 in [-1, 1], one caption and one integer label per image, per-image extras."""

    images: torch.Tensor
    captions: list[str]
    labels: torch.Tensor
    extras: list[dict]

    def __post_init__(self):
        n = self.images.shape[0]
        if not (len(self.captions) == len(self.labels) == len(self.extras) == n):
            raise ValueError(
                f"CaptionedImages: images ({n}), captions ({len(self.captions)}), labels ({len(self.labels)}) "
                f"and extras ({len(self.extras)}) must have the same length"
            )

    def __len__(self) -> int:
        return self.images.shape[0]


def check_split(split: str) -> str:
    """Return split if it is a known split name, else raise."""
    if split not in SPLITS:
        raise ValueError(f"split={split!r} is not a dataset split; allowed: {', '.join(SPLITS)}")
    return split
