"""Shard folders checked against the paper's setup and each other (the planner); what a run cannot train is refused."""

import pytest
import torch

from src import plan
from src.data.expectations import (PAPER_DATA, SAME_ENCODING, check_shard_folders, paper_differences,
                                   split_differences)
from src.data.shards import read_meta, write_shards

PAPER_GROUPS = [{"name": "clip:ViT-L-14-quickgelu"}, {"name": "clip:ViT-bigG-14"}, {"name": "t5:t5-v1_1-xxl"}]


def small_folder(path, seed, **kw):
    g = torch.Generator().manual_seed(seed)
    n = 6
    return write_shards(path, torch.randn(n, 4, 8, 8, generator=g), torch.randn(n, 5, 16, generator=g),
                        torch.randn(n, 8, generator=g), [f"c{i}" for i in range(n)], encoder_names=["clip:a"],
                        samples_per_shard=4, **kw)


def test_paper_meta_has_no_differences_and_each_difference_is_named():
    paper = {**PAPER_DATA, "text_groups": PAPER_GROUPS}
    assert paper_differences(paper) == []
    other = {**paper, "latent_channels": 4, "context_dim": 768, "text_groups": PAPER_GROUPS[:1]}
    assert paper_differences(other) == [
        "latent_channels 4 (paper: 16)", "context_dim 768 (paper: 4096)",
        "text groups clip:ViT-L-14-quickgelu (paper: CLIP L/14, CLIP bigG/14, T5-XXL)"]
    assert split_differences(paper, {**paper, "latent_std": 2.0}) == []  # normalised with the training split's


def test_the_paper_setup_is_sd3s():
    """256^2 images through a factor-8, 16-channel autoencoder; 77 CLIP tokens then 77 T5-XXL tokens of 4096; the
    two CLIPs' pooled vectors (768 + 1280); text groups CLIP L/14, CLIP bigG/14, T5-XXL in that order."""
    assert PAPER_DATA == {"latent_channels": 16, "latent_size": 256 // 8, "context_length": 77 + 77,
                          "context_dim": 4096, "pooled_dim": 768 + 1280}
    paper = {**PAPER_DATA, "text_groups": PAPER_GROUPS}
    assert paper_differences({**paper, "text_groups": [PAPER_GROUPS[i] for i in (0, 2, 1)]}) == [
        "text groups clip:ViT-L-14-quickgelu, t5:t5-v1_1-xxl, clip:ViT-bigG-14 "
        "(paper: CLIP L/14, CLIP bigG/14, T5-XXL)"]


def test_what_the_splits_must_share_and_what_a_run_cannot_do_without():
    """The planner names, and a run is refused for, every difference of the encoding's five; not the latent
    statistics: an evaluation split is normalised with the training split's when read, so one COCO folder serves
    ImageNet and CC12M runs (the paper grid's) without a Check line it could never satisfy."""
    train = {"shapes": {"latent": [4, 8, 8]}, "autoencoder": "sd3-vae", "autoencoder_sha256": "0123456789ab",
             "encoder_names": ["clip:a"], "encoder_sha256": ["456789abcdef"], "text_groups": [{"name": "clip:a"}],
             "latent_mean": 0.1, "latent_std": 0.9}
    for key in train:
        other = {**train, key: "other"}
        named = [] if key in ("latent_mean", "latent_std") else [f"{key} 'other' vs training {train[key]!r}"]
        assert split_differences(train, other) == split_differences(train, other, SAME_ENCODING) == named, key


def test_another_autoencoder_in_a_folder_of_the_same_name_is_another_encoding():
    """Autoencoders are named by their folder (AutoencoderKL:vae for .../sd15/vae and .../sdxl/vae alike): their
    files' content tells them apart, where both folders record it (folders written before do not)."""
    train = {"shapes": {"latent": [4, 8, 8]}, "autoencoder": "AutoencoderKL:vae", "autoencoder_sha256": "aaaaaaaaaaaa"}
    other = {**train, "autoencoder_sha256": "bbbbbbbbbbbb"}
    assert split_differences(train, other, SAME_ENCODING) == ["autoencoder_sha256 'bbbbbbbbbbbb' vs training "
                                                              "'aaaaaaaaaaaa'"]
    older = {k: v for k, v in train.items() if k != "autoencoder_sha256"}
    assert split_differences(train, older, SAME_ENCODING) == split_differences(older, train, SAME_ENCODING) == []


def test_text_encoders_of_one_name_with_other_weights_are_another_encoding(tmp_path):
    """Text encoders are named by model or folder (clip:ViT-L-14 for OpenAI and LAION weights alike, t5:t5 for any
    folder called t5): encoder_sha256 tells them apart, where both folders record it (folders written before do not),
    and a run is refused in one line naming it and both digests."""
    from hydra import compose, initialize_config_module

    from src.config import register_resolvers
    from src.training.prepare import ConfigError, check_data

    register_resolvers()
    digests = {"train": ["aaaaaaaaaaaa", "cccccccccccc"], "laion": ["bbbbbbbbbbbb", "cccccccccccc"], "older": None}
    for i, (name, sha) in enumerate(digests.items()):
        small_folder(tmp_path / name, i, latent_mean=0.0, latent_std=1.0,
                     extra_meta={} if sha is None else {"encoder_sha256": sha})
    assert "encoder_sha256" not in read_meta(tmp_path / "older")

    def check(train_dir, eval_dir):
        with initialize_config_module(config_module="conf", version_base="1.3"):
            cfg = compose(config_name="config", overrides=[
                "data=shards", f"data.train_dir={tmp_path / train_dir}", f"data.eval_dir={tmp_path / eval_dir}",
                "data.val_samples=4"])
        return check_data(cfg)

    with pytest.raises(ConfigError) as error:
        check("train", "laion")
    assert str(error.value) == (f"data.eval_dir={tmp_path / 'laion'} is not encoded like data.train_dir "
                                "(encoder_sha256 ['bbbbbbbbbbbb', 'cccccccccccc'] vs training ['aaaaaaaaaaaa', "
                                "'cccccccccccc']): preprocess it with the same models and --stats-from the training "
                                "folder")
    notes = check_shard_folders(tmp_path / "train", tmp_path / "laion")
    assert "(encoder_sha256 ['bbbbbbbbbbbb', 'cccccccccccc'] vs training ['aaaaaaaaaaaa', 'cccccccccccc'])" in notes[-1]
    for train_dir, eval_dir in (("train", "older"), ("older", "laion"), ("train", "train")):
        assert check(train_dir, eval_dir)["context_dim"] == 16, (train_dir, eval_dir)
        assert not any("not encoded like" in n for n in check_shard_folders(tmp_path / train_dir, tmp_path / eval_dir))


def test_folders_checked_only_where_they_exist(tmp_path):
    assert check_shard_folders(tmp_path / "none", tmp_path / "none") == []
    train = small_folder(tmp_path / "train", 0)
    small_folder(tmp_path / "same", 1, latent_mean=train["latent_mean"], latent_std=train["latent_std"])
    small_folder(tmp_path / "own-stats", 2)
    assert len(check_shard_folders(tmp_path / "train", tmp_path / "none")) == 1  # no evaluation folder yet
    notes = check_shard_folders(tmp_path / "train", tmp_path / "same")
    assert len(notes) == 1 and "differs from the paper's setup: latent_channels 4 (paper: 16)" in notes[0]
    # Its own statistics are no difference: it is normalised with the training folder's when read.
    assert check_shard_folders(tmp_path / "train", tmp_path / "own-stats") == notes
    assert read_meta(tmp_path / "own-stats")["latent_mean"] != train["latent_mean"]


def test_plan_states_what_the_shards_hold_unlike_the_paper(tmp_path, capsys):
    small_folder(tmp_path / "imagenet-256", 0)
    small_folder(tmp_path / "cc12m-256", 1)
    small_folder(tmp_path / "coco2014-256", 2)
    assert plan.main(["+sweep=paper_grid", f"paths.shards_dir={tmp_path}", "loss=paper/rf_lognorm_0.00_1.00",
                      "model.depth=2"]) == 0
    out = capsys.readouterr().out
    checks = [line for line in out.splitlines() if line.startswith("Check: ")]
    # The two training folders unlike the paper; the COCO folder, encoded like both with statistics of its own
    # (normalised with each training folder's when read), is unlike neither.
    assert len(checks) == 2, out
    assert any(f"data.train_dir={tmp_path}/cc12m-256 differs from the paper's setup: latent_channels 4" in c
               for c in checks)
    assert not any("is not encoded like" in c for c in checks)


def test_an_evaluation_split_encoded_otherwise_is_refused_before_training(tmp_path):
    """Else the first validation fails in a traceback (another width), or the evaluation conditions on what the model
    never saw (other encoders, as many tokens): one line naming the folder and the difference, before any work."""
    from hydra import compose, initialize_config_module

    from src.config import register_resolvers
    from src.training.prepare import ConfigError, check_data

    register_resolvers()
    train = small_folder(tmp_path / "train", 0)
    stats = {"latent_mean": train["latent_mean"], "latent_std": train["latent_std"]}
    small_folder(tmp_path / "same", 1, **stats)
    g = torch.Generator().manual_seed(2)
    for name, width, encoder in (("wide", 24, "clip:a"), ("other-encoder", 16, "clip:b")):
        write_shards(tmp_path / name, torch.randn(4, 4, 8, 8, generator=g), torch.randn(4, 5, width, generator=g),
                     torch.randn(4, 8, generator=g), ["c"] * 4, encoder_names=[encoder], **stats)

    def check(eval_dir):
        with initialize_config_module(config_module="conf", version_base="1.3"):
            cfg = compose(config_name="config", overrides=[
                "data=shards", f"data.train_dir={tmp_path / 'train'}", f"data.eval_dir={tmp_path / eval_dir}",
                "data.val_samples=4"])
        return check_data(cfg)

    assert check("same")["context_dim"] == 16
    with pytest.raises(ConfigError, match=rf"^data.eval_dir={tmp_path}/wide is not encoded like data.train_dir "
                                          r"\(shapes .*'context': \[5, 24\].* vs training .*\[5, 16\]"):
        check("wide")
    with pytest.raises(ConfigError, match=r"not encoded like data.train_dir \(encoder_names \['clip:b'\] vs training "
                                          r"\['clip:a'\]\): preprocess it with the same models"):
        check("other-encoder")


def test_a_missing_shard_folder_says_what_to_do_naming_the_setting_the_user_sets(tmp_path):
    """`python -m src.run +sweep=paper_grid paths.shards_dir=...` before the shards exist: every job's line said
    only "data.train_dir=.../imagenet-256: no webdataset shard folder there (meta.json missing)", neither how to
    make one nor that the grid's folders come from paths.shards_dir."""
    from hydra import compose, initialize_config_module

    from src.config import register_resolvers
    from src.training.prepare import ConfigError, check_data

    register_resolvers()

    def check(overrides):
        with initialize_config_module(config_module="conf", version_base="1.3"):
            check_data(compose(config_name="config", overrides=overrides))

    with pytest.raises(ConfigError, match=rf"^data.train_dir={tmp_path}/imagenet-256: no webdataset shard folder "
                                          r"there \(meta.json missing\); write it with python -m src.preprocess "
                                          r"\(README: Real data\), or set paths.shards_dir to where it is$"):
        check(["+sweep=paper_grid", f"paths.shards_dir={tmp_path}"])
    with pytest.raises(ConfigError, match=r"meta.json missing\); write it with python -m src.preprocess "
                                          r"\(README: Real data\), or set data.eval_dir to where it is$"):
        small_folder(tmp_path / "train", 0)
        check(["data=shards", f"data.train_dir={tmp_path / 'train'}", f"data.eval_dir={tmp_path / 'none'}"])


def test_training_shards_of_non_square_latents_are_refused_in_one_line(tmp_path):
    """meta.json records [H, W] for them; the configuration's latent_size is one side (a TypeError before)."""
    from hydra import compose, initialize_config_module

    from src.config import register_resolvers
    from src.training.prepare import ConfigError, check_data

    register_resolvers()
    g = torch.Generator().manual_seed(0)
    for name in ("train", "eval"):
        write_shards(tmp_path / name, torch.randn(4, 4, 8, 6, generator=g), torch.randn(4, 5, 16, generator=g),
                     torch.randn(4, 8, generator=g), ["c"] * 4, encoder_names=["clip:a"], latent_mean=0.0,
                     latent_std=1.0)
    with initialize_config_module(config_module="conf", version_base="1.3"):
        cfg = compose(config_name="config", overrides=[
            "data=shards", f"data.train_dir={tmp_path / 'train'}", f"data.eval_dir={tmp_path / 'eval'}",
            "data.val_samples=4"])
    with pytest.raises(ConfigError, match=rf"^data.train_dir={tmp_path}/train: latents of 8 x 6; allowed: square"):
        check_data(cfg)
