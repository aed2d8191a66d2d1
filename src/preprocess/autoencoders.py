"""Frozen image autoencoders for preprocessing: `identity` (pixel space) or an SD-style AutoencoderKL (diffusers).

Decision: latents are the posterior mean of the AutoencoderKL by default (`latent="mean"`, deterministic and
what the decoder reconstructs best); `latent="sample"` draws one sample per image, mean + std * noise with the
noise seeded by (seed, item index), so it does not depend on batching, workers or resumption. Latents are
stored unscaled: the VAE's own scaling_factor/shift_factor are recorded in meta.json, but training normalises by
the dataset's global mean and std instead (docs/data.md#pixels-and-latents).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from src.data.shards import IDENTITY_AUTOENCODER
from src.preprocess.sources import item_rng
from src.preprocess.text import PRECISIONS
from src.utils.io import files_digest, folder_files

LATENT_MODES = ("mean", "sample")
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".bin")


class IdentityAutoencoder:
    """Pixel space: the latent is the image in [-1, 1]."""

    name = IDENTITY_AUTOENCODER
    downsample = 1
    latent_channels = 3

    def encode(self, pixels: torch.Tensor, indices: list[int] | None = None, seed: int = 0) -> torch.Tensor:
        """Pixels (B, 3, H, W) in [-1, 1] -> the same tensor."""
        return pixels

    def describe(self) -> dict:
        """What meta.json records about the autoencoder."""
        return {"autoencoder": self.name, "autoencoder_downsample": 1}


def check_autoencoder_path(path: str, config: str | None = None) -> Path:
    """Fail before any work when the autoencoder folder or file (or a single file's config folder) is missing."""
    p = Path(path)
    if p.is_dir():
        if not ((p / "config.json").is_file() or (p / "vae" / "config.json").is_file()):
            raise FileNotFoundError(f"autoencoder={path!r} is a folder without config.json (or vae/config.json); "
                                    f"expected a diffusers AutoencoderKL saved with save_pretrained")
    elif p.is_file():
        if p.suffix not in SINGLE_FILE_SUFFIXES:
            raise ValueError(f"autoencoder={path!r} has suffix {p.suffix!r}; allowed single files: "
                             f"{', '.join(SINGLE_FILE_SUFFIXES)}, or a diffusers folder")
        if config is None or not (Path(config) / "config.json").is_file():
            raise FileNotFoundError(f"autoencoder_config={config!r}: a single-file autoencoder needs a local folder "
                                    f"with its diffusers config.json (no hub access here)")
    else:
        raise FileNotFoundError(f"autoencoder={path!r} does not exist; give a diffusers AutoencoderKL folder, a "
                                f"single weights file with autoencoder_config, or {IDENTITY_AUTOENCODER!r}")
    return p


def autoencoder_digest(path: str | os.PathLike, config: str | os.PathLike | None = None,
                       cache_dir: str | os.PathLike | None = None) -> str:
    """sha256[:12] over the sha256 of the autoencoder's files (weights and config; a pipeline folder's vae/ only,
    a single file's config folder too): its identity, whatever its folder is called. Each file is hashed once per
    version (src.utils.io.weights_sha256, remembered under cache_dir)."""
    path = Path(path)
    if path.is_dir() and not (path / "config.json").is_file() and (path / "vae" / "config.json").is_file():
        path = path / "vae"  # a whole pipeline's folder: only its autoencoder encodes and decodes
    files = folder_files(path) if path.is_dir() else {path.name: path}
    if config is not None:
        files["config/config.json"] = Path(config) / "config.json"
    return files_digest(files, cache_dir)


class DiffusersAutoencoder:
    """An SD-style diffusers AutoencoderKL from a local folder (save_pretrained layout) or a single weights file."""

    def __init__(self, path: str, device: str = "cpu", precision: str = "float32", latent: str = "mean",
                 config: str | None = None, cache_dir: str | None = None):
        from diffusers import AutoencoderKL

        if latent not in LATENT_MODES:
            raise ValueError(f"latent={latent!r} is not allowed; allowed: {', '.join(LATENT_MODES)}")
        p = check_autoencoder_path(path, config)
        dtype = PRECISIONS[precision]
        if p.is_file():
            vae = AutoencoderKL.from_single_file(str(p), config=str(config), local_files_only=True, torch_dtype=dtype)
        else:
            sub = {} if (p / "config.json").is_file() else {"subfolder": "vae"}
            vae = AutoencoderKL.from_pretrained(str(p), local_files_only=True, torch_dtype=dtype, **sub)
        self.vae = vae.to(device).eval().requires_grad_(False)
        # Absolute: meta.json's autoencoder_path is what the evaluation decodes with, from wherever training runs.
        self.path, self.latent, self.dtype = str(Path(path).resolve()), latent, dtype
        # A single file's config folder: the evaluation needs it too to build the decoder from the file.
        self.config = str(Path(config).resolve()) if p.is_file() and config is not None else None
        self.device = torch.device(device)
        self.cache_dir = cache_dir  # where its files' checksums are remembered (autoencoder_digest)
        cfg = self.vae.config
        self.name = f"AutoencoderKL:{Path(path).name}"
        self.downsample = 2 ** (len(cfg.block_out_channels) - 1)
        self.latent_channels = int(cfg.latent_channels)

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor, indices: list[int] | None = None, seed: int = 0) -> torch.Tensor:
        """Pixels (B, 3, H, W) in [-1, 1] -> unscaled latents (B, C, H/f, W/f), float32 on the CPU.

        indices: the items' indices, which seed their noise when latent="sample".
        """
        dist = self.vae.encode(pixels.to(self.device, self.dtype)).latent_dist
        mean = dist.mean.float().cpu()
        if self.latent == "mean":
            return mean
        if indices is None or len(indices) != len(mean):
            raise ValueError("latent='sample' needs one item index per image to seed its noise")
        return sample_latents(mean, dist.std.float().cpu(), indices, seed)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Unscaled latents (B, C, h, w) -> pixels (B, 3, h*f, w*f) in [-1, 1], float32 on the latents' device."""
        pixels = self.vae.decode(latents.to(self.device, self.dtype)).sample
        return pixels.float().clamp(-1.0, 1.0).to(latents.device)

    def describe(self) -> dict:
        """What meta.json records about the autoencoder."""
        cfg = self.vae.config
        out = {"autoencoder": self.name, "autoencoder_path": self.path, "autoencoder_latent": self.latent,
               "autoencoder_downsample": self.downsample, "autoencoder_scaling_factor": cfg.scaling_factor,
               "autoencoder_shift_factor": cfg.shift_factor,
               # Its content: two autoencoders in folders of one name (.../sd15/vae, .../sdxl/vae) are told apart.
               "autoencoder_sha256": autoencoder_digest(self.path, self.config, self.cache_dir)}
        return out if self.config is None else {**out, "autoencoder_config": self.config}


def sample_latents(mean: torch.Tensor, std: torch.Tensor, indices: list[int], seed: int) -> torch.Tensor:
    """mean + std * noise, the noise of item i drawn from a generator seeded by (seed + 1, i)."""
    noise = np.stack([item_rng(seed + 1, i).standard_normal(mean.shape[1:], dtype=np.float32) for i in indices])
    return mean + std * torch.from_numpy(noise)


def load_autoencoder(spec: str, device: str = "cpu", precision: str = "float32", latent: str = "mean",
                     config: str | None = None, cache_dir: str | None = None):
    """`identity` or a diffusers AutoencoderKL from a local path."""
    if spec == IDENTITY_AUTOENCODER:
        return IdentityAutoencoder()
    return DiffusersAutoencoder(spec, device=device, precision=precision, latent=latent, config=config,
                                cache_dir=cache_dir)
