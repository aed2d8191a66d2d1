"""Raw datasets as indexable sources of (image bytes, caption, extras): ImageNet, CC12M (TSV or tars), COCO-2014.

Every source enumerates its items once, in a fixed sorted order, and reads item i on demand (inside DataLoader
workers). Item storage is compact (numpy arrays, byte offsets) so that CC12M's 12M items fit in memory.
Captions that involve chance (ImageNet synonyms, a random COCO caption) are drawn from a generator seeded by
(seed, item index), so they do not depend on chunking, workers or resumption.
"""

from __future__ import annotations

import hashlib
import json
import os
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np

from src.utils.io import file_sha256

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
WDS_IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
CAPTION_CHOICES = ("first", "random")
UTF8_BOM = b"\xef\xbb\xbf"
TSV_HEADER_NAMES = ({"path", "image", "image_path", "file", "filepath", "filename", "url"}, {"caption", "text"})
#: Marks fingerprints that identify files by content (sha256) and image folders by names and sizes; one without it
#: was written before, when a TSV or captions file counted as the same if its size was (pipeline.legacy_state).
IDENTITY = 2


@dataclass
class Record:
    """One raw item: encoded image bytes, its caption and the extras stored in the shard's json."""

    key: str
    data: bytes
    caption: str
    extras: dict = field(default_factory=dict)


class Source(Protocol):
    """What the pipeline needs of a dataset: a length, item reading, a name for the skip log, a fingerprint."""

    name: str
    settings: dict[str, str]  # fingerprint key -> the setting (CLI option) it comes from, for refusals
    hashed: dict[str, dict]  # resolved path -> {size, mtime_ns, ctime_ns, sha256} of the files fingerprint() hashed

    def __len__(self) -> int: ...

    def read(self, index: int) -> Record:
        """Item index's image bytes, caption and extras; raises when the item is unreadable."""

    def describe(self, index: int) -> str:
        """A short name of the item (its path or tar member) for the skip log, without reading the image."""

    def fingerprint(self, known: dict | None = None) -> dict:
        """What identifies the items and their contents (paths, counts, hashes), so a resumed run can check it is
        the same; known: hashes an earlier run kept ({resolved path: {size, mtime_ns, ctime_ns, sha256}})."""

    def legacy_fingerprint(self) -> dict:
        """The fingerprint as written before IDENTITY (a TSV or captions file by its size or not at all)."""

    def legacy_files(self) -> list[tuple[str, Path]]:
        """(setting, file) whose contents legacy_fingerprint does not cover."""


def imagenet_caption(name: str) -> str:
    """The paper's ImageNet caption template (docs/data.md#real-data)."""
    return f"a photo of a {name}"


def item_rng(seed: int, index: int) -> np.random.Generator:
    """A generator that depends only on (seed, item index)."""
    return np.random.default_rng([seed, index])


def _require_file(path: str | Path, setting: str) -> Path:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{setting}={str(path)!r} is not a file")
    return path


def _require_dir(path: str | Path, setting: str) -> Path:
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{setting}={str(path)!r} is not a folder")
    return path


def _read_text(path: Path, setting: str) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")  # a BOM (an editor's) is no part of the first name
    except UnicodeDecodeError as e:
        raise ValueError(f"{setting}={str(path)!r} is not UTF-8 text ({e}); save it as UTF-8") from None


def _read_json(path: Path, setting: str):
    try:
        return json.loads(_read_text(path, setting))
    except json.JSONDecodeError as e:
        raise ValueError(f"{setting}={str(path)!r} is not valid JSON ({e})") from None


def _digest(strings) -> str:
    h = hashlib.sha256()
    for s in strings:
        h.update(s.encode("utf-8", "surrogateescape") + b"\0")  # a file name need not be UTF-8
    return h.hexdigest()[:16]


def _sizes_digest(sizes) -> str:
    return hashlib.sha256(np.asarray(sizes, dtype=np.int64).tobytes()).hexdigest()[:16]


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:  # missing: skipped and logged when read
        return -1


def _hash_file(path: Path, known: dict | None, hashed: dict) -> str:
    """sha256 of a source file, taken from known when it holds this file version; the version is kept in hashed."""
    sha, entry = file_sha256(path, known)
    if entry is not None:
        hashed[str(path.resolve())] = entry
    return sha


#: What a difference in a fingerprint key means, for the refusal of a resumed run (source_change).
CHANGES = {
    "kind": "is another dataset or layout", "count": "has another number of items",
    "items": "lists other images (added, removed or renamed)", "sizes": "has images of other sizes (replaced?)",
    "tsv_sha256": "has other contents", "annotations_sha256": "has other contents", "tsv_bytes": "has another size",
    "classes": "has other class names", "spans": "has members of other sizes (rewritten?)",
}


def source_change(source, old: dict, new: dict) -> str:
    """One phrase per differing fingerprint key, naming its setting, e.g. "tsv='/d/a.tsv' has other contents
    (sha256 0a1b2c3d4e5f -> 9f8e7d6c5b4a)"."""
    phrases = []
    for key in sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k) and k != "identity"):
        setting = source.settings.get(key, key)
        value = getattr(source, setting, None)
        named = f"{setting}={str(value)!r}" if isinstance(value, (str, Path)) else setting
        what = CHANGES.get(key, "differs")
        a, b = (v[:12] if isinstance(v, str) and key in CHANGES else v for v in (old.get(key), new.get(key)))
        phrases.append(f"{named} {what} ({'sha256 ' if key.endswith('sha256') else ''}{a} -> {b})")
    return "; ".join(phrases) or "none"


# ----------------------------------------------------------------------------------------------------------------
# ImageNet: class folders + a class-name file
# ----------------------------------------------------------------------------------------------------------------

def read_class_names(path: str | Path) -> dict[str, list[str]]:
    """Synset -> synonyms, in label order, from a JSON file or a LOC_synset_mapping.txt-style text file.

    JSON: {"n01440764": ["tench", "Tinca tinca"]} (a string value is split at commas) or the Keras-style
    {"0": ["n01440764", "tench"]}. Text: one "n01440764 tench, Tinca tinca" per line. Labels follow the file's
    order for the text file and the Keras-style JSON, and sorted synsets for the synset-keyed JSON.
    """
    path = _require_file(path, "class_names")
    if path.suffix.lower() == ".json":
        raw = _read_json(path, "class_names")
        if not isinstance(raw, dict) or not raw:
            raise ValueError(f"class_names={str(path)!r}: expected a non-empty JSON object")
        odd = [k for k, v in raw.items() if not (isinstance(v, str) or isinstance(v, list)
                                                   and all(isinstance(n, str) for n in v))]
        if odd:
            raise ValueError(f"class_names={str(path)!r}: the value of {odd[0]!r} is not a name or a list of names")
        if all(k.isdigit() for k in raw):  # Keras: {"0": ["n01440764", "tench"]}
            odd = [k for k, v in raw.items() if not isinstance(v, list) or not v]
            if odd:
                raise ValueError(f"class_names={str(path)!r}: the value of {odd[0]!r} is not a list [synset, name, "
                                 "...]; need Keras-style {\"0\": [\"n01440764\", \"tench\"]} or {synset: names}")
            items = [(raw[k][0], raw[k][1:]) for k in sorted(raw, key=int)]
            twice = next((s for j, (s, _) in enumerate(items) if s in {t for t, _ in items[:j]}), None)
            if twice is not None:  # which label and names would win is a guess: refuse, as the text file's
                raise ValueError(f"class_names={str(path)!r} lists {twice} more than once; need each class once")
        else:
            items = [(k, raw[k]) for k in sorted(raw)]
        mapping = {}
        for synset, names in items:
            names = [names] if isinstance(names, str) else list(names)
            mapping[synset] = [n.strip().replace("_", " ") for s in names for n in s.split(",") if n.strip()]
    else:
        mapping = {}
        for line_no, line in enumerate(_read_text(path, "class_names").splitlines(), 1):
            if not line.strip():
                continue
            synset, names = (line.split(None, 1) + [""])[:2]  # a space (LOC_synset_mapping.txt) or a tab
            if synset in mapping:  # which line's names and label would win is a guess: refuse
                raise ValueError(f"class_names={str(path)!r} lists {synset} again on line {line_no}; need each "
                                 "class once")
            mapping[synset] = [n.strip() for n in names.split(",") if n.strip()]
    empty = [s for s, names in mapping.items() if not names]
    if empty:
        raise ValueError(f"class_names={str(path)!r}: classes without a name: {', '.join(empty[:5])}")
    return mapping


class ImageNetSource:
    """ImageNet in its folder layout (root/<synset>/<image>); captions "a photo of a <random synonym>"."""

    name = "imagenet"
    settings = {"root": "root", "count": "root", "items": "root", "sizes": "root", "classes": "class_names"}

    def __init__(self, root: str | Path, class_names: str | Path, seed: int = 0):
        self.root = _require_dir(root, "root")
        self.class_names = Path(class_names)
        self.classes = read_class_names(class_names)
        self.hashed: dict[str, dict] = {}
        self.seed = seed
        self.label_of = {synset: i for i, synset in enumerate(self.classes)}
        folders = sorted(p.name for p in self.root.iterdir() if p.is_dir())
        if not folders:
            raise FileNotFoundError(f"root={str(self.root)!r} has no class folders (expected e.g. n01440764/)")
        unknown = [f for f in folders if f not in self.label_of]
        if unknown:
            raise ValueError(f"root={str(self.root)!r} has class folders missing from class_names: "
                             f"{', '.join(unknown[:5])}{' ...' if len(unknown) > 5 else ''}")
        files: list[tuple[str, int]] = []
        for folder in folders:
            with os.scandir(self.root / folder) as entries:  # one stat per image, as is_file() took: with its size
                files += sorted((f"{folder}/{e.name}", e.stat().st_size) for e in entries
                                if os.path.splitext(e.name)[1].lower() in IMAGE_EXTENSIONS and e.is_file())
        if not files:  # else every chunk-less step ran and the folder was left with "every item was unreadable"
            raise FileNotFoundError(f"root={str(self.root)!r} has no images ({', '.join(IMAGE_EXTENSIONS)}) in its "
                                    "class folders; need root/<synset>/<image>")
        self.paths = [rel for rel, _ in files]
        # Names and sizes identify the images: an image replaced by another of another size is seen, without
        # reading 1.28M images at every resume (one replaced by one of equal size is not).
        self.sizes = _sizes_digest([size for _, size in files])

    def __len__(self) -> int:
        return len(self.paths)

    def caption(self, index: int) -> tuple[str, dict]:
        """The seeded caption and extras of item index (no image read)."""
        synset = self.paths[index].split("/", 1)[0]
        names = self.classes[synset]
        name = names[int(item_rng(self.seed, index).integers(len(names)))]
        return imagenet_caption(name), {"label": self.label_of[synset], "synset": synset, "class_name": name}

    def describe(self, index: int) -> str:
        return self.paths[index]

    def read(self, index: int) -> Record:
        rel = self.paths[index]
        caption, extras = self.caption(index)
        return Record(rel, (self.root / rel).read_bytes(), caption, {**extras, "source": rel})

    def fingerprint(self, known: dict | None = None) -> dict:
        return {**self.legacy_fingerprint(), "identity": IDENTITY, "sizes": self.sizes}

    def legacy_fingerprint(self) -> dict:
        return {"kind": self.name, "root": str(self.root.resolve()), "count": len(self), "seed": self.seed,
                "classes": _digest(f"{k}:{'|'.join(v)}" for k, v in self.classes.items()),
                "items": _digest(self.paths)}

    def legacy_files(self) -> list[tuple[str, Path]]:
        return []  # the legacy fingerprint has the class names and the image names: image sizes are not kept


# ----------------------------------------------------------------------------------------------------------------
# CC12M: a TSV of local image paths and captions
# ----------------------------------------------------------------------------------------------------------------

class TsvSource:
    """CC12M as a TSV file "<image path>\\t<caption>" (paths relative to image_root, default the TSV's folder).

    Only the byte offsets of the lines are kept in memory; a line is parsed when its item is read.
    """

    name = "cc12m"
    settings = {"tsv": "tsv", "tsv_sha256": "tsv", "tsv_bytes": "tsv", "count": "tsv", "image_root": "image_root"}

    def __init__(self, tsv: str | Path, image_root: str | Path | None = None):
        self.tsv = _require_file(tsv, "tsv")
        self.hashed: dict[str, dict] = {}
        self.image_root = _require_dir(image_root, "image_root") if image_root else self.tsv.parent
        offsets, urls, tabbed, wide = [], 0, 0, None
        with open(self.tsv, "rb") as f:
            pos = 0
            for n, line in enumerate(f):
                if n == 0 and line.startswith(UTF8_BOM):  # a spreadsheet's export: the BOM is no part of row 1
                    pos = len(UTF8_BOM)
                    line = line[pos:]
                if line.strip() and not (n == 0 and self._is_header(line)):
                    offsets.append(pos)
                    urls += line.startswith((b"http://", b"https://"))
                    tabbed += b"\t" in line.strip()
                    if wide is None and line.strip().count(b"\t") > 1:
                        wide = n + 1
                pos += len(line)
        if not offsets:
            raise ValueError(f"tsv={str(self.tsv)!r} has no rows")
        if urls == len(offsets):  # CC12M's own TSV: every item would be skipped, after reading all of them
            raise ValueError(f"tsv={str(self.tsv)!r} lists image URLs, not files; this command reads local images: "
                             "download them first (e.g. img2dataset, then --tars DIR) or give a TSV of local paths")
        if not tabbed:  # a CSV, or spaces for tabs: every item would be skipped, after reading all of them
            raise ValueError(f"tsv={str(self.tsv)!r} has no row with a tab between image path and caption; need "
                             "<image path><TAB><caption> per line")
        if wide is not None:  # the caption would take in the other columns, tabs and all
            raise ValueError(f"tsv={str(self.tsv)!r} line {wide} has more than two tab-separated columns; need "
                             "<image path><TAB><caption> per line")
        self.offsets = np.asarray(offsets, dtype=np.int64)

    @staticmethod
    def _is_header(line: bytes) -> bool:
        fields = line.decode("utf-8", "replace").strip().lower().split("\t")
        return len(fields) >= 2 and fields[0] in TSV_HEADER_NAMES[0] and fields[1] in TSV_HEADER_NAMES[1]

    def __len__(self) -> int:
        return len(self.offsets)

    def _row(self, index: int) -> tuple[str, str]:
        with open(self.tsv, "rb") as f:
            f.seek(int(self.offsets[index]))
            line = f.readline().decode("utf-8").rstrip("\r\n")
        path, sep, caption = line.partition("\t")
        if not sep or not caption.strip():
            raise ValueError(f"tsv line for item {index} has no caption column: {line[:80]!r}")
        return path, caption.strip()

    def describe(self, index: int) -> str:
        try:
            return self._row(index)[0]
        except (OSError, ValueError, UnicodeDecodeError):
            return f"{self.tsv.name} item {index}"

    def read(self, index: int) -> Record:
        path, caption = self._row(index)
        return Record(path, (self.image_root / path).read_bytes(), caption, {"source": path})

    def fingerprint(self, known: dict | None = None) -> dict:
        # The TSV's sha256: an edit that keeps its size (a caption corrected, rows reordered) is other data.
        return {"kind": "cc12m-tsv", "identity": IDENTITY, "tsv": str(self.tsv.resolve()),
                "image_root": str(self.image_root.resolve()), "count": len(self),
                "tsv_sha256": _hash_file(self.tsv, known, self.hashed)}

    def legacy_fingerprint(self) -> dict:
        return {"kind": "cc12m-tsv", "tsv": str(self.tsv.resolve()), "image_root": str(self.image_root.resolve()),
                "count": len(self), "tsv_bytes": self.tsv.stat().st_size}

    def legacy_files(self) -> list[tuple[str, Path]]:
        return [("tsv", self.tsv)]


# ----------------------------------------------------------------------------------------------------------------
# CC12M: webdataset tars of <key>.jpg + <key>.txt (e.g. as img2dataset writes them)
# ----------------------------------------------------------------------------------------------------------------

def list_tars(tars: str | Path | list) -> list[Path]:
    """Tar files from a folder (all *.tar inside, sorted), one file, or a list of files."""
    if isinstance(tars, (list, tuple)):
        paths = [_require_file(t, "tars") for t in tars]
    else:
        p = Path(tars)
        if p.is_dir():
            paths = sorted(p.glob("*.tar"))
            if not paths:
                raise FileNotFoundError(f"tars={str(p)!r} is a folder without .tar files")
        else:
            paths = [_require_file(p, "tars")]
    seen: dict[Path, Path] = {}
    for path in paths:  # one tar twice (a glob and a name, a link) would put each of its samples in twice
        if seen.setdefault(path.resolve(), path) is not path:
            raise ValueError(f"tars={str(path)!r} is given twice (as {str(seen[path.resolve()])!r}); "
                             "need each tar once")
    return paths


def _tar_members(path: Path) -> dict[str, dict[str, tuple[int, int]]]:
    """Sample key -> {extension: (data offset, size)} of one tar; a file that is no tar (empty, compressed, an
    interrupted download's) is a one-line error naming it, not a traceback."""
    members: dict[str, dict[str, tuple[int, int]]] = {}
    try:
        with tarfile.open(path, "r:") as tf:
            for m in tf:
                if not m.isfile():
                    continue
                base = m.name.rsplit("/", 1)[-1]
                key, dot, ext = base.partition(".")  # webdataset: the extension starts at the first dot
                if dot:
                    members.setdefault(f"{m.name[: len(m.name) - len(base)]}{key}", {})[ext.lower()] = \
                        (m.offset_data, m.size)
    except tarfile.TarError as e:
        raise ValueError(f"tars={str(path)!r} is not a readable tar file ({type(e).__name__}: {e}); need "
                         "uncompressed webdataset .tar files: re-download or remove it") from None
    return members


class TarSource:
    """CC12M as webdataset tars; the index keeps each image's and caption's byte range inside its tar."""

    name = "cc12m"
    settings = {"tars": "tars", "count": "tars", "items": "tars", "spans": "tars"}

    def __init__(self, tars: str | Path | list):
        self.tars = list_tars(tars)
        self.hashed: dict[str, dict] = {}
        tar_ids, keys, spans = [], [], []
        for t, path in enumerate(self.tars):
            members = _tar_members(path)
            for key in sorted(members):
                exts = members[key]
                image_ext = next((e for e in WDS_IMAGE_EXTENSIONS if e in exts), None)
                if image_ext is None:
                    continue  # e.g. a failed download: json only
                tar_ids.append(t)
                keys.append(key)
                spans.append(exts[image_ext] + exts.get("txt", (-1, -1)))
        if not keys:
            raise ValueError(f"tars={str(self.tars[0].parent)!r}: no samples with an image (jpg, png, webp) found")
        self.tar_ids = np.asarray(tar_ids, dtype=np.int32)
        # UTF-8 bytes: numpy's bytes_ would encode as ASCII and fail on a member named café.jpg
        self.keys = np.asarray([k.encode("utf-8", "surrogateescape") for k in keys], dtype=np.bytes_)
        self.spans = np.asarray(spans, dtype=np.int64)  # image offset, size, caption offset, size

    def __len__(self) -> int:
        return len(self.keys)

    def _key(self, index: int) -> str:
        return self.keys[index].decode("utf-8", "surrogateescape")

    def describe(self, index: int) -> str:
        return f"{self.tars[int(self.tar_ids[index])].name}:{self._key(index)}"

    def read(self, index: int) -> Record:
        path = self.tars[int(self.tar_ids[index])]
        key = self._key(index)
        image_off, image_size, text_off, text_size = (int(v) for v in self.spans[index])
        if text_off < 0:
            raise ValueError(f"{path.name}:{key} has no .txt caption")
        with open(path, "rb") as f:
            f.seek(image_off)
            data = f.read(image_size)
            f.seek(text_off)
            caption = f.read(text_size).decode("utf-8").strip()
        if not caption:
            raise ValueError(f"{path.name}:{key} has an empty caption")
        return Record(key, data, caption, {"source": f"{path.name}:{key}"})

    def fingerprint(self, known: dict | None = None) -> dict:
        # Member names, offsets and sizes, and tar sizes: a tar rewritten with other images is seen without reading
        # the terabytes (one rewritten byte for byte in the same sizes is not).
        spans = hashlib.sha256(self.spans.tobytes())
        spans.update(np.asarray([p.stat().st_size for p in self.tars], dtype=np.int64).tobytes())
        return {**self.legacy_fingerprint(), "identity": IDENTITY, "spans": spans.hexdigest()[:16]}

    def legacy_fingerprint(self) -> dict:
        return {"kind": "cc12m-wds", "tars": _digest(str(p.resolve()) for p in self.tars), "count": len(self),
                "items": hashlib.sha256(self.keys.tobytes()).hexdigest()[:16]}

    def legacy_files(self) -> list[tuple[str, Path]]:
        return [("tars", p) for p in self.tars]


# ----------------------------------------------------------------------------------------------------------------
# COCO-2014 validation: images + captions_val2014.json
# ----------------------------------------------------------------------------------------------------------------

def _text(value) -> str:
    if not isinstance(value, str) or not value:
        raise TypeError(f"{value!r} is not a text")
    return value


def _coco_fields(record, fields: dict, annotations: Path, defaults: dict | None = None) -> tuple:
    """A COCO record's fields converted ({"image_id": int}); a missing or odd one is a one-line error, not a
    traceback. defaults: values of fields that may be absent."""
    values = []
    for name, convert in fields.items():
        try:
            values.append(convert(record[name] if name in record or name not in (defaults or {}) else defaults[name]))
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"annotations={str(annotations)!r} has a record without a valid {name!r} "
                             f"({json.dumps(record)[:80]}); need COCO captions, e.g. captions_val2014.json") from None
    return tuple(values)


class CocoSource:
    """COCO captions: one item per image (images with no caption are left out); caption "first" or "random"."""

    name = "coco"
    settings = {"images": "images", "sizes": "images", "annotations": "annotations", "count": "annotations",
                "items": "annotations", "annotations_sha256": "annotations", "caption_choice": "caption"}

    def __init__(self, images: str | Path, annotations: str | Path, caption_choice: str = "first", seed: int = 0):
        if caption_choice not in CAPTION_CHOICES:
            raise ValueError(f"caption_choice={caption_choice!r} is not allowed; allowed: {', '.join(CAPTION_CHOICES)}")
        self.images = _require_dir(images, "images")
        annotations = _require_file(annotations, "annotations")
        raw = _read_json(annotations, "annotations")
        if not isinstance(raw, dict) or "images" not in raw or "annotations" not in raw:
            raise ValueError(f"annotations={str(annotations)!r} lacks 'images' or 'annotations' (not COCO captions?)")
        captions: dict[int, list[tuple[int, str]]] = {}
        for a in raw["annotations"]:
            if not isinstance(a, dict) or not isinstance(a.get("caption"), str):  # e.g. instances_val2014.json
                raise ValueError(f"annotations={str(annotations)!r} has an annotation without a caption text "
                                 f"({json.dumps(a)[:80]}); need COCO captions, e.g. captions_val2014.json")
            image_id, ann_id = _coco_fields(a, {"image_id": int, "id": int}, annotations, {"id": 0})
            if a["caption"].strip():  # a blank one would be encoded as the empty prompt: as if not there
                captions.setdefault(image_id, []).append((ann_id, a["caption"].strip()))
        self.annotations = annotations
        self.caption_choice, self.seed = caption_choice, seed
        self.hashed: dict[str, dict] = {}
        # "first" = lowest annotation id: independent of the file's record order.
        rows = sorted(row for row in (_coco_fields(im, {"id": int, "file_name": _text}, annotations)
                                      for im in raw["images"]) if row[0] in captions)
        twice = [a for a, b in zip(rows, rows[1:]) if a[0] == b[0]]
        if twice:  # one image twice in the evaluation set would weigh it double
            raise ValueError(f"annotations={str(annotations)!r} lists image id {twice[0][0]} more than once; "
                             "need each image once")
        if not rows:
            raise ValueError(f"annotations={str(annotations)!r} has no image with a caption")
        self.image_ids = [r[0] for r in rows]
        self.file_names = [r[1] for r in rows]
        self.captions = [[c for _, c in sorted(captions[i])] for i in self.image_ids]

    def __len__(self) -> int:
        return len(self.image_ids)

    def describe(self, index: int) -> str:
        return self.file_names[index]

    def read(self, index: int) -> Record:
        captions = self.captions[index]
        if self.caption_choice == "first":
            caption = captions[0]
        else:
            caption = captions[int(item_rng(self.seed, index).integers(len(captions)))]
        file_name = self.file_names[index]
        extras = {"image_id": self.image_ids[index], "source": file_name, "captions": captions}
        return Record(str(self.image_ids[index]), (self.images / file_name).read_bytes(), caption, extras)

    def fingerprint(self, known: dict | None = None) -> dict:
        # The captions file's sha256 (an edited caption is other data) and the listed images' sizes (-1: missing).
        return {**self.legacy_fingerprint(), "identity": IDENTITY,
                "sizes": _sizes_digest([_size(self.images / f) for f in self.file_names]),
                "annotations_sha256": _hash_file(self.annotations, known, self.hashed)}

    def legacy_fingerprint(self) -> dict:
        return {"kind": self.name, "images": str(self.images.resolve()), "annotations": str(self.annotations.resolve()),
                "count": len(self), "caption_choice": self.caption_choice, "seed": self.seed,
                "items": _digest(self.file_names)}

    def legacy_files(self) -> list[tuple[str, Path]]:
        return [("annotations", self.annotations)]
