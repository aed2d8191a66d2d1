"""Preemption under submitit: save a checkpoint at the next step boundary, then let submitit requeue the job.

submitit (SLURM) answers its signal (SIGUSR2 by default, sent on preemption and shortly before the time limit) by
requeueing the job and exiting at once, wherever training is. The requeued job resumes from the run directory's
last checkpoint, so without this callback up to train.ckpt_every steps are lost. With it, the signal only sets a
flag; after the current optimizer step every rank agrees (one all-reduce of a bool per step) to save
`last.ckpt`, and then submitit's own handler runs: rank 0 requeues and exits. A signal outside the training loop
(data setup, evaluation) goes to submitit's handler straight away.

Any run, local or not (InterruptCheckpoint): SIGTERM (scancel, a preemption that sends no signal first, `kill`),
which Lightning turns into a stop of every rank between two steps, saves `last.ckpt`; so does SIGINT (Ctrl-C), at
the next step boundary, before the job stops with a non-zero exit. Rerunning the command resumes from it.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from pathlib import Path

import lightning as L
from lightning.pytorch.utilities.exceptions import SIGTERMException

log = logging.getLogger(__name__)


def submitit_signal() -> signal.Signals | None:
    """The signal submitit listens to in this process, or None when the process is not a submitit SLURM job."""
    if os.environ.get("SUBMITIT_EXECUTOR") != "slurm" or "SLURM_JOB_ID" not in os.environ:
        return None
    name = "SIG" + os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2")
    return getattr(signal.Signals, name, None)


class PreemptionCheckpoint(L.Callback):
    """Defers submitit's requeue handler to the next step boundary and saves `ckpt_path` before it runs.

    Installed for the training loop only (on_train_start, after Lightning took its snapshot of the handlers, which
    it restores at teardown); outside it submitit's handler acts at once.
    """

    def __init__(self, ckpt_path: str | Path, signum: signal.Signals):
        self.ckpt_path, self.signum = Path(ckpt_path), signum
        self._previous = None  # submitit's handler while ours is installed
        self._pending: tuple | None = None  # (signum, frame) of a deferred signal

    def _handler(self, signum, frame) -> None:
        log.warning("caught %s: checkpointing after this step, then handing over to submitit",
                    signal.Signals(signum).name)
        self._pending = (signum, frame)

    def _uninstall(self):
        previous, self._previous = self._previous, None
        if previous is not None:
            signal.signal(self.signum, previous)
        return previous

    def on_train_start(self, trainer, pl_module) -> None:
        self._pending = None
        self._previous = signal.getsignal(self.signum)
        signal.signal(self.signum, self._handler)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._checkpoint_if_signalled(trainer)

    def on_train_end(self, trainer, pl_module) -> None:
        self._checkpoint_if_signalled(trainer)
        self._uninstall()

    def on_exception(self, trainer, pl_module, exception) -> None:
        self._uninstall()

    def teardown(self, trainer, pl_module, stage: str) -> None:
        self._uninstall()

    def _checkpoint_if_signalled(self, trainer) -> None:
        # Every rank takes the decision together: saving is collective under DDP/FSDP.
        if not trainer.strategy.reduce_boolean_decision(self._pending is not None, all=False):
            return
        trainer.save_checkpoint(self.ckpt_path)
        log.warning("preemption checkpoint at step %d: %s", trainer.global_step, self.ckpt_path)
        signum, frame = self._pending or (self.signum, None)
        self._pending = None
        previous = self._uninstall()
        if callable(previous):  # rank 0: submitit requeues and exits; the other ranks are stopped with the job
            previous(signum, frame)


class InterruptCheckpoint(L.Callback):
    """SIGTERM and SIGINT (Ctrl-C) during training: save `ckpt_path` at a step boundary, then stop (non-zero exit).

    SIGTERM: Lightning's own handler stops every rank together between two steps (SIGTERMException); the state is
    whole then, and saved here. SIGINT: Python would raise KeyboardInterrupt wherever training is (in the middle of
    an optimizer step, say), so during training the signal only sets a flag; after the current step every rank
    agrees to save, then a KeyboardInterrupt stops the fit (Lightning exits with status 1). A second Ctrl-C stops
    at once, without a checkpoint.
    """

    def __init__(self, ckpt_path: str | Path):
        self.ckpt_path = Path(ckpt_path)
        self._previous = None  # the SIGINT handler before ours
        self._pending = False

    def _handler(self, signum, frame) -> None:
        log.warning("caught SIGINT: checkpointing after this step, then stopping (Ctrl-C again stops at once)")
        self._pending = True
        signal.signal(signal.SIGINT, signal.default_int_handler)

    def _uninstall(self) -> None:
        previous, self._previous = self._previous, None
        if previous is not None:
            signal.signal(signal.SIGINT, previous)

    def on_train_start(self, trainer, pl_module) -> None:
        self._pending = False
        if threading.current_thread() is threading.main_thread():  # signal handlers live in the main thread
            self._previous = signal.getsignal(signal.SIGINT)
            signal.signal(signal.SIGINT, self._handler)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not trainer.strategy.reduce_boolean_decision(self._pending, all=False):
            return
        trainer.save_checkpoint(self.ckpt_path)
        log.warning("checkpoint on SIGINT at step %d: %s", trainer.global_step, self.ckpt_path)
        self._pending = False
        self._uninstall()
        raise KeyboardInterrupt(f"stopped on SIGINT after saving {self.ckpt_path}")

    def on_train_end(self, trainer, pl_module) -> None:
        self._uninstall()

    def on_exception(self, trainer, pl_module, exception) -> None:
        self._uninstall()
        # SIGTERM (scancel, preemption without submitit's signal, kill): every rank stopped between two steps.
        if isinstance(exception, SIGTERMException) and trainer.state.fn == "fit":
            trainer.save_checkpoint(self.ckpt_path)
            log.warning("checkpoint on SIGTERM at step %d: %s", trainer.global_step, self.ckpt_path)

    def teardown(self, trainer, pl_module, stage: str) -> None:
        self._uninstall()
