"""Preprocessing real-data layouts into shards (issue 8), on generated images and random tiny models saved to disk."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from src.data.shards import is_complete, iter_samples, make_loader, read_meta
from src.preprocess import CocoSource, ImageNetSource, PreprocessConfig, TarSource, TsvSource, preprocess
from src.preprocess.__main__ import main
from src.preprocess.images import decode_image, resize_center_crop
from src.preprocess.pipeline import SKIP_LOG, WORK_DIR, Models, done_path
from src.preprocess.sources import read_class_names
from src.preprocess.text import CombinedTextEncoder

RES = 16
SYNSETS = {"n00000001": ["tench", "Tinca tinca"], "n00000002": ["goldfish", "Carassius auratus"],
           "n00000003": ["great white shark", "white shark", "man-eater"]}


# ----------------------------------------------------------------------------------------------------------------
# Generated images and datasets
# ----------------------------------------------------------------------------------------------------------------

def image_bytes(i: int, fmt: str = "JPEG") -> bytes:
    """A random-ish image of varying size and aspect (some grayscale), encoded."""
    rng = np.random.default_rng(i)
    w, h = int(rng.integers(12, 40)), int(rng.integers(12, 40))
    array = (rng.random((h, w, 3)) * 255).astype(np.uint8)
    image = Image.fromarray(array)
    if i % 5 == 4:
        image = image.convert("L")
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return buf.getvalue()


CORRUPT = b"\xff\xd8\xff\xe0 this is not really a jpeg"


def make_imagenet(root: Path, per_class: int = 4) -> tuple[Path, Path]:
    """root/train/<synset>/*.JPEG (one corrupt) and a LOC_synset_mapping.txt."""
    train = root / "train"
    i = 0
    for synset in SYNSETS:
        (train / synset).mkdir(parents=True)
        for k in range(per_class):
            (train / synset / f"{synset}_{k}.JPEG").write_bytes(image_bytes(i))
            i += 1
    (train / "n00000002" / "n00000002_broken.JPEG").write_bytes(CORRUPT)
    mapping = root / "LOC_synset_mapping.txt"
    mapping.write_text("".join(f"{s} {', '.join(names)}\n" for s, names in SYNSETS.items()))
    return train, mapping


def make_tsv(root: Path, n: int = 7) -> Path:
    """images/*.jpg and cc12m.tsv with a header, a missing file and a corrupt file."""
    (root / "images").mkdir(parents=True)
    rows = ["path\tcaption"]
    for i in range(n):
        (root / "images" / f"{i}.jpg").write_bytes(image_bytes(100 + i))
        rows.append(f"images/{i}.jpg\ta caption number {i}")
    (root / "images" / "bad.jpg").write_bytes(CORRUPT)
    rows += ["images/bad.jpg\ta corrupt image", "images/missing.jpg\ta missing image"]
    tsv = root / "cc12m.tsv"
    tsv.write_text("\n".join(rows) + "\n")
    return tsv


def _add(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tf.addfile(info, io.BytesIO(data))


def make_tars(root: Path) -> Path:
    """Two img2dataset-style tars: jpg + txt + json per key, a truncated jpg, and a key without caption."""
    root.mkdir(parents=True)
    for t in range(2):
        with tarfile.open(root / f"{t:05d}.tar", "w") as tf:
            for k in range(3):
                key = f"{t:05d}{k:04d}"
                _add(tf, f"{key}.jpg", image_bytes(200 + 10 * t + k))
                _add(tf, f"{key}.txt", f"tar {t} caption {k}".encode())
                _add(tf, f"{key}.json", b"{}")
            _add(tf, f"{t:05d}9998.jpg", image_bytes(300)[:60])  # truncated
            _add(tf, f"{t:05d}9998.txt", b"truncated image")
            _add(tf, f"{t:05d}9999.jpg", image_bytes(301))  # no caption
    return root


def make_coco(root: Path, n: int = 5) -> tuple[Path, Path]:
    """val2014/*.jpg and captions_val2014.json (several captions per image, one image without any)."""
    images = root / "val2014"
    images.mkdir(parents=True)
    records, annotations = [], []
    for i in range(n + 1):
        name = f"COCO_val2014_{i + 40:012d}.jpg"
        (images / name).write_bytes(image_bytes(400 + i))
        records.append({"id": i + 40, "file_name": name, "width": 20, "height": 20})
        if i < n:  # the last image has no caption
            for j in range(3):
                annotations.append({"id": 1000 + 10 * i + (2 - j), "image_id": i + 40,
                                    "caption": f"image {i} cap {2 - j}"})
    ann = root / "captions_val2014.json"
    ann.write_text(json.dumps({"images": records[::-1], "annotations": annotations}))
    return images, ann


# ----------------------------------------------------------------------------------------------------------------
# Random tiny models saved to disk (the real loading code runs on them)
# ----------------------------------------------------------------------------------------------------------------

def save_clip(folder: Path, name: str, width: int, embed_dim: int) -> tuple[str, str]:
    """An open_clip model config JSON + random weights; returns (config path, weights path)."""
    import open_clip

    config = {"embed_dim": embed_dim,
              "vision_cfg": {"image_size": 16, "patch_size": 8, "layers": 1, "width": 32, "head_width": 16},
              "text_cfg": {"context_length": 12, "vocab_size": 49408, "width": width, "heads": 2, "layers": 2}}
    config_path = folder / f"{name}.json"
    config_path.write_text(json.dumps(config))
    model = open_clip.model.CLIP(embed_dim, config["vision_cfg"], config["text_cfg"])
    weights = folder / f"{name}.pt"
    torch.save(model.state_dict(), weights)
    return str(config_path), str(weights)


def save_vae(folder: Path) -> str:
    """A tiny diffusers AutoencoderKL (downsampling 2, 4 latent channels) saved with save_pretrained."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        block_out_channels=(8, 16), layers_per_block=1, latent_channels=4, norm_num_groups=4,
                        sample_size=RES)
    vae.save_pretrained(folder)
    return str(folder)


def save_t5(folder: Path) -> str:
    """A tiny T5 encoder (d_model 96) and a word-level tokenizer built offline, saved with save_pretrained."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast, T5Config, T5EncoderModel

    words = "a photo of tench tinca goldfish carassius auratus great white shark man-eater caption number image cap " \
            "tar corrupt missing truncated".split()
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(dict.fromkeys(words))}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>") \
        .save_pretrained(folder)
    config = T5Config(vocab_size=len(vocab), d_model=96, d_kv=16, d_ff=64, num_layers=1, num_heads=2,
                      decoder_start_token_id=0)
    T5EncoderModel(config).save_pretrained(folder)
    return str(folder)


@pytest.fixture(autouse=True)
def own_cache_dir(tmp_path_factory, monkeypatch):
    """The command line remembers model checksums under a folder of the test's own, not the repository's .cache."""
    monkeypatch.setattr("src.preprocess.__main__.DEFAULT_CACHE_DIR", str(tmp_path_factory.mktemp("checksums")))


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Paths of the saved random models."""
    root = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    return {"clip_a": save_clip(root, "clip-a", 32, 24), "clip_b": save_clip(root, "clip-b", 48, 16),
            "vae": save_vae(root / "vae"), "t5": save_t5(root / "t5")}


def config(out: Path, models: dict, **kw) -> PreprocessConfig:
    """A small CPU config: one CLIP, pixel space unless overridden."""
    base = dict(out=str(out), resolution=RES, clip=[models["clip_a"]], chunk_size=4, batch_size=3, num_workers=0,
                device="cpu", progress=False)
    return PreprocessConfig(**{**base, **kw})


def samples(folder: Path) -> list[dict]:
    return list(iter_samples(folder))


# ----------------------------------------------------------------------------------------------------------------
# Sources and image preparation
# ----------------------------------------------------------------------------------------------------------------

def test_class_names_formats(tmp_path):
    loc = tmp_path / "LOC_synset_mapping.txt"
    loc.write_text("n01440764 tench, Tinca tinca\nn01443537 goldfish, Carassius auratus\n")
    by_synset = tmp_path / "names.json"
    by_synset.write_text(json.dumps({"n01443537": ["goldfish"], "n01440764": "tench, Tinca tinca"}))
    keras = tmp_path / "imagenet_class_index.json"
    keras.write_text(json.dumps({"1": ["n01443537", "goldfish"], "0": ["n01440764", "tench"]}))
    assert read_class_names(loc) == {"n01440764": ["tench", "Tinca tinca"],
                                     "n01443537": ["goldfish", "Carassius auratus"]}
    assert read_class_names(by_synset) == {"n01440764": ["tench", "Tinca tinca"], "n01443537": ["goldfish"]}
    assert list(read_class_names(keras)) == ["n01440764", "n01443537"]
    with pytest.raises(FileNotFoundError, match="class_names="):
        read_class_names(tmp_path / "nope.txt")


def test_keras_class_index_labels_follow_the_numbers_and_names_lose_underscores(tmp_path):
    """Keras' imagenet_class_index.json keys are "0".."999": label 10 follows 9 (not "1"), and its names are
    written with underscores ("great_white_shark") where captions need spaces."""
    keras = tmp_path / "imagenet_class_index.json"
    keras.write_text(json.dumps({str(i): [f"n{i:08d}", f"class_{i}"] for i in range(12)}))
    names = read_class_names(keras)
    assert list(names) == [f"n{i:08d}" for i in range(12)]
    assert names["n00000010"] == ["class 10"]


def test_tsv_rows_keep_local_paths_among_urls_and_trim_captions(tmp_path):
    """Only the first line can be a header; a TSV that mixes URLs with local files is read (its URL rows are skipped
    when read), and a caption's surrounding spaces are no part of it."""
    from src.preprocess.sources import TsvSource

    (tmp_path / "0.jpg").write_bytes(image_bytes(0))
    tsv = tmp_path / "mixed.tsv"
    tsv.write_text("path\tcaption\nhttp://example.com/a.jpg\ta url\n0.jpg\t  a local image  \r\nfile\ttext\n")
    source = TsvSource(tsv)
    assert len(source) == 3 and source.describe(2) == "file"
    record = source.read(1)
    assert record.caption == "a local image" and record.key == "0.jpg"


def test_tar_samples_are_keyed_at_the_first_dot_and_extensions_any_case(tmp_path, monkeypatch):
    """webdataset: a sample's extra components ("k.seg.png") belong to sample k, and "K.JPG" is an image; tars in a
    folder are read in name order, so item indices do not depend on the file system's listing order."""
    from src.preprocess.sources import list_tars

    for name in ("b.tar", "a.tar"):
        with tarfile.open(tmp_path / name, "w") as tf:
            _add(tf, "k.JPG", image_bytes(1))
            _add(tf, "k.seg.png", image_bytes(2, "PNG"))
            _add(tf, "k.TXT", f"caption of {name}".encode())
    glob = Path.glob
    monkeypatch.setattr(Path, "glob", lambda self, pattern: sorted(glob(self, pattern), reverse=True))
    assert list_tars(tmp_path) == [tmp_path / "a.tar", tmp_path / "b.tar"]
    monkeypatch.undo()
    tars = TarSource(tmp_path)
    assert len(tars) == 2 and [tars.describe(i) for i in range(2)] == ["a.tar:k", "b.tar:k"]
    assert tars.read(1).caption == "caption of b.tar"


def test_resize_center_crop_keeps_the_centre():
    array = np.zeros((40, 80, 3), np.uint8)
    array[:, 20:60] = 255  # a white centre square in a wide image
    out = resize_center_crop(Image.fromarray(array), 16)
    assert out.size == (16, 16)
    assert np.asarray(out).min() > 200  # only the centre survives the crop
    pixels = decode_image(image_bytes(3), 16)
    assert pixels.shape == (3, 16, 16) and pixels.min() >= -1 and pixels.max() <= 1
    with pytest.raises(Exception):
        decode_image(CORRUPT, 16)


def test_decoded_pixels_keep_rows_as_rows_and_tall_images_keep_their_centre():
    """(3, H, W) with row 0 at the top: a transposed or top-anchored crop would train on rotated/shifted images."""
    tall = np.zeros((80, 40, 3), np.uint8)
    tall[20:60] = 255  # a white centre square in a tall image
    assert np.asarray(resize_center_crop(Image.fromarray(tall), 16)).min() > 200
    top_white = np.zeros((32, 32, 3), np.uint8)
    top_white[:16] = 255
    buf = io.BytesIO()
    Image.fromarray(top_white).save(buf, format="PNG")
    pixels = decode_image(buf.getvalue(), 16)
    assert (pixels[:, :7] > 0.9).all() and (pixels[:, 9:] < -0.9).all()


def test_exif_orientation_is_applied_before_cropping():
    """Camera photos store pixels sideways with an EXIF rotation; the decoded image is the one a viewer shows."""
    array = np.zeros((16, 32, 3), np.uint8)
    array[:, :16] = 255  # left half white as stored
    image = Image.fromarray(array)
    exif = image.getexif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    stored, upright = io.BytesIO(), io.BytesIO()
    image.save(stored, format="PNG", exif=exif)
    image.transpose(Image.Transpose.ROTATE_270).save(upright, format="PNG")
    torch.testing.assert_close(decode_image(stored.getvalue(), 16), decode_image(upright.getvalue(), 16))


def test_sixteen_bit_grey_maps_full_scale_onto_eight_bits_exactly():
    """65535 is white and k * 257 is exactly k: a 16-bit scan gives the same pixels as its 8-bit version."""
    from src.preprocess.images import to_rgb

    levels = np.array([[0, 257 * 100, 257 * 200, 65535]], np.uint16)
    rgb = np.asarray(to_rgb(Image.fromarray(levels)))
    assert rgb[0, :, 0].tolist() == [0, 100, 200, 255] and rgb.shape == (1, 4, 3)


def test_unreadable_items_give_one_short_log_line():
    """A skip record's error is one line of at most 300 characters: the skip log holds one line per item."""
    from src.preprocess.images import PreparedImages, collate_prepared

    class Broken:
        def __len__(self):
            return 1

        def read(self, index):
            raise OSError("first line\nsecond line " + "x" * 1000)

        def describe(self, index):
            return f"item {index}"

    record = PreparedImages(Broken(), 16)[0]
    assert record["index"] == 0 and record["source"] == "item 0"
    assert record["skip"].startswith("OSError: first line second line") and len(record["skip"]) == 300
    batch = collate_prepared([record])
    assert batch["pixels"] is None and batch["skipped"] == [{"index": 0, "source": "item 0", "error": record["skip"]}]


def test_sources_enumerate_layouts(tmp_path):
    train, mapping = make_imagenet(tmp_path / "imagenet")
    source = ImageNetSource(train, mapping, seed=1)
    assert len(source) == 13
    captions = {source.read(i).caption for i in range(len(source)) if "broken" not in source.paths[i]}
    assert all(c.startswith("a photo of a ") for c in captions) and len(captions) > 3
    assert source.read(0).caption == ImageNetSource(train, mapping, seed=1).read(0).caption  # seeded
    tsv = TsvSource(make_tsv(tmp_path / "cc12m"))
    assert len(tsv) == 9 and tsv.read(2).caption == "a caption number 2"  # header skipped
    tars = TarSource(make_tars(tmp_path / "tars"))
    assert len(tars) == 10 and tars.read(0).caption == "tar 0 caption 0"
    with pytest.raises(ValueError, match="no .txt caption"):
        tars.read(4)
    images, ann = make_coco(tmp_path / "coco")
    coco = CocoSource(images, ann)
    assert len(coco) == 5 and coco.image_ids == sorted(coco.image_ids)
    assert coco.read(0).caption == "image 0 cap 0"  # lowest annotation id, not the first in the file
    assert coco.read(0).extras["captions"] == ["image 0 cap 0", "image 0 cap 1", "image 0 cap 2"]


def test_source_identities_see_what_changed(tmp_path):
    """An image folder is known by its images' names and sizes (no image read): an image added, removed, renamed
    or replaced by one of another size is another source, and the refusal names root= and what changed; a file
    merely touched is not. The COCO captions file is known by its sha256, the tars by their members' sizes."""
    import os

    from src.preprocess.pipeline import prepare_output

    train, mapping = make_imagenet(tmp_path / "imagenet", per_class=2)
    cls = train / "n00000001"
    base = ImageNetSource(train, mapping).fingerprint()
    os.utime(cls / "n00000001_0.JPEG", ns=(1, 1))
    assert ImageNetSource(train, mapping).fingerprint() == base
    changes = {"added": ("items", lambda: (cls / "n00000001_9.JPEG").write_bytes(image_bytes(9))),
               "removed": ("items", lambda: (cls / "n00000001_9.JPEG").unlink()),
               "renamed": ("items", lambda: (cls / "n00000001_0.JPEG").rename(cls / "n00000001_8.JPEG")),
               "replaced": ("sizes", lambda: (cls / "n00000001_8.JPEG").write_bytes(image_bytes(50)))}
    previous = base
    for what, (key, change) in changes.items():
        change()
        source = ImageNetSource(train, mapping)
        assert source.fingerprint()[key] != previous[key], what
        previous = source.fingerprint()
    out = tmp_path / "out"
    old_settings = {"source": base, "resolution": RES}
    prepare_output(out, old_settings)
    (out / WORK_DIR / "chunk-000000.done.json").write_text("{}")
    with pytest.raises(ValueError, match=f"out=.* unfinished run made from other source data: root={str(train)!r} "
                                         "lists other images .*; restore that data, use a new output folder"):
        prepare_output(out, {"source": source.fingerprint(), "resolution": RES}, write=False, source=source)
    images, ann = make_coco(tmp_path / "coco")
    coco = CocoSource(images, ann).fingerprint()
    ann.write_text(ann.read_text().replace("image 0 cap 1", "image 0 cap X"))  # same size
    assert CocoSource(images, ann).fingerprint()["annotations_sha256"] != coco["annotations_sha256"]
    tars = make_tars(tmp_path / "tars")
    before = TarSource(tars).fingerprint()
    with tarfile.open(tars / "00000.tar") as tf:
        members = [(m.name, tf.extractfile(m).read()) for m in tf]
    with tarfile.open(tars / "00000.tar", "w") as tf:  # the same members, one image of another size
        for name, data in members:
            _add(tf, name, image_bytes(250) if name == "000000001.jpg" else data)
    after = TarSource(tars).fingerprint()
    assert after["items"] == before["items"] and after["spans"] != before["spans"]


def test_combined_text_encoder_layout():
    class Fake:
        def __init__(self, name, length, width, pooled):
            self.name, self.context_length, self.context_dim, self.pooled_dim = name, length, width, pooled

        def __call__(self, captions):
            n = len(captions)
            return torch.ones(n, self.context_length, self.context_dim), torch.ones(n, self.pooled_dim)

    enc = CombinedTextEncoder([Fake("l", 5, 3, 2), Fake("g", 5, 4, 3)], Fake("t5", 6, 10, 0))
    context, pooled = enc(["x", "y"])
    assert context.shape == (2, 11, 10) and pooled.shape == (2, 5)
    assert context[:, :5, 7:].abs().sum() == 0 and context[:, :5, :7].min() == 1  # CLIP zero-padded to T5 width
    assert [g["context_tokens"] for g in enc.groups] == [[0, 5], [0, 5], [5, 11]]
    assert [g["context_channels"] for g in enc.groups] == [[0, 3], [3, 7], [0, 10]]
    assert [g["pooled_channels"] for g in enc.groups] == [[0, 2], [2, 5], [5, 5]]
    wide_clip = CombinedTextEncoder([Fake("l", 5, 12, 2)], Fake("t5", 6, 10, 0))
    assert wide_clip(["x"])[0][:, 5:, 10:].abs().sum() == 0  # T5 padded when CLIPs are wider
    with pytest.raises(ValueError, match="context lengths"):
        CombinedTextEncoder([Fake("l", 5, 3, 2), Fake("g", 6, 4, 3)])


def test_text_cache_encodes_each_new_caption_once_and_evicts_the_least_recent():
    """ImageNet batches repeat captions: each distinct unseen caption is encoded once, the cache keeps the most
    recently used ones, 0 disables it, and the hit/miss counts printed at the end are right."""
    from src.preprocess.text import CachedTextEncoder

    calls = []

    def encoder(captions):
        calls.append(list(captions))
        ids = torch.tensor([float(ord(c[0])) for c in captions])
        return ids[:, None, None].expand(-1, 2, 3), ids[:, None].expand(-1, 4)

    cached = CachedTextEncoder(encoder, max_entries=2)
    context, pooled = cached(["a", "b", "a"])
    assert calls == [["a", "b"]] and context.shape == (3, 2, 3) and context.dtype == torch.float16
    assert pooled[:, 0].tolist() == [ord("a"), ord("b"), ord("a")]
    assert (cached.hits, cached.misses) == (1, 2)
    cached(["a", "c"])  # "a" used again: "b" is the least recently used and goes
    assert calls[-1] == ["c"] and list(cached.cache) == ["a", "c"]
    cached(["a"])
    assert calls[-1] == ["c"] and (cached.hits, cached.misses) == (3, 3)
    off = CachedTextEncoder(encoder, max_entries=0)
    off(["a"]), off(["a"])
    assert calls[-2:] == [["a"], ["a"]] and not off.cache
    with pytest.raises(ValueError, match="text_cache=-1"):
        CachedTextEncoder(encoder, max_entries=-1)


def test_t5_length_below_one_is_refused_before_loading(tmp_path):
    """t5_length=0 would give an empty T5 sequence; it is refused before the (large) model loads."""
    from src.preprocess.text import T5TextEncoder

    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="t5_length=0"):
        T5TextEncoder(tmp_path, max_length=0)


def test_latent_sample_is_seeded_per_item(models):
    from src.preprocess.autoencoders import DiffusersAutoencoder

    vae = DiffusersAutoencoder(models["vae"], latent="sample")
    pixels = torch.stack([decode_image(image_bytes(i), RES) for i in range(2)])
    both = vae.encode(pixels, [5, 6], seed=0)
    torch.testing.assert_close(vae.encode(pixels[1:], [6], seed=0)[0], both[1])  # independent of the batch
    assert (vae.encode(pixels[1:], [7], seed=0)[0] - both[1]).abs().max() > 0.01
    mean = DiffusersAutoencoder(models["vae"]).encode(pixels)
    assert mean.shape == both.shape == (2, 4, 8, 8) and not torch.equal(mean, both)


def test_latent_noise_stream_downsample_and_autoencoder_files(tmp_path, models):
    """Sampled latents draw their noise from (seed + 1, index), apart from the caption choice's (seed, index); a
    batch needs one index per image; the recorded downsample is the VAE's (16 px -> 8); only weight-file suffixes
    are taken as single-file autoencoders."""
    from src.preprocess.autoencoders import DiffusersAutoencoder, check_autoencoder_path, sample_latents
    from src.preprocess.sources import item_rng

    noise = sample_latents(torch.zeros(1, 2, 2, 2), torch.ones(1, 2, 2, 2), [3], seed=0)[0]
    assert torch.equal(noise, torch.from_numpy(item_rng(1, 3).standard_normal((2, 2, 2), dtype=np.float32)))
    vae = DiffusersAutoencoder(models["vae"], latent="sample")
    assert vae.downsample == 2 and vae.describe()["autoencoder_downsample"] == 2
    with pytest.raises(ValueError, match="one item index per image"):
        vae.encode(torch.zeros(2, 3, RES, RES), [5])
    notes = tmp_path / "vae.txt"
    notes.write_text("not weights")
    with pytest.raises(ValueError, match="has suffix '.txt'"):
        check_autoencoder_path(str(notes), str(tmp_path))


# ----------------------------------------------------------------------------------------------------------------
# End to end
# ----------------------------------------------------------------------------------------------------------------

def test_imagenet_autoencoder_clips_t5(tmp_path, models):
    train, mapping = make_imagenet(tmp_path / "imagenet")
    out = tmp_path / "shards"
    # README: two --clip options (CLIP L/14 and bigG in the paper), an autoencoder and T5, through the command line.
    assert main(["imagenet", "--root", str(train), "--class-names", str(mapping), "--out", str(out),
                 "--resolution", str(RES), "--autoencoder", models["vae"], "--clip", *models["clip_a"],
                 "--clip", *models["clip_b"], "--t5", models["t5"], "--t5-length", "8", "--chunk-size", "4",
                 "--batch-size", "3", "--num-workers", "0", "--device", "cpu", "--no-progress"]) == 0
    meta = read_meta(out)
    assert is_complete(out) and meta["count"] == 12 and meta["skipped"] == 1
    assert len(meta["shards"]) == 4 and not (out / WORK_DIR).exists()  # 13 items in chunks of 4
    assert meta["shapes"] == {"latent": [4, 8, 8], "context": [12 + 8, 96], "pooled": [24 + 16]}
    assert meta["encoder_names"] == ["clip:clip-a", "clip:clip-b", "t5:t5"]
    assert len(set(meta["encoder_sha256"])) == 3  # each encoder's content, in that order (checked below)
    assert meta["text_groups"] == [
        {"name": "clip:clip-a", "context_tokens": [0, 12], "context_channels": [0, 32], "pooled_channels": [0, 24]},
        {"name": "clip:clip-b", "context_tokens": [0, 12], "context_channels": [32, 80], "pooled_channels": [24, 40]},
        {"name": "t5:t5", "context_tokens": [12, 20], "context_channels": [0, 96], "pooled_channels": [40, 40]},
    ]
    log = (out / SKIP_LOG).read_text().splitlines()
    assert log[0].startswith("# 1 of 13") and "n00000002/n00000002_broken.JPEG" in log[1]

    rows = samples(out)
    assert len(rows) == 12 and len({r["extras"]["index"] for r in rows}) == 12
    latents = np.stack([r["latent"] for r in rows]).astype(np.float64)
    assert rows[0]["latent"].dtype == np.float16
    assert meta["latent_mean"] == pytest.approx(latents.mean(), rel=1e-9)
    assert meta["latent_std"] == pytest.approx(latents.std(), rel=1e-9)
    labels = {r["extras"]["synset"]: r["extras"]["label"] for r in rows}
    assert labels == {"n00000001": 0, "n00000002": 1, "n00000003": 2}
    for r in rows:
        assert r["caption"] in {f"a photo of a {n}" for n in SYNSETS[r["extras"]["synset"]]}
        assert np.abs(r["context"][:12, 80:]).max() == 0  # CLIP block zero-padded to the T5 width
    # one sample against the models run directly
    m = Models(config(out, models, autoencoder=models["vae"], clip=[models["clip_a"], models["clip_b"]],
                      t5=models["t5"], t5_length=8), "cpu")
    r = rows[0]
    pixels = decode_image((train / r["extras"]["source"]).read_bytes(), RES)[None]
    expected = m.autoencoder.vae.encode(pixels).latent_dist.mean[0].half().numpy()
    np.testing.assert_allclose(r["latent"], expected, atol=2e-3)
    assert meta["encoder_sha256"] == m.text.sha256 == m.describe()["encoder_sha256"]
    context, pooled = m.text([r["caption"]])
    np.testing.assert_allclose(r["context"], context[0].half().numpy(), atol=2e-3)
    np.testing.assert_allclose(r["pooled"], pooled[0].half().numpy(), atol=2e-3)

    batch = next(iter(make_loader(out, batch_size=5, shuffle=True, seed=0)))
    assert batch["x0"].shape == (5, 4, 8, 8) and batch["context"].shape == (5, 20, 96)
    assert batch["pooled"].shape == (5, 40) and len(batch["caption"]) == 5


def test_resume_after_stop_and_crash(tmp_path, models, monkeypatch):
    train, mapping = make_imagenet(tmp_path / "imagenet", per_class=5)  # 16 items, chunks of 4
    source = ImageNetSource(train, mapping)
    reference = preprocess(source, config(tmp_path / "reference", models))
    out = tmp_path / "resumed"
    assert preprocess(source, config(out, models, max_chunks=2)) is None
    assert not is_complete(out) and not (out / "meta.json").exists()
    first = [done_path(out, c).stat().st_mtime_ns for c in range(2)]

    calls = {"n": 0}
    original = Models.encode_images

    def crash_on_second_batch(self, *args):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("simulated crash")
        return original(self, *args)

    monkeypatch.setattr(Models, "encode_images", crash_on_second_batch)
    with pytest.raises(RuntimeError, match="simulated crash"):
        preprocess(source, config(out, models))  # dies inside chunk 2
    assert not done_path(out, 2).exists() and not (out / "meta.json").exists()
    assert [done_path(out, c).stat().st_mtime_ns for c in range(2)] == first  # completed chunks kept
    monkeypatch.setattr(Models, "encode_images", original)

    calls["n"] = 0
    monkeypatch.setattr(Models, "encode_images", lambda self, *a: (calls.__setitem__("n", calls["n"] + 1),
                                                                    original(self, *a))[1])
    meta = preprocess(source, config(out, models))
    assert calls["n"] == 4  # chunks 2 and 3 only: 2 batches of (3, 1) each
    assert [done_path(out, c).exists() for c in range(2)] == [False, False]  # work folder removed when complete
    assert meta["count"] == reference["count"] == 15 and meta["shards"] == reference["shards"]
    assert meta["latent_mean"] == reference["latent_mean"] and meta["latent_std"] == reference["latent_std"]
    for a, b in zip(samples(out), samples(tmp_path / "reference"), strict=True):
        assert a["caption"] == b["caption"] and a["extras"] == b["extras"]
        np.testing.assert_array_equal(a["latent"], b["latent"])
        np.testing.assert_allclose(a["context"], b["context"], atol=1e-3)
    assert preprocess(source, config(out, models))["created"] == meta["created"]  # complete: nothing redone
    with pytest.raises(ValueError, match="other settings.*resolution"):
        preprocess(source, config(out, models, resolution=8))


def test_a_stop_after_some_chunks_counts_only_the_chunks_done_before(tmp_path, models, capsys):
    """--max-chunks limits the chunks this run writes; the start line still counts the chunks written before."""
    train, mapping = make_imagenet(tmp_path / "imagenet", per_class=4)  # 13 items, 4 chunks of 4
    source, out = ImageNetSource(train, mapping), tmp_path / "out"
    assert preprocess(source, config(out, models, max_chunks=1)) is None
    assert f"{out}: 13 items, 4 chunks, 0 done before;" in capsys.readouterr().out
    assert preprocess(source, config(out, models, max_chunks=2)) is None
    assert f"{out}: 13 items, 4 chunks, 1 done before;" in capsys.readouterr().out


def test_a_resume_with_other_model_files_at_the_same_paths_is_refused(tmp_path, capsys):
    """The settings name the models by path: a CLIP weights file replaced there between a stop and the resume would
    encode the rest of the folder otherwise; models.json's content digests refuse it, writing nothing."""
    train, mapping = make_imagenet(tmp_path / "imagenet", per_class=4)  # 13 items, 4 chunks of 4
    source, out = ImageNetSource(train, mapping), tmp_path / "out"
    torch.manual_seed(1)
    clip = save_clip(tmp_path, "clip", 32, 24)
    assert preprocess(source, config(out, {"clip_a": list(clip)}, max_chunks=1)) is None
    written = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    torch.manual_seed(2)
    assert save_clip(tmp_path, "clip", 32, 24) == clip  # other weights, the same files
    with pytest.raises(ValueError, match=rf"^out='{out}': its chunks done before were encoded by other model files at "
                                         r"the same paths \(encoder_sha256 \['\w+'\] before, \['\w+'\] now\)"):
        preprocess(source, config(out, {"clip_a": list(clip)}, max_chunks=1))
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == written


def test_a_resume_after_the_clip_sidecar_turned_quick_gelu_on_is_refused(tmp_path, capsys):
    """The sidecar's force_quick_gelu changes the text features of the same weights file, but the content digest was
    the files' alone: a sidecar written between a stop and the resume encoded the rest of the folder with QuickGELU.
    Now the digest carries it when on (and is the files' alone when off, as folders written before recorded it)."""
    from src.preprocess.text import clip_digest
    from src.utils.io import files_digest

    train, mapping = make_imagenet(tmp_path / "imagenet", per_class=4)
    source, out = ImageNetSource(train, mapping), tmp_path / "out"
    torch.manual_seed(1)
    config_file, weights = save_clip(tmp_path, "clip", 32, 24)
    clip = (config_file, str(Path(weights).rename(tmp_path / "clip_weights.pt")))  # clip.json is the model config
    plain = clip_digest(*clip)
    assert plain == files_digest({"weights": Path(clip[1]), "config": Path(clip[0])})
    assert preprocess(source, config(out, {"clip_a": list(clip)}, max_chunks=1)) is None
    written = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    Path(clip[1]).with_suffix(".json").write_text(json.dumps({"force_quick_gelu": False}))
    assert clip_digest(*clip) == plain
    Path(clip[1]).with_suffix(".json").write_text(json.dumps({"force_quick_gelu": True}))
    assert clip_digest(*clip) != plain
    with pytest.raises(ValueError, match=rf"^out='{out}': its chunks done before were encoded by other model files at "
                                         rf"the same paths \(encoder_sha256 \['{plain}'\] before, \['\w+'\] now\)"):
        preprocess(source, config(out, {"clip_a": list(clip)}, max_chunks=1))
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == written


def test_folders_written_before_the_digest_named_quick_gelu_stay_complete_and_resumable(tmp_path, capsys):
    """A CLIP whose sidecar turns QuickGELU on was encoded with it before too, but its digest was the files' alone:
    such a complete folder was refused as "encoded by other model files", and so was a resume of its chunks and its
    pair with an evaluation folder written since. A folder without encoder_files_sha256 is compared as written."""
    from src.data.expectations import ENCODER_FILES_SHA256, split_differences
    from src.data.shards import META_FILE
    from src.preprocess.text import clip_digest

    train, mapping = make_imagenet(tmp_path / "imagenet", per_class=4)  # 13 items, 4 chunks of 4
    source = ImageNetSource(train, mapping)
    torch.manual_seed(1)
    clip = save_clip(tmp_path, "clip", 32, 24)
    Path(clip[1]).with_suffix(".json").write_text(json.dumps({"force_quick_gelu": True}))
    plain, quick = clip_digest(*clip, quick_gelu=False), clip_digest(*clip)
    assert plain != quick

    def as_written_before(path: Path) -> None:
        recorded = json.loads(path.read_text())
        assert recorded.pop(ENCODER_FILES_SHA256) == [plain] and recorded["encoder_sha256"] == [quick]
        path.write_text(json.dumps({**recorded, "encoder_sha256": [plain]}))

    done, part = tmp_path / "done", tmp_path / "part"
    meta = preprocess(source, config(done, {"clip_a": list(clip)}))
    as_written_before(done / META_FILE)
    assert preprocess(source, config(done, {"clip_a": list(clip)}))["created"] == meta["created"]  # nothing to do
    assert preprocess(source, config(part, {"clip_a": list(clip)}, max_chunks=1)) is None
    as_written_before(part / "_work" / "models.json")
    assert preprocess(source, config(part, {"clip_a": list(clip)}))["complete"]  # resumed
    assert split_differences(read_meta(done), read_meta(part)) == []
    # Folders written since compare their digests: one written before the sidecar turned QuickGELU on differs; one
    # written before and one since compare the files alone: other weights differ.
    assert split_differences({**read_meta(part), "encoder_sha256": [plain]}, read_meta(part)) == [
        f"encoder_sha256 {[quick]!r} vs training {[plain]!r}"]
    other = {**read_meta(part), "encoder_sha256": ["0" * 12], ENCODER_FILES_SHA256: ["0" * 12]}
    assert split_differences(read_meta(done), other) == [f"encoder_sha256 {['0' * 12]!r} vs training {[plain]!r}"]


def test_a_complete_folder_of_other_model_files_at_the_same_paths_is_not_complete(tmp_path, models, capsys):
    """A complete folder was judged by its settings alone, which name the models by path: CLIP weights replaced at the
    same path since made a rerun say "already complete with these settings" over the former weights' encodings. Its
    meta.json's content digests refuse it now, as a resume's are, changing nothing."""
    train, mapping = make_imagenet(tmp_path / "imagenet", per_class=4)
    source, out = ImageNetSource(train, mapping), tmp_path / "out"
    torch.manual_seed(1)
    clip = save_clip(tmp_path, "clip", 32, 24)
    assert preprocess(source, config(out, {"clip_a": list(clip)}))["complete"]
    assert preprocess(source, config(out, {"clip_a": list(clip)}))["complete"]  # the same files: nothing to do
    written = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    torch.manual_seed(2)
    assert save_clip(tmp_path, "clip", 32, 24) == clip  # other weights, the same files
    with pytest.raises(ValueError, match=rf"^out='{out}' already holds a shard set encoded by other model files at "
                                         r"the same paths \(encoder_sha256 \['\w+'\] then, \['\w+'\] now\)"):
        preprocess(source, config(out, {"clip_a": list(clip)}))
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == written
    # What it compares is what meta.json records, read off the files without loading a model: autoencoder and T5 too.
    from src.preprocess.pipeline import MODEL_CONTENT_KEYS, model_content

    full = config(out, models, autoencoder=models["vae"], autoencoder_config=models["vae"],
                  clip=[models["clip_a"], models["clip_b"]], t5=models["t5"])
    described = Models(full, "cpu").describe()
    assert model_content(full) == {k: described[k] for k in MODEL_CONTENT_KEYS}


def assert_same_shards(a: Path, b: Path) -> None:
    ma, mb = read_meta(a), read_meta(b)
    assert ma["count"] == mb["count"] and ma["shards"] == mb["shards"] and ma["skipped"] == mb["skipped"]
    assert ma["latent_mean"] == mb["latent_mean"] and ma["latent_std"] == mb["latent_std"]
    for x, y in zip(samples(a), samples(b), strict=True):
        assert x["caption"] == y["caption"] and x["extras"] == y["extras"]
        np.testing.assert_array_equal(x["latent"], y["latent"])
        np.testing.assert_allclose(x["context"], y["context"], atol=1e-3)


def test_parts_split_a_job_and_the_last_one_assembles(tmp_path, models):
    train, mapping = make_imagenet(tmp_path / "imagenet", per_class=5)  # 16 items, 4 chunks of 4 (one unreadable)
    source = ImageNetSource(train, mapping)
    preprocess(source, config(tmp_path / "whole", models))
    out = tmp_path / "parts"
    assert preprocess(source, config(out, models, part=0, parts=3)) == {"complete": False}
    assert [done_path(out, c).exists() for c in range(4)] == [True, False, False, True]  # chunks 0 and 3
    assert not (out / "meta.json").exists()
    assert preprocess(source, config(out, models, part=2, parts=3)) == {"complete": False}
    meta = preprocess(source, config(out, models, part=1, parts=3))  # the last part: assembles
    assert meta["complete"] and not (out / WORK_DIR).exists() and not (out / ".assemble.lock").exists()
    assert_same_shards(out, tmp_path / "whole")
    assert preprocess(source, config(out, models, part=0, parts=3))["created"] == meta["created"]  # nothing redone
    with pytest.raises(ValueError, match=r"part=3/3 is not allowed"):
        preprocess(source, config(tmp_path / "bad", models, part=3, parts=3))


def test_parts_running_at_once_through_the_cli(tmp_path, models):
    import os
    import subprocess
    import sys

    train, mapping = make_imagenet(tmp_path / "imagenet", per_class=5)
    preprocess(ImageNetSource(train, mapping), config(tmp_path / "whole", models))
    out = tmp_path / "parts"
    argv = ["imagenet", "--root", str(train), "--class-names", str(mapping), "--out", str(out), "--resolution",
            str(RES), "--clip", *models["clip_a"], "--chunk-size", "4", "--batch-size", "3", "--num-workers", "0",
            "--device", "cpu", "--no-progress", "--cache-dir", str(tmp_path / "checksums")]
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-m", "src.preprocess", *argv, "--part", f"{i}/2"], cwd=root, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    assert sum("complete:" in o for o in outputs) == 1  # exactly one part assembled the folder
    assert not (out / WORK_DIR).exists() and not (out / ".assemble.lock").exists()
    assert_same_shards(out, tmp_path / "whole")
    with pytest.raises(SystemExit) as exit_info:  # I/N with I >= N: a one-line argparse error
        main([*argv, "--part", "2/2"])
    assert exit_info.value.code == 2


def test_cc12m_tsv_and_tars_skip_bad_items(tmp_path, models):
    """README: `python -m src.preprocess cc12m --tsv ... | --tars ...` (the command line, as the README gives it)."""
    common = ["--resolution", str(RES), "--clip", *models["clip_a"], "--chunk-size", "4", "--batch-size", "3",
              "--device", "cpu", "--no-progress"]
    tsv = make_tsv(tmp_path / "tsv")
    assert main(["cc12m", "--tsv", str(tsv), "--image-root", str(tsv.parent), "--out", str(tmp_path / "a"),
                 "--num-workers", "0", "--no-shuffle", *common]) == 0
    meta = read_meta(tmp_path / "a")
    assert meta["count"] == 7 and meta["skipped"] == 2 and meta["dataset"] == "cc12m"
    assert [r["caption"] for r in samples(tmp_path / "a")] == [f"a caption number {i}" for i in range(7)]
    log = (tmp_path / "a" / SKIP_LOG).read_text()
    assert "images/bad.jpg" in log and "images/missing.jpg" in log and "FileNotFoundError" in log
    assert main(["cc12m", "--tars", str(make_tars(tmp_path / "tars")), "--out", str(tmp_path / "b"),
                 "--num-workers", "2", *common]) == 0
    meta = read_meta(tmp_path / "b")
    assert meta["count"] == 6 and meta["skipped"] == 4
    log = (tmp_path / "b" / SKIP_LOG).read_text()
    assert "00000.tar:000009999" in log and "no .txt caption" in log and "00001.tar:000019998" in log
    assert sorted(r["caption"] for r in samples(tmp_path / "b")) == sorted(
        f"tar {t} caption {k}" for t in range(2) for k in range(3))


def test_coco_cli_with_training_statistics(tmp_path, models, capsys):
    train, mapping = make_imagenet(tmp_path / "imagenet", per_class=2)
    train_meta = preprocess(ImageNetSource(train, mapping), config(tmp_path / "train", models))
    images, ann = make_coco(tmp_path / "coco")
    out = tmp_path / "eval"
    argv = ["coco", "--images", str(images), "--annotations", str(ann), "--out", str(out), "--resolution", str(RES),
            "--clip", *models["clip_a"], "--chunk-size", "2", "--batch-size", "2", "--num-workers", "0",
            "--device", "cpu", "--stats-from", str(tmp_path / "train"), "--caption", "random", "--no-progress"]
    assert main(argv) == 0
    meta = read_meta(out)
    assert meta["count"] == 5 and meta["skipped"] == 0
    assert meta["latent_mean"] == train_meta["latent_mean"] and meta["latent_std"] == train_meta["latent_std"]
    assert meta["dataset_latent_stats"]["latent_mean"] != train_meta["latent_mean"]
    rows = samples(out)
    assert sorted(r["extras"]["image_id"] for r in rows) == [40, 41, 42, 43, 44]
    assert all(r["caption"] in r["extras"]["captions"] for r in rows)
    assert main(argv) == 0 and "already complete" in capsys.readouterr().out
    assert main(argv + ["--resolution", "8"]) == 2  # the folder holds a set made with other settings


def test_stats_from_another_autoencoder_in_a_folder_of_the_same_name_is_refused(tmp_path, models, capsys):
    """The folder name alone (AutoencoderKL:vae) let an evaluation set encoded by another autoencoder borrow the
    training statistics; the files' content is recorded and compared."""
    from src.evaluation.decoding import decoder_name

    train, mapping = make_imagenet(tmp_path / "imagenet", per_class=1)
    meta = preprocess(ImageNetSource(train, mapping), config(tmp_path / "train", models, autoencoder=models["vae"]))
    assert decoder_name(meta) == f"AutoencoderKL:vae:{meta['autoencoder_sha256']}"  # the evaluation's name of it
    torch.manual_seed(3)
    other = save_vae(tmp_path / "other" / "vae")  # the folder name of models["vae"], other weights
    images, ann = make_coco(tmp_path / "coco", n=2)
    out = tmp_path / "eval"
    capsys.readouterr()
    assert main(["coco", "--images", str(images), "--annotations", str(ann), "--out", str(out), "--resolution",
                 str(RES), "--clip", *models["clip_a"], "--autoencoder", other, "--stats-from", str(tmp_path / "train"),
                 "--num-workers", "0", "--device", "cpu", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"was made with autoencoder AutoencoderKL:vae:{meta['autoencoder_sha256']} " in err, err
    assert "its statistics do not apply" in err and err.count("\n") == 1, err
    assert not (out / "meta.json").exists()


def test_text_encoders_of_one_name_with_other_weights_are_other_encoders(tmp_path, models, monkeypatch):
    """Text encoders are named by model (clip:ViT-L-14 for OpenAI and LAION weights alike) or folder (t5:t5):
    their files' content tells them apart (encoder_sha256, one per encoder in encoder_names order), and the split
    check names it; each encoder's files are hashed once however often the models are described."""
    from src.data.expectations import SAME_ENCODING, split_differences
    from src.preprocess.text import T5TextEncoder, load_clip
    from src.utils import io

    torch.manual_seed(5)
    other_clip = save_clip((tmp_path / "other").mkdir() or tmp_path / "other", "clip-a", 32, 24)  # clip-a's name
    other_t5 = save_t5(tmp_path / "other" / "t5")  # the folder name of models["t5"], other weights

    def combined(clip, t5):
        return CombinedTextEncoder([load_clip(*clip, device="cpu")], T5TextEncoder(t5, max_length=4))

    hashed = []
    monkeypatch.setattr(io, "sha256_file", lambda p, real=io.sha256_file: hashed.append(p) or real(p))
    monkeypatch.setattr(io, "_SHA256", {})
    train, same = combined(models["clip_a"], models["t5"]), combined(models["clip_a"], models["t5"])
    clip_other, t5_other = combined(other_clip, models["t5"]), combined(models["clip_a"], other_t5)
    assert train.names == clip_other.names == t5_other.names == ["clip:clip-a", "t5:t5"]
    assert train.sha256 == same.sha256 and len(set(train.sha256)) == 2
    assert clip_other.sha256 == [clip_other.clips[0].content_sha256, train.sha256[1]] != train.sha256
    assert t5_other.sha256 == [train.sha256[0], t5_other.t5.content_sha256] != train.sha256
    assert len(hashed) == len(set(hashed))  # every file once (the CLIP weights also name its fingerprint)
    files = len(hashed)
    monkeypatch.setattr(io, "_SHA256", {})  # not even the process's memory: the digests are kept on the encoders
    assert train.sha256 == same.sha256 and len(hashed) == files

    meta = lambda enc: {"shapes": {}, "encoder_names": enc.names, "encoder_sha256": enc.sha256}  # noqa: E731
    assert split_differences(meta(train), meta(same), SAME_ENCODING) == []
    assert split_differences(meta(train), meta(clip_other), SAME_ENCODING) == [
        f"encoder_sha256 {clip_other.sha256!r} vs training {train.sha256!r}"]
    older = {k: v for k, v in meta(train).items() if k != "encoder_sha256"}  # written before encoder_sha256
    assert split_differences(older, meta(t5_other), SAME_ENCODING) == []
    assert split_differences(meta(t5_other), older, SAME_ENCODING) == []


def test_model_files_are_hashed_once_across_processes_with_a_cache_dir(tmp_path, models, monkeypatch):
    """Each preprocess process (a resume, every --part of a job, the next folder) read every model file again to
    name it: 10-20 GB for T5-XXL. With cache_dir (the command line's default .cache) the checksums are remembered
    per file version; a file replaced since is hashed again."""
    import json

    from src.utils import io

    hashed = []
    monkeypatch.setattr(io, "sha256_file", lambda p, real=io.sha256_file: hashed.append(str(p)) or real(p))
    cache = tmp_path / "cache"
    models_of = dict(autoencoder=models["vae"], t5=models["t5"], t5_length=4, cache_dir=str(cache))

    def described() -> dict:
        monkeypatch.setattr(io, "_SHA256", {})  # a new process
        return Models(config(tmp_path / "out", models, **models_of), "cpu").describe()

    first = described()
    files = len(hashed)
    assert files >= 4 and any(p.endswith("model.safetensors") for p in hashed)  # T5, the autoencoder, the CLIP
    assert described() == first and len(hashed) == files  # the next process: nothing read again
    weights = Path(models["t5"]) / "model.safetensors"
    weights.write_bytes(weights.read_bytes())  # rewritten in place: another file version, hashed again
    assert described() == first and len(hashed) == files + 1
    assert str(weights.resolve()) in json.loads((cache / io.WEIGHTS_SHA256_FILE).read_text())


def test_an_evaluation_folder_encoded_with_other_text_weights_is_not_encoded_like_training(tmp_path, models):
    """meta.json records encoder_sha256; the planner and src.run's data check compare it (preprocess end to end)."""
    from src.data.expectations import check_shard_folders
    from src.preprocess.text import clip_digest

    torch.manual_seed(6)
    other_clip = save_clip((tmp_path / "laion").mkdir() or tmp_path / "laion", "clip-a", 32, 24)  # clip-a's name
    images, ann = make_coco(tmp_path / "coco", n=2)
    train = preprocess(CocoSource(images, ann), config(tmp_path / "train", models))
    assert train["encoder_names"] == ["clip:clip-a"] and train["encoder_sha256"] == [clip_digest(*models["clip_a"])]
    stats = ["--stats-from", str(tmp_path / "train")]
    for name, clip in (("same", models["clip_a"]), ("other", other_clip)):
        assert main(["coco", "--images", str(images), "--annotations", str(ann), "--out", str(tmp_path / name),
                     "--resolution", str(RES), "--clip", *clip, "--num-workers", "0", "--device", "cpu",
                     "--no-progress", *stats, "--cache-dir", str(tmp_path / "cache")]) == 0
    remembered = json.loads((tmp_path / "cache" / "weights_sha256.json").read_text())  # --cache-dir: the checksums
    assert {str(Path(models["clip_a"][1]).resolve()), str(Path(other_clip[1]).resolve())} <= set(remembered)
    same = check_shard_folders(tmp_path / "train", tmp_path / "same")
    assert len(same) == 1 and "differs from the paper's setup" in same[0]  # tiny models: only that
    other = check_shard_folders(tmp_path / "train", tmp_path / "other")
    digest = clip_digest(*other_clip)
    assert other[1:] == [f"data.eval_dir={tmp_path / 'other'} is not encoded like data.train_dir (encoder_sha256 "
                         f"[{digest!r}] vs training {train['encoder_sha256']!r}): preprocess it with the same models "
                         "and --stats-from the training folder"] and digest != train["encoder_sha256"][0]


def test_missing_inputs_fail_before_any_work(tmp_path, models, capsys):
    train, mapping = make_imagenet(tmp_path / "imagenet", per_class=1)
    out = tmp_path / "out"
    base = ["imagenet", "--root", str(train), "--class-names", str(mapping), "--out", str(out), "--device", "cpu"]
    cases = [
        (["--clip", models["clip_a"][0], str(tmp_path / "nope.pt")], "clip weights="),
        (["--clip", *models["clip_a"], "--autoencoder", str(tmp_path / "no-vae")], "autoencoder="),
        (["--clip", *models["clip_a"], "--t5", str(tmp_path / "no-t5")], "t5="),
        (["--clip", *models["clip_a"], "--stats-from", str(tmp_path / "no-stats")], "no-stats"),
        (["--clip", "ViT-Nope-99", models["clip_a"][1]], "not an open_clip model name"),
    ]
    for extra, message in cases:
        with pytest.raises(FileNotFoundError if "model name" not in message else ValueError, match=message):
            cfg = PreprocessConfig(out=str(out), clip=[tuple(extra[1:3])],
                                   autoencoder=extra[4] if "--autoencoder" in extra else "identity",
                                   t5=extra[4] if "--t5" in extra else None,
                                   stats_from=extra[4] if "--stats-from" in extra else None)
            cfg.check_inputs()
        assert main(base + extra) == 2
    assert main(["imagenet", "--root", str(tmp_path / "no-root"), "--class-names", str(mapping), "--out", str(out),
                 "--clip", *models["clip_a"]]) == 2
    # A file that is not weights, a GPU that is not there, a stop before the first chunk: refused before any work.
    garbage = tmp_path / "garbage.bin"
    garbage.write_bytes(b"not a checkpoint")
    refused = [(["--clip", models["clip_a"][0], str(garbage)], "not a weights file torch.load(weights_only=True)"),
               (["--clip", *models["clip_a"], "--max-chunks", "0"], "max_chunks=0 is not allowed; need >= 1")]
    if not torch.cuda.is_available():
        refused.append((["--clip", *models["clip_a"], "--device", "cuda"], "device='cuda' is not allowed here"))
    capsys.readouterr()
    for extra, message in refused:
        assert main([*base, *extra]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
    assert not out.exists()


def test_every_cli_option_reaches_the_config():
    """Each command-line option lands in its own PreprocessConfig field (none defaulted or taken from another)."""
    from src.preprocess.__main__ import build_parser, config_from_args

    args = build_parser().parse_args([
        "cc12m", "--tsv", "t.tsv", "--out", "o", "--resolution", "32", "--autoencoder", "vae", "--autoencoder-config",
        "cfg", "--latent", "sample", "--clip", "m", "w.pt", "--t5", "t5", "--t5-length", "9", "--chunk-size", "7",
        "--batch-size", "5", "--num-workers", "3", "--seed", "11", "--no-shuffle", "--stats-from", "s",
        "--device", "cpu", "--precision", "bfloat16", "--autoencoder-precision", "float16", "--text-cache", "13",
        "--max-chunks", "2", "--no-progress", "--part", "1/4"])
    cfg = config_from_args(args)
    assert (cfg.out, cfg.resolution, cfg.autoencoder, cfg.autoencoder_config, cfg.latent) == \
        ("o", 32, "vae", "cfg", "sample")
    assert (cfg.clip, cfg.t5, cfg.t5_length, cfg.chunk_size, cfg.batch_size, cfg.num_workers, cfg.seed) == \
        ([("m", "w.pt")], "t5", 9, 7, 5, 3, 11)
    assert (cfg.shuffle, cfg.stats_from, cfg.device, cfg.precision, cfg.autoencoder_precision) == \
        (False, "s", "cpu", "bfloat16", "float16")
    assert (cfg.text_cache, cfg.max_chunks, cfg.progress, cfg.part, cfg.parts) == (13, 2, False, 1, 4)
