"""data.image_size: the embedded datasets at a finer pixel grid (more values per sample, as a larger latent has)."""
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_module

from src.config import register_resolvers
from src.data import digits, shapes
from src.data.embedded import check_image_size, prepare_embedded
from src.data.shards import load_eval_set, read_meta
from src.training.prepare import fingerprint_changes, resolve_data
from tests import warm

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


def test_every_multiple_of_8_from_8_to_64_is_allowed():
    assert [check_image_size(size) for size in (8, 16, 24, 32, 40, 48, 56, 64)] == [8, 16, 24, 32, 40, 48, 56, 64]


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

    from src.training.prepare import _fingerprint_json

    old = _fingerprint_json(cfg_at(16))
    del old["data"]["image_size"]
    (run_dir / "fingerprint.json").write_text(json.dumps(old))
    assert fingerprint_changes(cfg_at(16), run_dir) == []
    changed = fingerprint_changes(cfg_at(32), run_dir)
    assert "data.image_size" in changed and "data.latent_size" in changed


@pytest.mark.slow  # the quick suite's time budget; the 32px seed sweep of test_cli_sweeps covers it through the CLI
def test_a_run_at_32_pixels_through_the_cli_trains_and_evaluates_at_that_size(tmp_path):
    """`python -m src.run data.image_size=32`: the backbone takes 32x32 inputs and the samples evaluated are 32x32."""
    tiny = ["model.depth=1", "model.hidden_size=32", "model.num_heads=2", "data.batch_size=8", "data.val_samples=8",
            "train.max_steps=2", "train.val_every=2", "train.ckpt_every=2", "eval.n_samples=4", "eval.batch_size=4",
            "eval.settings=[{steps: 2, cfg: 1.0}]", "eval.ema=[true]", "logger=csv",
            "trainer.enable_progress_bar=false", "torch_threads=1"]
    root = Path(__file__).resolve().parents[1]
    out = warm.run([sys.executable, "-m", "src.run", *tiny, "data=digits", "data.image_size=32",
                          f"paths.root_dir={tmp_path}"], cwd=root, capture_output=True, text=True, timeout=600,
                   env={**os.environ, "WANDB_MODE": "disabled"})
    assert out.returncode == 0, out.stderr[-3000:]
    (record,) = json.loads(next(tmp_path.glob("outputs/**/results.json")).read_text())
    assert record["config"]["data"]["latent_size"] == 32 and record["config"]["model"]["input_size"] == 32
    assert record["config"]["data"]["image_size"] == 32 and "32px" in record["config"]["data"]["train_dir"]
    run_dir = next(tmp_path.glob("outputs/**/results.json")).parent
    with np.load(run_dir / record["arrays"]) as arrays:
        shapes = {k: arrays[k].shape for k in arrays.files}
    assert any(s[-2:] == (32, 32) for s in shapes.values()), shapes
    # The same command again: the finished run is skipped, and says so.
    again = warm.run([sys.executable, "-m", "src.run", *tiny, "data=digits", "data.image_size=32",
                            f"paths.root_dir={tmp_path}"], cwd=root, capture_output=True, text=True, timeout=600,
                     env={**os.environ, "WANDB_MODE": "disabled"})
    assert again.returncode == 0 and again.stderr.strip() == f"complete already, skipped: {run_dir}", again.stderr


def test_the_planner_reads_each_image_size_from_its_own_shards(tmp_path):
    """`python -m src.plan -m data.image_size=16,32` sizes each job's backbone from its own data (no shared cache)."""
    from src.plan import data_meta

    metas = []
    for size in (16, 32):
        with initialize_config_module(config_module="conf", version_base="1.3"):
            cfg = compose(config_name="config", overrides=["data=shapes", f"data.image_size={size}",
                                                           f"paths.root_dir={tmp_path}",
                                                           f"paths.cache_dir={tmp_path / 'cache'}"])
        metas.append(data_meta(cfg)[0])
    assert [m["latent_size"] for m in metas] == [16, 32]
