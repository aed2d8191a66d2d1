"""Tests for src.metrics: Frechet distance, CLIP score, the CLIP extractor, reference-statistics cache."""

from __future__ import annotations

import json

import numpy as np
import open_clip
import pytest
import torch
from torchmetrics.image.fid import FrechetInceptionDistance

from src.metrics import (
    ClipFeatureExtractor,
    clip_score,
    feature_statistics,
    fid_from_features,
    frechet_distance,
    reference_features,
)
from src.metrics.frechet import frechet_distance_rows

TINY_CLIP = "TinyTest-CLIP-16"
TINY_CLIP_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 16, "layers": 1, "width": 32, "head_width": 16, "patch_size": 4},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


@pytest.fixture(scope="module")
def tiny_clip_file(tmp_path_factory):
    """A randomly initialised small open_clip model, registered by config and saved as a state dict."""
    folder = tmp_path_factory.mktemp("clip")
    (folder / f"{TINY_CLIP}.json").write_text(json.dumps(TINY_CLIP_CFG))
    open_clip.add_model_config(folder / f"{TINY_CLIP}.json")
    torch.manual_seed(0)
    model = open_clip.create_model(TINY_CLIP)
    path = folder / "tiny_clip.pt"
    torch.save(model.state_dict(), path)
    return path, model.eval()


def _digits(n: int, offset: int = 0) -> torch.Tensor:
    """sklearn's 8x8 digits as (n, 1, 16, 16) images in [-1, 1]."""
    from sklearn.datasets import load_digits

    x = torch.tensor(load_digits().images[offset : offset + n], dtype=torch.float32) / 16.0 * 2 - 1
    return torch.nn.functional.interpolate(x[:, None], size=16, mode="nearest")


# ---- Frechet distance -----------------------------------------------------------------------------
def test_identical_feature_sets_give_zero_fid():
    x = torch.randn(300, 24, generator=torch.Generator().manual_seed(0))
    assert fid_from_features(x, x) == pytest.approx(0.0, abs=1e-9)
    assert fid_from_features(x, x + 0.5) == pytest.approx(24 * 0.25, rel=1e-9)  # pure mean shift


def test_frechet_distance_of_a_set_with_itself_is_never_negative():
    # the round-off of tr S1 + tr S2 - 2 tr (S1 S2)^(1/2) is clipped at 0 (unclipped it is -1.8e-14 for seed 3)
    for seed in range(20):
        x = np.random.default_rng(seed).normal(size=(50, 8))
        mu, sigma = feature_statistics(x)
        assert frechet_distance(mu, sigma, mu, sigma) >= 0.0
        rows = (x - mu) / np.sqrt(len(x) - 1)
        assert frechet_distance_rows(mu, rows, mu, rows) >= 0.0


def test_frechet_distance_closed_form_for_diagonal_gaussians():
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    v1, v2 = np.array([1.0, 4.0, 0.25]), np.array([4.0, 1.0, 0.25])
    expected = 1 + 4 + ((np.sqrt(v1) - np.sqrt(v2)) ** 2).sum()
    assert frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2)) == pytest.approx(expected, rel=1e-12)


def test_frechet_distance_equals_torchmetrics_fid_on_the_same_features():
    gen = torch.Generator().manual_seed(1)
    real = torch.randn(400, 16, generator=gen, dtype=torch.float64)
    fake = torch.randn(300, 16, generator=gen, dtype=torch.float64) @ (0.3 * torch.randn(16, 16, generator=gen,
                                                                                   dtype=torch.float64)) + 0.2

    class Identity(torch.nn.Module):
        num_features = 16

        def forward(self, x):
            return x

    metric = FrechetInceptionDistance(feature=Identity(), normalize=True)
    metric.update(real, real=True)
    metric.update(fake, real=False)
    ours = fid_from_features(fake, real)
    assert ours > 1.0
    assert ours == pytest.approx(float(metric.compute()), rel=1e-7)


def test_fid_on_raw_clip_features_matches_torchmetrics_compute_fid(tiny_clip_file):
    """FID on the extractor's raw CLIP image features against torchmetrics' own _compute_fid (float64, same mean
    and covariance), to 1e-6 relative; and not the FID of the L2-normalised features."""
    from torchmetrics.image.fid import _compute_fid

    ext = ClipFeatureExtractor(TINY_CLIP, tiny_clip_file[0])
    real = ext.image_features(_digits(200))
    fake = ext.image_features(_digits(150, offset=200).flip(-1))
    (mu_f, s_f), (mu_r, s_r) = feature_statistics(fake), feature_statistics(real)
    reference = float(_compute_fid(*(torch.from_numpy(a) for a in (mu_f, s_f, mu_r, s_r))))
    ours = fid_from_features(fake, real)
    assert ours == pytest.approx(reference, rel=1e-6)
    assert ours == pytest.approx(frechet_distance(mu_f, s_f, mu_r, s_r), rel=1e-12)
    unit = torch.nn.functional.normalize
    assert abs(fid_from_features(unit(fake, dim=1), unit(real, dim=1)) - ours) > 0.1 * ours


def test_frechet_module_is_torch_free():
    """The ranking imports src.metrics.frechet; it must not pull in torch (checked in a fresh interpreter)."""
    import subprocess
    import sys

    code = ("import sys, src.metrics.frechet, src.ranking.bootstrap, src.ranking.report, src.ranking.synthetic; "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "False"


def test_batched_frechet_equals_one_at_a_time():
    rng = np.random.default_rng(3)
    a = [rng.normal(size=(30, 4)) * (1 + k) for k in range(3)]
    stats = [feature_statistics(x) for x in a]
    ref_mu, ref_s = feature_statistics(rng.normal(size=(40, 4)))
    batched = frechet_distance(np.stack([m for m, _ in stats]), np.stack([s for _, s in stats]), ref_mu, ref_s)
    assert batched.shape == (3,)
    np.testing.assert_allclose(batched, [frechet_distance(m, s, ref_mu, ref_s) for m, s in stats], rtol=1e-12)


def test_feature_statistics_are_float64_and_unbiased():
    x = np.random.default_rng(0).normal(size=(50, 3)).astype(np.float32)
    mu, sigma = feature_statistics(x)
    assert mu.dtype == sigma.dtype == np.float64
    np.testing.assert_allclose(sigma, np.cov(x.astype(np.float64), rowvar=False), rtol=1e-12)
    with pytest.raises(ValueError, match="n >= 2"):
        feature_statistics(x[:1])
    with pytest.raises(ValueError, match="shapes"):
        frechet_distance(mu, sigma, mu[:2], sigma[:2, :2])


def test_frechet_refuses_non_finite_input_and_handles_one_feature():
    x = np.random.default_rng(1).normal(size=(20, 3))
    x[4, 1] = np.nan
    with pytest.raises(ValueError, match="features contains NaN or inf values"):
        feature_statistics(x)
    with pytest.raises(ValueError, match="mu2 contains NaN or inf values"):
        frechet_distance(np.zeros(2), np.eye(2), np.array([0.0, np.inf]), np.eye(2))
    # d = 1: a (1, 1) covariance, and d^2 = (mu1 - mu2)^2 + (sd1 - sd2)^2
    a, b = np.array([[0.0], [2.0], [4.0]]), np.array([[1.0], [2.0]])
    mu, sigma = feature_statistics(a)
    assert sigma.shape == (1, 1) and sigma[0, 0] == pytest.approx(4.0)
    assert fid_from_features(a, b) == pytest.approx((2.0 - 1.5) ** 2 + (2.0 - np.sqrt(0.5)) ** 2, rel=1e-12)


def test_clip_score_is_raw_cosine():
    img = torch.tensor([[1.0, 0.0], [3.0, 4.0], [1.0, 1.0]])
    txt = torch.tensor([[2.0, 0.0], [4.0, -3.0], [-1.0, -1.0]])
    torch.testing.assert_close(clip_score(img, txt), torch.tensor([1.0, 0.0, -1.0]))
    with pytest.raises(ValueError, match="clip_score"):
        clip_score(img, txt[:2])
    with pytest.raises(ValueError, match="clip_score"):
        clip_score(img[0], txt[0])  # one pair without its batch dimension
    half = clip_score(img.half(), txt.half())
    assert half.dtype == torch.float32
    torch.testing.assert_close(half, clip_score(img, txt), rtol=0, atol=0)


# ---- image preparation (src/metrics/images.py) ------------------------------------------------------
def test_images_are_mapped_from_minus_one_one_to_unit_range_clamped_and_grey_repeated():
    """(x + 1) / 2, clamped: latent references are the autoencoder's unclamped reconstructions."""
    from src.metrics.images import to_rgb01, to_uint8

    grey = torch.tensor([-1.5, -1.0, 0.0, 0.5, 1.0, 1.2]).view(1, 1, 1, 6)
    out = to_rgb01(grey)
    assert out.shape == (1, 3, 1, 6) and torch.equal(out[:, 0], out[:, 1]) and torch.equal(out[:, 0], out[:, 2])
    torch.testing.assert_close(out[0, 0, 0], torch.tensor([0.0, 0.0, 0.5, 0.75, 1.0, 1.0]))
    assert to_uint8(torch.tensor([0.01, -1.0, 1.0]).view(1, 1, 1, 3))[0, 0, 0].tolist() == [129, 0, 255]  # rounded


def test_resize_keeps_the_shorter_side_and_crops_the_centre_as_open_clip_does():
    """Shorter side resized (bicubic, antialiased, clamped), then the centre cut: bright outer bands of a wide image
    are cut off, mirrored input gives mirrored output, and the values are torchvision's Resize + CenterCrop."""
    import torchvision.transforms.functional as TF

    from src.metrics.images import resize_center_crop

    wide = torch.zeros(1, 3, 8, 32)
    wide[..., :8], wide[..., 24:] = 1.0, 1.0  # only the outer quarters are bright
    out = resize_center_crop(wide, (4, 4))
    assert out.shape == (1, 3, 4, 4) and out.abs().max() < 1e-6  # the centre half of a 4 x 16 resize
    tall = resize_center_crop(wide.transpose(-1, -2), (4, 4))
    assert tall.shape == (1, 3, 4, 4) and tall.abs().max() < 1e-6
    x = (torch.rand(2, 3, 12, 20, generator=torch.Generator().manual_seed(0)) > 0.5).float()  # bicubic overshoots
    for image in (x, x.transpose(-1, -2)):
        out = resize_center_crop(image, (6, 6))
        torch.testing.assert_close(resize_center_crop(image.flip(-1), (6, 6)), out.flip(-1))
        torch.testing.assert_close(resize_center_crop(image.flip(-2), (6, 6)), out.flip(-2))
        resized = TF.resize(image, [6], interpolation=TF.InterpolationMode.BICUBIC, antialias=True).clamp(0, 1)
        torch.testing.assert_close(out, TF.center_crop(resized, [6, 6]))
    assert resize_center_crop(x, (12, 20)) is x  # already the model's size


# ---- CLIP extractor -------------------------------------------------------------------------------
def test_clip_extractor_loads_the_local_file(tiny_clip_file):
    path, model = tiny_clip_file
    ext = ClipFeatureExtractor(TINY_CLIP, path)
    for name, p in model.state_dict().items():
        torch.testing.assert_close(ext.model.state_dict()[name], p, rtol=0, atol=0)
    images = _digits(6)
    feats = ext.image_features(images)
    assert feats.shape == (6, 32) and feats.dtype == torch.float32
    # Raw embeddings (the paper's FID features): not unit vectors.
    assert not torch.allclose(feats.norm(dim=1), torch.ones(6), atol=1e-3)
    mean = torch.tensor(open_clip.OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(open_clip.OPENAI_DATASET_STD).view(1, 3, 1, 1)
    manual = model.encode_image(((images.repeat(1, 3, 1, 1) + 1) / 2 - mean) / std, normalize=False)
    torch.testing.assert_close(feats, manual.detach(), rtol=1e-5, atol=1e-5)
    assert ext.id.endswith(":clip_raw")
    from src.metrics.clip import FID_FEATURES
    from src.ranking import aggregate

    # The ranking (which must not import torch) and the extractor take the name from src.results: one definition.
    assert aggregate.FID_FEATURES == FID_FEATURES == ext.id.rsplit(":", 1)[1]
    torch.testing.assert_close(ext.image_features(images.repeat(1, 3, 1, 1)), feats)
    assert ext.image_features(_digits(2)[:, :, ::2, ::2]).shape == (2, 32)  # 8x8 input is resized to 16
    text = ext.text_features(["a photo of a zero", "a photo of a one"])
    assert text.shape == (2, 32)
    # The CLIP score stays the cosine of the normalised embeddings, whatever the features' scale.
    normed = torch.nn.functional.normalize(manual.detach()[:2], dim=1)
    torch.testing.assert_close(clip_score(feats[:2], text), (normed * text).sum(1), rtol=1e-5, atol=1e-6)
    tokens = open_clip.get_tokenizer(TINY_CLIP)(["a photo of a zero"])
    torch.testing.assert_close(text[:1], model.encode_text(tokens, normalize=True).detach())


def test_clip_extractor_mean_std_override(tiny_clip_file):
    path, _ = tiny_clip_file
    ext = ClipFeatureExtractor(TINY_CLIP, path, image_mean=(0.5, 0.5, 0.5), image_std=(0.5, 0.5, 0.5))
    torch.testing.assert_close(ext.mean.flatten(), torch.full((3,), 0.5))
    assert not torch.allclose(ext.image_features(_digits(2)), ClipFeatureExtractor(TINY_CLIP, path).image_features(
        _digits(2)))


def test_clip_extractor_missing_file_names_the_setting(tmp_path):
    missing = tmp_path / "nope.pt"
    with pytest.raises(FileNotFoundError, match=r"evaluation\.clip_weights.*nope\.pt"):
        ClipFeatureExtractor("ViT-B-32", missing, config_key="evaluation.clip_weights")
    with pytest.raises(FileNotFoundError, match=r"eval\.clip\.weights_path"):
        ClipFeatureExtractor("ViT-B-32", None)


def test_clip_extractor_rejects_bad_images(tiny_clip_file):
    ext = ClipFeatureExtractor(TINY_CLIP, tiny_clip_file[0])
    with pytest.raises(ValueError, match="C = 1 or 3"):
        ext.image_features(torch.zeros(2, 2, 16, 16))


def test_clip_fid_falls_when_samples_come_from_the_evaluation_distribution(tiny_clip_file):
    ext = ClipFeatureExtractor(TINY_CLIP, tiny_clip_file[0])
    reference = ext.image_features(_digits(400))
    from_data = ext.image_features(_digits(300, offset=400))
    noise = ext.image_features(torch.rand(300, 1, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1)
    fid_data, fid_noise = fid_from_features(from_data, reference), fid_from_features(noise, reference)
    assert fid_data < 0.5 * fid_noise, (fid_data, fid_noise)


# ---- reference statistics cache -------------------------------------------------------------------
def test_reference_features_are_computed_once_and_cached(tmp_path):
    calls = []

    def extractor(images):
        calls.append(images.shape[0])
        return images.flatten(1)[:, :5] * 2

    images = torch.randn(300, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    ref = reference_features("toy", "digits/test", images, extractor, tmp_path)
    assert calls == [256, 44] and ref.features.shape == (300, 5) and ref.n == 300
    np.testing.assert_allclose(ref.mu, (images.flatten(1)[:, :5] * 2).double().mean(0).numpy(), rtol=1e-6)
    assert ref.path.is_file() and [p.name for p in tmp_path.iterdir()] == [ref.path.name]

    def never():
        raise AssertionError("images are not loaded on a cache hit")

    again = reference_features("toy", "digits/test", never, extractor, tmp_path)
    assert calls == [256, 44]
    np.testing.assert_array_equal(again.features, ref.features)
    np.testing.assert_array_equal(again.sigma, ref.sigma)
    other = reference_features("toy", "shapes/test", [images[:10], images[10:20]], extractor, tmp_path)
    assert other.path != ref.path and other.n == 20


def test_temp_files_a_kill_left_in_the_reference_cache_go_after_a_day(tmp_path):
    """A job killed while writing an entry left `.<entry>.npz.<random>.tmp` (as large as the entry) for ever; the
    cache is shared by many jobs without a lock, so only temp files untouched for a day are removed."""
    import os
    import time

    def extractor(images):
        return images.flatten(1)[:, :3]

    images = torch.randn(4, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    ref = reference_features("toy", "digits/test", images, extractor, tmp_path)
    abandoned, live = tmp_path / f".{ref.path.name}.abcd1234.tmp", tmp_path / ".toy__other.npz.0123abcd.tmp"
    other = tmp_path / "notes.tmp"  # not one of this project's temp names: never touched
    for path in (abandoned, live, other):
        path.write_bytes(b"partial")
    day_ago = time.time() - 24 * 3600 - 60
    for path in (abandoned, other):
        os.utime(path, (day_ago, day_ago))
    again = reference_features("toy", "digits/test", images, extractor, tmp_path)  # a cache hit cleans too
    np.testing.assert_array_equal(again.features, ref.features)
    assert not abandoned.exists() and live.exists() and other.exists()


def test_a_reference_cache_file_of_another_pair_is_refused_not_served(tmp_path):
    """The cache file is checked when read: one that holds another extractor's or set's features (copied or renamed
    into place) is an error naming both pairs, never served as this pair's statistics."""
    from src.metrics import reference_path

    images = torch.randn(6, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    ref = reference_features("clip:a", "digits/test", images, lambda x: x.flatten(1)[:, :3], tmp_path)
    for extractor_id, dataset_id in (("clip:b", "digits/test"), ("clip:a", "shapes/test")):
        reference_path(extractor_id, dataset_id, tmp_path).write_bytes(ref.path.read_bytes())
        with pytest.raises(ValueError, match=r"holds \(clip:a, digits/test\), expected"):
            reference_features(extractor_id, dataset_id, images, lambda x: x.flatten(1)[:, :3], tmp_path)
    with pytest.raises(ValueError, match="no images for dataset 'empty'"):
        reference_features("clip:a", "empty", [], lambda x: x, tmp_path)


def test_reference_cache_of_the_former_normalised_features_is_never_reused(tiny_clip_file, tmp_path):
    """The cache key holds the feature definition: statistics cached under the old id (L2-normalised features)
    are not found for the raw-feature extractor, which computes its own."""
    from src.metrics import reference_path

    ext = ClipFeatureExtractor(TINY_CLIP, tiny_clip_file[0])
    old_id = ext.id.rsplit(":", 1)[0]  # the id before the feature definition was part of it
    unit = lambda x: torch.nn.functional.normalize(ext.image_features(x), dim=1)  # noqa: E731
    old = reference_features(old_id, "digits/test", _digits(20), unit, tmp_path)
    assert reference_path(ext.id, "digits/test", tmp_path) != old.path
    new = reference_features(ext.id, "digits/test", _digits(20), ext, tmp_path)
    assert new.path != old.path
    np.testing.assert_allclose(new.features, ext.image_features(_digits(20)).numpy())
    assert not np.allclose(np.linalg.norm(new.features, axis=1), 1.0, atol=1e-3)


def test_reference_cache_is_keyed_by_the_weights_content_not_the_file_name(tiny_clip_file, tmp_path):
    """Two different weights files both called clip.pt get their own reference statistics (the auditor's FID 123.59
    for 75.67 came from sharing them); a file replaced at the same path is another extractor; the same bytes at
    another path are the same features. QuickGELU and the image mean and std change the features: the key too."""
    from src.metrics import reference_path

    path, _ = tiny_clip_file
    torch.manual_seed(5)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    torch.save(open_clip.create_model(TINY_CLIP).state_dict(), tmp_path / "a" / "clip.pt")
    (tmp_path / "b" / "clip.pt").write_bytes(path.read_bytes())
    a, b = (ClipFeatureExtractor(TINY_CLIP, tmp_path / folder / "clip.pt") for folder in ("a", "b"))
    assert a.id != b.id and reference_path(a.id, "digits", tmp_path) != reference_path(b.id, "digits", tmp_path)
    ref_a = reference_features(a.id, "digits", _digits(20), a, tmp_path / "cache")
    ref_b = reference_features(b.id, "digits", _digits(20), b, tmp_path / "cache")
    np.testing.assert_allclose(ref_b.features, b.image_features(_digits(20)).numpy())
    assert not np.allclose(ref_a.features, ref_b.features)
    assert ClipFeatureExtractor(TINY_CLIP, path).id == b.id  # same bytes, same features
    (tmp_path / "a" / "clip.pt").write_bytes(path.read_bytes())  # replaced in place: now b's weights
    assert ClipFeatureExtractor(TINY_CLIP, tmp_path / "a" / "clip.pt").id == b.id
    others = {ClipFeatureExtractor(TINY_CLIP, path, force_quick_gelu=True).id,
              ClipFeatureExtractor(TINY_CLIP, path, image_mean=(0.5,) * 3, image_std=(0.5,) * 3).id}
    assert len(others) == 2 and b.id not in others


def test_reference_cache_key_tells_an_evaluation_folder_written_again_apart(tmp_path):
    """The key held the folder, its name and its count only: a folder deleted and preprocessed again at another
    resolution (same path, same count) was served the former images' statistics."""
    from omegaconf import OmegaConf

    from src.evaluation.run import reference_dataset_id
    from src.metrics import reference_path

    data = OmegaConf.create({"name": "coco", "eval_dir": str(tmp_path / "coco")})
    meta = {"count": 5000, "image_size": 256, "shapes": {"latent": [4, 32, 32]}, "created": "2026-12-01T10:00:00"}
    again = {**meta, "image_size": 512, "shapes": {"latent": [4, 64, 64]}, "created": "2026-12-02T10:00:00"}
    key = reference_dataset_id(data, {"meta": meta}, "AutoencoderKL:vae:abc")
    assert key == reference_dataset_id(data, {"meta": dict(meta)}, "AutoencoderKL:vae:abc")
    assert key != reference_dataset_id(data, {"meta": again}, "AutoencoderKL:vae:abc")
    assert key != reference_dataset_id(data, {"meta": meta}, "AutoencoderKL:vae:def")
    assert reference_path("clip", key, tmp_path) != reference_path("clip", reference_dataset_id(
        data, {"meta": again}, "AutoencoderKL:vae:abc"), tmp_path)


def test_reference_cache_key_is_the_same_for_an_evaluation_folder_moved_or_copied(tmp_path):
    """The key held the folder's resolved path: COCO copied to node-local disk (or the shards moved, which runs
    accept: same meta.json) was another set, and its reference statistics, an Inception pass over every image, were
    computed again."""
    from omegaconf import OmegaConf

    from src.evaluation.run import reference_dataset_id

    meta = {"count": 5000, "shapes": {"latent": [4, 32, 32]}, "created": "2026-12-01T10:00:00"}
    here, there = ({"name": "coco", "eval_dir": str(tmp_path / d / "coco")} for d in ("nfs", "scratch"))
    key = reference_dataset_id(OmegaConf.create(here), {"meta": meta}, "AutoencoderKL:vae:abc")
    assert key == reference_dataset_id(OmegaConf.create(there), {"meta": dict(meta)}, "AutoencoderKL:vae:abc")
    assert key != reference_dataset_id(OmegaConf.create({**there, "name": "cc12m"}), {"meta": meta},
                                       "AutoencoderKL:vae:abc")


def test_weights_sha256_is_computed_once_per_file_version(tmp_path, monkeypatch):
    """The checksum naming a weights file is remembered (in the process and under the cache folder) until the file
    changes; a file rewritten with the same size and its old mtime (cp -p) is hashed again."""
    import hashlib
    import os

    from src.utils import io

    hashed = []
    monkeypatch.setattr(io, "sha256_file", lambda p, real=io.sha256_file: hashed.append(p) or real(p))
    weights, cache = tmp_path / "w.pt", tmp_path / "cache"
    weights.write_bytes(b"1" * 1000)
    expected = hashlib.sha256(b"1" * 1000).hexdigest()
    assert io.weights_sha256(weights, cache) == expected and len(hashed) == 1
    assert io.weights_sha256(weights, cache) == expected and len(hashed) == 1
    monkeypatch.setattr(io, "_SHA256", {})  # a new process: the cache folder remembers it
    assert io.weights_sha256(weights, cache) == expected and len(hashed) == 1
    assert json.loads((cache / io.WEIGHTS_SHA256_FILE).read_text())[str(weights.resolve())]["sha256"] == expected
    stat = weights.stat()
    weights.write_bytes(b"2" * 1000)
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert io.weights_sha256(weights, cache) == hashlib.sha256(b"2" * 1000).hexdigest() and len(hashed) == 2
    (cache / io.WEIGHTS_SHA256_FILE).write_text("{not json")  # a damaged cache is only a cache
    monkeypatch.setattr(io, "_SHA256", {})
    assert io.weights_sha256(weights, cache) == hashlib.sha256(b"2" * 1000).hexdigest() and len(hashed) == 3
    assert json.loads((cache / io.WEIGHTS_SHA256_FILE).read_text())


def test_a_weights_file_written_to_while_hashed_is_not_remembered(tmp_path, monkeypatch):
    """A checksum of a file that changed under the read belongs to no one version: neither the process nor the cache
    folder may keep it, or a later launch would trust it."""
    from src.utils import io

    def hash_then_append(p, real=io.sha256_file):
        sha = real(p)
        with open(p, "ab") as f:
            f.write(b"more")
        return sha

    monkeypatch.setattr(io, "sha256_file", hash_then_append)
    monkeypatch.setattr(io, "_SHA256", {})
    weights, cache = tmp_path / "w.pt", tmp_path / "cache"
    weights.write_bytes(b"1" * 1000)
    io.weights_sha256(weights, cache)
    assert io._SHA256 == {} and not (cache / io.WEIGHTS_SHA256_FILE).exists()


def test_json_stores_keep_every_entry_and_read_a_non_object_as_empty(tmp_path):
    """A cache file of entries by key: a second update adds to the first; a file that is valid JSON but not an
    object (damaged, or another tool's) reads as no entries rather than breaking the lookups."""
    from src.utils.io import read_json_store, update_json_store

    store = tmp_path / "store.json"
    update_json_store(store, {"a": 1})
    assert update_json_store(store, {"b": 2}) == {"a": 1, "b": 2}
    assert read_json_store(store) == {"a": 1, "b": 2}
    store.write_text("[1, 2]")
    assert read_json_store(store) == {}


@pytest.mark.parametrize("damage", ["truncated", "empty", "not npz", "arrays missing"])
def test_an_unreadable_reference_cache_is_computed_again(tmp_path, caplog, damage):
    """A damaged cache file (this project writes it atomically: something else damaged it) is a miss: one warning
    line naming it, the statistics computed again and the file replaced."""
    from src.utils.io import save_npz

    images = torch.randn(30, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    extractor = lambda x: x.flatten(1)[:, :5]  # noqa: E731
    good = reference_features("toy", "digits/test", images, extractor, tmp_path)
    data = good.path.read_bytes()
    if damage == "arrays missing":
        save_npz(good.path, features=good.features)
    else:
        good.path.write_bytes({"truncated": data[: len(data) // 2], "empty": b"", "not npz": b"x" * 100}[damage])
    with caplog.at_level("WARNING", logger="src.metrics.reference"):
        again = reference_features("toy", "digits/test", images, extractor, tmp_path)
    [line] = [r.getMessage() for r in caplog.records]
    assert line.startswith(f"reference cache {good.path} is unreadable (") and "computing it again" in line
    assert "\n" not in line
    np.testing.assert_array_equal(again.sigma, good.sigma)
    np.testing.assert_array_equal(reference_features("toy", "digits/test", None, extractor, tmp_path).mu, good.mu)
    assert [p.name for p in tmp_path.iterdir()] == [good.path.name]  # replaced, no temp file left


# ---- Inception extractor --------------------------------------------------------------------------
def test_inception_extractor_missing_or_bad_file(tmp_path):
    from src.metrics import InceptionFeatureExtractor

    with pytest.raises(FileNotFoundError, match=r"eval\.inception\.weights_path.*missing\.pth"):
        InceptionFeatureExtractor(tmp_path / "missing.pth")
    torch.save({"step": 3}, tmp_path / "not_weights.pth")
    with pytest.raises(ValueError, match="not a state dict"):
        InceptionFeatureExtractor(tmp_path / "not_weights.pth")


def test_inception_reference_cache_is_keyed_by_the_weights_content(tmp_path):
    """As for CLIP: two Inception files of one name are two extractors, a replaced file another one."""
    from unittest import mock

    from src.metrics import InceptionFeatureExtractor

    for folder, value in (("a", 0.0), ("b", 1.0)):
        (tmp_path / folder).mkdir()
        torch.save({"w": torch.full((2,), value)}, tmp_path / folder / "inception.pth")
    with mock.patch("src.metrics.inception.FeatureExtractorInceptionV3"):  # the network itself is not needed
        a, b = (InceptionFeatureExtractor(tmp_path / f / "inception.pth") for f in ("a", "b"))
        assert a.id != b.id
        (tmp_path / "a" / "inception.pth").write_bytes((tmp_path / "b" / "inception.pth").read_bytes())
        assert InceptionFeatureExtractor(tmp_path / "a" / "inception.pth").id == b.id


def test_inception_is_given_the_images_as_uint8_rounded_as_a_png(tmp_path):
    from unittest import mock

    from src.metrics import InceptionFeatureExtractor
    from src.metrics.images import to_uint8

    torch.save({"w": torch.zeros(2)}, tmp_path / "inception.pth")
    with mock.patch("src.metrics.inception.FeatureExtractorInceptionV3") as network:
        network.return_value.return_value = (torch.ones(2, 2048),)
        ext = InceptionFeatureExtractor(tmp_path / "inception.pth")
        images = torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
        assert ext.image_features(images).shape == (2, 2048)
    (given,), _ = network.return_value.call_args
    assert given.dtype == torch.uint8 and torch.equal(given, to_uint8(images))


def test_inception_features_of_non_finite_images_are_nan(tmp_path):
    """A diverged sample (NaN pixels) was cast to uint8 as 0, a black image with finite Inception features: the
    record got a number for fid_inception beside a null CLIP FID, where docs/evaluation.md says both are null."""
    from unittest import mock

    from src.metrics import InceptionFeatureExtractor

    torch.save({"w": torch.zeros(2)}, tmp_path / "inception.pth")
    with mock.patch("src.metrics.inception.FeatureExtractorInceptionV3") as network:
        network.return_value.side_effect = lambda x: (x.float().flatten(1)[:, :1].repeat(1, 2048),)
        ext = InceptionFeatureExtractor(tmp_path / "inception.pth")
        images = torch.zeros(3, 1, 8, 8)
        images[1, 0, 2, 3] = float("nan")
        feats = ext.image_features(images)
    assert feats.shape == (3, 2048)
    assert torch.isnan(feats[1]).all() and torch.isfinite(feats[[0, 2]]).all()


@pytest.mark.slow
def test_inception_extractor_loads_random_weights_from_a_local_file(tmp_path):
    from unittest import mock

    from torch_fidelity import feature_extractor_inceptionv3 as fe

    from src.metrics import InceptionFeatureExtractor

    torch.manual_seed(0)  # build torch-fidelity's network without its download, keep the random init
    with mock.patch.object(fe, "load_state_dict_from_url", return_value={}), mock.patch.object(
        fe.FeatureExtractorInceptionV3, "load_state_dict"
    ):
        state = fe.FeatureExtractorInceptionV3("random", ["2048"]).state_dict()
    torch.save(state, tmp_path / "inception.pth")
    ext = InceptionFeatureExtractor(tmp_path / "inception.pth")
    for name in ("Conv2d_1a_3x3.conv.weight", "fc.weight", "Mixed_7c.branch_pool.conv.weight"):
        torch.testing.assert_close(ext.model.state_dict()[name], state[name], rtol=0, atol=0)
    images = _digits(3)
    feats = ext.image_features(images)
    assert feats.shape == (3, 2048) and torch.isfinite(feats).all() and feats.abs().sum() > 0
    torch.testing.assert_close(ext.image_features(images.repeat(1, 3, 1, 1)), feats)


def test_committed_tiny_clip_features_classify_digits():
    """The project's tiny CLIP through the extractor (its [-1, 1] mean/std): zero-shot digits well above chance."""
    from src.data.digits import class_captions, load_digits_split
    from src.text import tiny_clip

    ext = ClipFeatureExtractor(tiny_clip.MODEL_NAME, tiny_clip.WEIGHTS_PATH, image_mean=tiny_clip.IMAGE_MEAN,
                               image_std=tiny_clip.IMAGE_STD)
    digits = load_digits_split("eval")
    classes = torch.stack([ext.text_features(names).mean(0) for names in class_captions()])
    accuracy = float(((ext.image_features(digits.images) @ classes.T).argmax(1) == digits.labels).float().mean())
    assert accuracy > 0.85, accuracy
    scores = clip_score(ext.image_features(digits.images), ext.text_features(digits.captions))
    assert scores.shape == (len(digits),) and float(scores.mean()) > float(scores.min())
