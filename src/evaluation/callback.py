"""The evaluation after training, as a Lightning callback: a thin wrapper around src.evaluation.run.evaluate_run.

It only supplies what the trainer knows: rank 0 evaluates, on the trainer's device (by on_fit_end Lightning's
teardown has moved the module to the CPU), and the metrics go to the trainer's loggers. The feature extractors
live in the evaluation, not in the LightningModule, so they never end up in checkpoints or in the EMA copy.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
from omegaconf import DictConfig

from src.evaluation.run import check_eval_files, evaluate_run


class EvaluationCallback(L.Callback):
    """Runs evaluate_run once training has finished."""

    def __init__(self, cfg: DictConfig, run_dir: Path, meta: dict | None = None, on_setting=None):
        check_eval_files(cfg.eval)
        self.cfg, self.run_dir, self.meta, self.on_setting = cfg, Path(run_dir), meta, on_setting

    def on_fit_end(self, trainer: L.Trainer, pl_module) -> None:
        if trainer.global_rank != 0:
            return
        self.evaluate(trainer.loggers, device=trainer.strategy.root_device)

    def evaluate(self, loggers=(), device=None) -> list[dict]:
        return evaluate_run(self.cfg, self.run_dir, device=device, on_setting=self.on_setting, loggers=loggers,
                            meta=self.meta)
