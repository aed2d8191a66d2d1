"""Text encoders: loading through open_clip from a checksummed temporary file, penultimate context, pooled vector."""

import json
import shutil

import open_clip
import pytest
import torch

from src.text import tiny_clip
from src.text.checkpoints import load_open_clip, read_sidecar, sha256_file, verify_checksum
from src.data.embedded import dataset_version
from src.text.encoder import ClipTextEncoder, TextEncoder, load_tiny_clip_text_encoder

CAPTIONS = ["a red circle in the top left", "a photo of a zero", "a photo of a handwritten seven"]


@pytest.fixture(scope="module")
def random_weights(tmp_path_factory):
    """A randomly initialised tiny CLIP saved like the committed one (float16 + sidecar with sha256)."""
    path = tmp_path_factory.mktemp("clip") / "random_clip.pt"
    model = tiny_clip.create_tiny_clip(seed=1)
    sha = tiny_clip.save_tiny_clip(model, path, {"note": "random weights for tests"})
    return path, sha, model


@pytest.fixture(scope="module")
def encoder(random_weights):
    return ClipTextEncoder(tiny_clip.MODEL_NAME, random_weights[0])


def test_sidecar_records_the_checksum(random_weights):
    path, sha, _ = random_weights
    meta = read_sidecar(path)
    assert meta["sha256"] == sha == sha256_file(path)
    assert meta["model_name"] == tiny_clip.MODEL_NAME and meta["config"] == tiny_clip.model_config()
    assert meta["note"] == "random weights for tests"


def test_weights_load_through_open_clip(random_weights, encoder):
    _, _, model = random_weights
    loaded = encoder.model.state_dict()
    for key, value in model.state_dict().items():
        torch.testing.assert_close(loaded[key], value.half().float(), atol=0, rtol=0)
    assert not encoder.model.training
    assert not any(p.requires_grad for p in encoder.model.parameters())
    # the sidecar's preprocessing (ToTensor's [0, 1] -> the project's [-1, 1]) replaces open_clip's default
    assert tuple(encoder.model.visual.preprocess_cfg["mean"]) == tiny_clip.IMAGE_MEAN
    assert tuple(encoder.model.visual.preprocess_cfg["std"]) == tiny_clip.IMAGE_STD


def test_call_shapes_and_attributes(encoder):
    context, pooled = encoder(CAPTIONS)
    assert context.shape == (3, 16, 64) and pooled.shape == (3, 64)
    assert context.dtype == pooled.dtype == torch.float32
    assert (encoder.context_dim, encoder.pooled_dim, encoder.context_length) == (64, 64, 16)
    assert encoder.name == tiny_clip.MODEL_NAME and encoder.fingerprint.startswith(tiny_clip.MODEL_NAME + "@")
    assert isinstance(encoder, TextEncoder)
    with pytest.raises(TypeError, match="not one string"):
        encoder("a photo of a zero")


def test_context_is_the_penultimate_block_output(encoder):
    """Recompute SD3's context by hand: token + positional embedding through all blocks but the last, no final LN."""
    model = encoder.model
    tokens = encoder.tokenizer(CAPTIONS)
    with torch.no_grad():
        x = model.token_embedding(tokens) + model.positional_embedding
        blocks = model.transformer.resblocks
        for block in blocks[:-1]:
            x = block(x, attn_mask=model.attn_mask)
        after_all = blocks[-1](x, attn_mask=model.attn_mask)
    context, pooled = encoder(CAPTIONS)
    torch.testing.assert_close(context, x)
    assert not torch.allclose(context, after_all)


def test_pooled_is_the_unnormalised_projected_embedding(encoder):
    _, pooled = encoder(CAPTIONS)
    with torch.no_grad():
        expected = encoder.model.encode_text(encoder.tokenizer(CAPTIONS), normalize=False)
    torch.testing.assert_close(pooled, expected)
    assert not torch.allclose(pooled.norm(dim=-1), torch.ones(3))


def test_outputs_do_not_depend_on_the_batch(encoder):
    context, pooled = encoder(CAPTIONS)
    context_1, pooled_1 = encoder(CAPTIONS[1:2])
    torch.testing.assert_close(context_1[0], context[1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(pooled_1[0], pooled[1], atol=1e-5, rtol=1e-5)
    # different captions give different conditioning
    assert not torch.allclose(pooled[0], pooled[1])


def test_tampered_copy_is_rejected_with_its_path(random_weights, tmp_path):
    path, sha, _ = random_weights
    copy = tmp_path / "random_clip.pt"
    shutil.copy(path, copy)
    shutil.copy(path.with_suffix(".json"), copy.with_suffix(".json"))
    data = bytearray(copy.read_bytes())
    data[len(data) // 2] ^= 0xFF
    copy.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=rf"{copy}.*sha256"):
        ClipTextEncoder(tiny_clip.MODEL_NAME, copy)
    with pytest.raises(ValueError, match="expected"):
        verify_checksum(copy, sha)


def test_missing_files_name_the_path(random_weights, tmp_path):
    missing = tmp_path / "nowhere" / "tiny_clip.pt"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        load_tiny_clip_text_encoder(missing)
    with pytest.raises(FileNotFoundError, match="checksum file"):
        read_sidecar(missing)
    path, sha, _ = random_weights
    lone = tmp_path / "lone.pt"
    shutil.copy(path, lone)  # no sidecar: an explicit checksum is still verified
    model, tokenizer = load_open_clip(tiny_clip.MODEL_NAME, lone, sha256=sha)
    assert tokenizer.context_length == 16
    with pytest.raises(ValueError, match="sha256"):
        load_open_clip(tiny_clip.MODEL_NAME, lone, sha256="0" * 64)
    with pytest.raises(ValueError, match="model_name='no-such-clip'"):
        load_open_clip("no-such-clip", lone)


def test_tiny_clip_config_is_registered():
    assert tiny_clip.MODEL_NAME in open_clip.list_models()
    cfg = tiny_clip.model_config()
    assert cfg["vision_cfg"]["image_size"] == 16 and cfg["text_cfg"]["context_length"] == 16


def test_clip_pixels_repeats_grey_and_resizes():
    grey = torch.linspace(-1, 1, 64).reshape(1, 1, 8, 8)
    out = tiny_clip.clip_pixels(grey)
    assert out.shape == (1, 3, 16, 16)
    assert torch.equal(out[:, 0], out[:, 1]) and torch.equal(out[:, 1], out[:, 2])
    assert tiny_clip.clip_pixels(torch.full((2, 3, 16, 16), 3.0)).max() == 1.0
    with pytest.raises(ValueError, match="images of shape"):
        tiny_clip.clip_pixels(torch.zeros(2, 4, 16, 16))


def test_sidecar_records_the_saved_dtype(random_weights):
    """Readers of the sidecar learn the stored precision from it (the weights are float16, not the model's float32)."""
    path, _, _ = random_weights
    assert read_sidecar(path)["dtype"] == "float16"
    assert all(v.dtype == torch.float16 for v in torch.load(path).values() if v.is_floating_point())


def test_explicit_arguments_win_over_the_sidecar(random_weights, tmp_path):
    """The sidecar supplies defaults only: a caller's checksum and preprocessing settings are the ones used."""
    path, _, _ = random_weights
    copy = tmp_path / "random_clip.pt"
    shutil.copy(path, copy)
    shutil.copy(path.with_suffix(".json"), copy.with_suffix(".json"))
    with pytest.raises(ValueError, match="expected 0000"):
        load_open_clip(tiny_clip.MODEL_NAME, copy, sha256="0" * 64)
    model, _ = load_open_clip(tiny_clip.MODEL_NAME, copy, image_mean=(0.1, 0.2, 0.3))
    assert tuple(model.visual.preprocess_cfg["mean"]) == (0.1, 0.2, 0.3)
    assert tuple(model.visual.preprocess_cfg["std"]) == tiny_clip.IMAGE_STD


def test_quick_gelu_from_the_sidecar_is_another_encoder(random_weights, encoder, tmp_path):
    """The sidecar's force_quick_gelu changes the text features of the same weights file, but the encoder's fingerprint
    (the embedded datasets' cache key, src.data.embedded.dataset_version) named the file alone: shards encoded with
    GELU were served as this encoder's. Now it names QuickGELU when on, and is the file's alone when off."""
    path, _, _ = random_weights
    copy = tmp_path / "random_clip.pt"
    shutil.copy(path, copy)
    sidecar = read_sidecar(path)
    copy.with_suffix(".json").write_text(json.dumps({**sidecar, "force_quick_gelu": False}))
    plain = ClipTextEncoder(tiny_clip.MODEL_NAME, copy)
    assert plain.fingerprint == encoder.fingerprint and "quickgelu" not in plain.fingerprint
    copy.with_suffix(".json").write_text(json.dumps({**sidecar, "force_quick_gelu": True}))
    quick = ClipTextEncoder(tiny_clip.MODEL_NAME, copy)
    assert not torch.allclose(quick(CAPTIONS)[0], plain(CAPTIONS)[0])
    assert quick.fingerprint != plain.fingerprint and dataset_version(quick) != dataset_version(plain)
    assert ClipTextEncoder(tiny_clip.MODEL_NAME, path, force_quick_gelu=True).fingerprint == quick.fingerprint
    assert ClipTextEncoder(tiny_clip.MODEL_NAME, copy, force_quick_gelu=False).fingerprint == plain.fingerprint


def test_clip_pixels_clamps_below_too_and_refuses_unbatched_images():
    """Out-of-range pixels are clipped to [-1, 1] on both sides; a tensor without a batch dimension is refused."""
    assert tiny_clip.clip_pixels(torch.full((2, 3, 16, 16), -3.0)).min() == -1.0
    with pytest.raises(ValueError, match="images of shape"):
        tiny_clip.clip_pixels(torch.zeros(2, 3, 16))
