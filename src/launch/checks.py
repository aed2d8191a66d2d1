"""Launch checks that need to know how the job was started, made before any work."""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf

from src.config import ConfigError

# Strategies whose Lightning launcher starts the other ranks by re-running the command line.
_RELAUNCHING = ("ddp", "fsdp", "deepspeed")


def _strategy_name(strategy) -> str:
    if isinstance(strategy, (dict, DictConfig)):
        return str(strategy.get("_target_", "")).rsplit(".", 1)[-1].lower()
    return str(strategy).lower()


def _processes(devices, num_nodes) -> int | None:
    """Ranks the trainer would start; None when it decides itself ('auto', -1)."""
    if isinstance(devices, (list, tuple)) or (hasattr(devices, "__len__") and not isinstance(devices, str)):
        per_node = len(devices)
    elif str(devices).strip().lstrip("-").isdigit():
        per_node = int(devices)
        if per_node < 0:
            return None
    elif isinstance(devices, str) and "," in devices:
        per_node = len([d for d in devices.split(",") if d.strip()])
    else:
        return None
    return per_node * int(num_nodes)


def ranks_started_outside() -> bool:
    """Whether a cluster launcher (SLURM, torchrun) has started this process as one of the ranks."""
    import warnings

    from lightning.fabric.plugins.environments import SLURMEnvironment, TorchElasticEnvironment

    with warnings.catch_warnings():  # detect() warns on any machine with srun (a login node) that it is not used
        warnings.simplefilter("ignore")
        return SLURMEnvironment.detect() or TorchElasticEnvironment.detect()


def check_no_relaunch_in_multirun(cfg: DictConfig, multirun: bool) -> None:
    """Refuse Lightning's own re-launch of the ranks inside a multirun (docs/pitfalls.md: every rank would re-run
    the sweep)."""
    tr = cfg.trainer
    name = _strategy_name(tr.strategy)
    if not multirun or "spawn" in name or "fork" in name or not any(s in name for s in _RELAUNCHING):
        return
    n = _processes(tr.devices, tr.num_nodes)
    if (n is None or n > 1) and not ranks_started_outside():
        raise ConfigError(
            f"trainer.strategy={name} with trainer.devices={tr.devices} in a local multirun: Lightning would re-run "
            "the whole sweep in every rank; use hydra/launcher=slurm (SLURM starts the ranks), "
            "trainer.strategy=ddp_spawn, or a single run"
        )


_SHARDING = ("FULL_SHARD", "SHARD_GRAD_OP", "NO_SHARD", "HYBRID_SHARD")


def check_fsdp(cfg: DictConfig) -> None:
    """The FSDP settings the training module, its EMA update and the evaluation are built and tested for."""
    strategy = cfg.trainer.strategy
    if not isinstance(strategy, (dict, DictConfig)) or "fsdp" not in _strategy_name(strategy):
        return
    sharding = str(strategy.get("sharding_strategy", "FULL_SHARD")).upper()
    if sharding not in _SHARDING:
        raise ConfigError(f"trainer.strategy.sharding_strategy={strategy.sharding_strategy}: allowed: "
                          + ", ".join(_SHARDING))
    if strategy.get("state_dict_type", "full") != "full":
        raise ConfigError(f"trainer.strategy.state_dict_type={strategy.state_dict_type}: allowed: full (the "
                          "evaluation, resume and skip checks read single-file checkpoints)")
    if not strategy.get("use_orig_params", False):
        raise ConfigError(f"trainer.strategy.use_orig_params={strategy.get('use_orig_params')}: allowed: true "
                          "(AdamW and the EMA update work on the backbone's own parameters)")


def check_ranks_for_launcher(cfg: DictConfig) -> None:
    """A sweep launched with several tasks per run (submitit: tasks_per_node x nodes, which the GPU launcher ties to
    gpus_per_node) needs a trainer whose ranks those tasks are; under a one-process trainer every task would run the
    whole training in the same run directory, writing each other's checkpoints. Checked where the configuration has
    Hydra's node (the sweeper's checks before launching); a job's own configuration has none."""
    launcher = OmegaConf.select(cfg, "hydra.launcher", default=None)
    if str(OmegaConf.select(cfg, "hydra.mode", default="")) != "RunMode.MULTIRUN" or launcher is None \
            or launcher.get("tasks_per_node") is None:
        return
    tasks, nodes = int(launcher.tasks_per_node), int(launcher.get("nodes") or 1)
    name = _strategy_name(cfg.trainer.strategy)
    if tasks * nodes > 1 and ("spawn" in name or "fork" in name or not any(s in name for s in _RELAUNCHING)):
        raise ConfigError(
            f"hydra.launcher.tasks_per_node={tasks} (nodes={nodes}) with trainer.strategy={name}: SLURM would start "
            f"{tasks * nodes} copies of this one-process training in one run directory; use trainer=ddp or "
            "trainer=fsdp (SLURM starts their ranks), or one task per run: hydra.launcher.tasks_per_node=1 (it "
            "follows hydra.launcher.gpus_per_node)")


def check_batch_over_ranks(cfg: DictConfig) -> None:
    """data.batch_size is the global batch, split evenly over the ranks (src/training/datamodule.py): one that does
    not divide is refused where the ranks are known (the launcher's tasks before a sweep is submitted, the trainer's
    devices in a job), not once every rank has started and set up its process group."""
    launcher = OmegaConf.select(cfg, "hydra.launcher", default=None)
    tr = cfg.trainer
    if str(OmegaConf.select(cfg, "hydra.mode", default="")) == "RunMode.MULTIRUN" and launcher is not None \
            and launcher.get("tasks_per_node") is not None:
        nodes = int(launcher.get("nodes") or 1)
        ranks, where = int(launcher.tasks_per_node) * nodes, f"hydra.launcher.tasks_per_node={launcher.tasks_per_node}"
        where += f" x nodes={nodes}"
    else:
        ranks, where = _processes(tr.devices, tr.num_nodes), f"trainer.devices={tr.devices} x num_nodes={tr.num_nodes}"
    batch = cfg.data.batch_size
    if ranks is not None and ranks > 1 and batch % ranks:
        raise ConfigError(f"data.batch_size={batch}: the global batch must divide over the {ranks} ranks ({where}); "
                          f"allowed: multiples of {ranks}")


def check_launch(cfg: DictConfig, multirun: bool) -> None:
    """Every launch check, in run.main before the job starts."""
    check_no_relaunch_in_multirun(cfg, multirun)
    check_ranks_for_launcher(cfg)
    check_fsdp(cfg)
    check_batch_over_ranks(cfg)
