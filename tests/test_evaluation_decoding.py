"""Evaluation decodes pixel-space and autoencoder-latent shards."""

import pytest
import torch

from src.config import ConfigError
from src.evaluation.decoding import make_decoder, reference_images


def test_pixel_space_is_un_normalised():
    meta = {"autoencoder": "identity", "latent_mean": 0.25, "latent_std": 2.0}
    decode = make_decoder(meta)
    x = torch.randn(3, 1, 4, 4)
    assert torch.equal(decode(x), x * 2.0 + 0.25)
    stored = torch.zeros(3, 1, 4, 4)
    assert reference_images({"images": stored, "x0": x}, decode) is stored


def test_latents_go_through_the_autoencoder(tmp_path):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        block_out_channels=(8, 16), layers_per_block=1, latent_channels=4, norm_num_groups=4,
                        sample_size=16)
    vae.save_pretrained(tmp_path / "vae")
    meta = {"autoencoder": "AutoencoderKL:vae", "autoencoder_path": str(tmp_path / "vae"),
            "latent_mean": 0.1, "latent_std": 3.0}
    decode = make_decoder(meta, batch_size=2)
    x = torch.randn(5, 4, 8, 8)
    pixels = decode(x)
    assert pixels.shape == (5, 3, 16, 16) and pixels.abs().max() <= 1.0
    with torch.no_grad():
        expected = vae.decode(x * 3.0 + 0.1).sample.clamp(-1, 1)
    assert torch.allclose(pixels, expected, atol=1e-5)
    assert torch.allclose(reference_images({"images": None, "x0": x}, decode), expected, atol=1e-5)


def test_missing_autoencoder_is_a_clear_error(tmp_path):
    meta = {"autoencoder": "AutoencoderKL:vae", "autoencoder_path": str(tmp_path / "gone"), "latent_mean": 0.0,
            "latent_std": 1.0}
    with pytest.raises(ConfigError, match="eval.autoencoder_path="):
        make_decoder(meta)
