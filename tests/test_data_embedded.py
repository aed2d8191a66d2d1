"""prepare_embedded: writes each dataset once, reuses complete folders, rebuilds incomplete ones, is safe in parallel."""

import json
import threading
import zlib

import pytest
import torch

from src.data.embedded import dataset_version, prepare_embedded
from src.data.shards import is_complete, load_eval_set, make_loader, read_meta


class StubEncoder:
    """A deterministic stand-in text encoder: embeddings seeded by the caption's crc32."""

    name = "stub-encoder"
    fingerprint = "stub-encoder@v1"
    context_length, context_dim, pooled_dim = 4, 6, 5

    def __init__(self):
        self.calls = 0

    def __call__(self, captions):
        self.calls += 1
        gens = [torch.Generator().manual_seed(zlib.crc32(c.encode())) for c in captions]
        context = torch.stack([torch.randn(self.context_length, self.context_dim, generator=g) for g in gens])
        pooled = torch.stack([torch.randn(self.pooled_dim, generator=g) for g in gens])
        return context, pooled


@pytest.fixture(scope="module")
def digits_dirs(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    return cache, prepare_embedded("digits", cache, text_encoder=StubEncoder())


def test_digits_folders_and_meta(digits_dirs):
    cache, dirs = digits_dirs
    assert dirs["train"] == cache / f"digits-{dataset_version(StubEncoder())}" / "train"
    train, held_out = read_meta(dirs["train"]), read_meta(dirs["eval"])
    assert (train["count"], held_out["count"]) == (1500, 297)
    for meta in (train, held_out):
        assert (meta["latent_channels"], meta["latent_size"]) == (1, 16)
        assert (meta["context_dim"], meta["pooled_dim"], meta["context_length"]) == (6, 5, 4)
        assert meta["encoder_names"] == ["stub-encoder"] and meta["dataset"] == "digits"
        assert meta["encoder_fingerprints"] == ["stub-encoder@v1"] and meta["image_size"] == 16
    assert (train["split"], held_out["split"]) == ("train", "eval")
    # the evaluation split is normalised with the training split's statistics
    assert (held_out["latent_mean"], held_out["latent_std"]) == (train["latent_mean"], train["latent_std"])
    assert -1 < train["latent_mean"] < 0 and 0.3 < train["latent_std"] < 1


def test_eval_set_holds_images_captions_and_labels(digits_dirs):
    _, dirs = digits_dirs
    ev = load_eval_set(dirs["eval"])
    assert ev["images"].shape == (297, 1, 16, 16) and ev["images"].min() >= -1.001 and ev["images"].max() <= 1.001
    assert ev["labels"].tolist()[:5] == [int(e["label"]) for e in ev["extras"][:5]]
    assert all(c.startswith("a photo of a ") for c in ev["captions"])
    context, pooled = StubEncoder()(ev["captions"][:3])
    torch.testing.assert_close(ev["context"][:3], context.half().float())
    torch.testing.assert_close(ev["pooled"][:3], pooled.half().float())
    batch = next(iter(make_loader(dirs["train"], 16, shuffle=True, seed=0)))
    assert batch["x0"].shape == (16, 1, 16, 16)


def test_complete_folders_are_reused(digits_dirs):
    cache, dirs = digits_dirs
    created = read_meta(dirs["train"])["created"]
    encoder = StubEncoder()
    assert prepare_embedded("digits", cache, text_encoder=encoder) == dirs
    assert encoder.calls == 0 and read_meta(dirs["train"])["created"] == created


def test_incomplete_folder_is_rebuilt(tmp_path):
    dirs = prepare_embedded("digits", tmp_path, text_encoder=StubEncoder())
    meta_path = dirs["eval"] / "meta.json"
    meta_path.write_text(json.dumps({**json.loads(meta_path.read_text()), "complete": False}))
    (dirs["train"] / "shard-000001.tar").unlink()
    encoder = StubEncoder()
    prepare_embedded("digits", tmp_path, text_encoder=encoder)
    assert encoder.calls > 0 and is_complete(dirs["train"]) and is_complete(dirs["eval"])


def test_a_shard_cut_short_is_found_and_rebuilt(tmp_path):
    """A shard file truncated after the folder was finished (a full disk, a copy interrupted): meta.json records
    each shard's size, so the folder is not complete and the next caller rebuilds it; a shards run refuses it."""
    from src.config import ConfigError
    from src.training.prepare import check_data
    from tests.test_training import make_cfg

    dirs = prepare_embedded("digits", tmp_path, text_encoder=StubEncoder())
    shard = dirs["train"] / "shard-000000.tar"
    assert read_meta(dirs["train"])["shard_bytes"][0] == shard.stat().st_size
    shard.write_bytes(shard.read_bytes()[:5000])
    assert not is_complete(dirs["train"])
    cfg = make_cfg(tmp_path, tmp_path / "cache", ["data=shards", "data.name=x", f"data.train_dir={dirs['train']}",
                                                  f"data.eval_dir={dirs['eval']}", "data.val_samples=8"])
    with pytest.raises(ConfigError, match=r"data.train_dir=.*: shard-000000.tar missing or not of the size meta.json "
                                          r"records \(cut short\?\); write the folder again"):
        check_data(cfg)
    encoder = StubEncoder()
    prepare_embedded("digits", tmp_path, text_encoder=encoder)
    assert encoder.calls > 0 and is_complete(dirs["train"])


def test_concurrent_callers_write_once(tmp_path):
    encoders = [StubEncoder() for _ in range(3)]
    results = [None] * 3

    def run(k):
        results[k] = prepare_embedded("digits", tmp_path, text_encoder=encoders[k])

    threads = [threading.Thread(target=run, args=(k,)) for k in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results[0] == results[1] == results[2]
    assert sum(e.calls > 0 for e in encoders) == 1  # one writer; the others waited on the lock and reused
    assert is_complete(results[0]["train"]) and is_complete(results[0]["eval"])


def test_a_different_encoder_gets_its_own_folder():
    class Other(StubEncoder):
        fingerprint = "stub-encoder@v2"
    assert dataset_version(Other()) != dataset_version(StubEncoder())


def test_unknown_dataset_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="dataset='imagenet'.*digits, shapes"):
        prepare_embedded("imagenet", tmp_path, text_encoder=StubEncoder())


@pytest.mark.slow
def test_shapes_with_the_committed_tiny_clip(tmp_path):
    dirs = prepare_embedded("shapes", tmp_path)
    train, held_out = read_meta(dirs["train"]), read_meta(dirs["eval"])
    assert (train["count"], held_out["count"]) == (4000, 500)
    assert (train["latent_channels"], train["context_dim"], train["pooled_dim"], train["context_length"]) == (3, 64, 64, 16)
    assert train["encoder_names"] == ["tiny-clip-16px"]
