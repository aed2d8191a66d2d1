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

from lightning.pytorch.callbacks import Checkpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException

from src.training.callbacks import validated_at

log = logging.getLogger(__name__)


def submitit_signal() -> signal.Signals | None:
    """The signal submitit listens to in this process, or None when the process is not a submitit SLURM job."""
    if os.environ.get("SUBMITIT_EXECUTOR") != "slurm" or "SLURM_JOB_ID" not in os.environ:
        return None
    name = "SIG" + os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2")
    return getattr(signal.Signals, name, None)


class StopAtStepBoundary(Checkpoint):
    """A signal during training: save `ckpt_path` at the next step boundary, then stop (subclasses: how).

    The boundary after step N is where a checkpoint of step N is whole: after Lightning logged the step's metrics
    and, at a validated step, after its validation (and the best-checkpoint callback that follows it). Lightning's
    batch end comes before both, so at a validated step the save waits for the validation's end, and elsewhere the
    stop waits for the next step's start. Every rank takes the decision together (one all-reduce of a bool per
    step): saving is collective under DDP/FSDP. A Checkpoint, so Lightning runs it after the other callbacks.
    """

    stop_at_once = False  # after a save at a batch end: stop there (not when the next step starts)

    def __init__(self, ckpt_path: str | Path, val_every: int):
        self.ckpt_path, self.val_every = Path(ckpt_path), val_every
        self._stop_next = False  # saved at a batch end: stop when the next step starts

    def signalled(self) -> bool:
        raise NotImplementedError

    def stop(self, trainer) -> None:
        """After the checkpoint: end the job (raise, or hand over to another handler)."""
        raise NotImplementedError

    def save(self, trainer) -> None:
        trainer.save_checkpoint(self.ckpt_path)

    def _decide(self, trainer) -> bool:
        return trainer.strategy.reduce_boolean_decision(self.signalled(), all=False)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if validated_at(trainer.global_step, self.val_every):  # on_validation_end saves
            return
        if self._decide(trainer):
            self.save(trainer)
            if self.stop_at_once:
                self.stop(trainer)
            else:
                self._stop_next = True

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self._stop_next:
            self._stop_next = False
            self.stop(trainer)

    def on_validation_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking and trainer.state.fn == "fit" and self._decide(trainer):
            self.save(trainer)
            self.stop(trainer)

    def on_train_end(self, trainer, pl_module) -> None:
        # After the last step SaveLastAtEnd has saved it; a signal still pending stops the job before the evaluation.
        if self._stop_next or self._decide(trainer):
            self._stop_next = False
            self.stop(trainer)


class PreemptionCheckpoint(StopAtStepBoundary):
    """Defers submitit's requeue handler to the next step boundary and saves `ckpt_path` before it runs.

    Installed for the training loop only (on_train_start, after Lightning took its snapshot of the handlers, which
    it restores at teardown); outside it submitit's handler acts at once. The handover follows the save at once
    (the step's logged metrics may be lost): the requeue must happen inside the scheduler's grace period.
    """

    stop_at_once = True

    def __init__(self, ckpt_path: str | Path, signum: signal.Signals, val_every: int):
        super().__init__(ckpt_path, val_every)
        self.signum = signum
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

    def signalled(self) -> bool:
        return self._pending is not None

    def save(self, trainer) -> None:
        super().save(trainer)
        log.warning("preemption checkpoint at step %d: %s", trainer.global_step, self.ckpt_path)

    def stop(self, trainer) -> None:
        signum, frame = self._pending or (self.signum, None)
        self._pending = None
        previous = self._uninstall()
        if callable(previous):  # rank 0: submitit requeues and exits; the other ranks are stopped with the job
            previous(signum, frame)

    def on_train_end(self, trainer, pl_module) -> None:
        super().on_train_end(trainer, pl_module)
        self._uninstall()

    def on_exception(self, trainer, pl_module, exception) -> None:
        self._uninstall()

    def teardown(self, trainer, pl_module, stage: str) -> None:
        self._uninstall()


class InterruptCheckpoint(StopAtStepBoundary):
    """SIGTERM and SIGINT (Ctrl-C) during training: save `ckpt_path` at a step boundary, then stop (non-zero exit).

    SIGTERM: Lightning's own handler stops every rank together between two steps, after the step's validation
    (SIGTERMException); the state is whole then, and saved here. SIGINT: Python would raise KeyboardInterrupt
    wherever training is (in the middle of an optimizer step, say), so during training the signal only sets a flag;
    at the next step boundary (StopAtStepBoundary) every rank agrees to save, then a KeyboardInterrupt stops the fit
    (Lightning exits with status 1). A Ctrl-C in the final validation stops once training has ended, before the
    evaluation. A second Ctrl-C stops at once, without a checkpoint.
    """

    def __init__(self, ckpt_path: str | Path, val_every: int):
        super().__init__(ckpt_path, val_every)
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

    def signalled(self) -> bool:
        return self._pending

    def save(self, trainer) -> None:
        super().save(trainer)
        log.warning("checkpoint on SIGINT at step %d: %s; rerun the command to resume", trainer.global_step,
                    self.ckpt_path)

    def stop(self, trainer) -> None:
        self._pending = False
        self._uninstall()
        raise KeyboardInterrupt(f"stopped on SIGINT after saving {self.ckpt_path}")

    def on_train_end(self, trainer, pl_module) -> None:
        try:
            super().on_train_end(trainer, pl_module)
        finally:
            self._uninstall()

    def on_exception(self, trainer, pl_module, exception) -> None:
        self._uninstall()
        # SIGTERM (scancel, preemption without submitit's signal, kill): every rank stopped between two steps.
        if isinstance(exception, SIGTERMException) and trainer.state.fn == "fit":
            # Lightning raised it at the very end of the step, after counting the step for its loggers
            # (_batches_that_stepped). A resume from a validated step skips the validation that ran and counts the
            # step again, as it must for a checkpoint saved when the validation ended (every other save of such a
            # step): saved with that count, so the rerun logs every later row at the uninterrupted run's step
            # (docs/pitfalls.md).
            loop = trainer.fit_loop.epoch_loop
            counted = int(validated_at(trainer.global_step, self.val_every) and not trainer.validating
                          and loop._batches_that_stepped == trainer.global_step)
            loop._batches_that_stepped -= counted
            try:
                trainer.save_checkpoint(self.ckpt_path)
            finally:
                loop._batches_that_stepped += counted
            log.warning("checkpoint on SIGTERM at step %d: %s", trainer.global_step, self.ckpt_path)

    def teardown(self, trainer, pl_module, stage: str) -> None:
        self._uninstall()
