"""Image decoding, resizing and centre-cropping inside DataLoader workers; unreadable items become skip records."""

from __future__ import annotations

import io
import re
import warnings

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import Dataset


MEMORY_ADDRESS = re.compile(r" ?<[\w.]+ object at 0x[0-9a-f]+>")  # PIL names the BytesIO it could not read
MAX_ASPECT = 4  # longer / shorter side kept before resizing: a 1 x 20000 banner would otherwise take gigabytes
HIGH_DEPTH_MODES = ("I;16", "I;16L", "I;16B", "I;16N")  # 16-bit grey (PNG, TIFF): 0..65535


def resize_center_crop(image: Image.Image, resolution: int) -> Image.Image:
    """Resize so the shorter side is `resolution` (bicubic, antialiased), then crop the centre square.

    An image longer than MAX_ASPECT times its shorter side is first cut to its centre MAX_ASPECT : 1 part, which
    holds the square and its neighbourhood: the same square, without resizing the whole strip.
    """
    w, h = image.size
    if max(w, h) > MAX_ASPECT * min(w, h):
        cw, ch = min(w, MAX_ASPECT * h), min(h, MAX_ASPECT * w)
        image = image.crop(((w - cw) // 2, (h - ch) // 2, (w - cw) // 2 + cw, (h - ch) // 2 + ch))
        w, h = image.size
    scale = resolution / min(w, h)
    nw, nh = max(resolution, round(w * scale)), max(resolution, round(h * scale))
    image = image.resize((nw, nh), Image.BICUBIC)
    left, top = (nw - resolution) // 2, (nh - resolution) // 2
    return image.crop((left, top, left + resolution, top + resolution))


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB. PIL's own conversion clips 16-bit grey to 255 (an all-white image), so it is scaled here; 32-bit
    integer and float pixels have no defined range and are refused (the item is skipped and logged)."""
    if image.mode in HIGH_DEPTH_MODES:
        grey = np.asarray(image).astype(np.float32) / 257.0  # 65535 -> 255
        return Image.fromarray(np.clip(np.round(grey), 0, 255).astype(np.uint8)).convert("RGB")
    if image.mode in ("I", "F"):
        raise ValueError(f"image mode {image.mode!r} (32-bit pixels of no defined range) is not supported; "
                         "convert it to 8 or 16 bits")
    return image.convert("RGB")


def decode_image(data: bytes, resolution: int) -> torch.Tensor:
    """Encoded image bytes -> (3, R, R) float32 in [-1, 1]; raises on corrupt or truncated data."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # palette-with-transparency and EXIF warnings; errors still raise
        image = Image.open(io.BytesIO(data))
        image.load()
        image = to_rgb(ImageOps.exif_transpose(image))
    pixels = np.asarray(resize_center_crop(image, resolution), dtype=np.float32)
    return torch.from_numpy(pixels).permute(2, 0, 1) / 127.5 - 1.0


class PreparedImages(Dataset):
    """Item index -> dict with pixels, caption and extras, or a skip record {"index", "skip": reason}."""

    def __init__(self, source, resolution: int):
        self.source, self.resolution = source, resolution

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> dict:
        try:
            record = self.source.read(index)
            pixels = decode_image(record.data, self.resolution)
        except Exception as e:  # any unreadable item is skipped and logged, never fatal
            message = MEMORY_ADDRESS.sub("", f"{type(e).__name__}: {e}").replace("\n", " ")  # same log every run
            return {"index": index, "skip": message[:300], "source": self.source.describe(index)}
        return {"index": index, "pixels": pixels, "caption": record.caption, "key": record.key,
                "extras": record.extras}


def collate_prepared(samples: list[dict]) -> dict:
    """A batch: stacked pixels of the readable items, their captions/extras/indices, and the skip records."""
    ok = [s for s in samples if "skip" not in s]
    return {
        "pixels": torch.stack([s["pixels"] for s in ok]) if ok else None,
        "captions": [s["caption"] for s in ok],
        "extras": [s["extras"] for s in ok],
        "indices": [s["index"] for s in ok],
        "skipped": [{"index": s["index"], "source": s["source"], "error": s["skip"]} for s in samples if "skip" in s],
    }
