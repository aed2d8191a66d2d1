"""Checkpoints written atomically and read with torch.load(weights_only=True); the previous `last.ckpt` kept.

A new `last.ckpt` is written to a temp file first; only when it is complete does the old one become
`last.prev.ckpt` (a hard link, so `last.ckpt` never goes missing) and the new one take its name. A `last.ckpt`
that cannot be read (truncated, corrupted on disk) is then not the end of a run: `checkpoint_to_resume` picks
`last.prev.ckpt` instead, with a one-line warning naming the file.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins import TorchCheckpointIO

from src.utils.io import atomic_write, temp_sibling

log = logging.getLogger(__name__)

LAST = "last.ckpt"
PREVIOUS = "last.prev.ckpt"


def previous_path(path: str | os.PathLike) -> Path:
    """Where the checkpoint `path` replaced is kept (`last.ckpt` -> `last.prev.ckpt`)."""
    return Path(path).with_name(PREVIOUS)


def _keep_previous(path: Path) -> None:
    """Make the current `last.ckpt` the previous one (atomically: a link under a temp name, renamed)."""
    if not path.is_file():
        return
    tmp = temp_sibling(previous_path(path))
    try:
        os.link(path, tmp)
    except OSError:  # a file system without hard links
        shutil.copyfile(path, tmp)
    os.replace(tmp, previous_path(path))


def _readable(path: Path) -> str | None:
    """None if torch can open the checkpoint (mapped, so the tensors are not read), else why not, in one line."""
    try:
        torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        return None
    except Exception as e:
        text = str(e).strip()
        return f"{type(e).__name__}: {text.splitlines()[0]}" if text else type(e).__name__


def checkpoint_to_resume(ckpt_dir: str | os.PathLike, repair: bool = True) -> Path | None:
    """The checkpoint to resume from: `last.ckpt`, or `last.prev.ckpt` when the last one cannot be read; None when
    there is none. repair (the job that resumes, owning the run directory): the unreadable `last.ckpt` is replaced
    by the previous one, with a one-line warning naming both, so the next save keeps a readable previous one."""
    last = Path(ckpt_dir) / LAST
    if not os.path.lexists(last):  # a dangling link too is there (unreadable), not a run never saved
        return None
    why = _readable(last)
    if why is None:
        return last
    previous = previous_path(last)
    if not previous.is_file() or _readable(previous) is not None:
        raise RuntimeError(f"{last} is unreadable ({why}) and there is no readable {previous.name} to resume from; "
                           "delete the checkpoints folder to train from the start")
    if not repair:
        return previous
    log.warning("%s is unreadable (%s); resuming from the previous checkpoint %s", last, why, previous)
    tmp = temp_sibling(last)
    shutil.copyfile(previous, tmp)
    os.replace(tmp, last)
    return last


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning CheckpointIO: temp file + rename on save (the previous `last.ckpt` kept), weights-only
    unpickling on load."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options=None) -> None:
        path = Path(path)
        # Streamed into the temp file: an in-memory copy would double the host memory of a large checkpoint.
        before_replace = _keep_previous if path.name == LAST else None
        atomic_write(path, lambda f: torch.save(checkpoint, f), before_replace=before_replace)

    def load_checkpoint(self, path, map_location=None, weights_only=None) -> dict[str, Any]:
        if not Path(path).exists():
            raise FileNotFoundError(f"checkpoint not found: {path}")
        return torch.load(path, map_location=map_location or "cpu", weights_only=True)
