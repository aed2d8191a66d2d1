"""Atomic file writing (temp file in the same folder, fsync, rename) for npz arrays and JSON."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, IO

import numpy as np


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], None]) -> Path:
    """Write a file by calling write(f) on a temporary file next to path, then renaming it over path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def save_npz(path: str | os.PathLike, **arrays: np.ndarray) -> Path:
    """np.savez atomically (no pickled objects: strings are stored as unicode arrays)."""
    return atomic_write(path, lambda f: np.savez(f, **{k: np.asarray(v) for k, v in arrays.items()}))


def load_npz(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """All arrays of an npz file, loaded eagerly with allow_pickle=False."""
    with np.load(path, allow_pickle=False) as data:
        return {k: data[k] for k in data.files}


def save_json(path: str | os.PathLike, obj: Any) -> Path:
    """json.dump atomically, indented, strict JSON (NaN and inf are rejected)."""
    text = json.dumps(obj, indent=2, allow_nan=False) + "\n"
    return atomic_write(path, lambda f: f.write(text.encode("utf-8")))
