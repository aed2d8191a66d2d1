"""From the normalised latents the backbone produces to pixels in [-1, 1], for the evaluation (docs/data.md#pixels-and-latents, docs/evaluation.md#samples-and-prompts).

Pixel-space shards (the identity autoencoder) are un-normalised; latent shards are un-normalised with the
global mean and std and decoded by the frozen AutoencoderKL they were encoded with, loaded from a local path.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import Tensor

from src.config import ConfigError
from src.data.shards import IDENTITY_AUTOENCODER, decode_latents


def autoencoder_source(meta: dict, autoencoder_path: str | None = None) -> tuple[Path, str | None] | None:
    """(the autoencoder's folder or single weights file, its config folder for a single file) that decodes the
    shards' latents: eval.autoencoder_path, else the one meta.json names; None for pixel-space shards. A missing
    one is a configuration error, raised before training (src.training.prepare.prepare_job) as well as here."""
    if meta.get("autoencoder", IDENTITY_AUTOENCODER) == IDENTITY_AUTOENCODER:
        return None
    path = autoencoder_path or meta.get("autoencoder_path")
    if not path or not Path(path).exists():
        raise ConfigError(
            f"eval.autoencoder_path={path}: the shards hold {meta['autoencoder']} latents; give the local folder of "
            "that AutoencoderKL to decode samples for CLIP score and FID"
        )
    return Path(path), meta.get("autoencoder_config")


def decoder_name(meta: dict, autoencoder_path: str | None = None, cache_dir: str | os.PathLike | None = None
                 ) -> str | None:
    """Names the decoder by content, "<meta's autoencoder>:<sha256[:12]>" of its files' sha256 (weights and config),
    so an autoencoder replaced at its path, or another one given with eval.autoencoder_path, is another decoder: the
    records and the reference statistics it changes are computed again. None for pixel-space shards. Each file is
    hashed once per version (src.utils.io.weights_sha256, remembered under cache_dir)."""
    source = autoencoder_source(meta, autoencoder_path)
    if source is None:
        return None
    from src.preprocess.autoencoders import autoencoder_digest

    path, config = source
    return f"{meta['autoencoder']}:{autoencoder_digest(path, config, cache_dir)}"


def make_decoder(meta: dict, autoencoder_path: str | None = None, device: str | torch.device = "cpu",
                 batch_size: int = 64) -> Callable[[Tensor], Tensor]:
    """A function: normalised latents (B, C, h, w) -> pixels (B, 3 or C, H, W) in [-1, 1]."""
    source = autoencoder_source(meta, autoencoder_path)
    if source is None:
        return lambda x: decode_latents(x, meta)
    from src.preprocess.autoencoders import DiffusersAutoencoder

    path, config = source
    autoencoder = DiffusersAutoencoder(str(path), device=str(device), config=config)
    mean, std = meta["latent_mean"], meta["latent_std"]

    def decode(x: Tensor) -> Tensor:
        return torch.cat([autoencoder.decode(chunk * std + mean) for chunk in x.split(batch_size)])

    return decode


def reference_images(eval_set: dict, decode: Callable[[Tensor], Tensor], batch_size: int = 256
                     ) -> Tensor | Iterator[Tensor]:
    """The evaluation images: stored pixels for pixel-space shards, else the autoencoder's reconstructions of the
    evaluation latents (so FID measures the generative model, not the autoencoder), a batch at a time: all at once,
    COCO-2014 val's 40,504 at 256 px would take 32 GB. The latents are normalised as the training split's
    (load_eval_set's stats), which `decode` un-normalises with."""
    if eval_set.get("images") is not None:
        return eval_set["images"]
    return _reconstructions(eval_set["x0"], decode, batch_size)


def _reconstructions(x0: Tensor, decode: Callable[[Tensor], Tensor], batch_size: int) -> Iterator[Tensor]:
    for chunk in x0.split(batch_size):
        with torch.no_grad():
            yield decode(chunk)
