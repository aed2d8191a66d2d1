"""Preprocessing as a real user's data and mistakes meet it: refusals that change nothing, odd images, odd tables."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from src.preprocess.__main__ import main
from src.preprocess.pipeline import WORK_DIR, done_path
from tests.test_preprocess import RES, make_imagenet, make_tsv, models, own_cache_dir  # noqa: F401 (fixtures)


def imagenet_argv(train: Path, mapping: Path, out: Path, models: dict) -> list[str]:
    return ["imagenet", "--root", str(train), "--class-names", str(mapping), "--out", str(out), "--resolution",
            str(RES), "--clip", *models["clip_a"], "--chunk-size", "4", "--batch-size", "3", "--num-workers", "0",
            "--device", "cpu", "--no-progress"]


def test_refused_after_loading_the_models_writes_nothing(tmp_path, models, capsys):
    """Errors found only when the models load (or the statistics folder is read) are one line naming the setting,
    exit 2, and leave --out as it was: not created, or an unfinished run untouched."""
    train, mapping = make_imagenet(tmp_path / "imagenet", per_class=2)  # 7 items: 2 chunks
    empty_config = tmp_path / "empty"  # a folder with a config.json that no library can build a model from
    empty_config.mkdir()
    (empty_config / "config.json").write_text("{}")
    odd_meta = tmp_path / "odd-meta"
    odd_meta.mkdir()
    (odd_meta / "meta.json").write_text(json.dumps({"complete": True, "latent_channels": 3}))
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    out = tmp_path / "out"
    argv = imagenet_argv(train, mapping, out, models)
    cases = [
        (["--clip", models["clip_a"][0], str(tmp_path / "nope.pt")], "clip weights="),  # missing paths
        (["--clip", str(tmp_path / "nope.json"), models["clip_a"][1]], "clip model config="),
        (["--t5", str(tmp_path / "no-t5")], "t5="),
        (["--autoencoder", str(tmp_path / "no-vae")], "autoencoder="),
        (["--resolution", "15", "--autoencoder", models["vae"]], "resolution=15 is not allowed"),
        (["--autoencoder", str(empty_config)], "autoencoder="),
        (["--clip", models["clip_b"][0], models["clip_a"][1]], "clip="),  # weights of another model
        (["--t5", str(empty_config)], "t5="),
        (["--stats-from", str(train)], "stats_from="),  # an image folder, not a shard folder
        (["--stats-from", str(odd_meta)], "stats_from="),  # a meta.json without latent statistics
        (["--text-cache", "-1"], "text_cache=-1 is not allowed"),
        (["--seed", "-1"], "seed=-1 is not allowed"),
        (["--device", "tpu"], "device='tpu' is not allowed"),  # not blamed on the first model that loads
        (["--device", "mps"], "device='mps' is not allowed"),
    ]
    capsys.readouterr()
    for extra, message in cases:
        assert main([*argv, *extra]) == 2, extra
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1 and any(w in err for w in ("need", "allowed:", "give")), err
        assert not out.exists(), extra
    # A run killed in its first chunk is left exactly as it was by a refused rerun with another setting.
    assert main([*argv, "--max-chunks", "1"]) == 3
    shutil.rmtree(out / WORK_DIR / "chunk-000000")
    done_path(out, 0).unlink()
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert main([*argv, "--autoencoder", str(empty_config)]) == 2
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    # --out naming a file
    capsys.readouterr()
    assert main([*imagenet_argv(train, mapping, a_file, models)]) == 2
    assert "out=" in capsys.readouterr().err and a_file.read_text() == "x"


def test_assembled_folder_has_its_index_and_every_shard_size(tmp_path, models, monkeypatch, capsys):
    """The folder's index.npz (streaming starts without scanning the tars) and shard_bytes cover every shard, so a
    shard cut short after assembly is found by is_complete, and by a rerun of the command."""
    import numpy as np

    import src.data.shards as shards_module
    from src.data.shards import ShardSamples, is_complete, iter_samples, read_meta

    train, mapping = make_imagenet(tmp_path / "imagenet", per_class=4)  # 13 items: 4 chunks, one unreadable
    out = tmp_path / "out"
    assert main(imagenet_argv(train, mapping, out, models)) == 0
    meta = read_meta(out)
    assert len(meta["shards"]) == 4 and (out / "index.npz").is_file()
    assert meta["shard_bytes"] == [(out / name).stat().st_size for name in meta["shards"]]

    def no_scan(paths):
        raise AssertionError("the folder's index.npz was not used")

    monkeypatch.setattr(shards_module, "build_index", no_scan)
    streamed = ShardSamples(out)
    rows = list(iter_samples(out))
    assert len(streamed) == meta["count"] == len(rows) == 12
    for i, row in enumerate(rows):  # the index points at each sample's members, in writing order
        sample = streamed.read(i)
        for name in ("latent", "context", "pooled"):
            np.testing.assert_array_equal(sample[name], row[name])
    streamed.close()
    last = out / meta["shards"][-1]
    data = last.read_bytes()
    last.unlink()  # a new file, not the chunk's hard link
    last.write_bytes(data[: len(data) // 2])
    assert not is_complete(out)
    capsys.readouterr()
    assert main(imagenet_argv(train, mapping, out, models)) == 2  # a rerun does not call it complete
    assert f"{meta['shards'][-1]} is missing or not of its recorded size" in capsys.readouterr().err


def encoded(image, fmt: str = "PNG") -> bytes:
    import io

    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return buf.getvalue()


def test_sixteen_bit_grey_is_scaled_and_undefined_ranges_are_refused():
    """PIL's own conversion clips 16-bit grey to white; 32-bit and float pixels have no range to scale from."""
    import numpy as np
    from PIL import Image

    from src.preprocess.images import decode_image

    ramp = np.tile(np.linspace(0, 1, 32), (24, 1))
    grey16 = Image.fromarray(np.round(ramp * 65535).astype(np.uint16))
    assert grey16.mode.startswith("I;16")
    grey8 = Image.fromarray(np.round(ramp * 255).astype(np.uint8))
    torch.testing.assert_close(decode_image(encoded(grey16), RES), decode_image(encoded(grey8), RES),
                               atol=1.01 / 127.5, rtol=0)
    for pixels in (np.float32(ramp), np.int32(ramp * 40000)):
        with pytest.raises(ValueError, match="no defined range"):
            decode_image(encoded(Image.fromarray(pixels), "TIFF"), RES)


def test_a_long_strip_is_not_resized_whole(monkeypatch):
    """A 2 x 6000 banner gives its centre square without a 256 x 768,000 intermediate image."""
    import numpy as np
    from PIL import Image

    from src.preprocess.images import MAX_ASPECT, decode_image, resize_center_crop

    sizes = []
    resize = Image.Image.resize
    monkeypatch.setattr(Image.Image, "resize", lambda self, size, *a, **k: (sizes.append(size),
                                                                            resize(self, size, *a, **k))[1])
    strip = Image.fromarray(np.full((6000, 2, 3), 200, np.uint8))
    assert decode_image(encoded(strip), 256).shape == (3, 256, 256)
    assert max(max(s) for s in sizes) <= MAX_ASPECT * 256
    # Within MAX_ASPECT nothing changes; beyond, the same centre square up to a fraction of a pixel.
    ramp = np.tile(np.linspace(0, 255, 200), (20, 1))[:, :, None].repeat(3, axis=2).astype(np.uint8)
    cut = resize_center_crop(Image.fromarray(ramp), RES)
    whole = resize(Image.fromarray(ramp), (160, RES), Image.BICUBIC).crop((72, 0, 72 + RES, RES))
    assert np.abs(np.asarray(cut, np.int16) - np.asarray(whole, np.int16)).max() <= 2


def test_cc12m_tables_and_tars_as_downloaded(tmp_path, models, capsys):
    """CC12M's own TSV lists URLs: refused at once, not read item by item to end with nothing. A spreadsheet's
    UTF-8 BOM is no part of the header. A tar that is empty or compressed (an interrupted download) is named."""
    from src.preprocess import TsvSource
    from tests.test_preprocess import make_tars, make_tsv

    tsv = make_tsv(tmp_path / "tsv")
    text = tsv.read_text()
    tsv.write_bytes(b"\xef\xbb\xbf" + text.encode())
    source = TsvSource(tsv)
    assert len(source) == 9 and source.read(0).caption == "a caption number 0"
    urls = tmp_path / "cc12m.tsv"
    urls.write_text("".join(f"https://example.com/{i}.jpg\tcaption {i}\n" for i in range(5)))
    tars = make_tars(tmp_path / "tars")
    (tars / "00002.tar").write_bytes(b"")
    common = ["--clip", *models["clip_a"], "--resolution", str(RES), "--num-workers", "0", "--device", "cpu"]
    capsys.readouterr()
    for argv, message in ((["--tsv", str(urls)], "lists image URLs"), (["--tars", str(tars)], "00002.tar")):
        assert main(["cc12m", *argv, "--out", str(tmp_path / "out"), *common]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
        assert not (tmp_path / "out").exists()


def test_annotation_and_class_name_files_of_the_wrong_kind(tmp_path, models, capsys):
    """COCO's instances file for its captions file, a caption that is null, an image listed twice, a class-name file
    that is not JSON, not UTF-8 or names a class twice: one line naming the setting, before any work."""
    from tests.test_preprocess import make_coco

    images, ann = make_coco(tmp_path / "coco")
    raw = json.loads(ann.read_text())
    train, mapping = make_imagenet(tmp_path / "imagenet", per_class=1)
    common = ["--clip", *models["clip_a"], "--resolution", str(RES), "--num-workers", "0", "--device", "cpu",
              "--out", str(tmp_path / "out")]
    coco_cases = [
        ({**raw, "annotations": [{"image_id": 40, "id": 1, "bbox": [0, 0, 1, 1], "category_id": 1}]},
         "without a caption"),  # an instances file
        ({**raw, "annotations": [{"image_id": 40, "id": 1, "caption": None}]}, "without a caption"),
        ({**raw, "images": raw["images"] + raw["images"][-1:]}, "more than once"),  # id 40, captioned
        ("{not json", "not valid JSON"),
    ]
    names_cases = [
        ("names.json", b"{not json", "not valid JSON"),
        ("names.json", json.dumps({"n00000001": 3}).encode(), "not a name or a list of names"),
        ("names.txt", b"n00000001 caf\xe9\n", "not UTF-8"),
        ("names.txt", mapping.read_bytes() + b"n00000001 again\n", "n00000001 again on line 4"),
    ]
    capsys.readouterr()
    for content, message in coco_cases:
        path = tmp_path / "captions.json"
        path.write_text(content if isinstance(content, str) else json.dumps(content))
        assert main(["coco", "--images", str(images), "--annotations", str(path), *common]) == 2
        err = capsys.readouterr().err
        assert "annotations=" in err and message in err and err.count("\n") == 1, err
    for name, content, message in names_cases:
        path = tmp_path / name
        path.write_bytes(content)
        assert main(["imagenet", "--root", str(train), "--class-names", str(path), *common]) == 2
        err = capsys.readouterr().err
        assert "class_names=" in err and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "out").exists()


def test_a_t5_folder_as_google_ships_it_needs_sentencepiece(tmp_path, models, monkeypatch, capsys):
    """google/t5-v1_1-xxl (README's --t5) has spiece.model and no tokenizer.json: transformers needs sentencepiece
    to read it, so the preprocess extra installs it and its absence is named before any work."""
    import importlib.util
    import re

    pyproject = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()  # (tomllib is Python 3.11+)
    assert '"sentencepiece' in re.search(r"^preprocess = \[(.*?)\]", pyproject, re.S | re.M)[1]
    t5 = tmp_path / "t5-v1_1-xxl"
    t5.mkdir()
    (t5 / "config.json").write_text("{}")
    (t5 / "spiece.model").write_bytes(b"\0")
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "sentencepiece"
                        else find_spec(name, *a))
    train, mapping = make_imagenet(tmp_path / "imagenet", per_class=1)
    out = tmp_path / "out"
    capsys.readouterr()
    assert main([*imagenet_argv(train, mapping, out, models), "--t5", str(t5)]) == 2
    err = capsys.readouterr().err
    assert "t5=" in err and "sentencepiece" in err and err.count("\n") == 1, err
    assert not out.exists()


def test_a_chunk_another_process_is_writing_is_left_to_it(tmp_path, models, monkeypatch):
    """Two commands writing into one folder at once (an array submitted twice): a chunk the other holds is neither
    deleted nor rewritten; the folder completes once every chunk is done, equal to an undisturbed run."""
    import fcntl

    from src.preprocess import ImageNetSource, PreprocessConfig, preprocess
    from src.preprocess.pipeline import chunk_claim
    from tests.test_preprocess import assert_same_shards

    train, mapping = make_imagenet(tmp_path / "imagenet", per_class=4)  # 13 items: 4 chunks
    source = ImageNetSource(train, mapping)
    cfg = dict(resolution=RES, clip=[models["clip_a"]], chunk_size=4, batch_size=3, num_workers=0, device="cpu",
               progress=False)
    preprocess(source, PreprocessConfig(out=str(tmp_path / "whole"), **cfg))
    out = tmp_path / "out"
    (out / WORK_DIR).mkdir(parents=True)
    with open(out / WORK_DIR / "chunk-000001.lock", "a") as held:  # the other process, busy with chunk 1
        fcntl.flock(held.fileno(), fcntl.LOCK_EX)
        assert preprocess(source, PreprocessConfig(out=str(out), **cfg)) is None  # chunk 1 left to the other
        assert [done_path(out, c).exists() for c in range(4)] == [True, False, True, True]
        fcntl.flock(held.fileno(), fcntl.LOCK_UN)
    assert preprocess(source, PreprocessConfig(out=str(out), **cfg))["complete"]
    assert_same_shards(out, tmp_path / "whole")
    # The slower of two processes, still passing by chunks when the other assembled (and removed _work), and then
    # finding the folder complete: no crash on the vanished lock files, no lock file left behind.
    with chunk_claim(out, 2) as claimed:
        assert not claimed
    import src.preprocess.pipeline as pipeline

    again = tmp_path / "again"
    original = pipeline._process

    def other_process_finishes_first(*args):  # this process's work, all done by the other meanwhile
        monkeypatch.setattr(pipeline, "_process", original)
        preprocess(source, PreprocessConfig(out=str(again), **cfg))

    monkeypatch.setattr(pipeline, "_process", other_process_finishes_first)
    assert preprocess(source, PreprocessConfig(out=str(again), **cfg))["complete"]
    assert [p.name for p in again.iterdir() if p.name.startswith(".")] == []


def test_tar_members_named_beyond_ascii(tmp_path):
    """A webdataset tar of one's own with members named café.jpg / 猫.jpg: items like any other (numpy's bytes_
    encoded the keys as ASCII and the command failed)."""
    import tarfile

    from src.preprocess import TarSource
    from tests.test_preprocess import _add, image_bytes

    tars = tmp_path / "tars"
    tars.mkdir()
    with tarfile.open(tars / "00000.tar", "w") as tf:
        for i, key in enumerate(("café", "猫", "plain")):
            _add(tf, f"{key}.jpg", image_bytes(i))
            _add(tf, f"{key}.txt", f"caption of {key}".encode())
    source = TarSource(tars)
    assert sorted(source.read(i).caption for i in range(len(source))) == ["caption of café", "caption of plain",
                                                                           "caption of 猫"]
    assert "00000.tar:猫" in {source.describe(i) for i in range(len(source))}


def test_file_names_that_are_not_utf8(tmp_path, models):
    """Linux file names are bytes: one in Latin-1 (café.jpg) is an item like any other, and a corrupt one is named
    in skipped.log, not a failed command."""
    import os

    from src.data.shards import read_meta

    train, mapping = make_imagenet(tmp_path / "imagenet", per_class=1)
    first = next((train / "n00000001").iterdir())
    os.rename(first, os.fsencode(first.parent) + b"/caf\xe9.jpg")
    os.rename(train / "n00000002" / "n00000002_broken.JPEG", os.fsencode(train / "n00000002") + b"/broken\xe9.jpg")
    (train / "n00000003" / "empty.jpg").write_bytes(b"")
    out = tmp_path / "out"
    assert main(imagenet_argv(train, mapping, out, models)) == 0
    log = (out / "skipped.log").read_bytes()
    assert read_meta(out)["count"] == 3 and b"broken\xe9.jpg" in log
    assert b"UnidentifiedImageError: cannot identify image file\n" in log  # no memory address: the same every run


def test_stats_from_a_folder_of_another_autoencoder(tmp_path, models, capsys):
    """--stats-from a folder encoded by another autoencoder of as many channels, or with sampled latents, is
    refused before any work: its latent statistics are not this set's."""
    from src.data.shards import ShardWriter

    train, mapping = make_imagenet(tmp_path / "imagenet", per_class=1)
    other = tmp_path / "other"  # 4 latent channels like the tiny VAE, but another autoencoder's
    with ShardWriter(other, encoder_names=["clip:x"], autoencoder="AutoencoderKL:other-vae") as writer:
        for i in range(2):
            writer.write(torch.randn(4, RES // 2, RES // 2), torch.zeros(12, 32), torch.zeros(24), f"caption {i}")
    train_out = tmp_path / "train"
    argv = imagenet_argv(train, mapping, train_out, models)
    assert main([*argv, "--autoencoder", models["vae"], "--latent", "sample"]) == 0
    out = tmp_path / "out"
    capsys.readouterr()
    for stats in (other, train_out):  # another autoencoder; the same one's samples, not its means
        assert main([*imagenet_argv(train, mapping, out, models), "--autoencoder", models["vae"],
                     "--stats-from", str(stats)]) == 2
        err = capsys.readouterr().err
        assert "stats_from=" in err and "its statistics do not apply" in err and err.count("\n") == 1, err
        assert not out.exists()
    assert main([*imagenet_argv(train, mapping, out, models), "--autoencoder", models["vae"], "--latent", "sample",
                 "--stats-from", str(train_out)]) == 0


def test_class_names_with_a_byte_order_mark(tmp_path):
    """An editor's UTF-8 BOM is no part of the first synset (which then matched no class folder)."""
    from src.preprocess.sources import read_class_names
    from tests.test_preprocess import SYNSETS

    _, mapping = make_imagenet(tmp_path / "imagenet", per_class=1)
    for name, content in (("names.txt", mapping.read_bytes()), ("names.json", json.dumps(SYNSETS).encode())):
        (tmp_path / name).write_bytes(b"\xef\xbb\xbf" + content)
        assert list(read_class_names(tmp_path / name)) == list(SYNSETS)


def test_meta_records_the_autoencoder_by_its_absolute_path(tmp_path, models, monkeypatch):
    """--autoencoder given relative to where preprocessing ran: the evaluation, which decodes with meta.json's
    autoencoder_path, runs from wherever training was launched."""
    import os

    from src.data.shards import read_meta

    train, mapping = make_imagenet(tmp_path / "imagenet", per_class=1)
    monkeypatch.chdir(Path(models["vae"]).parent)
    out = tmp_path / "out"
    assert main([*imagenet_argv(train, mapping, out, models), "--autoencoder", "vae"]) == 0
    path = read_meta(out)["autoencoder_path"]
    assert os.path.isabs(path) and Path(path) == Path(models["vae"]).resolve()


def test_a_folder_finished_by_another_process_while_the_models_loaded(tmp_path, models, monkeypatch):
    """The same command twice (an array submitted twice): the second, still loading its models when the first
    assembles the folder, then finds it complete: it neither redoes the work nor leaves _work/ in the folder."""
    import src.preprocess.pipeline as pipeline
    from src.preprocess import ImageNetSource, PreprocessConfig, preprocess

    train, mapping = make_imagenet(tmp_path / "imagenet", per_class=2)
    source = ImageNetSource(train, mapping)
    cfg = PreprocessConfig(out=str(tmp_path / "out"), resolution=RES, clip=[models["clip_a"]], chunk_size=4,
                           batch_size=3, num_workers=0, device="cpu", progress=False)
    loading = pipeline.Models

    def the_other_finishes_meanwhile(*args):
        monkeypatch.setattr(pipeline, "Models", loading)
        preprocess(source, cfg)  # the first command, from start to assembly
        monkeypatch.setattr(pipeline, "_process", lambda *a: pytest.fail("the work was done again"))
        return loading(*args)

    monkeypatch.setattr(pipeline, "Models", the_other_finishes_meanwhile)
    meta = preprocess(source, cfg)
    assert meta["complete"] and sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "index.npz", "meta.json", "shard-000000.tar", "shard-000001.tar", "skipped.log"]


def tsv_argv(tsv: Path, out: Path, models: dict) -> list[str]:
    return ["cc12m", "--tsv", str(tsv), "--out", str(out), "--resolution", str(RES), "--clip", *models["clip_a"],
            "--chunk-size", "4", "--batch-size", "4", "--num-workers", "0", "--device", "cpu", "--no-progress"]


def edit_in_place(tsv: Path) -> None:
    """A caption corrected without changing the TSV's size (the size-only identity took it for the same)."""
    text = tsv.read_text()
    tsv.write_text(text.replace("a caption number 3", "a caption NUMBER 3"))
    assert tsv.stat().st_size == len(text.encode()) and tsv.read_text() != text


def files_of(out: Path) -> dict:
    return {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}


def test_a_tsv_edited_in_place_is_refused_on_resume(tmp_path, models, monkeypatch, capsys):
    """A resumed run whose TSV has other contents of the same size is refused in one line naming tsv=, what
    changed and the way out, and changes nothing; the unchanged TSV resumes, hashed once per file version (the
    hash kept in the folder's state, not recomputed by the next process) and kept in meta.json."""
    import hashlib

    from src.data.shards import read_meta
    from src.utils import io

    tsv = make_tsv(tmp_path / "tsv")  # 9 items: 3 chunks
    original = tsv.read_bytes()
    out = tmp_path / "out"
    assert main([*tsv_argv(tsv, out, models), "--max-chunks", "1"]) == 3
    before = files_of(out)
    edit_in_place(tsv)
    capsys.readouterr()
    assert main(tsv_argv(tsv, out, models)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"tsv={str(tsv)!r} has other contents (sha256 " in err, err
    assert "restore that data, use a new output folder or delete" in err and files_of(out) == before
    tsv.write_bytes(original)  # restored: the same data again
    hashed = []
    monkeypatch.setattr(io, "sha256_file", lambda p, real=io.sha256_file: hashed.append(p) or real(p))
    tsv_hashes = lambda: hashed.count(str(tsv.resolve()))  # noqa: E731 -- not the text encoders' weights
    monkeypatch.setattr(io, "_SHA256", {})
    assert main([*tsv_argv(tsv, out, models), "--max-chunks", "1"]) == 3 and tsv_hashes() == 1  # a new version
    monkeypatch.setattr(io, "_SHA256", {})  # a new process: the folder's state remembers the hash
    assert main(tsv_argv(tsv, out, models)) == 0 and tsv_hashes() == 1
    files = read_meta(out)["preprocess"]["files"]
    assert files[str(tsv.resolve())]["sha256"] == hashlib.sha256(original).hexdigest()
    monkeypatch.setattr(io, "_SHA256", {})
    assert main(tsv_argv(tsv, out, models)) == 0 and "nothing to do" in capsys.readouterr().out and tsv_hashes() == 1


def to_legacy(settings: dict) -> dict:
    """Settings as written before content identities: the TSV known by its size."""
    source = {k: v for k, v in settings["source"].items() if k not in ("identity", "tsv_sha256")}
    return {**settings, "source": {**source, "tsv_bytes": Path(source["tsv"]).stat().st_size}}


def test_a_state_written_before_content_hashes_still_resumes(tmp_path, models, capsys):
    """An unfinished run or a complete folder whose state knows the TSV by its size only (the earlier format)
    resumes, or is complete, with the same TSV; once the TSV was modified after that state was written, nothing
    tells whether its contents are the same: refused, naming tsv= and the way out, and nothing changes."""
    from src.data.shards import META_FILE, read_meta
    from src.preprocess.pipeline import CONFIG_FILE, fingerprint_of

    tsv = make_tsv(tmp_path / "tsv")
    unfinished, complete = tmp_path / "unfinished", tmp_path / "complete"
    for out in (unfinished, complete):
        assert main([*tsv_argv(tsv, out, models), "--max-chunks", "1"]) == 3
        state = json.loads((out / WORK_DIR / CONFIG_FILE).read_text())
        legacy = to_legacy(state["settings"])
        (out / WORK_DIR / CONFIG_FILE).write_text(json.dumps({"fingerprint": fingerprint_of(legacy),
                                                              "settings": legacy}))
    assert main(tsv_argv(tsv, complete, models)) == 0  # resumed from the legacy state
    assert read_meta(complete)["preprocess"]["settings"]["source"]["tsv_sha256"]
    meta = json.loads((complete / META_FILE).read_text())
    legacy = to_legacy(meta["preprocess"]["settings"])
    meta["preprocess"] = {"fingerprint": fingerprint_of(legacy), "settings": legacy}
    (complete / META_FILE).write_text(json.dumps(meta))
    capsys.readouterr()
    assert main(tsv_argv(tsv, complete, models)) == 0 and "nothing to do" in capsys.readouterr().out
    edit_in_place(tsv)
    for out in (unfinished, complete):
        before = files_of(out)
        assert main(tsv_argv(tsv, out, models)) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"known by content (tsv={str(tsv)!r} by its name and size only)" in err, err
        assert "use a new output folder or delete" in err and files_of(out) == before


def test_each_setting_out_of_range_is_refused_by_name():
    """validate() names the first setting out of range, at its boundary, before any model or file is touched."""
    from src.preprocess import PreprocessConfig

    ok = dict(out="unused", clip=[("tiny", "w.pt")], device="cpu")
    PreprocessConfig(**ok, num_workers=0, parts=2, part=1).validate()
    cases = [({"num_workers": -1}, "num_workers=-1"), ({"chunk_size": 0}, "chunk_size=0"),
             ({"batch_size": 0}, "batch_size=0"), ({"resolution": 0}, "resolution=0"),
             ({"t5_length": 0}, "t5_length=0"), ({"parts": 2, "part": 2}, "part=2/2"),
             ({"part": -1}, "part=-1/1"), ({"latent": "mode"}, "latent='mode'"),
             ({"precision": "fp8"}, "precision='fp8'"), ({"clip": []}, "clip is empty"), ({"out": ""}, "out=''")]
    for change, message in cases:
        with pytest.raises(ValueError, match=message):
            PreprocessConfig(**{**ok, **change}).validate()


def test_skip_log_lists_items_in_index_order(tmp_path):
    """Chunks finish in any order (parts, workers): the log is sorted by item index, one line per skipped item."""
    from src.preprocess.pipeline import SKIP_LOG, _write_skip_log

    _write_skip_log(tmp_path, [{"index": 9, "source": "b.jpg", "error": "OSError: x"},
                               {"index": 2, "source": "a.jpg", "error": "OSError: y"}], 10)
    lines = (tmp_path / SKIP_LOG).read_text().splitlines()
    assert lines[0].startswith("# 2 of 10 items skipped")
    assert lines[1:] == ["2\ta.jpg\tOSError: y", "9\tb.jpg\tOSError: x"]


def test_an_output_folder_the_file_system_refuses_is_one_line_and_status_1(tmp_path, models, capsys, monkeypatch):
    """--out that cannot be made or written (read-only, full, under a file) was a traceback; now one line naming
    the path and the cause. Exit status 1 when the file system refuses (read-only, full), 2 for bad input (a path
    under a file), as src.evaluate decides (src.utils.io.refused_write): any OSError was 1 here."""
    import errno

    train, mapping = make_imagenet(tmp_path / "in")
    (tmp_path / "file").write_text("")
    out = tmp_path / "file" / "shards"
    assert main(imagenet_argv(train, mapping, out, models)) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: NotADirectoryError: [Errno 20] Not a directory: ") and str(out) in err
    assert len(err.splitlines()) == 1

    def read_only(self, *args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system", str(self))

    monkeypatch.setattr(Path, "mkdir", read_only)
    out = tmp_path / "shards"
    assert main(imagenet_argv(train, mapping, out, models)) == 1
    err = capsys.readouterr().err.strip()
    assert err == f"error: OSError: [Errno 30] Read-only file system: '{out / WORK_DIR}'" and not out.exists()


def test_coco_records_without_their_fields_are_one_line(tmp_path, models, capsys):
    """A captions file whose records lack an id, an image_id or a file_name, or are no JSON objects (another tool's
    export): one line naming annotations= and the record, exit 2, nothing written; they were tracebacks."""
    from tests.test_preprocess import make_coco

    images, ann = make_coco(tmp_path / "coco")
    out = tmp_path / "out"
    common = ["--clip", *models["clip_a"], "--resolution", str(RES), "--num-workers", "0", "--device", "cpu",
              "--out", str(out)]
    cap = [{"image_id": 40, "caption": "c"}]
    cases = [
        ({"images": [{"id": 40, "file_name": "x.jpg"}], "annotations": ["a caption"]}, "without a caption text"),
        ({"images": [{"id": 40, "file_name": "x.jpg"}], "annotations": [{"caption": "c"}]}, "valid 'image_id'"),
        ({"images": [{"id": 40, "file_name": "x.jpg"}], "annotations": [{"image_id": "abc", "caption": "c"}]},
         "valid 'image_id'"),
        ({"images": [{"id": 40}], "annotations": cap}, "valid 'file_name'"),
        ({"images": [{"id": 40, "file_name": None}], "annotations": cap}, "valid 'file_name'"),
        ({"images": [{"file_name": "x.jpg"}], "annotations": cap}, "valid 'id'"),
        ({"images": ["x.jpg"], "annotations": cap}, "valid 'id'"),
    ]
    capsys.readouterr()
    for content, message in cases:
        ann.write_text(json.dumps(content))
        assert main(["coco", "--images", str(images), "--annotations", str(ann), *common]) == 2, content
        err = capsys.readouterr().err
        assert "annotations=" in err and message in err and err.count("\n") == 1, err
        assert not out.exists()


def test_state_files_of_another_kind_in_out_are_one_line(tmp_path, models, capsys):
    """--out holding a meta.json or _work/config.json that is not this command's (not JSON, not an object, no
    fingerprint): one line naming out=, exit 2, the folder as it was; they were tracebacks or a bare JSON message."""
    train, mapping = make_imagenet(tmp_path / "imagenet", per_class=1)
    cases = [("meta.json", "[1]"), ("meta.json", "{not json"), (f"{WORK_DIR}/config.json", "[]"),
             (f"{WORK_DIR}/config.json", "{}"), (f"{WORK_DIR}/config.json", "{not json")]
    capsys.readouterr()
    for i, (name, content) in enumerate(cases):
        out = tmp_path / f"out{i}"
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text(content)
        before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
        assert main(imagenet_argv(train, mapping, out, models)) == 2, (name, content)
        err = capsys.readouterr().err
        assert err.startswith(f"error: out='{out}' holds a {name} that is not ") and err.count("\n") == 1, err
        assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_stats_from_without_usable_statistics_is_refused(tmp_path, models, capsys):
    """--stats-from a meta.json that is no object, or whose latent_std is not a positive number: the set would be
    normalised by nonsense (a negative std was taken and the command ended 0), or a traceback."""
    train, mapping = make_imagenet(tmp_path / "imagenet", per_class=1)
    out = tmp_path / "out"
    stats = tmp_path / "stats"
    stats.mkdir()
    meta = {"complete": True, "latent_channels": 3, "autoencoder": "identity", "latent_mean": 0.0}
    capsys.readouterr()
    for content in ("[1]", json.dumps({**meta, "latent_std": -1.0}), json.dumps({**meta, "latent_std": 0}),
                    json.dumps({**meta, "latent_std": "1"}), json.dumps({**meta, "latent_std": 1, "latent_mean": None}),
                    json.dumps({**meta, "latent_std": float("nan")})):
        (stats / "meta.json").write_text(content)
        assert main([*imagenet_argv(train, mapping, out, models), "--stats-from", str(stats)]) == 2, content
        err = capsys.readouterr().err
        assert f"stats_from='{stats}' is not allowed" in err and err.count("\n") == 1, err
        assert not out.exists()


def test_inputs_that_would_double_or_take_in_the_output_are_refused(tmp_path, models, capsys):
    """One tar given twice put each of its samples in twice (exit 0); --out inside ImageNet's root became a class
    folder of its own, so the next run, this one's resume included, was refused. Both refused before any work."""
    from tests.test_preprocess import make_tars

    tars = make_tars(tmp_path / "tars")
    train, mapping = make_imagenet(tmp_path / "imagenet", per_class=1)
    common = ["--clip", *models["clip_a"], "--resolution", str(RES), "--num-workers", "0", "--device", "cpu"]
    capsys.readouterr()
    out = tmp_path / "out"
    assert main(["cc12m", "--tars", str(tars / "00000.tar"), str(tars / "00000.tar"), "--out", str(out),
                 *common]) == 2
    err = capsys.readouterr().err
    assert "tars=" in err and "given twice" in err and err.count("\n") == 1 and not out.exists(), err
    for out in (train / "shards", train, train / "n00000001" / "shards"):
        before = sorted(train.rglob("*"))
        assert main(imagenet_argv(train, mapping, out, models)) == 2, out
        err = capsys.readouterr().err
        assert f"out='{out}' is inside root='{train}'" in err and err.count("\n") == 1, err
        assert sorted(train.rglob("*")) == before


def test_autoencoder_options_that_would_be_ignored_are_refused(tmp_path, models, capsys):
    """--autoencoder-config with an autoencoder folder or identity, --latent sample in pixel space: ignored, yet
    part of the settings (a rerun without them was refused as other settings); now refused by name."""
    train, mapping = make_imagenet(tmp_path / "imagenet", per_class=1)
    out = tmp_path / "out"
    argv = imagenet_argv(train, mapping, out, models)
    cases = [(["--autoencoder-config", models["vae"]], "autoencoder_config="),
             (["--autoencoder", models["vae"], "--autoencoder-config", models["vae"]], "autoencoder_config="),
             (["--latent", "sample"], "latent='sample' is not allowed with autoencoder='identity'")]
    capsys.readouterr()
    for extra, message in cases:
        assert main([*argv, *extra]) == 2, extra
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1 and not out.exists(), err


def test_a_rerun_with_another_seed_is_told_other_settings(tmp_path, models, capsys):
    """--seed (or --caption) is in the source's fingerprint, as it draws captions; a rerun with another was refused
    as 'made from other source data ... restore that data', though the data are the same."""
    from tests.test_preprocess import make_coco

    train, mapping = make_imagenet(tmp_path / "imagenet", per_class=2)
    images, ann = make_coco(tmp_path / "coco", n=5)
    out, coco_out = tmp_path / "out", tmp_path / "coco-out"
    coco = ["coco", "--images", str(images), "--annotations", str(ann), "--out", str(coco_out), "--clip",
            *models["clip_a"], "--resolution", str(RES), "--chunk-size", "4", "--num-workers", "0", "--device", "cpu",
            "--no-progress"]
    assert main([*imagenet_argv(train, mapping, out, models), "--max-chunks", "1"]) == 3
    assert main([*coco, "--max-chunks", "1"]) == 3
    capsys.readouterr()
    for argv, folder, differing in (([*imagenet_argv(train, mapping, out, models), "--seed", "3"], out, "seed"),
                                    ([*coco, "--caption", "random"], coco_out, "caption")):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert f"holds an unfinished run with other settings (differing: {differing})" in err, err
        assert "source data" not in err and err.count("\n") == 1, err


def test_odd_captions_and_a_clip_twice_are_refused_before_any_work(tmp_path, models, capsys):
    """A TSV with no tab (a CSV; spaces for tabs) was read item by item to end with nothing, one with a third column
    put it, tab and all, into the captions; COCO's blank captions were encoded as the empty prompt; the same CLIP
    given twice doubled the text channels with nothing new in them (each ended 0 or after all the work)."""
    from tests.test_preprocess import make_coco

    tsv = make_tsv(tmp_path / "tsv")
    images, ann = make_coco(tmp_path / "coco", n=2)
    raw = json.loads(ann.read_text())
    out = tmp_path / "out"
    common = ["--clip", *models["clip_a"], "--resolution", str(RES), "--num-workers", "0", "--device", "cpu",
              "--out", str(out)]
    lines = tsv.read_text().splitlines()
    capsys.readouterr()
    for text, message in (("\n".join(line.replace("\t", ",") for line in lines), "has no row with a tab"),
                          ("\n".join([*lines[:3], lines[3] + "\textra", *lines[4:]]), "line 4 has more than two")):
        tsv.write_text(text + "\n")
        assert main(["cc12m", "--tsv", str(tsv), *common]) == 2
        err = capsys.readouterr().err
        assert f"tsv='{tsv}'" in err and message in err and err.count("\n") == 1 and not out.exists(), err
    ann.write_text(json.dumps({**raw, "annotations": [{**a, "caption": " "} for a in raw["annotations"]]}))
    assert main(["coco", "--images", str(images), "--annotations", str(ann), *common]) == 2
    err = capsys.readouterr().err
    assert "has no image with a caption" in err and not out.exists(), err
    from src.preprocess import CocoSource

    blank_first = [{**a, "caption": ""} if a["id"] == 1000 else a for a in raw["annotations"]]  # image 40's first
    ann.write_text(json.dumps({**raw, "annotations": blank_first}))
    assert CocoSource(images, ann).read(0).caption == "image 0 cap 1"
    train, mapping = make_imagenet(tmp_path / "imagenet", per_class=1)
    argv = imagenet_argv(train, mapping, out, models)
    assert main([*argv, "--clip", models["clip_a"][0], str(Path(models["clip_a"][1]).parent / ".." /
                                                              Path(models["clip_a"][1]).parent.name /
                                                              Path(models["clip_a"][1]).name)]) == 2
    err = capsys.readouterr().err
    assert "is given twice; need each CLIP text encoder once" in err and err.count("\n") == 1 and not out.exists()


def test_imagenet_class_files_and_folders_of_odd_shape(tmp_path, models, capsys):
    """A Keras-style class index with an empty or string entry (a traceback, or names split letter by letter) or
    a synset twice (the later names silently won) and class folders without images (the folder was left behind
    with 'every item was unreadable (0 skipped)') are refused before any work; a tab for the space is read."""
    from src.preprocess.sources import read_class_names

    train, mapping = make_imagenet(tmp_path / "imagenet", per_class=1)
    out = tmp_path / "out"
    empty = tmp_path / "empty"
    (empty / "n00000001").mkdir(parents=True)
    (empty / "n00000001" / "notes.txt").write_text("x")
    names = tmp_path / "names.json"
    keras = {"0": ["n00000001", "tench"], "1": ["n00000002", "goldfish"], "2": ["n00000003", "shark"]}
    cases = [(train, {**keras, "0": []}, "the value of '0' is not a list"),
             (train, {**keras, "0": "n00000001"}, "the value of '0' is not a list"),
             (train, {**keras, "3": ["n00000001", "again"]}, "lists n00000001 more than once"),
             (empty, keras, f"root='{empty}' has no images")]
    capsys.readouterr()
    for root, content, message in cases:
        names.write_text(json.dumps(content))
        assert main(imagenet_argv(root, names, out, models)) == 2, content
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1 and not out.exists(), err
    tabbed = tmp_path / "names.txt"
    tabbed.write_text(mapping.read_text().replace(" ", "\t", 1))
    assert read_class_names(tabbed) == read_class_names(mapping)
