"""The embedded datasets (digits, shapes) written once as shards with precomputed text embeddings (docs/data.md#embedded-datasets)."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Callable

import torch

from src.data import digits, shapes
from src.data.captioned import SPLITS, CaptionedImages
from src.data.shards import ShardWriter, is_complete, read_meta
from src.utils.io import file_lock

DATA_VERSION = 1  # bump when the generated images, captions or shard layout change
SAMPLES_PER_SHARD = 250  # several shards per split, so ranks and loader workers each get some
ENCODE_BATCH = 256
DATASETS: dict[str, Callable[[str], CaptionedImages]] = {
    "digits": digits.load_digits_split,
    "shapes": shapes.load_shapes_split,
}


IMAGE_SIZE = 16  # the default side of both datasets
IMAGE_SIZES = range(8, 65, 8)  # multiples of 8 (the digits' native size) up to 64


def check_image_size(image_size) -> int:
    """Return image_size if the embedded datasets can be made at it, else raise."""
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size not in IMAGE_SIZES:
        raise ValueError(f"image_size={image_size!r} is not allowed; allowed: a multiple of 8 from 8 to 64 "
                         f"(default {IMAGE_SIZE})")
    return image_size


def check_dataset(name: str) -> str:
    """Return name if it is an embedded dataset, else raise."""
    if name not in DATASETS:
        raise ValueError(f"dataset={name!r} is not an embedded dataset; allowed: {', '.join(DATASETS)}")
    return name


def encoder_fingerprint(text_encoder) -> str:
    """What identifies the encoder's outputs: its fingerprint (name plus weights checksum) or, failing that, name."""
    return str(getattr(text_encoder, "fingerprint", text_encoder.name))


def dataset_version(text_encoder) -> str:
    """Cache version: the data version plus a short hash of the encoder, so a retrained encoder gets new shards."""
    digest = hashlib.sha256(encoder_fingerprint(text_encoder).encode()).hexdigest()[:10]
    return f"v{DATA_VERSION}-{digest}"


@torch.no_grad()
def write_split(shard_dir: Path, data: CaptionedImages, text_encoder, meta: dict,
                latent_mean: float | None = None, latent_std: float | None = None) -> dict:
    """Encode one split's captions and write its shards (pixel space: the latent is the image)."""
    with ShardWriter(shard_dir, encoder_names=[text_encoder.name], samples_per_shard=SAMPLES_PER_SHARD,
                     latent_mean=latent_mean, latent_std=latent_std,
                     extra_meta={**meta, "encoder_fingerprints": [encoder_fingerprint(text_encoder)]}) as writer:
        for start in range(0, len(data), ENCODE_BATCH):
            stop = min(start + ENCODE_BATCH, len(data))
            context, pooled = text_encoder(data.captions[start:stop])
            for i in range(start, stop):
                writer.write(data.images[i], context[i - start], pooled[i - start], data.captions[i], data.extras[i])
    return read_meta(shard_dir)


def prepare_embedded(name: str, cache_dir: str | Path, text_encoder=None,
                     image_size: int = IMAGE_SIZE) -> dict[str, Path]:
    """Write dataset `name` once into cache_dir/<name>-<version>/{train,eval}/ and return those folders.

    image_size: the side of the images (the same scenes and captions at every size); sizes other than the default
    get their own folder, <name>-<size>px-<version>. text_encoder: a TextEncoder; None loads the committed tiny CLIP. Complete folders are reused; incomplete ones
    are rebuilt. A file lock makes concurrent callers safe: one writes, the others wait and reuse. The eval split
    is normalised with the training split's latent mean and std.
    """
    check_dataset(name)
    check_image_size(image_size)
    if text_encoder is None:
        from src.text.encoder import load_tiny_clip_text_encoder  # lazy: open_clip is only needed here
        text_encoder = load_tiny_clip_text_encoder()
    version = dataset_version(text_encoder)
    folder = name if image_size == IMAGE_SIZE else f"{name}-{image_size}px"
    root = Path(cache_dir) / f"{folder}-{version}"
    dirs = {split: root / split for split in SPLITS}
    if all(is_complete(d) for d in dirs.values()):
        return dirs
    with file_lock(Path(cache_dir) / f".{folder}-{version}.lock"):
        if all(is_complete(d) for d in dirs.values()):  # another process finished while we waited
            return dirs
        common = {"dataset": name, "version": version, "image_size": image_size}
        load = DATASETS[name]
        train = write_split(dirs["train"], load("train", image_size=image_size), text_encoder,
                            {**common, "split": "train"})
        write_split(dirs["eval"], load("eval", image_size=image_size), text_encoder, {**common, "split": "eval"},
                    latent_mean=train["latent_mean"], latent_std=train["latent_std"])
    return dirs
