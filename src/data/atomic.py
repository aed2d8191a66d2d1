"""Atomic file writes: a temporary sibling, fsync, then a rename."""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path


def temp_sibling(path: str | Path) -> Path:
    """A unique hidden temporary name in the same folder as path (same file system, so rename is atomic)."""
    path = Path(path)
    return path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write data to path through a temporary sibling and a rename."""
    tmp = temp_sibling(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_json(path: str | Path, obj) -> None:
    """Write obj as indented, key-sorted JSON through a temporary sibling and a rename."""
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())
