"""UCI handwritten digits (shipped with scikit-learn) as a captioned 16x16 dataset (other sizes on request): the ImageNet analogue (docs/data.md#digits)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from src.data.captioned import CaptionedImages, check_split

IMAGE_SIZE = 16
CHANNELS = 1
EVAL_SIZE = 297  # 1797 - 1500: a stratified held-out split, the COCO analogue
SPLIT_SEED = 0
WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# Several names per class, drawn at random per image, as the paper does with ImageNet synonyms (docs/data.md#digits).
DIGIT_NAMES: dict[int, tuple[str, ...]] = {
    d: (w, str(d), f"digit {w}", f"number {w}", f"handwritten {w}") + (("nought",) if d == 0 else ())
    for d, w in enumerate(WORDS)
}


def digit_caption(name: str) -> str:
    """The paper's ImageNet caption template, "a photo of a <class name>"."""
    return f"a photo of a {name}"


def class_captions() -> list[list[str]]:
    """Every caption of every class, indexed by digit (for zero-shot classification by prompt ensembling)."""
    return [[digit_caption(n) for n in DIGIT_NAMES[d]] for d in range(10)]


def upsample_digits(raw: np.ndarray, image_size: int = IMAGE_SIZE) -> torch.Tensor:
    """Raw 8x8 digits with values 0..16, shape (N, 64) -> (N, 1, S, S) float32 in [-1, 1] (bilinear; S = 16)."""
    x = torch.as_tensor(raw, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0
    x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)
    return (x * 2.0 - 1.0).clamp(-1.0, 1.0)


def split_indices(split: str) -> np.ndarray:
    """Sorted indices into load_digits() of the fixed, stratified train or eval split."""
    check_split(split)
    labels = load_digits().target
    train, held_out = train_test_split(
        np.arange(len(labels)), test_size=EVAL_SIZE, stratify=labels, random_state=SPLIT_SEED
    )
    return np.sort(train if split == "train" else held_out)


def load_digits_split(split: str, seed: int = 0, image_size: int = IMAGE_SIZE) -> CaptionedImages:
    """The train or eval split of the digits; seed picks each image's class name (fixed per image); image_size:
    the side the 8x8 originals are upsampled to (the same digits and captions at every size)."""
    data = load_digits()
    rng = np.random.default_rng(seed)
    choice = rng.random(len(data.target))  # one draw per image over the whole set: captions do not depend on split
    idx = split_indices(split)
    captions, extras = [], []
    for i in idx:
        d = int(data.target[i])
        names = DIGIT_NAMES[d]
        name = names[int(choice[i] * len(names))]
        captions.append(digit_caption(name))
        extras.append({"label": d, "name": name, "source_index": int(i)})
    return CaptionedImages(
        images=upsample_digits(data.data[idx], image_size),
        captions=captions,
        labels=torch.as_tensor(data.target[idx], dtype=torch.long),
        extras=extras,
    )
