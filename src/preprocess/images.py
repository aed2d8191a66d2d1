"""Image decoding, resizing and centre-cropping inside DataLoader workers; unreadable items become skip records."""

from __future__ import annotations

import io
import warnings

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import Dataset


def resize_center_crop(image: Image.Image, resolution: int) -> Image.Image:
    """Resize so the shorter side is `resolution` (bicubic, antialiased), then crop the centre square."""
    w, h = image.size
    scale = resolution / min(w, h)
    nw, nh = max(resolution, round(w * scale)), max(resolution, round(h * scale))
    image = image.resize((nw, nh), Image.BICUBIC)
    left, top = (nw - resolution) // 2, (nh - resolution) // 2
    return image.crop((left, top, left + resolution, top + resolution))


def decode_image(data: bytes, resolution: int) -> torch.Tensor:
    """Encoded image bytes -> (3, R, R) float32 in [-1, 1]; raises on corrupt or truncated data."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # palette-with-transparency and EXIF warnings; errors still raise
        image = Image.open(io.BytesIO(data))
        image.load()
        image = ImageOps.exif_transpose(image).convert("RGB")
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
            return {"index": index, "skip": f"{type(e).__name__}: {e}".replace("\n", " ")[:300],
                    "source": self.source.describe(index)}
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
