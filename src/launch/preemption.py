"""Preemption under submitit: save a checkpoint at the next step boundary, then let submitit requeue the job.

submitit (SLURM) answers its signal (SIGUSR2 by default, sent on preemption and shortly before the time limit) by
requeueing the job and exiting at once, wherever training is. The requeued job resumes from the run directory's
last checkpoint, so without this callback up to train.ckpt_every steps are lost. With it, the signal only sets a
flag; after the current optimizer step every rank agrees (one all-reduce of a bool per step) to save
`last.ckpt`, and then submitit's own handler runs: rank 0 requeues and exits. A signal outside the training loop
(data setup, evaluation) goes to submitit's handler straight away.
"""

from __future__ import annotations

import logging
import os
import signal
from pathlib import Path

import lightning as L

log = logging.getLogger(__name__)


def submitit_signal() -> signal.Signals | None:
    """The signal submitit listens to in this process, or None when the process is not a submitit SLURM job."""
    if os.environ.get("SUBMITIT_EXECUTOR") != "slurm" or "SLURM_JOB_ID" not in os.environ:
        return None
    name = "SIG" + os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2")
    return getattr(signal.Signals, name, None)


class PreemptionCheckpoint(L.Callback):
    """Defers submitit's requeue handler to the next step boundary and saves `ckpt_path` before it runs."""

    def __init__(self, ckpt_path: str | Path, signum: signal.Signals):
        self.ckpt_path, self.signum = Path(ckpt_path), signum
        self._previous = None
        self._pending: tuple | None = None  # (signum, frame) of a deferred signal
        self._training = False

    def _handler(self, signum, frame) -> None:
        if self._training:
            log.warning("caught %s: checkpointing after this step, then handing over to submitit",
                        signal.Signals(signum).name)
            self._pending = (signum, frame)
        else:
            self._hand_over(signum, frame)

    def _hand_over(self, signum, frame) -> None:
        previous, self._previous = self._previous, None
        signal.signal(self.signum, previous if previous is not None else signal.SIG_DFL)
        if callable(previous):
            previous(signum, frame)

    def setup(self, trainer, pl_module, stage: str) -> None:
        if self._previous is None:
            self._previous = signal.getsignal(self.signum)
            signal.signal(self.signum, self._handler)

    def on_train_start(self, trainer, pl_module) -> None:
        self._training = True

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._checkpoint_if_signalled(trainer)

    def on_train_end(self, trainer, pl_module) -> None:
        self._checkpoint_if_signalled(trainer)
        self._training = False

    def _checkpoint_if_signalled(self, trainer) -> None:
        # Every rank takes the decision together: saving is collective under DDP/FSDP.
        if not trainer.strategy.reduce_boolean_decision(self._pending is not None, all=False):
            return
        trainer.save_checkpoint(self.ckpt_path)
        log.warning("preemption checkpoint at step %d: %s", trainer.global_step, self.ckpt_path)
        self._training = False
        signum, frame = self._pending or (self.signum, None)
        self._pending = None
        self._hand_over(signum, frame)  # rank 0: submitit requeues and exits; the other ranks are stopped with it

    def teardown(self, trainer, pl_module, stage: str) -> None:
        if self._previous is not None:
            signal.signal(self.signum, self._previous)
            self._previous = None
