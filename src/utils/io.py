"""Atomic file writes: a temp file in the same directory, fsync, then os.replace, so readers never see half a file.

The one place the project writes results, checkpoints, shards' metadata and caches from; and the advisory file
lock that serialises writers of one file across processes.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import json
import os
import re
import tempfile
import uuid
from pathlib import Path
from typing import IO, Any, Callable, Iterator

import numpy as np


def temp_sibling(path: str | Path) -> Path:
    """A unique hidden temporary name in the same folder as path (same file system, so rename is atomic)."""
    path = Path(path)
    return path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")


# The temp names of temp_sibling (32 hex digits) and atomic_write (mkstemp's 8 characters): `.<name>.<random>.tmp`.
_TEMP_NAME = re.compile(r"\..+\.([0-9a-f]{32}|[0-9a-z_]{8})\.tmp")


def is_temp_name(name: str) -> bool:
    """Whether a file name is one of this module's temp names (a write in progress, or one a kill interrupted)."""
    return _TEMP_NAME.fullmatch(name) is not None


def remove_stale_temp_files(root: str | os.PathLike, skip: tuple[str, ...] = ("wandb",)) -> list[Path]:
    """Delete the temp files interrupted writes left under root (a kill during a checkpoint or .npz write).

    Only for a folder this process owns (the run directory under its lock, src/launch/rundir.py): a temp file
    there belongs to no live writer. Folders named in `skip` (other libraries' files) are not entered.
    """
    removed = []
    for current, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if d not in skip]
        for name in files:
            if is_temp_name(name):
                path = Path(current) / name
                path.unlink(missing_ok=True)
                removed.append(path)
    return removed


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], None],
                 before_replace: Callable[[Path], None] | None = None) -> Path:
    """Write a file by calling write(f) on a temporary file next to path, then renaming it over path.
    before_replace(path), if given, runs once the new content is complete, just before the rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; results are meant to be shared like any file
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        if before_replace is not None:
            before_replace(path)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
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
