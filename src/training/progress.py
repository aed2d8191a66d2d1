"""Training progress for the console: step/max_steps, loss, steps/s and time left (src/utils/progress.py).

A Lightning progress bar (it replaces Lightning's own TQDM bar, which in a log file is one endless line): a live bar
on a terminal, a plain line every few seconds otherwise. Only rank 0 shows it.
"""
from __future__ import annotations

import math
import sys
from typing import TextIO

from lightning.pytorch.callbacks.progress.progress_bar import ProgressBar

from src.utils.progress import PLAIN_EVERY_S, Progress


class TrainingProgress(ProgressBar):
    """step/max_steps, the last training loss, the last EMA validation loss, steps/s and time left."""

    def __init__(self, stream: TextIO | None = None, terminal: bool | None = None, every_s: float = PLAIN_EVERY_S):
        super().__init__()
        self.stream, self.terminal, self.every_s = stream, terminal, every_s
        self.progress: Progress | None = None
        self._enabled = True

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    def _show(self, trainer) -> bool:
        return self._enabled and trainer.is_global_zero

    def on_train_start(self, trainer, pl_module) -> None:
        if not self._show(trainer):
            return
        self.progress = Progress(trainer.max_steps, "  train", unit="step", stream=self.stream,
                                 terminal=self.terminal, every_s=self.every_s)
        self.progress.update(trainer.global_step)  # a resumed run starts at its checkpoint's step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.progress is None:
            return
        # Reading the metrics costs a device sync: only when they are shown.
        step = trainer.global_step
        self.progress.update(step, **(self._fields(trainer) if self.progress.due(step) else {}))

    @staticmethod
    def _fields(trainer) -> dict:
        fields = {}
        metrics = trainer.progress_bar_metrics
        for key, name in (("train/loss", "loss"), ("val_ema/loss_mean", "val loss (EMA)")):
            value = metrics.get(key)
            if value is not None and math.isfinite(float(value)):
                fields[name] = float(value)
        return fields

    def on_train_end(self, trainer, pl_module) -> None:
        if self.progress is not None:
            self.progress.fields.update(self._fields(trainer))  # the final values in the closing line
            self.progress.close()
            self.progress = None

    def on_fit_end(self, trainer, pl_module) -> None:
        # Before the evaluation callback's on_fit_end (this callback comes first in the list).
        if self._show(trainer) and any(type(c).__name__ == "EvaluationCallback" for c in trainer.callbacks):
            print("  evaluating the selected checkpoint", file=self.stream or sys.stderr, flush=True)
