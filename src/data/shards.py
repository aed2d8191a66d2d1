"""Webdataset shards of precomputed latents and text embeddings: writer, loader, evaluation set (ARCHITECTURE.md).

One format for the embedded pixel-space data and for real precomputed autoencoder latents. Per sample:
`latent.npy` float16 (C, H, W), `context.npy` float16 (L, D_ctx), `pooled.npy` float16 (D_vec,), `txt` (caption),
`json` (extras, e.g. label). The folder's `meta.json` is written last and carries `complete: true`; a folder
without it is incomplete and is rebuilt by whoever prepares it. Just before it, `index.npz` records where every
sample's members lie in its shard, so that streaming starts without reading the tar headers again. Latents are
normalised by one global mean and std (docs/data.md#pixels-and-latents) when read.
"""

from __future__ import annotations

import contextlib

import io
import json
import math
import os
import re
import shutil
import time
import zipfile
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
import webdataset as wds

from src.utils.io import atomic_write_json, load_npz, save_npz, temp_sibling

META_FILE = "meta.json"
INDEX_FILE = "index.npz"  # the byte offsets of every sample (ShardSamples); optional: a folder without one is scanned
SHARD_PATTERN = "shard-{:06d}.tar"
FORMAT_VERSION = 1
IDENTITY_AUTOENCODER = "identity"  # pixel space: the latent is the image
SHUFFLE_BUFFER = 2000


# ----------------------------------------------------------------------------------------------------------------
# Small helpers
# ----------------------------------------------------------------------------------------------------------------

def npy_bytes(array: np.ndarray) -> bytes:
    """Serialise an array in .npy format (no pickle)."""
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


_NPY_HEADERS: dict[bytes, tuple[np.dtype, tuple[int, ...]]] = {}


def npy_array(data: bytes) -> np.ndarray:
    """Deserialise .npy bytes (no pickle); headers are parsed once and cached, as every sample shares them."""
    if data[:6] != b"\x93NUMPY":
        raise ValueError("npy_array: data is not in .npy format (bad magic bytes)")
    size_bytes = 2 if data[6] == 1 else 4
    start = 8 + size_bytes
    end = start + int.from_bytes(data[8:start], "little")
    header = data[start:end]
    parsed = _NPY_HEADERS.get(header)
    if parsed is None:
        array = np.load(io.BytesIO(data), allow_pickle=False)  # the reference parser, once per header
        if array.flags.f_contiguous and not array.flags.c_contiguous:
            return np.ascontiguousarray(array)
        parsed = _NPY_HEADERS.setdefault(header, (array.dtype, array.shape))
    dtype, shape = parsed
    return np.frombuffer(data, dtype=dtype, offset=end).reshape(shape)


def as_numpy(x) -> np.ndarray:
    """A tensor or array as a numpy array on the CPU."""
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


# ----------------------------------------------------------------------------------------------------------------
# Metadata
# ----------------------------------------------------------------------------------------------------------------

def read_meta(shard_dir: str | Path) -> dict:
    """The folder's meta.json; raises FileNotFoundError naming the folder when it is missing or incomplete."""
    path = Path(shard_dir) / META_FILE
    if not path.is_file():
        raise FileNotFoundError(f"shard folder {shard_dir} has no {META_FILE}: not written, or writing was interrupted")
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:  # json's own message names no file
        raise ValueError(f"shard folder {shard_dir}'s {META_FILE} is not JSON ({e}); write the folder again") from None
    if not isinstance(meta, dict):  # another tool's file: a one-line error, not an AttributeError
        raise ValueError(f"shard folder {shard_dir}'s {META_FILE} is not a JSON object")
    if meta.get("complete") is not True:
        raise FileNotFoundError(f"shard folder {shard_dir} is incomplete ({META_FILE} lacks complete: true)")
    return meta


def text_split(meta: dict) -> int:
    """Where the second text token group begins (SD3-style data: the 77 CLIP tokens, then T5's 77), from meta's
    text_groups; half the context when one group spans it (one encoder). The 3-stream MM-DiT's first stream."""
    starts = {int(g["context_tokens"][0]) for g in meta.get("text_groups") or [] if g.get("context_tokens")}
    starts.discard(0)
    return min(starts) if starts else max(int(meta["context_length"]) // 2, 1)


def is_complete(shard_dir: str | Path) -> bool:
    """Whether the folder holds a finished shard set (meta.json with complete: true and every shard present, of
    the size meta.json records where it does)."""
    try:
        meta = read_meta(shard_dir)
    except (FileNotFoundError, ValueError):  # ValueError: not JSON, or not a JSON object
        return False
    return not damaged_shards(shard_dir, meta)


def damaged_shards(shard_dir: str | Path, meta: dict) -> list[str]:
    """The shards of a folder that are missing or not of the size meta.json records (folders written before the
    sizes were recorded: missing ones only)."""
    sizes = meta.get("shard_bytes") or [None] * len(meta.get("shards", []))
    damaged = []
    for name, size in zip(meta.get("shards", []), sizes):
        path = Path(shard_dir) / name
        if not path.is_file() or (size is not None and path.stat().st_size != size):
            damaged.append(name)
    return damaged


def shard_paths(shard_dir: str | Path) -> list[str]:
    """The shard files of a complete folder, in writing order."""
    meta = read_meta(shard_dir)
    return [str(Path(shard_dir) / name) for name in meta["shards"]]


# ----------------------------------------------------------------------------------------------------------------
# Writer
# ----------------------------------------------------------------------------------------------------------------

def _is_shard_folder_entry(name: str) -> bool:
    """Whether a file name is one a ShardWriter creates (shards, meta.json, index.npz, their temporaries)."""
    return re.fullmatch(r"\.?(shard-\d{6}\.tar|meta\.json|index\.npz)(\.([0-9a-f]{32}|[0-9a-z_]{8})\.tmp)?",
                        name) is not None


class ShardWriter:
    """Streams samples into numbered tar shards; on close writes meta.json (global latent mean/std) last.

    latent_mean/latent_std: normalisation statistics to record; None computes them from the written latents
    (an evaluation split should pass its training split's statistics). Used as a context manager; if the block
    raises, no meta.json is written and the folder stays incomplete.
    """

    def __init__(self, shard_dir: str | Path, *, encoder_names: Sequence[str], samples_per_shard: int = 1000,
                 latent_mean: float | None = None, latent_std: float | None = None,
                 autoencoder: str = IDENTITY_AUTOENCODER, extra_meta: dict | None = None):
        if samples_per_shard < 1:
            raise ValueError(f"samples_per_shard={samples_per_shard} is not allowed; need >= 1")
        if latent_std is not None and not latent_std > 0:
            raise ValueError(f"latent_std={latent_std} is not allowed; need a positive number")
        if (latent_mean is None) != (latent_std is None):
            raise ValueError("latent_mean and latent_std must be given together or both left None")
        self.shard_dir = Path(shard_dir)
        self.encoder_names = list(encoder_names)
        self.samples_per_shard = samples_per_shard
        self.latent_mean, self.latent_std = latent_mean, latent_std
        self.autoencoder = autoencoder
        self.extra_meta = dict(extra_meta or {})
        self.count = 0
        self.shards: list[str] = []
        self.shard_bytes: list[int] = []  # each shard's size, in meta.json: a file cut short is found (is_complete)
        self.shapes: dict[str, list[int]] | None = None
        self._sum = 0.0
        self._sumsq = 0.0
        self._numel = 0
        self._tar: wds.TarWriter | None = None
        self._tmp_path: Path | None = None
        # Where each sample's training members land, known as they are written (plain ustar layout, checked per
        # sample); None once a sample's layout did not check out: the index is then built by scanning the shards.
        self._index: tuple[list, list, list] | None = ([], [], [])

    def __enter__(self) -> "ShardWriter":
        # Start from an empty folder: a stale meta.json must not outlive the rewrite.
        if self.shard_dir.exists():
            foreign = [p.name for p in self.shard_dir.iterdir() if not _is_shard_folder_entry(p.name)]
            if foreign:
                raise ValueError(f"refusing to overwrite {self.shard_dir}: it holds files that are not shards "
                                 f"({', '.join(sorted(foreign)[:3])}); choose an empty or shard-only folder")
            shutil.rmtree(self.shard_dir)
        self.shard_dir.mkdir(parents=True)
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            where = self.shard_dir
            if self._tar is not None:
                where = self.shard_dir / self.shards[-1]
                try:
                    with contextlib.suppress(OSError):  # a full disk fails the close's flush too
                        self._tar.close()
                finally:
                    self._tmp_path.unlink(missing_ok=True)
            if isinstance(exc, OSError) and exc.errno is not None and exc.filename is None:
                # `[Errno 28] No space left on device` names no file: say which one
                raise type(exc)(exc.errno, exc.strerror, str(where)) from exc
            return
        self._finish_shard()
        if self.count:  # (none: _write_meta refuses the folder)
            paths = [str(self.shard_dir / n) for n in self.shards]
            save_npz(self.shard_dir / INDEX_FILE, **(pack_index(*self._index, paths) if self._index is not None
                                                     else build_index(paths)))
        self._write_meta()

    def write(self, latent, context, pooled, caption: str, extras: dict | None = None) -> None:
        """Add one sample; arrays are stored as float16."""
        with np.errstate(over="ignore"):  # overflow is reported below as non-finite values
            latent16 = as_numpy(latent).astype(np.float16)
            context16 = as_numpy(context).astype(np.float16)
            pooled16 = as_numpy(pooled).astype(np.float16)
        shapes = {"latent": list(latent16.shape), "context": list(context16.shape), "pooled": list(pooled16.shape)}
        self._check_shapes(shapes)
        for name, array in (("latent", latent16), ("context", context16), ("pooled", pooled16)):
            if not np.isfinite(array).all():
                raise ValueError(f"sample {self.count}: {name} has non-finite values after float16 conversion")
        if self._tar is None:
            self._open_shard()
        sample = {
            "latent.npy": npy_bytes(latent16),
            "context.npy": npy_bytes(context16),
            "pooled.npy": npy_bytes(pooled16),
            "txt": caption.encode("utf-8"),
            "json": json.dumps(extras or {}, sort_keys=True).encode("utf-8"),
        }
        pos = self._tar.tarstream.offset
        self._tar.write({"__key__": f"{self.count:09d}", **sample})
        self._record_layout(pos, sample)
        stored = latent16.astype(np.float64)  # statistics of what a reader will see
        self._sum += float(stored.sum())
        self._sumsq += float((stored**2).sum())
        self._numel += stored.size
        self.count += 1
        if self.count % self.samples_per_shard == 0:
            self._finish_shard()

    def _record_layout(self, pos: int, sample: dict[str, bytes]) -> None:
        """Index the sample just written from its members' sizes: TarWriter writes them in sorted key order, each
        a 512-byte ustar header and its data padded to 512 bytes. Checked against where the tar stream ended up."""
        if self._index is None:
            return
        where = {}
        for ext in sorted(sample):
            where[ext] = (pos + _TAR_BLOCK, len(sample[ext]))
            pos += member_span(len(sample[ext]))
        if pos != self._tar.tarstream.offset:  # another header layout (PAX, GNU long names): scan at the end
            self._index = None
            return
        shard_ids, offsets, sizes = self._index
        shard_ids.append(len(self.shards) - 1)
        offsets.append([where[m][0] for m in TRAIN_MEMBERS])
        sizes.append([where[m][1] for m in TRAIN_MEMBERS])

    def _check_shapes(self, shapes: dict[str, list[int]]) -> None:
        if len(shapes["latent"]) != 3 or len(shapes["context"]) != 2 or len(shapes["pooled"]) != 1:
            raise ValueError(f"sample shapes {shapes} are not allowed; need latent (C,H,W), context (L,D), pooled (D,)")
        if self.shapes is None:
            self.shapes = shapes
        elif shapes != self.shapes:
            raise ValueError(f"sample {self.count} has shapes {shapes}; the folder's samples have {self.shapes}")

    def _open_shard(self) -> None:
        name = SHARD_PATTERN.format(len(self.shards))
        self._tmp_path = temp_sibling(self.shard_dir / name)
        self._tar = wds.TarWriter(str(self._tmp_path), encoder=False, mtime=0)  # int mtime: no PAX headers
        self.shards.append(name)

    def _finish_shard(self) -> None:
        if self._tar is None:
            return
        self._tar.close()
        self.shard_bytes.append(self._tmp_path.stat().st_size)
        os.replace(self._tmp_path, self.shard_dir / self.shards[-1])
        self._tar, self._tmp_path = None, None

    def _write_meta(self) -> None:
        if self.count == 0:
            raise ValueError(f"no samples were written to {self.shard_dir}; a shard folder needs at least one")
        if self.latent_mean is None:
            mean = self._sum / self._numel
            std = math.sqrt(max(self._sumsq / self._numel - mean**2, 0.0))
            if not std > 0:
                raise ValueError(f"latents written to {self.shard_dir} are constant; their std is {std}")
            self.latent_mean, self.latent_std = mean, std
        c, h, w = self.shapes["latent"]
        meta = {
            **self.extra_meta,
            "format_version": FORMAT_VERSION,
            "count": self.count,
            "shards": self.shards,
            "shard_bytes": self.shard_bytes,
            "shapes": self.shapes,
            "latent_mean": float(self.latent_mean),
            "latent_std": float(self.latent_std),
            "latent_channels": c,
            "latent_size": h if h == w else [h, w],
            "context_length": self.shapes["context"][0],
            "context_dim": self.shapes["context"][1],
            "pooled_dim": self.shapes["pooled"][0],
            "encoder_names": self.encoder_names,
            "autoencoder": self.autoencoder,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "complete": True,
        }
        atomic_write_json(self.shard_dir / META_FILE, meta, sort_keys=True)


def write_shards(shard_dir: str | Path, latents, contexts, pooled, captions: Sequence[str],
                 extras: Sequence[dict] | None = None, **writer_kwargs) -> dict:
    """Write whole arrays (N leading) as a shard folder; returns its meta. Keyword arguments go to ShardWriter."""
    n = len(captions)
    for name, arr in (("latents", latents), ("contexts", contexts), ("pooled", pooled)):
        if len(arr) != n:
            raise ValueError(f"{name} has {len(arr)} samples but captions has {n}; they must match")
    if extras is not None and len(extras) != n:
        raise ValueError(f"extras has {len(extras)} samples but captions has {n}; they must match")
    with ShardWriter(shard_dir, **writer_kwargs) as writer:
        for i in range(n):
            writer.write(latents[i], contexts[i], pooled[i], captions[i], None if extras is None else extras[i])
    return read_meta(shard_dir)


# ----------------------------------------------------------------------------------------------------------------
# Reader
# ----------------------------------------------------------------------------------------------------------------

def decode_sample(sample: dict, text: bool = True) -> dict:
    """Raw tar members of one sample -> numpy arrays, caption and extras (text=False: no context and pooled)."""
    missing = [m for m in (*(TRAIN_MEMBERS if text else TRAIN_MEMBERS[:1]), "txt") if m not in sample]
    if missing:  # another tool's shards: named as ShardSamples names them, not a KeyError of the member
        raise ValueError(f"{sample.get('__url__', 'a shard')}: sample {sample.get('__key__')} lacks "
                         f"{', '.join(missing)}; not a training shard")
    return {
        "key": sample["__key__"],
        "latent": npy_array(sample["latent.npy"]),
        **({"context": npy_array(sample["context.npy"]), "pooled": npy_array(sample["pooled.npy"])} if text else {}),
        "caption": sample["txt"].decode("utf-8"),
        "extras": json.loads(sample["json"].decode("utf-8")) if "json" in sample else {},
    }


class Collate:
    """Stacks decoded samples into a batch with x0 normalised by the folder's global mean and std."""

    def __init__(self, latent_mean: float, latent_std: float):
        self.latent_mean, self.latent_std = latent_mean, latent_std

    def x0(self, samples: list[dict]) -> torch.Tensor:
        # numpy rather than torch ops: no intra-op thread start-up inside loader workers
        latent = np.stack([s["latent"] for s in samples]).astype(np.float32)
        return torch.from_numpy((latent - np.float32(self.latent_mean)) / np.float32(self.latent_std))

    def __call__(self, samples: list[dict]) -> dict:
        return {
            "x0": self.x0(samples),
            "context": torch.from_numpy(np.stack([s["context"] for s in samples]).astype(np.float32)),
            "pooled": torch.from_numpy(np.stack([s["pooled"] for s in samples]).astype(np.float32)),
            "caption": [s["caption"] for s in samples],
        }


def make_loader(shard_dir: str | Path, batch_size: int, shuffle: bool, seed: int, resampled: bool = False,
                epoch_batches: int | None = None, num_workers: int = 0, partial: bool | None = None):
    """Iterable of dict batches {"x0" (normalised), "context", "pooled", "caption"} from a shard folder.

    shuffle: shards and samples (before decoding) in a seeded, epoch-dependent order.
    resampled: draw shards with replacement forever (seeded per rank and worker); endless unless epoch_batches.
    epoch_batches: batches per epoch (webdataset's with_epoch): bounds a resampled stream, keeps ranks in step,
    and repeats a finite set as needed.
    partial: keep a last smaller batch; defaults to True unless resampled.
    Deterministic for a seed with num_workers=0; each rank reads its own shards (webdataset's split_by_node).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} is not allowed; need >= 1")
    if num_workers < 0:
        raise ValueError(f"num_workers={num_workers} is not allowed; need >= 0")
    if epoch_batches is not None and epoch_batches < 1:
        raise ValueError(f"epoch_batches={epoch_batches} is not allowed; need >= 1 or None")
    meta = read_meta(shard_dir)
    urls = shard_paths(shard_dir)
    partial = (not resampled) if partial is None else partial
    if resampled:
        # Seed mixes the rank and worker, so ranks draw different shards; deterministic for a given seed.
        stages = [wds.ResampledShards(urls, seed=seed, deterministic=True)]
    else:
        stages = [wds.SimpleShardList(urls)]
        if shuffle:  # same shard order on every rank (same seed) before the ranks take their slices
            stages.append(wds.detshuffle(bufsize=len(urls), initial=len(urls), seed=seed))
    stages += [
        wds.split_by_node,
        wds.split_by_worker,
        wds.tarfile_to_samples(),
    ]
    if shuffle:
        stages.append(wds.detshuffle(bufsize=SHUFFLE_BUFFER, initial=SHUFFLE_BUFFER, seed=seed))
    stages += [
        wds.map(decode_sample),
        wds.batched(batch_size, collation_fn=Collate(meta["latent_mean"], meta["latent_std"]), partial=partial),
    ]
    pipeline = wds.DataPipeline(*stages)
    loader = wds.WebLoader(pipeline, batch_size=None, shuffle=False, num_workers=num_workers,
                           persistent_workers=num_workers > 0)
    if epoch_batches is not None:
        loader = loader.with_epoch(epoch_batches)
    return loader


# ----------------------------------------------------------------------------------------------------------------
# Random access: the step-indexed training stream reads the samples a step names, wherever they lie
# ----------------------------------------------------------------------------------------------------------------

TRAIN_MEMBERS = ("latent.npy", "context.npy", "pooled.npy")  # what a training batch needs of a sample
# Shard files a ShardSamples keeps open per process (the least recently read closed first): a step's random samples
# touch most shards of a folder, and real folders hold thousands (CC12M: about 12,000), past the open-file limit.
MAX_OPEN_SHARDS = 64
_TAR_BLOCK = 512


def member_span(size: int) -> int:
    """Bytes a plain ustar member of `size` data bytes takes: its 512-byte header and the data padded to 512."""
    return _TAR_BLOCK + -(-size // _TAR_BLOCK) * _TAR_BLOCK


def _scan_tar(path: str) -> list[tuple[str, str, int, int]]:
    """(key, extension, data offset, size) of every regular member, in file order, from the tar headers alone.

    Plain ustar headers (what ShardWriter writes) are parsed directly; a shard with any other header (PAX, GNU long
    names) is scanned with Python's tarfile instead.
    """
    members = []
    with open(path, "rb") as f:
        fd, pos, end = f.fileno(), 0, os.fstat(f.fileno()).st_size
        while pos + _TAR_BLOCK <= end:
            header = os.pread(fd, _TAR_BLOCK, pos)
            if header == bytes(_TAR_BLOCK):  # the end-of-archive blocks
                break
            if header[257:262] != b"ustar" or header[156:157] not in (b"0", b"\0") or header[345:500].strip(b"\0"):
                return _scan_tar_slow(path)
            name = header[:100].split(b"\0", 1)[0].decode("utf-8")
            size = int(header[124:136].split(b"\0", 1)[0].strip() or b"0", 8)
            key, _, ext = name.partition(".")
            members.append((key, ext, pos + _TAR_BLOCK, size))
            pos += member_span(size)
    return members


def _scan_tar_slow(path: str) -> list[tuple[str, str, int, int]]:
    import tarfile

    with tarfile.open(path, "r:") as tar:
        return [(*m.name.partition(".")[::2], m.offset_data, m.size) for m in tar if m.isfile()]


def build_index(paths: Sequence[str]) -> dict[str, np.ndarray]:
    """Where each sample's training members lie, from the shards' tar headers (about 3 header reads per sample).

    shard (N,) int32 and start (N,) int64: the shard and byte offset of sample i's first member; rel and size
    (k, 3): the members' offsets from that start and their sizes, one row per sample, or a single row when every
    sample shares the layout (ShardWriter's do: 12 bytes a sample in all, 150 MB for 12M samples); shard_bytes:
    each shard's file size, which load_index checks.
    """
    shard_ids, offsets, sizes = [], [], []
    for s, path in enumerate(paths):
        by_key: dict[str, dict[str, tuple[int, int]]] = {}
        for key, ext, offset, size in _scan_tar(path):
            by_key.setdefault(key, {})[ext] = (offset, size)
        for key, members in by_key.items():  # dicts keep insertion order: writing order
            missing = [m for m in TRAIN_MEMBERS if m not in members]
            if missing:
                raise ValueError(f"{path}: sample {key} lacks {', '.join(missing)}; not a training shard")
            shard_ids.append(s)
            offsets.append([members[m][0] for m in TRAIN_MEMBERS])
            sizes.append([members[m][1] for m in TRAIN_MEMBERS])
    return pack_index(shard_ids, offsets, sizes, paths)


def pack_index(shard_ids: list[int], offsets: list, sizes: list, paths: Sequence[str]) -> dict[str, np.ndarray]:
    """The index arrays of build_index from each sample's shard, member offsets and member sizes."""
    offset = np.asarray(offsets, dtype=np.int64).reshape(-1, len(TRAIN_MEMBERS))
    size = np.asarray(sizes, dtype=np.int64).reshape(-1, len(TRAIN_MEMBERS))
    start = offset[:, 0].copy()
    rel = offset - start[:, None]
    uniform = len(rel) > 0 and (rel == rel[0]).all() and (size == size[0]).all()
    return {"shard": np.asarray(shard_ids, dtype=np.int32), "start": start,
            "rel": rel[:1] if uniform else rel, "size": size[:1] if uniform else size,
            "shard_bytes": np.asarray([os.path.getsize(p) for p in paths], dtype=np.int64)}


def load_index(shard_dir: str | Path, paths: Sequence[str]) -> dict[str, np.ndarray] | None:
    """The folder's index.npz when it describes these shards (one entry per shard, each of the recorded size);
    None when there is none, it is unreadable, or a shard was rewritten since (the caller scans the headers)."""
    try:
        index = load_npz(Path(shard_dir) / INDEX_FILE)
        recorded = index["shard_bytes"]
        if len(recorded) != len(paths) or any(int(b) != os.path.getsize(p) for b, p in zip(recorded, paths)):
            return None
        if index["rel"].shape[1:] != (len(TRAIN_MEMBERS),) or len(index["shard"]) != len(index["start"]):
            return None
        return index
    except (OSError, KeyError, ValueError, IndexError, EOFError, zipfile.BadZipFile):  # missing, truncated, foreign
        return None


class ShardSamples:
    """Sample i of a shard folder (writing order, as load_eval_set numbers them), read on demand.

    Where each sample lies comes from the folder's index.npz (ShardWriter writes it), else from one scan of the tar
    headers (build_index); afterwards a sample costs one read of its contiguous latent, context and pooled members.
    Picklable and fork-safe: each process opens the shard files itself.
    """

    def __init__(self, shard_dir: str | Path):
        self.meta = read_meta(shard_dir)
        self.paths = shard_paths(shard_dir)
        index = load_index(shard_dir, self.paths)
        if index is None:  # written before index.npz existed, or the shards changed since: read the headers
            index = build_index(self.paths)
        if len(index["shard"]) != self.meta["count"]:
            raise ValueError(f"shard folder {shard_dir}: the shards hold {len(index['shard'])} samples, "
                             f"meta.json says {self.meta['count']}; rebuild the folder")
        self.shard, self.start, self.rel, self.size = (index[k] for k in ("shard", "start", "rel", "size"))
        self.collate = Collate(self.meta["latent_mean"], self.meta["latent_std"])
        self._files: dict[int, int] = {}
        self._pid = -1

    def __len__(self) -> int:
        return len(self.shard)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_files": {}, "_pid": -1}

    def _fd(self, shard: int) -> int:
        if self._pid != os.getpid():  # a forked worker must not share the parent's descriptors' lifetimes
            self._files, self._pid = {}, os.getpid()
        fd = self._files.pop(shard, None)
        if fd is None:
            if len(self._files) >= MAX_OPEN_SHARDS:  # the least recently read: dicts keep insertion order
                os.close(self._files.pop(next(iter(self._files))))
            fd = os.open(self.paths[shard], os.O_RDONLY)
        self._files[shard] = fd  # (re)inserted: the most recently read
        return fd

    def read(self, i: int) -> dict:
        """Sample i as {"latent", "context", "pooled"} float16 arrays."""
        row = i if len(self.size) > 1 else 0
        offset, size = self.start[i] + self.rel[row], self.size[row]
        start, stop = int(offset.min()), int((offset + size).max())
        data = os.pread(self._fd(int(self.shard[i])), stop - start, start)  # one read: the members are adjacent
        try:
            return {name.split(".")[0]: npy_array(data[o - start : o - start + n])
                    for name, o, n in zip(TRAIN_MEMBERS, offset.tolist(), size.tolist())}
        except ValueError as e:  # overwritten in place at the same size (meta.json's sizes still match): name it
            raise ValueError(f"{self.paths[int(self.shard[i])]}: sample {i} at byte {start} is not what index.npz "
                             f"records ({e}); write the folder again") from None

    def batch(self, indices) -> dict:
        """Samples `indices` as a training batch {"x0" (normalised), "context", "pooled"}, exactly as in memory."""
        samples = [self.read(int(i)) for i in indices]
        batch = self.collate([{**s, "caption": ""} for s in samples])
        return {k: batch[k] for k in ("x0", "context", "pooled")}

    def close(self) -> None:
        for fd in self._files.values():
            os.close(fd)
        self._files = {}


def iter_samples(shard_dir: str | Path) -> Iterator[dict]:
    """Every decoded sample of a folder in writing order (no shuffling; every rank sees all of them)."""
    pipeline = wds.DataPipeline(wds.SimpleShardList(shard_paths(shard_dir)), wds.tarfile_to_samples(),
                                wds.map(decode_sample))
    return iter(pipeline)


def iter_samples_text_of(shard_dir: str | Path, text_of: int) -> Iterator[dict]:
    """iter_samples, with context and pooled of the first `text_of` samples only: the others' are never read (the
    tar headers say where each member lies). An evaluation conditions on its 1000 prompts but takes every image of
    COCO-2014 val: streamed whole, its 40,504 contexts of 154 x 4096 float16 were 52 GB read to keep 1.3 GB."""
    i = 0
    for path in shard_paths(shard_dir):
        by_key: dict[str, dict[str, tuple[int, int]]] = {}
        for key, ext, offset, size in _scan_tar(path):
            by_key.setdefault(key, {})[ext] = (offset, size)
        with open(path, "rb") as f:
            for key, members in by_key.items():  # writing order
                text = i < text_of
                skip = () if text else ("context.npy", "pooled.npy")
                raw = {ext: os.pread(f.fileno(), size, offset) for ext, (offset, size) in members.items()
                       if ext not in skip}
                yield decode_sample({"__key__": key, "__url__": path, **raw}, text=text)
                i += 1


def decode_latents(x0_norm: torch.Tensor, meta: dict) -> torch.Tensor:
    """Normalised latents -> pixels in [-1, 1]; only the identity autoencoder (pixel space) is decodable here."""
    if meta.get("autoencoder", IDENTITY_AUTOENCODER) != IDENTITY_AUTOENCODER:
        raise ValueError(
            f"decode_latents: autoencoder={meta['autoencoder']!r} needs its decoder; only "
            f"{IDENTITY_AUTOENCODER!r} (pixel space) is decoded by un-normalising"
        )
    return x0_norm * meta["latent_std"] + meta["latent_mean"]


def load_eval_set(shard_dir: str | Path, n: int | None = None, prompts: int | None = None,
                  stats: dict | None = None) -> dict:
    """The first n samples (all if None) in writing order: x0 (normalised), images, captions, context, pooled,
    labels (from the json extras' "label", -1 where absent), extras and meta (the folder's).

    prompts: captions, context and pooled of the first `prompts` samples only (what an evaluation of that many
    samples conditions on); the whole COCO-2014 split's 40,504 contexts of 154 x 4096 would take 100 GB as float32.
    stats: the meta.json whose latent_mean and latent_std normalise x0, default the folder's own; an evaluation
    split is normalised as the training split is (what the model takes and the decoder un-normalises).
    """
    for name, value in (("n", n), ("prompts", prompts)):
        if value is not None and value < 1:
            raise ValueError(f"{name}={value} is not allowed; need >= 1 or None for the whole set")
    meta = read_meta(shard_dir)
    if n is not None and n > meta["count"]:
        raise ValueError(f"n={n} is more than the {meta['count']} samples in {shard_dir}")
    samples = []
    stream = iter_samples(shard_dir) if prompts is None else iter_samples_text_of(shard_dir, prompts)
    for s in stream:  # (a tar cut short at a header ends without an error: counted below)
        if prompts is not None and len(samples) >= prompts:  # let go of its text embeddings as soon as read
            s = {k: v for k, v in s.items() if k not in ("context", "pooled")}
        samples.append(s)
        if n is not None and len(samples) == n:
            break
    if len(samples) != (meta["count"] if n is None else n):  # streaming (ShardSamples) refuses such a folder too
        raise ValueError(f"shard folder {shard_dir}: the shards hold {len(samples)} samples, meta.json says "
                         f"{meta['count']}; rebuild the folder")
    stats = meta if stats is None else stats
    collate = Collate(stats["latent_mean"], stats["latent_std"])
    batch = collate(samples if prompts is None else samples[:prompts])
    if prompts is not None and len(samples) > prompts:
        batch["x0"] = collate.x0(samples)
    extras = [s["extras"] for s in samples]
    return {
        "x0": batch["x0"],
        "images": decode_latents(batch["x0"], {**meta, **{k: stats[k] for k in ("latent_mean", "latent_std")}})
        if meta.get("autoencoder") == IDENTITY_AUTOENCODER else None,
        "captions": batch["caption"],
        "context": batch["context"],
        "pooled": batch["pooled"],
        "labels": torch.tensor([int(e.get("label", -1)) for e in extras], dtype=torch.long),
        "extras": extras,
        "meta": meta,
    }

