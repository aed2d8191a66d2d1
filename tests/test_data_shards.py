"""Shard format: write -> read round trip, normalisation, metadata, atomicity, loader determinism and splitting."""

import json
import tarfile

import numpy as np
import pytest
import torch

from src.data import shards
from src.data.shards import (ShardWriter, decode_latents, is_complete, load_eval_set, make_loader, read_meta,
                             write_shards)

N = 45


def _arrays(n=N, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        "latents": torch.rand(n, 3, 4, 4, generator=g) * 2 - 1,
        "contexts": torch.randn(n, 5, 8, generator=g),
        "pooled": torch.randn(n, 6, generator=g),
        "captions": [f"caption number {i}" for i in range(n)],
        "extras": [{"label": i % 7, "index": i} for i in range(n)],
    }


@pytest.fixture()
def folder(tmp_path):
    data = _arrays()
    write_shards(tmp_path / "s", **data, encoder_names=["enc-a"], samples_per_shard=10)
    return tmp_path / "s", data


def test_meta_describes_the_folder(folder):
    path, data = folder
    meta = read_meta(path)
    assert meta["complete"] is True and meta["count"] == N
    assert meta["shards"] == [f"shard-{i:06d}.tar" for i in range(5)]
    assert meta["shapes"] == {"latent": [3, 4, 4], "context": [5, 8], "pooled": [6]}
    assert (meta["latent_channels"], meta["latent_size"], meta["context_dim"], meta["pooled_dim"]) == (3, 4, 8, 6)
    assert meta["encoder_names"] == ["enc-a"] and meta["autoencoder"] == "identity"
    stored = data["latents"].half().double()
    assert meta["latent_mean"] == pytest.approx(stored.mean().item(), abs=1e-9)
    assert meta["latent_std"] == pytest.approx(stored.std(unbiased=False).item(), rel=1e-9)


def test_per_sample_members_and_keys(folder):
    path, _ = folder
    with tarfile.open(path / "shard-000000.tar") as tar:
        names = tar.getnames()
    assert sorted(names[:5]) == ["000000000.context.npy", "000000000.json", "000000000.latent.npy",
                                 "000000000.pooled.npy", "000000000.txt"]
    assert all(name.count(".") in (1, 2) and name.split(".")[0].isdigit() for name in names)


def test_round_trip_in_writing_order(folder):
    path, data = folder
    ev = load_eval_set(path)
    meta = ev["meta"]
    assert ev["captions"] == data["captions"]
    assert ev["labels"].tolist() == [i % 7 for i in range(N)]
    assert [e["index"] for e in ev["extras"]] == list(range(N))
    torch.testing.assert_close(ev["context"], data["contexts"].half().float())
    torch.testing.assert_close(ev["pooled"], data["pooled"].half().float())
    torch.testing.assert_close(ev["x0"] * meta["latent_std"] + meta["latent_mean"], data["latents"].half().float(),
                               atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(ev["images"], data["latents"], atol=2e-3, rtol=0)
    assert ev["x0"].dtype == torch.float32
    # normalised by the global mean and std: zero mean, unit variance over the whole folder
    assert abs(ev["x0"].mean().item()) < 1e-5 and ev["x0"].std(unbiased=False).item() == pytest.approx(1, abs=1e-5)
    first = load_eval_set(path, n=12)
    assert first["captions"] == data["captions"][:12] and torch.equal(first["x0"], ev["x0"][:12])


def test_an_evaluation_holds_the_text_embeddings_of_the_prompts_it_samples_only(folder):
    """Every image is a reference for FID, but only the first n_samples prompts condition the samples (sample k
    takes prompt k mod their number, src.evaluation.evaluate): the whole COCO-2014 split's contexts (40,504 x 154 x
    4096) would take 100 GB as float32 in every evaluation (src.evaluation.run asks for prompts=eval.n_samples)."""
    path, _ = folder
    ev = load_eval_set(path)
    some = load_eval_set(path, prompts=12)
    assert torch.equal(some["x0"], ev["x0"]) and torch.equal(some["images"], ev["images"])
    assert torch.equal(some["labels"], ev["labels"]) and some["extras"] == ev["extras"]
    assert some["captions"] == ev["captions"][:12]
    assert torch.equal(some["context"], ev["context"][:12]) and torch.equal(some["pooled"], ev["pooled"][:12])
    assert torch.equal(load_eval_set(path, prompts=N + 5)["context"], ev["context"])  # all there are
    with pytest.raises(ValueError, match="prompts=0 is not allowed"):
        load_eval_set(path, prompts=0)


def test_an_evaluation_never_reads_the_text_embeddings_of_the_prompts_it_does_not_sample(folder):
    """COCO-2014 val streamed whole was 52 GB of 154 x 4096 float16 contexts read to keep 1000 of them (1.3 GB):
    with prompts=k the later samples' context and pooled members are skipped by their tar headers' offsets. Shown
    with a later sample's context made unreadable in place: only an evaluation that conditions on it reads it."""
    path, _ = folder
    ev = load_eval_set(path, prompts=12)
    index = np.load(path / shards.INDEX_FILE)
    sample = 30
    at = int(index["start"][sample] + index["rel"][0, 1])  # context.npy's data (the layout is uniform)
    with open(path / shards.SHARD_PATTERN.format(int(index["shard"][sample])), "r+b") as f:
        f.seek(at)
        f.write(b"\0" * 6)  # the .npy magic: decoding it fails
    again = load_eval_set(path, prompts=12)
    assert torch.equal(again["x0"], ev["x0"]) and torch.equal(again["context"], ev["context"])
    assert again["captions"] == ev["captions"] and again["extras"] == ev["extras"]
    with pytest.raises(ValueError, match="npy"):
        load_eval_set(path, prompts=sample + 1)


def test_decode_latents_inverts_normalisation_and_refuses_real_autoencoders(folder):
    path, data = folder
    meta = read_meta(path)
    x0 = (data["latents"] - meta["latent_mean"]) / meta["latent_std"]
    torch.testing.assert_close(decode_latents(x0, meta), data["latents"])
    with pytest.raises(ValueError, match="autoencoder='sd-vae'"):
        decode_latents(x0, {**meta, "autoencoder": "sd-vae"})


def test_given_statistics_are_used(tmp_path):
    data = _arrays(n=12)
    meta = write_shards(tmp_path / "e", **data, encoder_names=["x"], latent_mean=0.5, latent_std=2.0)
    assert (meta["latent_mean"], meta["latent_std"]) == (0.5, 2.0)
    ev = load_eval_set(tmp_path / "e")
    torch.testing.assert_close(ev["x0"], (data["latents"].half().float() - 0.5) / 2.0)


def test_samples_without_a_label_are_labelled_minus_one(tmp_path):
    data = {**_arrays(n=4), "extras": [{"label": 3}, {}, None, {"index": 1}]}
    write_shards(tmp_path / "s", **data, encoder_names=["x"])
    assert load_eval_set(tmp_path / "s")["labels"].tolist() == [3, -1, -1, -1]


def test_interrupted_writing_leaves_an_incomplete_folder(tmp_path):
    data = _arrays(n=25)
    with pytest.raises(RuntimeError, match="boom"):
        with ShardWriter(tmp_path / "s", encoder_names=["x"], samples_per_shard=10) as writer:
            for i in range(25):
                if i == 17:
                    raise RuntimeError("boom")
                writer.write(data["latents"][i], data["contexts"][i], data["pooled"][i], data["captions"][i])
    assert not is_complete(tmp_path / "s")
    assert not (tmp_path / "s" / "meta.json").exists()
    assert not list((tmp_path / "s").glob(".*.tmp"))  # the half-written shard was removed
    with pytest.raises(FileNotFoundError, match="no meta.json"):
        make_loader(tmp_path / "s", 4, shuffle=False, seed=0)
    # a rewrite of the same folder completes it
    write_shards(tmp_path / "s", **_arrays(n=25), encoder_names=["x"], samples_per_shard=10)
    assert is_complete(tmp_path / "s") and read_meta(tmp_path / "s")["count"] == 25


def test_meta_without_marker_or_missing_shard_is_incomplete(folder):
    path, _ = folder
    meta = json.loads((path / "meta.json").read_text())
    (path / "shard-000004.tar").unlink()
    assert not is_complete(path)
    (path / "meta.json").write_text(json.dumps({**meta, "complete": False}))
    with pytest.raises(FileNotFoundError, match="incomplete"):
        read_meta(path)
    (path / "meta.json").write_text(json.dumps({k: v for k, v in meta.items() if k != "complete"}))
    with pytest.raises(FileNotFoundError, match="incomplete"):  # no marker at all: not finished either
        read_meta(path)


def test_a_folder_written_before_shard_sizes_were_recorded_is_complete_while_its_shards_are_there(folder):
    """meta.json gained shard_bytes later: an older folder counts as complete while every shard it names exists."""
    path, _ = folder
    meta = json.loads((path / "meta.json").read_text())
    (path / "meta.json").write_text(json.dumps({k: v for k, v in meta.items() if k != "shard_bytes"}))
    assert is_complete(path)
    (path / "shard-000004.tar").unlink()
    assert not is_complete(path)


def test_writer_validates_input(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="refusing to overwrite"):
        write_shards(tmp_path, **_arrays(n=2), encoder_names=["x"])
    assert (tmp_path / "notes.txt").exists()
    with pytest.raises(ValueError, match="sample 1 has shapes"):
        with ShardWriter(tmp_path / "a", encoder_names=["x"]) as w:
            w.write(torch.zeros(3, 4, 4), torch.zeros(5, 8), torch.zeros(6), "a")
            w.write(torch.zeros(3, 4, 4), torch.zeros(5, 9), torch.zeros(6), "b")
    for stats in ({"latent_mean": 0.5}, {"latent_std": 2.0}):  # one without the other: refused before writing
        with pytest.raises(ValueError, match="latent_mean and latent_std must be given together"):
            ShardWriter(tmp_path / "e", encoder_names=["x"], **stats)
    with pytest.raises(ValueError, match="samples_per_shard=0"):
        ShardWriter(tmp_path / "b", encoder_names=["x"], samples_per_shard=0)
    with pytest.raises(ValueError, match="latents has 3 samples but captions has 2"):
        write_shards(tmp_path / "c", torch.zeros(3, 1, 2, 2), torch.zeros(2, 1, 1), torch.zeros(2, 1), ["a", "b"],
                     encoder_names=["x"])
    with pytest.raises(ValueError, match="non-finite"):
        with ShardWriter(tmp_path / "d", encoder_names=["x"]) as w:
            w.write(torch.full((1, 2, 2), 1e6), torch.zeros(1, 1), torch.zeros(1), "overflows float16")


def _epoch(loader):
    return [(b["caption"], b["x0"]) for b in loader]


def test_loader_batches_are_normalised_float32(folder):
    path, data = folder
    batches = list(make_loader(path, 8, shuffle=False, seed=0))
    assert [len(b["caption"]) for b in batches] == [8] * 5 + [5]
    b = batches[0]
    assert b["x0"].shape == (8, 3, 4, 4) and b["context"].shape == (8, 5, 8) and b["pooled"].shape == (8, 6)
    assert all(t.dtype == torch.float32 for t in (b["x0"], b["context"], b["pooled"]))
    assert [c for b in batches for c in b["caption"]] == data["captions"]
    ev = load_eval_set(path)
    torch.testing.assert_close(torch.cat([b["x0"] for b in batches]), ev["x0"])


def test_loader_is_deterministic_for_a_seed(folder):
    path, data = folder
    first = make_loader(path, 8, shuffle=True, seed=3)
    second = make_loader(path, 8, shuffle=True, seed=3)
    epoch_a, epoch_b = _epoch(first), _epoch(second)
    assert [c for c, _ in epoch_a] == [c for c, _ in epoch_b]
    assert all(torch.equal(x, y) for (_, x), (_, y) in zip(epoch_a, epoch_b))
    order = [c for caps, _ in epoch_a for c in caps]
    assert sorted(order) == sorted(data["captions"]) and order != data["captions"]  # a permutation, shuffled
    other = [c for caps, _ in _epoch(make_loader(path, 8, shuffle=True, seed=4)) for c in caps]
    assert other != order
    # a second epoch of the same loader gets a new (but reproducible) order
    assert [c for caps, _ in _epoch(first) for c in caps] != order


def test_the_seed_shuffles_the_samples_within_a_shard(tmp_path):
    """One shard: the shard order cannot differ, so only the sample shuffle's own seed tells seeds apart."""
    write_shards(tmp_path / "one", **_arrays(n=20), encoder_names=["x"], samples_per_shard=20)
    orders = {tuple(c for b in make_loader(tmp_path / "one", 5, shuffle=True, seed=s) for c in b["caption"])
              for s in range(3)}
    assert len(orders) == 3


def test_epoch_order_is_reproducible_across_loaders(folder):
    path, _ = folder
    a, b = make_loader(path, 8, shuffle=True, seed=5), make_loader(path, 8, shuffle=True, seed=5)
    for _ in range(2):
        assert [c for caps, _ in _epoch(a) for c in caps] == [c for caps, _ in _epoch(b) for c in caps]


def test_resampled_loader_counts_batches_and_is_deterministic(folder):
    path, _ = folder
    loader = make_loader(path, 4, shuffle=True, seed=1, resampled=True, epoch_batches=7)
    batches = list(loader)
    assert len(batches) == 7 and all(len(b["caption"]) == 4 for b in batches)
    again = list(make_loader(path, 4, shuffle=True, seed=1, resampled=True, epoch_batches=7))
    assert [b["caption"] for b in batches] == [b["caption"] for b in again]
    endless = iter(make_loader(path, 4, shuffle=True, seed=1, resampled=True))  # no epoch_batches: endless
    assert len([next(endless) for _ in range(30)]) == 30  # more batches than one pass over the 45 samples holds


def test_epoch_batches_repeats_a_finite_set(folder):
    path, _ = folder
    batches = list(make_loader(path, 10, shuffle=False, seed=0, epoch_batches=8))
    assert len(batches) == 8


@pytest.mark.parametrize("resampled", [False, True])
def test_ranks_split_the_shards(folder, monkeypatch, resampled):
    """With RANK/WORLD_SIZE set (as torchrun does), each rank reads its own shards; resampled does not crash."""
    path, data = folder
    seen = []
    for rank in range(2):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        kwargs = {"epoch_batches": 3} if resampled else {}
        loader = make_loader(path, 5, shuffle=True, seed=0, resampled=resampled, **kwargs)
        seen.append([c for b in loader for c in b["caption"]])
    if resampled:
        assert all(len(s) == 15 for s in seen) and seen[0] != seen[1]
    else:  # 5 shards over 2 ranks: disjoint, together everything once
        assert not set(seen[0]) & set(seen[1])
        assert sorted(seen[0] + seen[1]) == sorted(data["captions"])


@pytest.mark.slow
def test_loader_with_workers_reads_everything_once(folder):
    path, data = folder
    loader = make_loader(path, 4, shuffle=True, seed=0, num_workers=2)
    captions = [c for b in loader for c in b["caption"]]
    assert sorted(captions) == sorted(data["captions"])


def test_loader_rejects_bad_settings(folder):
    path, data = folder
    with pytest.raises(ValueError, match="batch_size=0"):
        make_loader(path, 0, shuffle=False, seed=0)
    with pytest.raises(ValueError, match="epoch_batches=0"):
        make_loader(path, 2, shuffle=False, seed=0, epoch_batches=0)
    assert load_eval_set(path, n=N)["captions"] == data["captions"]  # all of them: allowed
    with pytest.raises(ValueError, match="n=46"):
        load_eval_set(path, n=46)


def test_npy_decoding_matches_numpy():
    for array in (np.arange(12, dtype=np.float16).reshape(3, 4), np.asfortranarray(np.ones((2, 3))),
                  np.zeros((0, 2), np.float32), np.array(3.0)):
        for _ in range(2):  # second pass uses the cached header
            out = shards.npy_array(shards.npy_bytes(array))
            assert out.dtype == array.dtype and out.shape == array.shape and np.array_equal(out, array)
    with pytest.raises(ValueError, match="not in .npy format"):
        shards.npy_array(b"garbage-bytes")


def test_a_meta_json_that_is_not_json_is_named(folder):
    path, _ = folder
    (path / "meta.json").write_text('{"count": 45,')
    with pytest.raises(ValueError, match=rf"^shard folder {path}'s meta.json is not JSON \(.*\); write the folder "):
        read_meta(path)
    assert not is_complete(path)


def test_the_whole_set_is_refused_when_the_shards_hold_another_count_than_meta_json(folder):
    """In memory as streaming (ShardSamples): a tar cut short at a sample's first header ends without an error, so
    the in-memory training set silently lacked its samples (a folder written before meta.json recorded the shards'
    sizes passes the checks before launching), and a hand-edited count trained in memory but not streaming."""
    path, _ = folder
    meta = json.loads((path / "meta.json").read_text())
    (path / "meta.json").write_text(json.dumps({**meta, "count": N + 1}))
    with pytest.raises(ValueError, match=rf"the shards hold {N} samples, meta.json says {N + 1}; rebuild the folder"):
        load_eval_set(path)
    assert len(load_eval_set(path, n=N)["x0"]) == N  # the first n of them are there
    with pytest.raises(ValueError, match=rf"the shards hold {N} samples, meta.json says {N + 1}"):
        load_eval_set(path, n=N + 1)  # (past the count)
    last = path / "shard-000004.tar"  # samples 40..44; cut at sample 44's first header, sizes no longer recorded
    with tarfile.open(last) as tar:
        cut = next(m.offset for m in tar.getmembers() if m.name.startswith("000000044."))
    with open(last, "r+b") as f:
        f.truncate(cut)
    (path / "meta.json").write_text(json.dumps({k: v for k, v in meta.items() if k != "shard_bytes"}))
    assert is_complete(path)
    with pytest.raises(ValueError, match=rf"the shards hold {N - 1} samples, meta.json says {N}; rebuild the folder"):
        load_eval_set(path)


def test_samples_lacking_a_member_are_named_when_read_in_memory(folder):
    """What the validation batch and the evaluation read (load_eval_set): another tool's shard without pooled.npy
    was a bare KeyError('pooled.npy'); named as the streaming reader names it (build_index)."""
    import io

    path, _ = folder
    shard = path / "shard-000001.tar"
    with tarfile.open(shard) as old:
        members = [(m, old.extractfile(m).read()) for m in old]
    with tarfile.open(shard, "w") as new:
        for member, data in members:
            if member.name != "000000013.pooled.npy":
                new.addfile(member, io.BytesIO(data))
    with pytest.raises(ValueError, match=rf"^{shard}: sample 000000013 lacks pooled.npy; not a training shard$"):
        load_eval_set(path)
