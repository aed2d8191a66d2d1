"""One job of a sweep: prepare data, build the recipe, train (resuming), evaluate, record.

Called by the Hydra entry point (src/run.py) with a composed configuration, and by tests directly.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import hydra
import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from omegaconf import DictConfig, OmegaConf, open_dict

from src.config import ConfigError, diff_keys, fingerprint, to_dict
from src.launch.preemption import PreemptionCheckpoint, submitit_signal
from src.launch.strategies import build_strategy
from src.training.callbacks import SaveLastAtEnd
from src.training.checkpoint_io import AtomicCheckpointIO
from src.training.datamodule import ShardDataModule
from src.training.module import FormulationModule
from src.training.progress import TrainingProgress
from src.utils.io import atomic_write_json

log = logging.getLogger(__name__)

DIM_KEYS = ("latent_channels", "latent_size", "context_dim", "pooled_dim")


# ---- configuration checks -------------------------------------------------------------------------
def build_formulation(cfg: DictConfig):
    from src.formulations import from_config

    try:
        return from_config(to_dict(cfg.loss))
    except ValueError as e:
        raise ConfigError(f"loss: {e}") from None


def resolve_data(cfg: DictConfig) -> dict:
    """Locate (or build, for embedded data) the shards and fill the data shape keys from their meta.json."""
    from src.data.shards import read_meta

    data = cfg.data
    if data.kind == "embedded":
        from src.data.embedded import prepare_embedded

        dirs = prepare_embedded(data.name, Path(cfg.paths.cache_dir) / "data")
        train_dir, eval_dir = str(dirs["train"]), str(dirs["eval"])
    elif data.kind == "shards":
        for key in ("train_dir", "eval_dir"):
            if OmegaConf.is_missing(data, key):
                raise ConfigError(f"data.{key} is not set: a folder of shards (python -m src.preprocess ...)")
        train_dir, eval_dir = data.train_dir, data.eval_dir
        for key, path in (("data.train_dir", train_dir), ("data.eval_dir", eval_dir)):
            if not (Path(path) / "meta.json").exists():
                raise ConfigError(f"{key}={path}: no webdataset shard folder there (meta.json missing)")
    else:
        raise ConfigError(f"data.kind={data.kind!r}: allowed values are 'embedded', 'shards'")
    meta = read_meta(train_dir)
    with open_dict(cfg):
        cfg.data.train_dir, cfg.data.eval_dir = train_dir, eval_dir
        for key in DIM_KEYS:
            if cfg.data[key] is None:
                cfg.data[key] = meta[key]
            elif int(cfg.data[key]) != int(meta[key]):
                raise ConfigError(f"data.{key}={cfg.data[key]}: the shards in {train_dir} have {meta[key]}")
    return meta


def check_values(cfg: DictConfig) -> None:
    """Numeric settings in range, or a one-line error naming the setting, its value and what is allowed."""
    integer, number = (int,), (int, float)
    checks = [  # key, allowed types, test, what is allowed
        ("train.max_steps", integer, lambda v: v >= 1, ">= 1"),
        ("train.ema_every", integer, lambda v: v >= 1, ">= 1"),
        ("train.ema_decay", number, lambda v: 0.0 <= v < 1.0, "in [0, 1)"),
        ("train.cond_dropout", number, lambda v: 0.0 <= v < 1.0, "in [0, 1)"),
        ("train.val_levels", integer, lambda v: v >= 2, ">= 2"),
        ("train.val_every", integer, lambda v: v >= 1, ">= 1"),
        ("train.ckpt_every", integer, lambda v: v >= 1, ">= 1 (resume starts from the last checkpoint)"),
        ("optim.lr", number, lambda v: v > 0, "> 0"),
        ("data.batch_size", integer, lambda v: v >= 1, ">= 1"),
        ("data.val_samples", integer, lambda v: v >= 1, ">= 1"),
        ("seed", integer, lambda v: v >= 0, ">= 0"),
    ]
    if cfg.eval.enabled:  # checked before training, not found out when the evaluation starts
        checks += [
            ("eval.n_samples", integer, lambda v: v >= 2, ">= 2 (FID needs two samples)"),
            ("eval.batch_size", integer, lambda v: v >= 1, ">= 1"),
            ("eval.seed", integer, lambda v: v >= 0, ">= 0"),
            ("eval.shift", number, lambda v: v > 0, "> 0"),
        ]
        for i in range(len(cfg.eval.settings)):
            checks += [(f"eval.settings.{i}.steps", integer, lambda v: v >= 1, ">= 1"),
                       (f"eval.settings.{i}.cfg", number, lambda v: v >= 0, ">= 0")]
        checks += [(f"eval.ema.{i}", (bool,), lambda v: True, "(true or false)") for i in range(len(cfg.eval.ema))]
    for key, types, ok, allowed in checks:
        value = OmegaConf.select(cfg, key)
        kind = {integer: "an integer", number: "a number", (bool,): "a boolean"}[types]
        if (isinstance(value, bool) and types != (bool,)) or not isinstance(value, types) or not ok(value):
            raise ConfigError(f"{key}={value}: must be {kind} {allowed}")


def check_fingerprint(cfg: DictConfig, run_dir: Path) -> None:
    """A run directory belongs to one configuration: resuming with another one is an error, not a silent mix.

    Only once something was trained or evaluated there: a launch that failed before its first checkpoint (a typo in
    a setting, a missing file) leaves nothing to protect, and its fingerprint is replaced by the next launch's.
    """
    path = run_dir / "fingerprint.json"
    fp = json.loads(json.dumps(fingerprint(cfg), default=str))
    worked = any((run_dir / "checkpoints").glob("*.ckpt")) or (run_dir / "results.json").exists()
    if path.exists() and worked:
        old = json.loads(path.read_text())
        changed = diff_keys(old, fp)
        if changed:
            raise ConfigError(
                f"{run_dir} holds a run with a different configuration ({', '.join(changed[:5])}); "
                "use another sweep_name, give this configuration its own directory with run_tag=/<label>, "
                "or delete the directory"
            )
    if not path.exists() or not worked:
        atomic_write_json(path, fp)


# ---- building -------------------------------------------------------------------------------------
def build_backbone(cfg: DictConfig) -> torch.nn.Module:
    try:
        return hydra.utils.instantiate(cfg.model)
    except Exception as e:  # instantiate wraps constructor errors; surface the model's own message
        cause = e.__cause__ or e
        raise ConfigError(f"model: {cause}") from None


def build_module(cfg: DictConfig, formulation, backbone, meta: dict | None = None) -> FormulationModule:
    o, t = cfg.optim, cfg.train
    # Which context tokens / pooled channels belong to which text encoder, for per-encoder dropout.
    groups = to_dict(t.cond_groups) if t.get("cond_groups") else (meta or {}).get("text_groups")
    return FormulationModule(
        formulation, backbone, lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay,
        warmup_steps=o.warmup_steps, ema_every=t.ema_every, ema_decay=t.ema_decay, cond_dropout=t.cond_dropout,
        cond_groups=groups,
        val_levels=t.val_levels, seed=cfg.seed, compile=getattr(backbone, "compile_requested", False),
    )


def build_loggers(cfg: DictConfig, run_dir: Path) -> list:
    from lightning.pytorch.loggers import CSVLogger

    loggers = []
    if cfg.logger.csv:
        loggers.append(CSVLogger(save_dir=str(run_dir), name="csv", version=""))
    w = cfg.logger.wandb
    if w.enabled and os.environ.get("WANDB_MODE", w.mode) != "disabled":
        from lightning.pytorch.loggers import WandbLogger

        # Offline unless the user configures otherwise; credentials come from the environment, never the config.
        mode = os.environ.get("WANDB_MODE", w.mode)
        loggers.append(
            WandbLogger(
                project=w.project, entity=w.entity, group=cfg.sweep_name, name=cfg.run_name, save_dir=str(run_dir),
                offline=mode == "offline", mode=mode, id=_wandb_id(run_dir), resume="allow",
                job_type="train", config=to_dict(cfg),
            )
        )
    return loggers


def _wandb_id(run_dir: Path) -> str:
    """A stable W&B run id per run directory, so a resumed job continues its W&B run."""
    import hashlib

    return hashlib.sha1(str(run_dir.resolve()).encode()).hexdigest()[:16]


def cluster_plugins() -> list:
    """Under SLURM: Lightning's SLURM environment without its own requeue (SIGUSR1); submitit owns requeue."""
    from lightning.pytorch.plugins.environments import SLURMEnvironment

    return [SLURMEnvironment(auto_requeue=False)] if SLURMEnvironment.detect() else []


def build_trainer(cfg: DictConfig, run_dir: Path, callbacks: list, loggers: list) -> L.Trainer:
    tr = cfg.trainer
    precision = tr.precision or ("bf16-mixed" if torch.cuda.is_available() and tr.accelerator != "cpu" else "32-true")
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
def results_complete(cfg: DictConfig, run_dir: Path) -> bool:
    from src.evaluation.records import read_results

    if not cfg.eval.enabled:
        return (run_dir / "checkpoints" / "last.ckpt").exists() and _finished_training(cfg, run_dir)
    records = read_results(run_dir)
    have = {(r["steps"], float(r["cfg"]), bool(r["ema"])) for r in records}
    want = {(s["steps"], float(s["cfg"]), bool(e)) for s in cfg.eval.settings for e in cfg.eval.ema}
    return want <= have


def _finished_training(cfg: DictConfig, run_dir: Path) -> bool:
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    return ckpt.get("global_step", 0) >= cfg.train.max_steps


def run_job(cfg: DictConfig, run_dir: str | Path) -> dict:
    """Train and evaluate one recipe in `run_dir`; resume from its last checkpoint; skip if already complete."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    check_values(cfg)
    formulation = build_formulation(cfg)
    meta = resolve_data(cfg)
    check_fingerprint(cfg, run_dir)
    if results_complete(cfg, run_dir):
        log.info("%s: results complete, nothing to do", run_dir)
        return {"run_dir": str(run_dir), "skipped": True}

    if torch.cuda.is_available():
        torch.set_float32_matmul_precision("high")  # TF32 for the fp32 parts of bf16-mixed training
    if cfg.get("torch_threads"):
        torch.set_num_threads(int(cfg.torch_threads))
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    backbone = build_backbone(cfg)
    module = build_module(cfg, formulation, backbone, meta)
    datamodule = ShardDataModule(
        cfg.data.train_dir, cfg.data.eval_dir, batch_size=cfg.data.batch_size, seed=cfg.seed,
        in_memory=cfg.data.in_memory, num_workers=cfg.data.num_workers, val_samples=cfg.data.val_samples,
    )
    ckpt_dir = run_dir / "checkpoints"
    # step/max_steps, loss, steps/s and time left (src/training/progress.py), in place of Lightning's own bar.
    callbacks = [TrainingProgress()] if cfg.trainer.enable_progress_bar else []
    callbacks += [
        # `last.ckpt` every ckpt_every steps (resume), and the lowest EMA validation loss (model selection).
        ModelCheckpoint(dirpath=ckpt_dir, filename="step{step:06d}", auto_insert_metric_name=False,
                        every_n_train_steps=cfg.train.ckpt_every, save_top_k=0, save_last=True),
        ModelCheckpoint(dirpath=ckpt_dir, filename="best", monitor="val_ema/loss_mean", mode="min",
                        save_top_k=1, auto_insert_metric_name=False, enable_version_counter=False),
        SaveLastAtEnd(ckpt_dir / "last.ckpt"),
    ]
    preempt_signal = submitit_signal()
    if preempt_signal is not None:  # a submitit SLURM job: checkpoint at the step boundary before a requeue
        callbacks.append(PreemptionCheckpoint(ckpt_dir / "last.ckpt", preempt_signal))
    if cfg.eval.enabled:
        from src.evaluation.callback import EvaluationCallback

        callbacks.append(EvaluationCallback(cfg, run_dir, meta))
    loggers = build_loggers(cfg, run_dir)
    trainer = build_trainer(cfg, run_dir, callbacks, loggers)
    last = ckpt_dir / "last.ckpt"
    trainer.fit(module, datamodule=datamodule, ckpt_path=str(last) if last.exists() else None)
    return {"run_dir": str(run_dir), "skipped": False, "global_step": trainer.global_step}
