"""Raw images + captions -> a shard folder of autoencoder latents and text embeddings, resumable per chunk.

The items (in a seeded random order, so every shard mixes classes) are cut into chunks of `chunk_size`; each
chunk becomes one complete src.data.shards.ShardWriter folder under `<out>/_work/chunk-NNNNNN/` and then a done
marker (its latent sums and skipped items) is written atomically. A rerun skips chunks with a marker; a chunk
interrupted mid-way has none and is redone from scratch. When every chunk is done the chunk shards are linked
into `<out>/shard-NNNNNN.tar`, `skipped.log` and `index.npz` are written, and `meta.json` (global latent mean/std,
docs/data.md#pixels-and-latents; `text_groups`) comes last, so an unfinished folder never looks complete. Nothing
is written before the models have loaded: a command refused on its inputs leaves the folder as it was.

One job can be split over machines: part i of n (`--part i/n`, e.g. a SLURM array) does the chunks c with
c % n == i into the same folder; whichever part finds every chunk done assembles the folder (under a lock, once).
Each chunk is written under its own lock, so two commands into one folder never write the same chunk at once.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import math
import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from src.data.expectations import ENCODER_FILES_SHA256
from src.data.shards import IDENTITY_AUTOENCODER, INDEX_FILE, META_FILE, SHARD_PATTERN, ShardWriter, build_index, \
    damaged_shards, load_index, pack_index, read_meta
from src.preprocess.autoencoders import LATENT_MODES, autoencoder_digest, check_autoencoder_path, load_autoencoder
from src.preprocess.images import PreparedImages, collate_prepared
from src.preprocess.sources import source_change
from src.preprocess.text import PRECISIONS, CachedTextEncoder, CombinedTextEncoder, T5TextEncoder, check_clip_spec, \
    check_t5_folder, clip_digest, load_clip
from src.utils.io import atomic_write_bytes, atomic_write_json, file_lock, files_digest, first_line, folder_files, \
    save_npz

WORK_DIR = "_work"
CONFIG_FILE = "config.json"
MODELS_FILE = "models.json"
SKIP_LOG = "skipped.log"
CHUNK_PATTERN = "chunk-{:06d}"
ASSEMBLY_LOCK = ".assemble.lock"


@dataclass
class PreprocessConfig:
    """Settings of one preprocessing job (the CLI's options; see `python -m src.preprocess --help`)."""

    out: str
    resolution: int = 256
    autoencoder: str = IDENTITY_AUTOENCODER
    autoencoder_config: str | None = None
    latent: str = "mean"
    clip: list[tuple[str, str]] = field(default_factory=list)
    t5: str | None = None
    t5_length: int = 77
    chunk_size: int = 1000
    batch_size: int = 64
    num_workers: int = 4
    seed: int = 0
    shuffle: bool = True
    stats_from: str | None = None
    device: str = "auto"
    precision: str = "float32"
    autoencoder_precision: str = "float32"
    text_cache: int = 2048
    max_chunks: int | None = None
    progress: bool = True
    part: int = 0  # this process does the chunks c with c % parts == part (not a setting of the contents)
    parts: int = 1
    # Where the model files' checksums are remembered (the command line's default: .cache, as src.run's
    # paths.cache_dir): a resume, another --part or the next folder does not read 10-20 GB of T5 weights again to name
    # them. None: in this process only. Not a setting of the contents either.
    cache_dir: str | None = None

    def validate(self) -> None:
        """Raise a one-line error for the first setting out of range."""
        if not str(self.out).strip():  # e.g. --out "$OUT" unset: Path('') is the working directory
            raise ValueError(f"out={self.out!r} is not allowed; need a folder path")
        for name in ("resolution", "chunk_size", "batch_size", "t5_length"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} is not allowed; need >= 1")
        if self.num_workers < 0:
            raise ValueError(f"num_workers={self.num_workers} is not allowed; need >= 0")
        if self.text_cache < 0:
            raise ValueError(f"text_cache={self.text_cache} is not allowed; need >= 0 (0 disables the cache)")
        if self.max_chunks is not None and self.max_chunks < 1:
            raise ValueError(f"max_chunks={self.max_chunks} is not allowed; need >= 1 or None (no limit)")
        if self.seed < 0:
            raise ValueError(f"seed={self.seed} is not allowed; need >= 0")
        self._validate_device()
        if self.parts < 1 or not 0 <= self.part < self.parts:
            raise ValueError(f"part={self.part}/{self.parts} is not allowed; need parts >= 1 and 0 <= part < parts")
        if self.latent not in LATENT_MODES:
            raise ValueError(f"latent={self.latent!r} is not allowed; allowed: {', '.join(LATENT_MODES)}")
        for name in ("precision", "autoencoder_precision"):
            if getattr(self, name) not in PRECISIONS:
                raise ValueError(f"{name}={getattr(self, name)!r} is not allowed; allowed: {', '.join(PRECISIONS)}")
        if not self.clip:
            raise ValueError("clip is empty; at least one CLIP text encoder (model name, weights file) is needed")
        given = [(model, os.path.abspath(weights)) for model, weights in self.clip]
        twice = next((self.clip[k] for k in range(len(given)) if given[k] in given[:k]), None)
        if twice is not None:  # its context and pooled channels twice over: a wider text input, nothing new in it
            raise ValueError(f"clip={twice[0]!r} {twice[1]!r} is given twice; need each CLIP text encoder once "
                             "(SD3: two different ones)")

    def _validate_device(self) -> None:
        if self.device == "auto":
            return
        try:
            device = torch.device(self.device)
        except RuntimeError:  # torch's message lists two dozen device types
            device = None
        if device is None or device.type not in ("cpu", "cuda"):  # else a model's loading would take the blame
            raise ValueError(f"device={self.device!r} is not allowed; allowed: auto, cpu, cuda, cuda:N")
        if device.type == "cuda":
            if not torch.cuda.is_available():
                raise ValueError(f"device={self.device!r} is not allowed here: torch sees no CUDA device; allowed: cpu")
            if device.index is not None and device.index >= torch.cuda.device_count():
                raise ValueError(f"device={self.device!r} is not allowed here: torch sees "
                                 f"{torch.cuda.device_count()} CUDA device(s); allowed: cpu, cuda, cuda:0 ...")

    def check_inputs(self) -> None:
        """Fail before any work when a weight file, model folder or statistics folder is missing."""
        if self.autoencoder != IDENTITY_AUTOENCODER:
            check_autoencoder_path(self.autoencoder, self.autoencoder_config)
        # Else ignored (a folder's own config.json is used; pixels have no posterior), but part of the settings: a
        # value that changes nothing, and a rerun without it is refused as other settings.
        if self.autoencoder_config is not None and (self.autoencoder == IDENTITY_AUTOENCODER
                                                    or not Path(self.autoencoder).is_file()):
            raise ValueError(f"autoencoder_config={self.autoencoder_config!r} is not allowed with autoencoder="
                             f"{self.autoencoder!r}; it is the config folder of a single weights file only")
        if self.latent != "mean" and self.autoencoder == IDENTITY_AUTOENCODER:
            raise ValueError(f"latent={self.latent!r} is not allowed with autoencoder={IDENTITY_AUTOENCODER!r} "
                             "(pixels have no posterior to sample); allowed: mean")
        for model, weights in self.clip:
            check_clip_spec(model, weights)
        if self.t5 is not None:
            check_t5_folder(self.t5)
        if self.stats_from is not None:
            read_stats_meta(self.stats_from)

    def settings(self, source, known: dict | None = None) -> dict:
        """Everything that determines the shard contents (the resume fingerprint); not workers, device, batch.
        known: the source file hashes an earlier run into the folder kept (remembered_hashes)."""
        resolve = lambda p: None if p is None else str(Path(p).resolve())  # noqa: E731
        return {
            "source": source.fingerprint(known),
            "resolution": self.resolution,
            "autoencoder": self.autoencoder if self.autoencoder == IDENTITY_AUTOENCODER else resolve(self.autoencoder),
            "autoencoder_config": resolve(self.autoencoder_config),
            "latent": self.latent,
            "clip": [[m if not m.endswith(".json") else resolve(m), resolve(w)] for m, w in self.clip],
            "t5": resolve(self.t5),
            "t5_length": self.t5_length if self.t5 else None,
            "chunk_size": self.chunk_size,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "precision": self.precision,
            "autoencoder_precision": self.autoencoder_precision,
            "stats_from": resolve(self.stats_from),
        }


def read_stats_meta(stats_from: str) -> dict:
    """The meta.json of a --stats-from folder, which must be a complete shard folder with latent statistics."""
    allowed = "a complete shard folder, e.g. the training set's --out"
    try:
        meta = read_meta(stats_from)
    except FileNotFoundError as e:  # no meta.json, or an unfinished one
        raise FileNotFoundError(f"stats_from={stats_from!r} is not allowed: {e}; need {allowed}") from None
    except ValueError as e:  # a meta.json that is not JSON
        raise ValueError(f"stats_from={stats_from!r} is not allowed: {e}; need {allowed}") from None
    missing = [k for k in ("latent_mean", "latent_std", "latent_channels") if k not in meta]
    if missing:
        raise ValueError(f"stats_from={stats_from!r} is not allowed: its meta.json lacks {', '.join(missing)}; "
                         f"need {allowed}")
    mean, std = meta["latent_mean"], meta["latent_std"]
    numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in (mean, std))
    if not numbers or not std > 0:  # another tool's or an edited file: the set would be normalised by nonsense
        raise ValueError(f"stats_from={stats_from!r} is not allowed: its meta.json has latent_mean {mean!r}, "
                         f"latent_std {std!r}; need finite numbers, std > 0 ({allowed})")
    return meta


# ----------------------------------------------------------------------------------------------------------------
# Output folder state
# ----------------------------------------------------------------------------------------------------------------

def fingerprint_of(settings: dict) -> str:
    """A short hash of the settings."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def _differences(a: dict, b: dict) -> str:
    keys = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
    return ", ".join(keys) or "none"


def remembered_hashes(out: Path) -> dict:
    """The source file hashes (resolved path -> {size, mtime_ns, ctime_ns, sha256}) a run into out kept, so a
    resume or rerun does not hash an unchanged multi-GB TSV again (src.utils.io.file_sha256)."""
    known = {}
    for path, key in ((out / META_FILE, "preprocess"), (out / WORK_DIR / CONFIG_FILE, None)):
        try:
            state = json.loads(path.read_text())
            files = (state.get(key, {}) if key else state).get("files", {})
        except (OSError, ValueError, AttributeError):  # absent or odd: only a cache; prepare_output judges the state
            continue
        known.update(files if isinstance(files, dict) else {})
    return known


#: Keys of a source's fingerprint that are options of the command (--seed, --caption), not its data.
SOURCE_OPTIONS = ("seed", "caption_choice")


def _refusal(out: Path, holds: str, stored: dict, settings: dict, source, way_out: str) -> str:
    """Why out's state (meta.json or the work folder's config) is not this run: the source data named by its setting
    and what changed, else the differing settings."""
    old, new = stored.get("source"), settings.get("source")
    if source is not None and isinstance(old, dict) and "identity" not in old:  # legacy: compared on what it kept
        new = source.legacy_fingerprint()
    others = sorted(k for k in set(stored) | set(settings) if k != "source" and stored.get(k) != settings.get(k))
    if source is not None and isinstance(old, dict) and isinstance(new, dict):  # options are no data to restore
        others = sorted({*others, *(source.settings.get(k, k) for k in SOURCE_OPTIONS if old.get(k) != new.get(k))})
        old, new = ({k: v for k, v in d.items() if k not in SOURCE_OPTIONS} for d in (old, new))
    if source is None or old == new or not isinstance(old, dict):
        differing = ", ".join(others) if old == new else _differences(stored, settings)
        return f"out={str(out)!r} {holds} with other settings (differing: {differing}); {way_out}"
    return (f"out={str(out)!r} {holds} made from other source data: {source_change(source, old, new)}"
            f"{' and other settings: ' + ', '.join(others) if others else ''}; restore that data, use a new output "
            f"folder or delete {out} to start over")


def legacy_state(out: Path, state_file: Path, stored: dict, settings: dict, source) -> bool:
    """Whether a state written before content identities (sources.IDENTITY; a TSV known by its size, a captions
    file not at all) holds this run, so a finished or half-done folder need not be redone for the new format.

    The rule: its source fingerprint must equal the source's legacy_fingerprint(), every other setting must be
    equal, and no file the old fingerprint did not cover (source.legacy_files()) may have been modified (mtime, or
    ctime, which cannot be set back) since the state was written: the file then is the one that run read. A match
    whose file changed since is refused: nothing can tell whether the content is the same.
    """
    old = stored.get("source")
    if source is None or not isinstance(old, dict) or "identity" in old or old != source.legacy_fingerprint():
        return False
    if fingerprint_of({**stored, "source": None}) != fingerprint_of({**settings, "source": None}):
        return False
    written = state_file.stat().st_mtime_ns
    for setting, path in source.legacy_files():
        st = path.stat()
        if max(st.st_mtime_ns, st.st_ctime_ns) >= written:
            raise ValueError(f"out={str(out)!r} was made before sources were known by content ({setting}="
                             f"{str(path)!r} by its name and size only), and that file was modified since; cannot tell "
                             f"whether it is the same data: use a new output folder or delete {out} to start over")
    return True


def _read_state(out: Path, path: Path, keys: tuple[str, ...] = ()) -> dict:
    """A state file of out (meta.json, the work folder's config) as a JSON object with keys; anything else (another
    tool's file, a damaged one) is a one-line error naming out, not a traceback or a bare JSON message."""
    try:
        state = json.loads(path.read_text())
    except (UnicodeDecodeError, ValueError) as e:
        state = e
    if not isinstance(state, dict) or any(k not in state for k in keys):
        what = f"not JSON ({state})" if isinstance(state, Exception) else \
            f"not a JSON object{' with ' + ', '.join(keys) if keys else ''}"
        raise ValueError(f"out={str(out)!r} holds a {path.relative_to(out)} that is {what}; need a folder this "
                         f"command wrote (or a new, empty one): choose another folder or delete {out}")
    return state


def prepare_output(out: Path, settings: dict, write: bool = True, source=None, files: dict | None = None) -> str:
    """'complete' (same settings, nothing to do), 'resume' or 'fresh'; raises if out holds something else.

    write=False only checks: a command refused later (a model that does not load) must leave out as it was.
    source: to name what changed in the source data and to accept states of the legacy format (legacy_state);
    files: the source file hashes to keep in the state (remembered_hashes).
    """
    fingerprint = fingerprint_of(settings)
    state = {"fingerprint": fingerprint, "settings": settings, "files": files or {}}
    if out.exists() and not out.is_dir():
        raise ValueError(f"out={str(out)!r} is a file; need a folder (new, empty, or one this command wrote)")
    if (out / META_FILE).is_file():
        meta = _read_state(out, out / META_FILE)
        done = meta.get("preprocess") if isinstance(meta.get("preprocess"), dict) else {}
        if meta.get("complete") and (done.get("fingerprint") == fingerprint or
                                     legacy_state(out, out / META_FILE, done.get("settings", {}), settings, source)):
            return "complete"
        raise ValueError(_refusal(out, "already holds a shard set", done.get("settings", {}), settings, source,
                                  "choose another folder"))
    config_path = out / WORK_DIR / CONFIG_FILE
    if config_path.is_file():
        previous = _read_state(out, config_path, ("fingerprint", "settings"))
        if previous["fingerprint"] != fingerprint and (
                not any((out / WORK_DIR).glob("*.done.json"))  # nothing done yet: start afresh
                or legacy_state(out, config_path, previous["settings"], settings, source)):  # kept in today's format
            previous = state
            if write:
                atomic_write_json(config_path, previous)
        if previous["fingerprint"] != fingerprint:
            raise ValueError(_refusal(out, "holds an unfinished run", previous["settings"], settings, source,
                                      "rerun with those or delete the folder"))
        if write and previous.get("files") != state["files"]:  # hashes of new file versions (e.g. touched)
            atomic_write_json(config_path, state)
        return "resume"
    # Parts of one job starting together: another part's work folder (config not written yet) or lock is no obstacle.
    if out.exists() and any(p.name not in (WORK_DIR, ASSEMBLY_LOCK) for p in out.iterdir()):
        raise ValueError(f"out={str(out)!r} is not empty and holds no preprocessing run; choose an empty folder")
    if write:
        atomic_write_json(config_path, state)
    return "fresh"


def item_order(n: int, seed: int, shuffle: bool) -> np.ndarray:
    """Item indices in writing order: a seeded permutation (shards mix classes) or the source's sorted order."""
    return np.random.default_rng(seed).permutation(n) if shuffle else np.arange(n)


def part_chunks(n_chunks: int, part: int, parts: int) -> list[int]:
    """The chunks part `part` of `parts` writes: every parts-th, starting at part."""
    return list(range(part, n_chunks, parts))


def chunk_dir(out: Path, chunk: int) -> Path:
    return out / WORK_DIR / CHUNK_PATTERN.format(chunk)


def done_path(out: Path, chunk: int) -> Path:
    return out / WORK_DIR / f"{CHUNK_PATTERN.format(chunk)}.done.json"


# ----------------------------------------------------------------------------------------------------------------
# One chunk
# ----------------------------------------------------------------------------------------------------------------

class ChunkWriter:
    """One chunk -> one ShardWriter folder holding a single shard, then its done marker (only on success)."""

    def __init__(self, out: Path, chunk: int, encoder_names: list[str], autoencoder: str, chunk_size: int):
        self.dir, self.marker = chunk_dir(out, chunk), done_path(out, chunk)
        self.chunk = chunk
        self.writer_kwargs = dict(encoder_names=encoder_names, samples_per_shard=chunk_size, autoencoder=autoencoder,
                                  latent_mean=0.0, latent_std=1.0)  # placeholders: global statistics come at assembly
        self.writer: ShardWriter | None = None
        self.count, self.sum, self.sumsq, self.numel = 0, 0.0, 0.0, 0
        self.skipped: list[dict] = []

    def __enter__(self) -> "ChunkWriter":
        if self.dir.exists():
            shutil.rmtree(self.dir)  # an interrupted earlier attempt
        return self

    def write(self, latent16: torch.Tensor, context, pooled, caption: str, extras: dict) -> None:
        """Add one sample; latent16 is the float16 latent the shard will hold."""
        if self.writer is None:
            self.writer = ShardWriter(self.dir, **self.writer_kwargs).__enter__()
        self.writer.write(latent16, context, pooled, caption, extras)
        stored = latent16.double()
        self.sum += float(stored.sum())
        self.sumsq += float((stored**2).sum())
        self.numel += stored.numel()
        self.count += 1

    def skip(self, records: list[dict]) -> None:
        """Record unreadable items."""
        self.skipped += records

    def __exit__(self, exc_type, exc, tb) -> None:
        if self.writer is not None:
            self.writer.__exit__(exc_type, exc, tb)
        if exc_type is None:
            atomic_write_json(self.marker, {"chunk": self.chunk, "count": self.count, "sum": self.sum,
                                            "sumsq": self.sumsq, "numel": self.numel, "skipped": self.skipped})


# ----------------------------------------------------------------------------------------------------------------
# The job
# ----------------------------------------------------------------------------------------------------------------

class Models:
    """The frozen autoencoder and the combined, cached text encoder of one job."""

    def __init__(self, cfg: PreprocessConfig, device: str):
        self.autoencoder = _load(
            f"autoencoder={cfg.autoencoder!r}", "a diffusers AutoencoderKL folder (save_pretrained), a single weights "
            f"file with autoencoder_config, or {IDENTITY_AUTOENCODER!r}", load_autoencoder, cfg.autoencoder,
            device=device, precision=cfg.autoencoder_precision, latent=cfg.latent, config=cfg.autoencoder_config,
            cache_dir=cfg.cache_dir)
        clips = [_load(f"clip={m!r} {w!r}", "an open_clip model name or config .json and weights of that model",
                       load_clip, m, w, device=device, precision=cfg.precision, cache_dir=cfg.cache_dir)
                 for m, w in cfg.clip]
        t5 = _load(f"t5={cfg.t5!r}", "a transformers T5 encoder folder with its tokenizer (save_pretrained)",
                   T5TextEncoder, cfg.t5, device=device, precision=cfg.precision,
                   max_length=cfg.t5_length, cache_dir=cfg.cache_dir) if cfg.t5 else None
        self.text = CombinedTextEncoder(clips, t5)
        self.cached_text = CachedTextEncoder(self.text, cfg.text_cache)
        if cfg.resolution % self.autoencoder.downsample:
            raise ValueError(f"resolution={cfg.resolution} is not allowed with this autoencoder; need a multiple of "
                             f"its downsampling factor {self.autoencoder.downsample}")

    def encode_images(self, pixels: torch.Tensor, indices: list[int], cfg: PreprocessConfig) -> torch.Tensor:
        """Pixels -> float32 latents on the CPU (posterior mean, or a per-item seeded sample)."""
        return self.autoencoder.encode(pixels, indices, cfg.seed)

    def describe(self) -> dict:
        """What meta.json records about the models: autoencoder settings, the text encoders' layout and content (one
        digest per encoder in encoder_names order, as the evaluation folder's must match the training folder's)."""
        return {**self.autoencoder.describe(), "text_groups": self.text.groups, "encoder_sha256": self.text.sha256,
                ENCODER_FILES_SHA256: self.text.files_sha256}


def _load(setting: str, allowed: str, load, *args, **kwargs):
    """load(*args, **kwargs), with any failure but lack of memory as one line naming the setting (libraries raise
    OSError, KeyError, RuntimeError, AssertionError with pages of text for a folder or file of the wrong kind)."""
    try:
        return load(*args, **kwargs)
    except (MemoryError, torch.cuda.OutOfMemoryError):
        raise
    except Exception as e:
        raise ValueError(f"{setting} could not be loaded ({type(e).__name__}: {first_line(e)}); need {allowed}") \
            from e


def resolve_device(device: str) -> str:
    """'auto' -> cuda when available, else cpu."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def preprocess(source, cfg: PreprocessConfig) -> dict | None:
    """Run (or resume) a job or one part of it.

    Returns the folder's meta when complete, None when stopped early by max_chunks (rerun to go on), and
    {"complete": False} when this part's chunks are done and other parts' are not (the last part assembles).
    """
    cfg.validate()
    cfg.check_inputs()
    out = Path(cfg.out)
    _check_out_outside_root(out, source)
    settings = cfg.settings(source, remembered_hashes(out))
    files = getattr(source, "hashed", {})
    if prepare_output(out, settings, write=False, source=source, files=files) == "complete":
        return _already_complete(out, cfg)
    n_chunks = math.ceil(len(source) / cfg.chunk_size)
    order = item_order(len(source), cfg.seed, cfg.shuffle)
    mine = part_chunks(n_chunks, cfg.part, cfg.parts)
    pending = [c for c in mine if not done_path(out, c).is_file()]
    size = lambda c: min(cfg.chunk_size, len(order) - c * cfg.chunk_size)  # noqa: E731
    total = sum(size(c) for c in mine)
    done_before = total - sum(size(c) for c in pending)
    done_chunks = len(mine) - len(pending)  # before --max-chunks cuts the pending list
    if cfg.max_chunks is not None:
        pending = pending[:cfg.max_chunks]
    part = f" (part {cfg.part}/{cfg.parts}: {len(mine)} chunks)" if cfg.parts > 1 else ""
    if pending:  # the models load (and may be refused) before anything is written
        device = resolve_device(cfg.device)
        models = Models(cfg, device)
        _check_stats_source(cfg, models)
    # Again, now writing: another process may have started the folder, or even finished it, while the models loaded.
    if prepare_output(out, settings, source=source, files=files) == "complete":
        return _already_complete(out, cfg)
    if pending:
        described = models.describe()
        _check_same_models(out, described, n_chunks)
        atomic_write_json(out / WORK_DIR / MODELS_FILE, described)
        print(f"{out}: {len(source)} items, {n_chunks} chunks{part}, {done_chunks} done before; "
              f"device {device}")
        _process(source, cfg, models, order, pending, out, done_before, total)
    with file_lock(out / ASSEMBLY_LOCK):  # one part decides, and assembles, at a time
        if (out / META_FILE).is_file():  # another part finished and assembled the folder meanwhile
            (out / ASSEMBLY_LOCK).unlink(missing_ok=True)  # this process made it anew: leave the folder clean
            return read_meta(out)
        remaining = sum(not done_path(out, c).is_file() for c in range(n_chunks))
        if not remaining:
            stats = read_stats_meta(cfg.stats_from) if cfg.stats_from else None
            meta = assemble(out, n_chunks, settings, source.name, cfg, stats, files)
            (out / ASSEMBLY_LOCK).unlink(missing_ok=True)
            return meta
    if any(not done_path(out, c).is_file() for c in mine):
        print(f"{out}: stopped with {remaining} of {n_chunks} chunks left; rerun to continue")
        return None
    print(f"{out}: part {cfg.part}/{cfg.parts} done; {remaining} of {n_chunks} chunks left to other parts "
          "(the last part to finish assembles the folder)")
    return {"complete": False}


def _check_out_outside_root(out: Path, source) -> None:
    """ImageNet's root holds class folders only: --out inside it would be a class folder of its own to the next run
    (refused as missing from class_names, the resume of this very run included)."""
    root = getattr(source, "root", None)
    if root is not None and Path(root).resolve() in (out.resolve(), *out.resolve().parents):
        raise ValueError(f"out={str(out)!r} is inside root={str(root)!r}, whose every folder is taken for a class; "
                         "need an output folder outside root")


def _already_complete(out: Path, cfg: PreprocessConfig) -> dict:
    """The meta of a folder complete with these settings (nothing to do), unless a shard went missing since or the
    models its settings name by path hold other files now (their encodings would be served as these models')."""
    meta = read_meta(out)
    now = model_content(cfg, quick_gelu=ENCODER_FILES_SHA256 in meta)  # as the folder's writer named them
    changed = [f"{k} {meta[k]} then, {now[k]} now" for k in MODEL_CONTENT_KEYS
               if None not in (meta.get(k), now.get(k)) and meta[k] != now[k]]
    if changed:
        raise ValueError(f"out={str(out)!r} already holds a shard set encoded by other model files at the same paths "
                         f"({'; '.join(changed)}): put those files back, or write to another --out")
    damaged = damaged_shards(out, meta)
    if damaged:  # deleted or cut short since: "nothing to do" would send training to a broken folder
        raise ValueError(f"out={str(out)!r} is complete but {', '.join(damaged[:3])} is missing or not of its "
                         f"recorded size; delete the folder and rerun")
    shutil.rmtree(out / WORK_DIR, ignore_errors=True)
    print(f"{out}: already complete with these settings; nothing to do")
    return meta


#: What models.json records of the models' content (their paths are the settings' and compared with them).
MODEL_CONTENT_KEYS = ("autoencoder_sha256", "encoder_sha256")


def model_content(cfg: PreprocessConfig, quick_gelu: bool = True) -> dict:
    """MODEL_CONTENT_KEYS of the models cfg names, as Models.describe() gives them, from their files' checksums
    alone (once per file version, remembered under cfg.cache_dir): no model is loaded. quick_gelu=False: the CLIPs'
    digests as folders written before they named QuickGELU recorded them (src.preprocess.text.clip_digest)."""
    out = {"encoder_sha256": [clip_digest(m, w, cfg.cache_dir, quick_gelu) for m, w in cfg.clip]
           + ([files_digest(folder_files(cfg.t5), cfg.cache_dir)] if cfg.t5 else [])}
    if cfg.autoencoder != IDENTITY_AUTOENCODER:
        config = cfg.autoencoder_config if Path(cfg.autoencoder).is_file() else None  # as DiffusersAutoencoder
        out["autoencoder_sha256"] = autoencoder_digest(Path(cfg.autoencoder).resolve(),
                                                       None if config is None else Path(config).resolve(),
                                                       cfg.cache_dir)
    return out


def _check_same_models(out: Path, described: dict, n_chunks: int) -> None:
    """The chunks done before were encoded by the models models.json records: weights replaced at the same paths
    since (a resume, or another --part, with other files there) would put two encodings in one folder."""
    path = out / WORK_DIR / MODELS_FILE
    if not path.is_file() or not any(done_path(out, c).is_file() for c in range(n_chunks)):
        return
    before = json.loads(path.read_text())
    if ENCODER_FILES_SHA256 not in before:  # written before the digests named QuickGELU: the files' alone
        described = {**described, "encoder_sha256": described[ENCODER_FILES_SHA256]}
    changed = [f"{k} {before[k]} before, {described[k]} now" for k in MODEL_CONTENT_KEYS
               if None not in (before.get(k), described.get(k)) and before[k] != described[k]]
    if changed:
        raise ValueError(f"out={str(out)!r}: its chunks done before were encoded by other model files at the same "
                         f"paths ({'; '.join(changed)}): put those files back, or write to another --out")


def _check_stats_source(cfg: PreprocessConfig, models: Models) -> None:
    if cfg.stats_from is None:
        return
    meta = read_stats_meta(cfg.stats_from)
    ours = models.autoencoder.describe()
    # Another autoencoder (even one of as many channels) or posterior mean vs sample: other latent statistics; the
    # planner would flag the pair of folders too (src/data/expectations.py compares their names and content).
    # Its content where both record it (a folder written before autoencoder_sha256 is known by the name only).
    same_content = None in (meta.get("autoencoder_sha256"), ours.get("autoencoder_sha256")) or \
        meta["autoencoder_sha256"] == ours["autoencoder_sha256"]
    if meta.get("latent_channels") != models.autoencoder.latent_channels or \
            meta.get("autoencoder") != ours["autoencoder"] or not same_content or \
            meta.get("autoencoder_latent") != ours.get("autoencoder_latent"):
        theirs, mine = (f":{m['autoencoder_sha256']}" if m.get("autoencoder_sha256") else "" for m in (meta, ours))
        raise ValueError(f"stats_from={cfg.stats_from!r} was made with autoencoder {meta.get('autoencoder')}{theirs} "
                         f"({meta.get('latent_channels')} channels, latent {meta.get('autoencoder_latent')}); this "
                         f"job's is {ours['autoencoder']}{mine} ({models.autoencoder.latent_channels} channels, latent "
                         f"{ours.get('autoencoder_latent')}): its statistics do not apply")


def _process(source, cfg: PreprocessConfig, models: Models, order: np.ndarray, pending: list[int], out: Path,
             done_before: int, total: int) -> None:
    """Encode and write the pending chunks: one DataLoader over all of them (batches never cross chunks), the
    encoders in this thread and the shard writing of batch k in a second thread while batch k + 1 is encoded."""
    batches, plan = [], []
    for c in pending:
        idx = order[c * cfg.chunk_size:(c + 1) * cfg.chunk_size].tolist()
        chunk_batches = [idx[i:i + cfg.batch_size] for i in range(0, len(idx), cfg.batch_size)]
        batches += chunk_batches
        plan.append((c, len(chunk_batches)))
    loader = DataLoader(PreparedImages(source, cfg.resolution), batch_sampler=batches, num_workers=cfg.num_workers,
                        collate_fn=collate_prepared, pin_memory=torch.cuda.is_available() and cfg.device != "cpu")
    batch_iter = iter(loader)
    names = models.text.names
    start, written, skipped, elsewhere = time.perf_counter(), 0, 0, 0
    timers = dict.fromkeys(("read", "autoencoder", "text", "write"), 0.0)

    def timed(name, fn, *args):
        tick = time.perf_counter()
        result = fn(*args)
        timers[name] += time.perf_counter() - tick
        return result

    with tqdm(total=total, initial=done_before, unit="sample", disable=not cfg.progress, smoothing=0.1,
              dynamic_ncols=True) as bar, ThreadPoolExecutor(max_workers=1) as write_thread:
        for c, n_batches in plan:
            with chunk_claim(out, c) as claimed:
                if not claimed:  # another process writes (or has written) this chunk: pass its batches by
                    for _ in range(n_batches):
                        batch = timed("read", next, batch_iter)
                        bar.update(len(batch["indices"]) + len(batch["skipped"]))
                    elsewhere += 1
                    continue
                with ChunkWriter(out, c, names, models.autoencoder.name, cfg.chunk_size) as writer:
                    pending_write = None
                    try:
                        for _ in range(n_batches):
                            batch = timed("read", next, batch_iter)
                            latents16 = context = pooled = None
                            if batch["pixels"] is not None:
                                latents16 = timed("autoencoder", _encode_images, models, batch, cfg)
                                context, pooled = timed("text", models.cached_text.rows, batch["captions"])
                            if pending_write is not None:
                                timed("write", pending_write.result)
                            pending_write = write_thread.submit(_store, writer, batch, latents16, context, pooled)
                            written += len(batch["indices"])
                            skipped += len(batch["skipped"])
                            bar.update(len(batch["indices"]) + len(batch["skipped"]))
                            bar.set_postfix(skipped=skipped, refresh=False)
                    finally:  # the writer thread must be idle before the chunk is closed (or abandoned)
                        if pending_write is not None:
                            timed("write", pending_write.result)
    seconds = time.perf_counter() - start
    if elsewhere:
        print(f"{out}: {elsewhere} chunk(s) left to another process writing into this folder")
    print(f"{out}: wrote {written} samples ({len(pending) - elsewhere} chunks), skipped {skipped}, in {seconds:.1f} s "
          f"({(written + skipped) / max(seconds, 1e-9):.1f} samples/s); seconds waiting for images "
          f"{timers['read']:.1f}, in the autoencoder {timers['autoencoder']:.1f}, in the text encoders "
          f"{timers['text']:.1f}, waiting for the shard writer {timers['write']:.1f}; text cache hits "
          f"{models.cached_text.hits}, misses {models.cached_text.misses}")


@contextlib.contextmanager
def chunk_claim(out: Path, chunk: int):
    """True while this process alone may write the chunk (an exclusive lock, released by the kernel if it dies);
    False when another process holds it, or finished the chunk since this one planned its work. Two commands
    writing into one folder at once (an array submitted twice, overlapping --part values) then never delete or
    rewrite each other's chunk while it is being written or assembled."""
    try:
        f = open(out / WORK_DIR / f"{CHUNK_PATTERN.format(chunk)}.lock", "a")
    except FileNotFoundError:  # the other process finished every chunk and assembled the folder meanwhile
        yield False
        return
    with f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            yield not done_path(out, chunk).is_file()
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _encode_images(models: Models, batch: dict, cfg: PreprocessConfig) -> torch.Tensor:
    return models.encode_images(batch["pixels"], batch["indices"], cfg).half()


def _store(writer: ChunkWriter, batch: dict, latents16: torch.Tensor | None, context: list | None,
           pooled: list | None) -> None:
    """Write one encoded batch (runs in the writer thread); unreadable items and non-finite latents are skipped."""
    writer.skip(batch["skipped"])
    if latents16 is None:  # every item of the batch was unreadable
        return
    finite = torch.isfinite(latents16.flatten(1)).all(dim=1).tolist()
    for j, index in enumerate(batch["indices"]):
        if not finite[j]:
            writer.skip([{"index": index, "source": batch["extras"][j].get("source", f"item {index}"),
                          "error": "non-finite latent (float16 overflow?)"}])
            continue
        writer.write(latents16[j], context[j], pooled[j], batch["captions"][j], {**batch["extras"][j], "index": index})


# ----------------------------------------------------------------------------------------------------------------
# Assembly
# ----------------------------------------------------------------------------------------------------------------

def _link(src: Path, dst: Path) -> None:
    """Hard-link (or copy) src to dst atomically."""
    tmp = dst.with_name(f".{dst.name}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def assemble(out: Path, n_chunks: int, settings: dict, dataset: str, cfg: PreprocessConfig,
             stats_meta: dict | None, files: dict | None = None) -> dict:
    """Link the chunk shards into the folder, write skipped.log, then meta.json last; returns the meta.
    files: the source file hashes, kept for a rerun (remembered_hashes)."""
    markers = [json.loads(done_path(out, c).read_text()) for c in range(n_chunks)]
    full = [m for m in markers if m["count"] > 0]
    skipped = [s for m in markers for s in m["skipped"]]
    _write_skip_log(out, skipped, sum(m["count"] for m in markers) + len(skipped))
    if not full:
        raise ValueError(f"out={str(out)!r}: every item was unreadable ({len(skipped)} skipped, see {SKIP_LOG})")
    chunk_metas = [read_meta(chunk_dir(out, m["chunk"])) for m in full]
    shards = []
    for j, (m, cm) in enumerate(zip(full, chunk_metas)):
        if cm["shapes"] != chunk_metas[0]["shapes"]:
            raise ValueError(f"chunk {m['chunk']} has shapes {cm['shapes']}, chunk {full[0]['chunk']} has "
                             f"{chunk_metas[0]['shapes']}; delete {out} and rerun")
        name = SHARD_PATTERN.format(j)
        _link(chunk_dir(out, m["chunk"]) / cm["shards"][0], out / name)
        shards.append(name)
    _write_index(out, [chunk_dir(out, m["chunk"]) for m in full], [str(out / name) for name in shards])
    numel = sum(m["numel"] for m in full)
    mean = sum(m["sum"] for m in full) / numel
    std = math.sqrt(max(sum(m["sumsq"] for m in full) / numel - mean**2, 0.0))
    own_stats = {"latent_mean": mean, "latent_std": std}
    if stats_meta is None and not std > 0:
        raise ValueError(f"out={str(out)!r}: the latents are constant (std {std}); cannot normalise them")
    count = sum(m["count"] for m in full)
    models_meta = json.loads((out / WORK_DIR / MODELS_FILE).read_text())
    meta = {
        **chunk_metas[0],
        "count": count,
        "shards": shards,
        "latent_mean": stats_meta["latent_mean"] if stats_meta else mean,
        "latent_std": stats_meta["latent_std"] if stats_meta else std,
        "latent_stats_from": cfg.stats_from,
        "dataset_latent_stats": own_stats,
        "dataset": dataset,
        "resolution": cfg.resolution,
        **models_meta,
        "skipped": len(skipped),
        "shard_bytes": [os.path.getsize(out / name) for name in shards],  # every shard's (is_complete checks them)
        "preprocess": {"fingerprint": fingerprint_of(settings), "settings": settings, "files": files or {}},
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "complete": True,
    }
    atomic_write_json(out / META_FILE, meta)
    shutil.rmtree(out / WORK_DIR)
    print(f"{out}: complete: {count} samples in {len(shards)} shards, {len(skipped)} skipped; "
          f"latent mean {meta['latent_mean']:.4f} std {meta['latent_std']:.4f}")
    return read_meta(out)


def _write_index(out: Path, chunk_dirs: list[Path], shards: list[str]) -> None:
    """The folder's index.npz from the chunks' own (chunk j's one shard is the folder's shard j), so that training
    streams without scanning every tar header (docs/data.md#shard-format)."""
    shard_ids, offsets, sizes = [], [], []
    for j, (folder, shard) in enumerate(zip(chunk_dirs, shards)):
        index = load_index(folder, [shard]) or build_index([shard])  # a chunk written without one: scanned
        n = len(index["start"])
        shard_ids += [j] * n
        offsets.append(index["start"][:, None] + np.broadcast_to(index["rel"], (n, index["rel"].shape[1])))
        sizes.append(np.broadcast_to(index["size"], (n, index["size"].shape[1])))
    save_npz(out / INDEX_FILE, **pack_index(shard_ids, np.concatenate(offsets), np.concatenate(sizes), shards))


def _write_skip_log(out: Path, skipped: list[dict], total: int) -> None:
    lines = [f"# {len(skipped)} of {total} items skipped (unreadable or corrupt); index\tsource\terror"]
    lines += [f"{s['index']}\t{s['source']}\t{s['error']}" for s in sorted(skipped, key=lambda s: s["index"])]
    atomic_write_bytes(out / SKIP_LOG, ("\n".join(lines) + "\n").encode("utf-8", "surrogateescape"))  # file names
