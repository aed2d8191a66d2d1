"""Small training callbacks."""

from __future__ import annotations

from pathlib import Path

import lightning as L


class SaveLastAtEnd(L.Callback):
    """Write `last.ckpt` when training ends, whatever ckpt_every is: a finished run is then recognisably finished,
    and an interruption during the evaluation that follows never retrains."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        trainer.save_checkpoint(str(self.path), weights_only=False)
