"""Procedural 16x16 coloured shapes with compositional captions: the CC12M analogue (docs/data.md#shapes)."""

from __future__ import annotations

import numpy as np
import torch

from src.data.captioned import CaptionedImages, check_split

IMAGE_SIZE = 16
CHANNELS = 3
SUPERSAMPLE = 4  # render at 4x and box-filter down: anti-aliased edges
SPLIT_SIZES = {"train": 4000, "eval": 500}
SPLIT_STREAMS = {"train": 0, "eval": 1}  # independent random streams per split

COLORS: dict[str, tuple[float, float, float]] = {
    "red": (0.92, 0.12, 0.10),
    "green": (0.15, 0.80, 0.18),
    "blue": (0.15, 0.30, 1.00),
    "yellow": (0.95, 0.88, 0.12),
    "magenta": (0.90, 0.15, 0.85),
    "cyan": (0.12, 0.88, 0.90),
}
SHAPES = ("circle", "square", "triangle", "cross")
# Shape centres in pixel units (0..16): the four quadrants and the centre.
POSITIONS: dict[str, tuple[float, float]] = {
    "top left": (4.5, 4.5),
    "top right": (11.5, 4.5),
    "bottom left": (4.5, 11.5),
    "bottom right": (11.5, 11.5),
    "center": (8.0, 8.0),
}
NUM_CLASSES = len(COLORS) * len(SHAPES) * len(POSITIONS)


def shape_caption(color: str, shape: str, position: str) -> str:
    """Compositional caption, e.g. "a red circle in the top left"."""
    return f"a {color} {shape} in the {position}"


def label_attributes(label: int) -> tuple[str, str, str]:
    """(color, shape, position) of a class label; labels enumerate colours, then shapes, then positions."""
    if not 0 <= label < NUM_CLASSES:
        raise ValueError(f"label={label} is not a shapes class; allowed: 0..{NUM_CLASSES - 1}")
    c, rest = divmod(label, len(SHAPES) * len(POSITIONS))
    s, p = divmod(rest, len(POSITIONS))
    return list(COLORS)[c], SHAPES[s], list(POSITIONS)[p]


def class_captions() -> list[str]:
    """The caption of every class, indexed by label (the distinct captions of the dataset)."""
    return [shape_caption(*label_attributes(k)) for k in range(NUM_CLASSES)]


def shape_mask(shape: str, dx: np.ndarray, dy: np.ndarray, r: float) -> np.ndarray:
    """Boolean inside-test of a shape of radius r at offsets (dx, dy) from its centre (y grows downwards)."""
    if shape == "circle":
        return dx**2 + dy**2 <= r**2
    if shape == "square":
        return np.maximum(np.abs(dx), np.abs(dy)) <= 0.85 * r
    if shape == "triangle":  # apex up, base at 0.8 r below the centre
        half_width = (dy + r) / (1.8 * r) * 1.05 * r
        return (dy >= -r) & (dy <= 0.8 * r) & (np.abs(dx) <= half_width)
    if shape == "cross":
        arm = 0.36 * r
        return ((np.abs(dx) <= arm) & (np.abs(dy) <= r)) | ((np.abs(dy) <= arm) & (np.abs(dx) <= r))
    raise ValueError(f"shape={shape!r} is not a known shape; allowed: {', '.join(SHAPES)}")


def render(color: tuple[float, float, float], shape: str, centre: tuple[float, float], r: float,
           background: float, image_size: int = IMAGE_SIZE) -> np.ndarray:
    """One anti-aliased (3, S, S) image with values in [0, 1]; centre and r in pixels of that size."""
    n = image_size * SUPERSAMPLE
    coords = (np.arange(n) + 0.5) / SUPERSAMPLE
    yy, xx = np.meshgrid(coords, coords, indexing="ij")
    mask = shape_mask(shape, xx - centre[0], yy - centre[1], r).astype(np.float32)
    coverage = mask.reshape(image_size, SUPERSAMPLE, image_size, SUPERSAMPLE).mean(axis=(1, 3))
    rgb = np.asarray(color, dtype=np.float32)[:, None, None]
    return background * (1.0 - coverage) + rgb * coverage


def load_shapes_split(split: str, seed: int = 0, n: int | None = None,
                      image_size: int = IMAGE_SIZE) -> CaptionedImages:
    """The train or eval split (4000 / 500 images by default), deterministic in (seed, split); classes balanced.

    image_size: the side in pixels; the scene (positions, sizes, colours, captions) is the same at every size,
    drawn in units of the 16-pixel default and scaled, so only the sampling grid changes."""
    check_split(split)
    n = SPLIT_SIZES[split] if n is None else n
    if n < 1:
        raise ValueError(f"n={n} images is not allowed; need n >= 1")
    rng = np.random.default_rng([seed, SPLIT_STREAMS[split]])
    # Balanced classes: repeat a permutation of all labels, each repetition freshly shuffled.
    reps = -(-n // NUM_CLASSES)
    labels = np.concatenate([rng.permutation(NUM_CLASSES) for _ in range(reps)])[:n]
    images = np.empty((n, CHANNELS, image_size, image_size), dtype=np.float32)
    scale = image_size / IMAGE_SIZE
    captions, extras = [], []
    for k, label in enumerate(labels):
        color, shape, position = label_attributes(int(label))
        jitter_rgb = rng.uniform(-0.08, 0.08, size=3)
        rgb = tuple(np.clip(np.asarray(COLORS[color]) + jitter_rgb, 0.0, 1.0))
        cx, cy = POSITIONS[position]
        centre = (cx + rng.uniform(-0.75, 0.75), cy + rng.uniform(-0.75, 0.75))
        r = rng.uniform(2.6, 3.4)
        background = rng.uniform(0.0, 0.15)
        images[k] = render(rgb, shape, (centre[0] * scale, centre[1] * scale), r * scale, background, image_size)
        captions.append(shape_caption(color, shape, position))
        extras.append({"label": int(label), "color": color, "shape": shape, "position": position})
    return CaptionedImages(
        images=torch.from_numpy(images * 2.0 - 1.0),
        captions=captions,
        labels=torch.as_tensor(labels, dtype=torch.long),
        extras=extras,
    )
