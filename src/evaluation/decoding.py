"""From the normalised latents the backbone produces to pixels in [-1, 1], for the evaluation (docs/data.md#pixels-and-latents, docs/evaluation.md#samples-and-prompts).

Pixel-space shards (the identity autoencoder) are un-normalised; latent shards are un-normalised with the
global mean and std and decoded by the frozen AutoencoderKL they were encoded with, loaded from a local path.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

from src.config import ConfigError
from src.data.shards import IDENTITY_AUTOENCODER, decode_latents


def make_decoder(meta: dict, autoencoder_path: str | None = None, device: str | torch.device = "cpu",
                 batch_size: int = 64) -> Callable[[Tensor], Tensor]:
    """A function: normalised latents (B, C, h, w) -> pixels (B, 3 or C, H, W) in [-1, 1]."""
    if meta.get("autoencoder", IDENTITY_AUTOENCODER) == IDENTITY_AUTOENCODER:
        return lambda x: decode_latents(x, meta)
    path = autoencoder_path or meta.get("autoencoder_path")
    if not path or not Path(path).exists():
        raise ConfigError(
            f"eval.autoencoder_path={path}: the shards hold {meta['autoencoder']} latents; give the local folder of "
            "that AutoencoderKL to decode samples for CLIP score and FID"
        )
    from src.preprocess.autoencoders import DiffusersAutoencoder

    autoencoder = DiffusersAutoencoder(str(path), device=str(device))
    mean, std = meta["latent_mean"], meta["latent_std"]

    def decode(x: Tensor) -> Tensor:
        return torch.cat([autoencoder.decode(chunk * std + mean) for chunk in x.split(batch_size)])

    return decode


def reference_images(eval_set: dict, decode: Callable[[Tensor], Tensor]) -> Tensor:
    """The evaluation images: stored pixels for pixel-space shards, else the autoencoder's reconstructions of the
    evaluation latents (so FID measures the generative model, not the autoencoder)."""
    if eval_set.get("images") is not None:
        return eval_set["images"]
    with torch.no_grad():
        return decode(eval_set["x0"])
