"""Checkpoints written atomically and read with torch.load(weights_only=True)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins import TorchCheckpointIO

from src.utils.io import atomic_write


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning CheckpointIO: temp file + rename on save, weights-only unpickling on load."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options=None) -> None:
        # Streamed into the temp file: an in-memory copy would double the host memory of a large checkpoint.
        atomic_write(path, lambda f: torch.save(checkpoint, f))

    def load_checkpoint(self, path, map_location=None, weights_only=None) -> dict[str, Any]:
        if not Path(path).exists():
            raise FileNotFoundError(f"checkpoint not found: {path}")
        return torch.load(path, map_location=map_location or "cpu", weights_only=True)
