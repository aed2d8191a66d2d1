"""One job of a sweep: prepare data, build the recipe, train (resuming), evaluate, record.

Called by the Hydra entry point (src/run.py) with a composed configuration, and by tests directly.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import hydra
import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf

from src.config import to_dict
from src.launch.preemption import InterruptCheckpoint, PreemptionCheckpoint, submitit_signal
from src.launch.rundir import is_launch_rank_zero
from src.launch.strategies import build_strategy
from src.launch.sweeper import EVALUATION_ONLY
from src.results import parse_run_tag
from src.training.callbacks import BestCheckpoint, SaveLastAtEnd, StepCheckpoint
from src.training.checkpoint_io import AtomicCheckpointIO, checkpoint_to_resume
from src.training.datamodule import ShardDataModule
from src.training.module import FormulationModule
from src.training.prepare import (
    CONFIG_FILE, REUSED_FILE, bind_fingerprint, build_formulation, fingerprint_changes, is_bound, model_error,
    prepare_job, resolved_cond_dropout, resolved_precision, run_streams,
)
from src.training.progress import TrainingProgress
from src.utils.io import atomic_write_json, remove_stale_temp_files
from src.utils.progress import evaluation_hook

log = logging.getLogger(__name__)



# ---- building -------------------------------------------------------------------------------------
def build_backbone(cfg: DictConfig) -> torch.nn.Module:
    try:
        return hydra.utils.instantiate(cfg.model)
    except Exception as e:  # instantiate wraps constructor errors; surface the model's own message
        raise model_error(cfg.model, e) from None


def build_module(cfg: DictConfig, formulation, backbone, meta: dict | None = None, streams: int | None = None
                 ) -> FormulationModule:
    o, t = cfg.optim, cfg.train
    # Which context tokens / pooled channels belong to which text encoder, for per-encoder dropout (a list: to_dict
    # made {first key: second key} of it, and the first training step failed).
    groups = OmegaConf.to_container(t.cond_groups, resolve=True) if t.cond_groups else (meta or {}).get("text_groups")
    # model.compile and compile_backend: the backbone's record of them where it keeps one (src/models/backbone.py);
    # a backbone of your own takes them as keys it does not read, and is compiled whole as they ask (docs/backbone.md).
    compile_mode = getattr(backbone, "compile_requested", OmegaConf.select(cfg, "model.compile", default=False))
    compile_backend = getattr(backbone, "compile_backend",
                              OmegaConf.select(cfg, "model.compile_backend", default="default"))
    return FormulationModule(
        formulation, backbone, lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay,
        warmup_steps=o.warmup_steps, ema_every=t.ema_every, ema_decay=t.ema_decay,
        cond_dropout=resolved_cond_dropout(cfg, meta or {}), cond_groups=groups, val_levels=t.val_levels,
        shift=t.get("shift", 1.0), seed=cfg.seed, compile=compile_mode, compile_backend=compile_backend,
        fused=o.get("fused", "auto"), loss_check_every=t.get("loss_check_every", "auto"),
        val_chunk=cfg.data.batch_size,
        **({} if streams is None else {"streams": streams}),
    )


def build_loggers(cfg: DictConfig, run_dir: Path) -> list:
    from src.training.metrics_log import ResumableCSVLogger

    loggers = []
    if cfg.logger.csv:  # csv/metrics.csv: every attempt's rows (a resume appends; read with read_metrics)
        loggers.append(ResumableCSVLogger(save_dir=str(run_dir), name="csv", version=""))
    w = cfg.logger.wandb
    if w.enabled and os.environ.get("WANDB_MODE", w.mode) != "disabled":
        import wandb
        from lightning.pytorch.loggers import WandbLogger

        from src.utils.wandb_git import wandb_git_settings

        # Offline unless the user configures otherwise; credentials come from the environment, never the config.
        mode = os.environ.get("WANDB_MODE", w.mode)
        # The git remote URL without a token W&B would keep (a token as the URL's user name: src/utils/wandb_git.py).
        git = wandb_git_settings()
        loggers.append(
            WandbLogger(
                project=w.project, entity=w.entity, group=cfg.sweep_name, name=cfg.run_name, save_dir=str(run_dir),
                offline=mode == "offline", mode=mode, id=_wandb_id(run_dir), resume="allow",
                job_type="train", config=to_dict(cfg), **({"settings": wandb.Settings(**git)} if git else {}),
            )
        )
    return loggers


def _wandb_id(run_dir: Path) -> str:
    """The W&B run id of the run directory's earlier attempts (wandb/[offline-]run-<time>-<id>), so a resumed job
    continues its W&B run; a new one for a directory W&B never ran in (a hash of the path would resume an old W&B
    run of a deleted directory at the same path, mixing its history with this training's)."""
    import secrets

    earlier = sorted((run_dir / "wandb").glob("*run-*-*"), key=lambda p: p.name.split("run-", 1)[1])
    return earlier[-1].name.rsplit("-", 1)[1] if earlier else secrets.token_hex(8)


def cluster_plugins() -> list:
    """Under SLURM: Lightning's SLURM environment without its own requeue (SIGUSR1); submitit owns requeue."""
    from lightning.pytorch.plugins.environments import SLURMEnvironment

    return [SLURMEnvironment(auto_requeue=False)] if SLURMEnvironment.detect() else []


def build_trainer(cfg: DictConfig, run_dir: Path, callbacks: list, loggers: list) -> L.Trainer:
    tr = cfg.trainer
    precision = resolved_precision(tr)
    return L.Trainer(
        default_root_dir=str(run_dir), accelerator=tr.accelerator, devices=tr.devices, num_nodes=tr.num_nodes,
        strategy=build_strategy(tr.strategy), precision=precision, deterministic=tr.deterministic,
        max_steps=cfg.train.max_steps,
        max_epochs=-1, val_check_interval=cfg.train.val_every, check_val_every_n_epoch=None,
        num_sanity_val_steps=0, limit_val_batches=1.0, log_every_n_steps=tr.log_every_n_steps,
        enable_progress_bar=tr.enable_progress_bar, gradient_clip_val=tr.gradient_clip_val,
        callbacks=callbacks, logger=loggers or False, plugins=[AtomicCheckpointIO(), *cluster_plugins()],
        enable_model_summary=False,
    )


# ---- the job ----------------------------------------------------------------------------------------
def training_finished(cfg: DictConfig, run_dir: Path) -> bool:
    """last.ckpt holds the final step (an unreadable one counts as not finished: the trainer resumes or fails)."""
    try:
        last = checkpoint_to_resume(run_dir / "checkpoints", repair=False)  # last.ckpt, else last.prev.ckpt
        if last is None:
            return False
        ckpt = torch.load(last, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # a truncated or foreign file
        return False
    return int(ckpt.get("global_step", 0)) >= cfg.train.max_steps


def _run_tags(run_dir: Path) -> dict | None:
    """The swept values of the run in run_dir (its config.yaml's run_tag); None when unreadable."""
    try:
        return parse_run_tag(OmegaConf.load(run_dir / CONFIG_FILE).get("run_tag", ""))
    except Exception:  # noqa: BLE001 (a missing or foreign file: not a twin)
        return None


def trained_twin(cfg: DictConfig, run_dir: Path) -> Path | None:
    """A sibling run directory of the same sweep that finished training exactly this model: the same fingerprint,
    and swept values that differ only in evaluation settings (`-m sampler=rf_time,native`, `eval.n_samples=...`).
    Those get their own directories and ranked entries but need not train again. Runs without swept values (a
    deliberate retraining in another directory, e.g. to check determinism) are never twins."""
    tags = parse_run_tag(cfg.get("run_tag", ""))
    if not tags:
        return None
    siblings = [p for p in run_dir.parent.iterdir() if p.is_dir() and p != run_dir]
    # The directory that trained comes before those that reuse it, so reused_training.json names the trainer.
    for twin in sorted(siblings, key=lambda p: ((p / REUSED_FILE).exists(), p.name)):
        other = _run_tags(twin)
        if not other or set(other) != set(tags):
            continue
        differing = [k for k in tags if str(other[k]) != str(tags[k])]
        if not all(k.startswith(EVALUATION_ONLY) for k in differing):
            continue
        if (twin / "fingerprint.json").is_file() and is_bound(twin) and not fingerprint_changes(cfg, twin) \
                and training_finished(cfg, twin):
            return twin
    return None


def reuse_training(cfg: DictConfig, run_dir: Path) -> Path | None:
    """Link (else copy) a trained twin's checkpoints into run_dir, which has none yet, so only the evaluation runs.

    The checkpoints land in a temporary directory renamed into place, so an interruption leaves either none (the
    rerun looks again) or all. Off with reuse_training=false. In a multi-process job only rank 0 links; the others
    get the twin too (run_job lets rank 0 alone evaluate)."""
    ckpt_dir = run_dir / "checkpoints"
    if not cfg.get("reuse_training", True) or is_bound(run_dir):
        return None
    twin = trained_twin(cfg, run_dir)
    if twin is None or not is_launch_rank_zero():
        return twin
    staging = run_dir / ".checkpoints.reuse.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    for src in sorted((twin / "checkpoints").glob("*.ckpt")):
        try:
            os.link(src, staging / src.name)  # checkpoints are replaced by rename, never rewritten: a link is safe
        except OSError:
            shutil.copy2(src, staging / src.name)
    shutil.rmtree(ckpt_dir, ignore_errors=True)  # holds no checkpoint (nothing is bound): left by a failed launch
    os.replace(staging, ckpt_dir)
    atomic_write_json(run_dir / REUSED_FILE, {"checkpoints_from": str(twin.resolve())})
    log.info("%s: reusing the model trained in %s (the same training configuration); evaluating only", run_dir, twin,
             extra={"console": True})
    return twin


def run_job(cfg: DictConfig, run_dir: str | Path) -> dict:
    """Train and evaluate one recipe in `run_dir`; resume from its last checkpoint; when training is finished,
    evaluate only what results.json lacks (never retrain); skip if complete."""
    run_dir = Path(run_dir)
    meta = prepare_job(cfg, run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if is_launch_rank_zero():  # the job owns run_dir (its lock): no live writer holds a temp file there
        for path in remove_stale_temp_files(run_dir):
            log.info("removed %s, left by an interrupted write", path)
        # Rank 0 alone: another rank's temp file of the same write could be removed above, failing its rename.
        bind_fingerprint(cfg, run_dir)
    formulation = build_formulation(cfg)
    twin = reuse_training(cfg, run_dir)

    if twin is not None or training_finished(cfg, run_dir):
        from src.evaluation.run import describe, evaluate_run, missing_for, select_checkpoint

        if not is_launch_rank_zero():  # evaluation is one process's work: the job's other ranks end here
            log.info("%s: training is done; rank 0 evaluates", run_dir)
            return {"run_dir": str(run_dir), "skipped": True}

        missing = missing_for(cfg, run_dir, formulation, meta)
        if not missing:
            log.info("%s: results complete, nothing to do", run_dir)
            return {"run_dir": str(run_dir), "skipped": True}
        # A checkpoint to evaluate, before saying the job evaluates (a lost best.ckpt is named instead).
        select_checkpoint(run_dir, str(OmegaConf.select(cfg, "eval.checkpoint", default="best")))
        if twin is None:  # (a reused training said so already)
            log.info("%s: results for %s missing: evaluating, training is done", run_dir,
                     describe(cfg, run_dir, missing), extra={"console": True})
        _torch_settings(cfg)
        loggers = build_loggers(cfg, run_dir)  # the CSV logger appends (src/training/metrics_log.py)
        evaluate_run(cfg, run_dir, loggers=loggers, meta=meta, on_setting=evaluation_hook())
        for lg in loggers:
            lg.finalize("success")
        return {"run_dir": str(run_dir), "skipped": False, "evaluated_only": True}

    _torch_settings(cfg)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    backbone = build_backbone(cfg)
    streams = run_streams(run_dir)  # a run bound before today's streams resumes with its own draws
    module = build_module(cfg, formulation, backbone, meta, streams)
    datamodule = ShardDataModule(
        cfg.data.train_dir, cfg.data.eval_dir, batch_size=cfg.data.batch_size, seed=cfg.seed,
        in_memory=cfg.data.in_memory, num_workers=cfg.data.num_workers, val_samples=cfg.data.val_samples,
        streams=streams,
    )
    ckpt_dir = run_dir / "checkpoints"
    # step/max_steps, loss, steps/s and time left (src/training/progress.py), in place of Lightning's own bar.
    callbacks = [TrainingProgress()] if cfg.trainer.enable_progress_bar else []
    callbacks += [
        # The lowest EMA validation loss (model selection), and `last.ckpt` every ckpt_every steps (resume).
        BestCheckpoint(dirpath=ckpt_dir, filename="best", monitor="val_ema/loss_mean", mode="min",
                       save_top_k=1, auto_insert_metric_name=False, enable_version_counter=False),
        StepCheckpoint(ckpt_dir / "last.ckpt", every=cfg.train.ckpt_every, val_every=cfg.train.val_every),
        SaveLastAtEnd(ckpt_dir / "last.ckpt"),
    ]
    # SIGTERM, Ctrl-C: save, stop; a rerun resumes
    callbacks.append(InterruptCheckpoint(ckpt_dir / "last.ckpt", val_every=cfg.train.val_every))
    preempt_signal = submitit_signal()
    if preempt_signal is not None:  # a submitit SLURM job: checkpoint at the step boundary before a requeue
        callbacks.append(PreemptionCheckpoint(ckpt_dir / "last.ckpt", preempt_signal, val_every=cfg.train.val_every))
    if cfg.eval.enabled:  # evaluate_run on rank 0, on the trainer's device, once fit has finished
        from src.evaluation.callback import EvaluationCallback

        callbacks.append(EvaluationCallback(cfg, run_dir, meta, on_setting=evaluation_hook()))
    loggers = build_loggers(cfg, run_dir)
    trainer = build_trainer(cfg, run_dir, callbacks, loggers)
    resume = checkpoint_to_resume(ckpt_dir)  # last.ckpt, or the previous one if it is unreadable
    trainer.fit(module, datamodule=datamodule, ckpt_path=str(resume) if resume is not None else None)
    return {"run_dir": str(run_dir), "skipped": False, "global_step": trainer.global_step}


def _torch_settings(cfg: DictConfig) -> None:
    if torch.cuda.is_available():
        torch.set_float32_matmul_precision("high")  # TF32 for the fp32 parts of bf16-mixed training
    if cfg.get("torch_threads"):
        torch.set_num_threads(int(cfg.torch_threads))
