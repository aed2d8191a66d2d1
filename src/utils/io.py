"""Atomic file writes: a temp file in the same directory, fsync, then os.replace, so readers never see half a file.

The one place the project writes results, checkpoints, shards' metadata and caches from; and the advisory file
lock that serialises writers of one file across processes.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import hashlib
import json
import logging
import os
import re
import tempfile
import time
import uuid
from pathlib import Path
from typing import IO, Any, Callable, Iterator

import numpy as np

log = logging.getLogger(__name__)

#: A full disk, a quota, a read-only file system, a permission refused, an I/O error: the file system refused, the
#: input was fine (exit status 1 where bad input is 2). Not every OSError: Hydra's missing option, a missing file and a
#: busy lock are OSErrors too.
REFUSED_WRITES = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO, errno.EACCES, errno.EPERM})


def refused_write(e: BaseException) -> bool:
    """Whether an exception is the file system refusing a write or read (REFUSED_WRITES), not bad input."""
    return isinstance(e, OSError) and e.errno in REFUSED_WRITES


def temp_sibling(path: str | Path) -> Path:
    """A unique hidden temporary name in the same folder as path (same file system, so rename is atomic)."""
    path = Path(path)
    return path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")


# The temp names of temp_sibling (32 hex digits) and atomic_write (mkstemp's 8 characters): `.<name>.<random>.tmp`.
_TEMP_NAME = re.compile(r"\..+\.([0-9a-f]{32}|[0-9a-z_]{8})\.tmp")


def is_temp_name(name: str) -> bool:
    """Whether a file name is one of this module's temp names (a write in progress, or one a kill interrupted)."""
    return _TEMP_NAME.fullmatch(name) is not None


def remove_stale_temp_files(root: str | os.PathLike, skip: tuple[str, ...] = ("wandb",),
                            lock_file: str = ".run.lock") -> list[Path]:
    """Delete the temp files interrupted writes left under root (a kill during a checkpoint or .npz write).

    Only for a folder this process owns (the run directory under its lock, src/launch/rundir.py): a temp file
    there belongs to no live writer. Folders named in `skip` (other libraries' files) are not entered, nor folders
    below root holding `lock_file` (rundir.LOCK_FILE): another run's directory, whose job may be writing there (two
    launches at once, one with a key added, nest digits/rf/sampler=ab2 in digits/rf before either can refuse it).
    """
    removed = []
    for current, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if d not in skip and not os.path.lexists(os.path.join(current, d, lock_file))]
        for name in files:
            if is_temp_name(name):
                path = Path(current) / name
                path.unlink(missing_ok=True)
                removed.append(path)
    return removed


def remove_abandoned_temp_files(folder: str | os.PathLike, older_than_s: float = 24 * 3600) -> list[Path]:
    """Delete the temp files in folder (not below it) that interrupted writes left (a kill while a shared cache file
    was written) and no writer has touched for older_than_s: in a folder shared by many jobs, where no lock says
    whether a temp file's writer is alive, an unchanged day is proof enough (a write takes seconds to minutes)."""
    removed = []
    now = time.time()
    with contextlib.suppress(OSError):  # no folder (yet): nothing left there
        for entry in os.scandir(folder):
            try:
                if is_temp_name(entry.name) and entry.is_file() and now - entry.stat().st_mtime > older_than_s:
                    os.unlink(entry.path)
                    removed.append(Path(entry.path))
            except OSError:  # removed meanwhile by another job
                continue
    return removed


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


class _WriteErrors:
    """A binary file that remembers the OSError its writes raised: writers such as torch.save's zip writer catch it
    and raise an error of their own that names neither the file nor the cause (`unexpected pos 223744 vs 223632`
    on a full disk)."""

    def __init__(self, f: IO[bytes]):
        self._f = f
        self.error: OSError | None = None

    def write(self, data) -> int:
        try:
            return self._f.write(data)
        except OSError as e:
            self.error = self.error or e
            raise

    def __getattr__(self, name: str):
        return getattr(self._f, name)


def _naming(error: OSError, path: Path, tmp: str | None = None) -> OSError:
    """The error with path as its file name (`[Errno 28] No space left on device: '<path>'`): an OSError raised by
    a write names no file, one raised making or renaming the temp file names the temp file."""
    if error.errno is None or error.filename not in (None, tmp):
        return error
    return type(error)(error.errno, error.strerror, str(path))


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], None],
                 before_replace: Callable[[Path], None] | None = None) -> Path:
    """Write a file by calling write(f) on a temporary file next to path, then renaming it over path.
    before_replace(path), if given, runs once the new content is complete, just before the rename.
    A write the file system refuses (a full disk, a read-only folder) raises an OSError naming path and the cause,
    whatever error the writer made of it, and leaves path as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        raise _naming(e, path, e.filename) from None
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; results are meant to be shared like any file
    f = None
    try:
        with os.fdopen(fd, "wb") as raw:
            f = _WriteErrors(raw)
            write(f)
            raw.flush()
            os.fsync(raw.fileno())
        if before_replace is not None:
            before_replace(path)
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if f is not None and f.error is not None and e is not f.error:  # the writer's own error hides the cause
            raise _naming(f.error, path, tmp) from e
        if isinstance(e, OSError):
            raise _naming(e, path, tmp) from None
        raise
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    return atomic_write(path, lambda f: f.write(data))


def atomic_write_json(path: str | os.PathLike, obj: Any, sort_keys: bool = False) -> Path:
    """Indented, strict JSON (NaN and inf are rejected); objects JSON does not know are written as strings."""
    text = json.dumps(obj, indent=2, sort_keys=sort_keys, allow_nan=False, default=str) + "\n"
    return atomic_write_bytes(path, text.encode("utf-8"))


def save_npz(path: str | os.PathLike, **arrays: np.ndarray) -> Path:
    """np.savez atomically (no pickled objects: strings are stored as unicode arrays)."""
    return atomic_write(path, lambda f: np.savez(f, **{k: np.asarray(v) for k, v in arrays.items()}))


def load_npz(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """All arrays of an npz file, loaded eagerly with allow_pickle=False."""
    with np.load(path, allow_pickle=False) as data:
        return {k: data[k] for k in data.files}


@contextlib.contextmanager
def file_lock(path: str | os.PathLike) -> Iterator[None]:
    """An exclusive advisory lock on path (created, with its folder, if needed), held for the with-block."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (library messages run over several)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def weights_file_error(path: str | os.PathLike) -> str | None:
    """Why a weights file cannot be read as tensors by torch.load(weights_only=True) (safetensors for .safetensors),
    as the exception's name, or None. Memory-mapped, so checking a large file reads little; cached per file version
    (every job of a sweep asks)."""
    stat = Path(path).stat()
    return _weights_file_error(str(Path(path).resolve()), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=16)
def _weights_file_error(path: str, mtime_ns: int, size: int) -> str | None:
    import torch

    try:
        if path.endswith(".safetensors"):  # open_clip reads these with safetensors, not torch.load
            from safetensors import safe_open

            with safe_open(path, framework="pt") as f:
                f.keys()
            return None
        try:
            torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            torch.load(path, map_location="cpu", weights_only=True)  # the legacy (non-zip) format
    except Exception as e:  # noqa: BLE001 -- any failure is the answer (torch's messages run to paragraphs)
        return type(e).__name__
    return None


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


#: Where weights_sha256 remembers the checksums it computed, under paths.cache_dir.
WEIGHTS_SHA256_FILE = "weights_sha256.json"
_SHA256: dict[tuple, str] = {}  # (resolved path, size, mtime_ns, ctime_ns) -> sha256, for this process
_STORED: set[tuple[str, tuple]] = set()  # (store, file version) pairs this process found in or wrote to a store


def file_version(path: Path) -> tuple:
    """(path, size, mtime_ns, ctime_ns): what changes when the file at path is rewritten, replaced or renamed over.
    Raises OSError where there is no file."""
    # ctime too: unlike mtime it cannot be set back (cp -p, touch -d), and a file renamed over this path changes it.
    st = path.stat()
    return str(path), st.st_size, st.st_mtime_ns, st.st_ctime_ns


def weights_sha256(path: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> str:
    """The sha256 of a weights file: its identity, so a file replaced at the same path (or another file of the same
    name) is another feature extractor. Hashed once per file version (resolved path, size, mtime_ns, ctime_ns):
    remembered in this process and, with cache_dir, in cache_dir/weights_sha256.json, so a large file is not read
    again at every launch."""
    version = file_version(Path(path).resolve())
    store = Path(cache_dir) / WEIGHTS_SHA256_FILE if cache_dir is not None else None
    # Known in this process, and in the store where one is given (a file first hashed without one is written to it).
    if version in _SHA256 and (store is None or (str(store), version) in _STORED):
        return _SHA256[version]
    known = read_json_store(store) if store is not None else {}
    sha, entry = file_sha256(path, known)
    if store is not None and entry is not None:
        if known.get(version[0]) != entry:  # hashed here, or in this process only: remember it
            update_json_store(store, {version[0]: entry})
        _STORED.add((str(store), version))
    return sha


def folder_files(path: str | os.PathLike) -> dict[str, Path]:
    """A model folder's files by relative path (hidden files left out), for files_digest."""
    path = Path(path)
    return {f.relative_to(path).as_posix(): f for f in sorted(path.rglob("*"))
            if f.is_file() and not f.name.startswith(".")}


def files_digest(files: dict[str, Path], cache_dir: str | os.PathLike | None = None) -> str:
    """sha256[:12] over the sha256 of a model's files (name -> path; the names are part of it): its identity,
    whatever its folder or files are called. Each file is hashed once per version (weights_sha256)."""
    digest = hashlib.sha256()
    for name, f in files.items():
        digest.update(f"{name}:{weights_sha256(f, cache_dir)}\n".encode())
    return digest.hexdigest()[:12]


def file_sha256(path: str | os.PathLike, known: dict | None = None) -> tuple[str, dict | None]:
    """The sha256 of a file, hashed once per file version (resolved path, size, mtime_ns, ctime_ns), like
    weights_sha256 but remembered by the caller: `known` maps resolved paths to {size, mtime_ns, ctime_ns, sha256}
    kept from an earlier process. Returns the sha256 and the entry to keep for this version (None when the file was
    written to while read: a hash of no one version)."""
    version = file_version(Path(path).resolve())
    fields = dict(zip(("size", "mtime_ns", "ctime_ns"), version[1:]))
    if version not in _SHA256:
        entry = (known or {}).get(version[0])
        if isinstance(entry, dict) and all(entry.get(k) == v for k, v in fields.items()) and entry.get("sha256"):
            _SHA256[version] = str(entry["sha256"])
        else:
            sha = sha256_file(version[0])
            if file_version(Path(version[0])) != version:  # written to while read: a hash of no one version, not kept
                return sha, None
            _SHA256[version] = sha
    return _SHA256[version], {**fields, "sha256": _SHA256[version]}


def read_json_store(store: Path) -> dict:
    """The entries of a cache file of JSON entries by key; {} when absent or damaged (only a cache, rebuilt)."""
    try:
        data = json.loads(store.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def update_json_store(store: Path, entries: dict) -> dict | None:
    """Add entries to a cache file of JSON entries, under its lock (jobs of a sweep add entries concurrently);
    returns all its entries, None where it cannot be written (a read-only cache folder costs a recomputation
    next time, nothing else)."""
    try:
        with file_lock(store.with_name(f".{store.name}.lock")):
            data = read_json_store(store)
            data.update(entries)
            atomic_write_json(store, data, sort_keys=True)
        return data
    except OSError as e:
        log.debug("could not remember %d entries in %s: %s", len(entries), store, e)
        return None
