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
    # A batch at a time (all 40k COCO reconstructions at once would take 32 GB), decoded only as they are read.
    calls = []
    batches = reference_images({"images": None, "x0": x}, lambda z: calls.append(len(z)) or decode(z), batch_size=2)
    assert calls == []
    assert torch.allclose(torch.cat(list(batches)), expected, atol=1e-5) and calls == [2, 2, 1]


def test_missing_autoencoder_is_a_clear_error(tmp_path):
    meta = {"autoencoder": "AutoencoderKL:vae", "autoencoder_path": str(tmp_path / "gone"), "latent_mean": 0.0,
            "latent_std": 1.0}
    with pytest.raises(ConfigError, match="eval.autoencoder_path="):
        make_decoder(meta)


def _vae(seed: int = 0):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                         block_out_channels=(8, 16), layers_per_block=1, latent_channels=4, norm_num_groups=4,
                         sample_size=16)


def test_the_decoder_is_named_by_its_files_content(tmp_path):
    """Another autoencoder (eval.autoencoder_path), or one replaced at its path, is another decoder; a copy of the
    same files elsewhere, or a pipeline folder around them, is the same one."""
    from src.evaluation.decoding import decoder_name

    assert decoder_name({"autoencoder": "identity"}) is None
    _vae(0).save_pretrained(tmp_path / "vae")
    _vae(0).save_pretrained(tmp_path / "copy")
    _vae(1).save_pretrained(tmp_path / "other")
    _vae(0).save_pretrained(tmp_path / "pipeline" / "vae")
    (tmp_path / "pipeline" / "model_index.json").write_text("{}")
    meta = {"autoencoder": "AutoencoderKL:vae", "autoencoder_path": str(tmp_path / "vae")}
    name = decoder_name(meta, cache_dir=tmp_path / "cache")
    assert name.startswith("AutoencoderKL:vae:") and len(name.rsplit(":", 1)[1]) == 12
    assert decoder_name(meta, str(tmp_path / "copy")) == decoder_name(meta, str(tmp_path / "pipeline")) == name
    assert decoder_name(meta, str(tmp_path / "other")) != name
    config = tmp_path / "vae" / "config.json"
    config.write_text(config.read_text().replace('"sample_size": 16', '"sample_size": 32'))
    assert decoder_name(meta, cache_dir=tmp_path / "cache") != name  # replaced in place: hashed again
    with pytest.raises(ConfigError, match=r"eval.autoencoder_path=\S*gone: the shards hold AutoencoderKL:vae latents"):
        decoder_name(meta, str(tmp_path / "gone"))


def test_a_single_file_autoencoder_decodes_with_the_config_the_preprocessing_recorded(tmp_path):
    """meta.json names a single weights file's config folder, so the evaluation can build it as the preprocessing
    did (before, it asked for a setting the evaluation does not have)."""
    from safetensors.torch import save_file

    from src.evaluation.decoding import decoder_name
    from src.preprocess.autoencoders import DiffusersAutoencoder

    vae = _vae(0)
    vae.save_pretrained(tmp_path / "config")
    save_file(vae.state_dict(), tmp_path / "vae.safetensors")
    meta = {**DiffusersAutoencoder(str(tmp_path / "vae.safetensors"), config=str(tmp_path / "config")).describe(),
            "latent_mean": 0.1, "latent_std": 3.0}
    assert meta["autoencoder_config"] == str((tmp_path / "config").resolve())
    x = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        expected = vae.decode(x * 3.0 + 0.1).sample.clamp(-1, 1)
    assert torch.allclose(make_decoder(meta)(x), expected, atol=1e-5)
    name = decoder_name(meta)
    (tmp_path / "config" / "config.json").write_text((tmp_path / "config" / "config.json").read_text() + "\n")
    assert decoder_name(meta) != name  # its config is part of it


def test_the_decoder_name_holds_which_file_has_which_content_and_ignores_hidden_files(tmp_path):
    """Two files' contents swapped is another decoder; a hidden file (.DS_Store, a lock) leaves the name as it was."""
    from src.evaluation.decoding import decoder_name

    folder = tmp_path / "vae"
    folder.mkdir()
    (folder / "config.json").write_bytes(b"A")
    (folder / "weights.bin").write_bytes(b"B")
    meta = {"autoencoder": "AutoencoderKL:vae", "autoencoder_path": str(folder)}
    name = decoder_name(meta, cache_dir=tmp_path / "cache")
    (folder / ".DS_Store").write_bytes(b"junk")
    assert decoder_name(meta, cache_dir=tmp_path / "cache") == name
    (tmp_path / "swapped").mkdir()
    (tmp_path / "swapped" / "config.json").write_bytes(b"B")
    (tmp_path / "swapped" / "weights.bin").write_bytes(b"A")
    assert decoder_name(meta, str(tmp_path / "swapped"), tmp_path / "cache") != name
