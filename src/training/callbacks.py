"""Small training callbacks."""

from __future__ import annotations

from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import Checkpoint, ModelCheckpoint


class SaveLastAtEnd(L.Callback):
    """Write `last.ckpt` when training ends, whatever ckpt_every is: a finished run is then recognisably finished,
    and an interruption during the evaluation that follows never retrains."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._at_end = False

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._at_end = True
        trainer.save_checkpoint(str(self.path), weights_only=False)

    def state_dict(self) -> dict:
        return {"saved_at_end": self._at_end}

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        """A run trained longer goes on from the checkpoint saved at its end, in which Lightning has counted the last
        step's batch already (in those saved during training it has not, and adds it when resuming): without this,
        its logged steps (metrics.csv, W&B) would run one ahead of the run trained straight."""
        if checkpoint.get("callbacks", {}).get(self.state_key, {}).get("saved_at_end"):
            checkpoint["loops"]["fit_loop"]["epoch_loop.state_dict"]["_batches_that_stepped"] -= 1


def validated_at(step: int, val_every: int) -> bool:
    """Whether Lightning validates after training step `step` (val_check_interval=val_every, counted in steps)."""
    return step % val_every == 0


class BestCheckpoint(ModelCheckpoint):
    """Lightning's ModelCheckpoint (save_top_k=1, no save_last) that also remembers the step of the checkpoint it
    chose, `best_model_step` in its state (saved in last.ckpt with the rest): where best.ckpt is lost, the evaluation
    names that model and still tells its records apart (src/evaluation/run.py select_checkpoint, checkpoint_step).
    Its state keeps ModelCheckpoint's key, so runs checkpointed before this class resume their best score."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.best_model_step: int | None = None

    @property
    def state_key(self) -> str:
        return super().state_key.replace(type(self).__qualname__, ModelCheckpoint.__qualname__, 1)

    def _update_best_and_save(self, current, trainer: L.Trainer, monitor_candidates) -> None:
        self.best_model_step = trainer.global_step  # (called only for a new best) set first: best.ckpt holds it too
        super()._update_best_and_save(current, trainer, monitor_candidates)

    def state_dict(self) -> dict:
        return {**super().state_dict(), "best_model_step": self.best_model_step}

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        self.best_model_step = state_dict.get("best_model_step")


class StepCheckpoint(Checkpoint):
    """Write `last.ckpt` every `every` training steps; at a step that is also validated, after that validation.

    Lightning's ModelCheckpoint(every_n_train_steps) saves when the batch ends, before the step's validation: a job
    killed in between left a checkpoint of step N without step N's validation, and the resumed run never ran it
    (the final step's validation included, so best.ckpt missed it and the evaluation used an older model). Here a
    checkpoint of step N always includes everything due at step N. A Checkpoint, so that Lightning runs it with
    the checkpoint callbacks after all others; list it after the best-checkpoint callback, whose state it saves.
    """

    def __init__(self, path: str | Path, every: int, val_every: int):
        self.path, self.every, self.val_every = Path(path), every, val_every
        self._after_validation: int | None = None

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if self._after_validation is not None:  # a validation that did not run (none is configured to skip)
            self._after_validation = None
            trainer.save_checkpoint(str(self.path), weights_only=False)
        if step % self.every:
            return
        if validated_at(step, self.val_every):
            self._after_validation = step
            return
        trainer.save_checkpoint(str(self.path), weights_only=False)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._after_validation == trainer.global_step and not trainer.sanity_checking:
            self._after_validation = None
            trainer.save_checkpoint(str(self.path), weights_only=False)
