"""data.image_size: the embedded datasets at a finer pixel grid (more values per sample, as a larger latent has)."""
import json

import pytest
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_module

from src.config import register_resolvers
from src.data import digits, shapes
from src.data.embedded import check_image_size, prepare_embedded
from src.data.shards import load_eval_set, read_meta
from src.training.job import fingerprint_changes, resolve_data

register_resolvers()


def test_shapes_at_32_pixels_draw_the_same_scenes_on_a_finer_grid():
    small, large = shapes.load_shapes_split("eval", n=40), shapes.load_shapes_split("eval", n=40, image_size=32)
    assert large.images.shape == (40, 3, 32, 32) and small.images.shape == (40, 3, 16, 16)
    assert large.captions == small.captions and torch.equal(large.labels, small.labels)
    # Averaging 2x2 blocks of the 32-pixel image gives the 16-pixel one up to anti-aliasing (8x vs 4x supersampling).
    pooled = F.avg_pool2d(large.images, 2)
    assert (pooled - small.images).abs().mean() < 0.02
    assert (pooled - small.images).abs().mean() < 0.1 * (small.images - small.images.roll(1, 0)).abs().mean()


def test_the_default_size_is_the_16_pixel_data_bit_for_bit():
    default = shapes.load_shapes_split("eval", n=8)
    assert torch.equal(shapes.load_shapes_split("eval", n=8, image_size=16).images, default.images)
    assert torch.equal(digits.load_digits_split("eval", image_size=16).images, digits.load_digits_split("eval").images)


def test_digits_at_32_pixels():
    small, large = digits.load_digits_split("eval"), digits.load_digits_split("eval", image_size=32)
    assert large.images.shape == (len(small), 1, 32, 32) and large.captions == small.captions
    assert large.images.min() >= -1.0 and large.images.max() <= 1.0


@pytest.mark.parametrize("bad", [20, 0, 72, "32", True, 16.0])
def test_sizes_that_are_not_multiples_of_8_up_to_64_are_refused(bad):
    with pytest.raises(ValueError, match=r"image_size=.* is not allowed; allowed: a multiple of 8 from 8 to 64"):
        check_image_size(bad)


def test_a_32_pixel_dataset_is_cached_apart_and_trains_a_32_pixel_backbone(tmp_path):
    cache = tmp_path / "cache"
    dirs16 = prepare_embedded("shapes", cache / "data")
    dirs32 = prepare_embedded("shapes", cache / "data", image_size=32)
    assert dirs32["train"].parent.name.startswith("shapes-32px-v")
    assert dirs16["train"].parent.name.startswith("shapes-v")
    meta = read_meta(dirs32["train"])
    assert meta["latent_size"] == 32 and meta["image_size"] == 32 and meta["count"] == 4000
    assert load_eval_set(dirs32["eval"])["x0"].shape[-2:] == (32, 32)
    with initialize_config_module(config_module="conf", version_base="1.3"):
        cfg = compose(config_name="config", overrides=["data=shapes", "data.image_size=32",
                                                       f"paths.root_dir={tmp_path}", f"paths.cache_dir={cache}"])
    resolve_data(cfg)
    assert cfg.data.latent_size == 32 and cfg.data.train_dir == str(dirs32["train"])


def test_runs_fingerprinted_before_image_size_existed_still_resume(tmp_path):
    """A stored fingerprint without data.image_size is a 16-pixel run: it matches 16 and refuses 32."""
    cache = tmp_path / "cache"
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "checkpoints" / "last.ckpt").write_bytes(b"x")  # something trained: the directory is bound

    def cfg_at(size):
        with initialize_config_module(config_module="conf", version_base="1.3"):
            cfg = compose(config_name="config", overrides=[f"data.image_size={size}",
                                                           f"paths.root_dir={tmp_path}", f"paths.cache_dir={cache}"])
        resolve_data(cfg)
        return cfg

    from src.training.job import _fingerprint_json

    old = _fingerprint_json(cfg_at(16))
    del old["data"]["image_size"]
    (run_dir / "fingerprint.json").write_text(json.dumps(old))
    assert fingerprint_changes(cfg_at(16), run_dir) == []
    changed = fingerprint_changes(cfg_at(32), run_dir)
    assert "data.image_size" in changed and "data.latent_size" in changed
