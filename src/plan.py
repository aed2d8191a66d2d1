"""Planning mode: the jobs a sweep would launch, each with its training FLOPs and GPU-hours; launches nothing.

    python -m src.plan +sweep=paper_grid
    python -m src.plan +sweep=paper_embedded --peak-tflops 989 --mfu 0.4
    python -m src.plan 'loss=rf,edm' model=dit --flops 6nt

Every argument that is not a --option is a Hydra override, exactly as for `python -m src.run`. The job list is
Hydra's own expansion (the basic sweeper over the sweep file's hydra.sweeper.params plus the command line).

FLOPs of a job. The forward FLOPs per sample are counted on the meta device (torch.utils.flop_counter over one
forward of the configured backbone: every matmul, attention included; no memory is allocated), the backward costs
twice the forward, so training is 3 x forward x global batch x steps. `--flops 6nt` uses the rule of thumb instead:
6 x params x tokens per sample plus attention (12 x depth x tokens^2 x hidden), tokens = image patches + text
tokens. The rule overestimates MM-DiT about 2.8x: each token meets only its own stream's weights, and the adaLN
weights act on one vector per sample, not per token. Validation (every val_every steps, raw and EMA, at every
level) and evaluation (every sampler setting, x2 with guidance, raw and EMA) add forward passes; they are shown
apart. GPU-hours = FLOPs / (peak x utilisation) / 3600, at the stated peak (default: H100 SXM dense bf16, 989
TFLOP/s) and model FLOPs utilisation: --mfu, else the MFU measured by `make bench-gpu` (bench/results/gpu.md) for
each job's own configuration (depth, per-GPU batch, throughput settings: a sweep over backbones or depths plans each
job at its own) when the measured device is the one --gpu names (whole words of its name, case and "NVIDIA" aside:
H200 or h200 is an "NVIDIA H200", H1 or A is no device), else 37% (the paper grid's launch, d = 15 at batch 128
with the GPU defaults, measured 37.1% on an H200; an H100 has the same bf16 peak and less memory bandwidth, so expect
no more there). The plan says which, and why it used the default.

The status column reads the run directory with the job's own rules: done (trained, and every record the configuration
wants is in results.json: a relaunch skips it), to evaluate (trained, but records of these evaluation settings are
missing: a relaunch evaluates without retraining), best.ckpt missing (to evaluate, but the checkpoint validation chose
was deleted or lost: a relaunch fails saying so; restore it, or evaluate last.ckpt with eval.checkpoint=last),
results.json unreadable (to evaluate, but a relaunch fails naming the file: delete it), best.ckpt unreadable (or
last.ckpt with eval.checkpoint=last: to evaluate, but a relaunch fails naming it), resume (a checkpoint before the last
step), extend 8 -> 12 steps (a run relaunched with only a larger train.max_steps: a relaunch trains it on from its last
checkpoint and evaluates the new step), cannot resume (last.ckpt unreadable, and no readable last.prev.ckpt: a relaunch
fails naming it; delete the checkpoints folder to train anew), to train, refused: changed configuration (the directory
holds a run of another configuration: a relaunch does not run the job, it is recorded in the sweep's failures.json and
the directory left as it is; refused: fingerprint.json unreadable: the same, naming the file), failed (error.json; a
relaunch trains anew) or failed: <status> (error.json; a relaunch removes it and does what <status> says; a finished run
is done), new; to evaluate (trained in TWIN) or (after TWIN trains) for a job that differs from a sibling only in
evaluation settings (a sampler sweep): it evaluates the sibling's model (src/launch/sweeper.py training_waves).
"GPU-hours in all" counts each model's training and validation once; "still to run" counts what a relaunch runs: no
training or validation for trained or reused models, the steps left (and their validation) for a resume or an extension,
and the evaluation of every job not done: for a trained run, only the records results.json lacks; nothing for a refused
job, which the plan names apart with what training it anew would cost, nor for a blocked one (best.ckpt missing, a file
unreadable, cannot resume: a relaunch fails naming the file), which it names apart with what it costs once the file is
restored or deleted.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from omegaconf import DictConfig, OmegaConf, open_dict

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
H100_BF16_DENSE_TFLOPS = 989.0
#: The status of a job a relaunch refuses (its directory holds a run of another configuration): nothing runs.
REFUSED = "refused: "
#: The status of a job whose run a relaunch trains longer, from its last checkpoint ("extend 8 -> 12 steps").
EXTEND = "extend "
#: Statuses (after "failed: ") of a job whose relaunch fails naming a damaged or missing file: nothing runs until the
#: file is restored or deleted; then what the status says (evaluate a trained run, or train anew for "cannot resume").
TRAINED_BLOCKED = ("best.ckpt missing", "results.json unreadable", "best.ckpt unreadable", "last.ckpt unreadable")
BLOCKED = (*TRAINED_BLOCKED, "cannot resume")
DEFAULT_MFU = 0.37  # the paper grid's launch measured on an H200 (bench/results/gpu.md)
GPU_RESULTS = CONF_DIR.parent / "bench" / "results" / "gpu.md"  # written by make bench-gpu
# What the paper's setup feeds the backbone at 256^2 (docs/backbone.md#backbone-mm-dit, docs/training.md#paper-setup; bench/results/backbone.md): SD3-style latents
# (factor 8, 16 channels), CLIP + T5 context (77 + 77 tokens x 4096), pooled CLIP L + bigG (2048). Used for the keys
# a configuration leaves null when its shards' meta.json is not at hand, and stated in the plan.
PAPER_SHAPES = {"latent_channels": 16, "latent_size": 32, "context_dim": 4096, "pooled_dim": 2048,
                "context_length": 154}


def extends(status: str) -> bool:
    """Whether a relaunch trains the job's run longer (extend, or failed: extend)."""
    return status.removeprefix("failed: ").startswith(EXTEND)


@dataclass
class JobPlan:
    """One job of a sweep and what it costs."""

    index: int
    overrides: list[str]
    run_dir: Path
    model: str
    params: int
    image_tokens: int
    text_tokens: int
    batch_size: int
    steps: int
    gpus: int
    fwd_flops_per_sample: float
    train_flops: float
    eval_flops: float  # validation + evaluation sampling
    status: str
    assumptions: list[str] = field(default_factory=list)
    data_checks: list[str] = field(default_factory=list)  # what the shard folders hold unlike the paper's setup
    trains_here: bool = True  # False: the job evaluates a sibling's model (reuse_training)
    train_left: float = 1.0  # share of the training a relaunch still runs (0 when trained, resume: the steps left)
    val_flops: float = 0.0  # the validation in eval_flops: run by the training (with its share left), not by a reuse
    sampling_left: float | None = None  # the evaluation a relaunch runs: a trained run's missing records (None: all)
    wave: int = 1  # 2: launched when the first wave is over (src/launch/sweeper.py training_waves)
    mfu: float = DEFAULT_MFU  # the utilisation its GPU-hours are planned at (launch_mfu: of its own configuration)
    mfu_source: str = ""  # where mfu comes from, as the plan says it
    requests_gpus: bool = True  # False: a SLURM launcher asking for no GPUs (hydra/launcher=slurm_cpu)

    @property
    def tokens(self) -> int:
        return self.image_tokens + self.text_tokens

    @property
    def sampling_flops(self) -> float:
        return self.eval_flops - self.val_flops

    @property
    def total_flops(self) -> float:
        """What the job costs in the sweep: its training and validation (unless it evaluates a sibling's model) and
        evaluation."""
        return (self.train_flops + self.val_flops) * self.trains_here + self.sampling_flops

    @property
    def refused(self) -> bool:
        """A relaunch does not run the job: its directory holds another configuration's run (job_status)."""
        return self.status.startswith(REFUSED)

    @property
    def blocked(self) -> bool:
        """A relaunch fails naming a file of the run directory (BLOCKED): nothing runs until it is restored or
        deleted."""
        return self.status.removeprefix("failed: ").startswith(BLOCKED)

    @property
    def flops_left(self) -> float:
        """What a relaunch still runs: the training (and its validation) left and, unless the job is done (or
        refused), the evaluation (of a trained run: the records it lacks). Of a blocked job: what runs once its
        file is restored or deleted."""
        sampling = self.sampling_flops if self.sampling_left is None else self.sampling_left
        runs = self.status != "done" and not self.refused
        return (self.train_flops + self.val_flops) * self.train_left + (sampling if runs else 0.0)

    def set_status(self, status: str, run_dir_step: int | None = None) -> None:
        """The status and what it leaves to run: a twin's training or a finished one leaves none, resume (or
        extend) the steps after run_dir_step."""
        self.status = status
        self.trains_here = not status.startswith("to evaluate (")
        runs = status.removeprefix("failed: ")  # a failed run's relaunch goes on from what it left
        if runs in ("done", "to evaluate", *TRAINED_BLOCKED) or not self.trains_here or status.startswith(REFUSED):
            self.train_left = 0.0
        elif (runs == "resume" or extends(status)) and run_dir_step is not None and self.steps > 0:
            self.train_left = min(1.0, max(0.0, 1.0 - run_dir_step / self.steps))
        else:
            self.train_left = 1.0
        from src.training.prepare import REUSED_FILE

        if self.train_left == 0.0 and (self.run_dir / REUSED_FILE).is_file():
            self.trains_here = False  # it evaluated a sibling's model (reuse_training): that training counts once


@dataclass
class Plan:
    jobs: list[JobPlan]
    peak_tflops: float
    flops_method: str
    parallelism: int | None  # jobs at once (the launcher's array_parallelism); None: one after the other
    not_launched: list[str] = field(default_factory=list)  # jobs that name another job's run directory
    refused_before_launch: list[str] = field(default_factory=list)  # invalid jobs, a line per cause (grouped)
    fail_fast: bool = False  # src.run launches none of the jobs when one is refused before launch

    @property
    def mfu(self) -> float | None:
        """The utilisation every job is planned at; None where the jobs' configurations differ in it."""
        values = {j.mfu for j in self.jobs} or {DEFAULT_MFU}
        return values.pop() if len(values) == 1 else None

    @property
    def mfu_source(self) -> str:
        """Where the jobs' utilisation comes from: one source, or each with the jobs (#) it is of."""
        jobs: dict[str, list[str]] = {}
        for j in self.jobs:
            jobs.setdefault(j.mfu_source, []).append(str(j.index))
        if len(jobs) == 1:
            return next(iter(jobs))
        return "; ".join(f"{source} (job{'s' * (len(i) > 1)} {', '.join(i)})" for source, i in jobs.items())

    def gpu_hours(self, flops: float, mfu: float | None = None) -> float:
        """GPU-hours of these FLOPs at this utilisation (default: the one every job is planned at)."""
        return flops / (self.peak_tflops * 1e12 * (mfu or self.mfu)) / 3600.0

    def job_hours(self, job: JobPlan, flops: float) -> float:
        """GPU-hours of FLOPs of this job, at its own utilisation."""
        return self.gpu_hours(flops, job.mfu)


# ---- the job list: Hydra's own expansion ------------------------------------------------------------------
@contextlib.contextmanager
def _hydra_context():
    """Hydra's compose API over conf/ (the symlink conf/sweep -> ../sweeps included); left as it was found."""
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig

    from src.config import register_resolvers

    register_resolvers()
    previous = HydraConfig.instance().cfg
    try:
        if GlobalHydra.instance().is_initialized():
            yield
        else:
            with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3", job_name="run"):
                yield
    finally:
        HydraConfig.instance().cfg = previous


def _compose(overrides: Sequence[str]) -> DictConfig:
    from hydra import compose

    return compose(config_name="config", overrides=list(overrides), return_hydra_config=True)


def expand_jobs(overrides: Sequence[str]) -> tuple[DictConfig, list[list[str]]]:
    """The sweep's base configuration and every job's override list, as `python -m src.run` would launch them."""
    from hydra._internal.config_loader_impl import ConfigLoaderImpl
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.types import RunMode

    from src.launch.sweeper import split_tagged

    overrides = [o for o in overrides if o not in ("-m", "--multirun")]
    # The config loader lists a group's options for glob(...) (loss='glob(rf_*)'), as the sweeper's parser does.
    parser = OverridesParser.create(config_loader=GlobalHydra.instance().config_loader())
    parsed = parser.parse_overrides(list(overrides))
    base = _compose([o.input_line for o in parsed if not o.is_sweep_override()])
    sweeper = base.hydra.sweeper
    tagging = sweeper._target_ == "hydra_plugins.flowsweep_launcher.TaggingSweeper"
    if not tagging and sweeper._target_ != "hydra._internal.core_plugins.basic_sweeper.BasicSweeper":
        raise ValueError(f"hydra.sweeper._target_={sweeper._target_}: the planner expands the basic sweeper only")
    params = [f"{k}={v}" for k, v in (sweeper.get("params") or {}).items()]
    if not params and not any(o.is_sweep_override() for o in parsed) and str(base.hydra.mode) != "RunMode.MULTIRUN":
        return base, [list(overrides)]  # a single run
    parsed = parser.parse_overrides(params + list(overrides))
    # Hydra's own refusal of a sweep over its keys (hydra.sweep.dir=a,b), which src.run launches nothing under.
    ConfigLoaderImpl.validate_sweep_overrides_legal(parsed, RunMode.MULTIRUN, from_shell=True)
    # The jobs as the configured sweeper launches them (the tagging sweeper adds each job's run_tag).
    batches = split_tagged(parsed, None, base) if tagging else BasicSweeper.split_arguments(parsed, None)
    return base, [list(job) for batch in batches for job in batch]


# ---- one job: shapes, parameters, FLOPs ---------------------------------------------------------------------
_META_CACHE: dict[str, tuple[dict, list[str]]] = {}


def data_meta(cfg: DictConfig) -> tuple[dict, list[str]]:
    """The training shards' meta (shapes), and the assumptions made where the shards are not at hand."""
    data = cfg.data
    for key in ("train_dir", "eval_dir") if data.kind == "shards" else ():
        if OmegaConf.is_missing(data, key) or data[key] is None:
            from src.config import ConfigError  # the job's own line (src.training.prepare.check_data)

            raise ConfigError(f"data.{key} is not set: a folder of shards (python -m src.preprocess ...)")
    where = data.train_dir if data.kind == "shards" else f"{cfg.paths.cache_dir}:{data.get('image_size')}"
    key = f"{data.kind}:{data.name}:{where}"
    if key not in _META_CACHE:
        _META_CACHE[key] = _read_data_meta(cfg)
    return _META_CACHE[key]


def _read_data_meta(cfg: DictConfig) -> tuple[dict, list[str]]:
    from src.data.shards import read_meta

    data = cfg.data
    if data.kind == "embedded":
        from src.training.prepare import check_data, embedded_shapes

        check_data(cfg)  # the job's own checks (dataset, image size), with its one-line errors
        return embedded_shapes(data.name, data.image_size), []  # known without building the shards
    try:
        return read_meta(data.train_dir), []
    except (FileNotFoundError, OSError, ValueError):
        pass
    meta = {k: int(data[k]) if data.get(k) is not None else v for k, v in PAPER_SHAPES.items()}
    taken = [f"{k}={v}" for k, v in PAPER_SHAPES.items() if data.get(k) is None]
    notes = [f"no shards at data.train_dir={data.train_dir}"]
    return meta, notes + ([f"the paper's {', '.join(taken)}"] if taken else [])


def build_on_meta(cfg: DictConfig, meta: dict):
    """The configured backbone on the meta device (shapes only, no memory); a model that cannot be built is the
    job's one-line ConfigError (a class that cannot be imported, a setting its constructor refuses)."""
    import hydra
    import torch

    from src.training.prepare import model_error

    _fill_data_shape(cfg, meta)  # (and checks model.context_split against the data)
    try:
        with torch.device("meta"):
            return hydra.utils.instantiate(cfg.model)
    except Exception as e:  # instantiate wraps constructor errors; surface the model's own message
        raise model_error(cfg.model, e) from None


def configuration_error(e: BaseException | None):
    """The ConfigError behind an exception, if any: one raised while resolving the run name's
    ${recipe_slug:${loss}} (an invalid recipe) reaches us wrapped in OmegaConf's InterpolationResolutionError."""
    from src.config import ConfigError

    while e is not None and not isinstance(e, ConfigError):
        e = e.__cause__ or e.__context__
    return e


def _fill_data_shape(cfg: DictConfig, meta: dict) -> None:
    from src.training.prepare import fill_context_split

    with open_dict(cfg):
        for k in ("latent_channels", "latent_size", "context_dim", "pooled_dim"):
            if cfg.data[k] is None:
                cfg.data[k] = int(meta[k])
    fill_context_split(cfg, meta)


def forward_flops(model, meta: dict) -> float:
    """FLOPs of one forward pass for one sample, counted on the meta device."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    c, s, L, d, v = (int(meta[k]) for k in ("latent_channels", "latent_size", "context_length", "context_dim",
                                              "pooled_dim"))
    args = (torch.zeros(1, c, s, s), torch.zeros(1), torch.zeros(1, L, d), torch.zeros(1, v))
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(*(a.to("meta") for a in args))
    return float(counter.get_total_flops())


_COST_CACHE: dict[str, tuple[int, int, int, float]] = {}


def _backbone_cost(cfg: DictConfig, meta: dict) -> tuple[int, int, int, float]:
    """(parameters, depth, hidden size, forward FLOPs per sample), cached per backbone and data shape."""
    _fill_data_shape(cfg, meta)
    key = repr((OmegaConf.to_container(cfg.model, resolve=True), meta.get("context_length")))
    if key not in _COST_CACHE:
        from torch.utils.flop_counter import FlopCounterMode

        from src.training.prepare import check_backbone_call

        model = build_on_meta(cfg, meta)
        params = sum(p.numel() for p in model.parameters())
        # depth and width feed only the 6NT rule; a backbone of the user's own may not say them (then 0).
        depth, hidden = (int(getattr(model, k, None) or cfg.model.get(k) or 0) for k in ("depth", "hidden_size"))
        # The job's own check (its call signature, a tensor shaped like x), whose forward is the one counted.
        counter = FlopCounterMode(display=False)
        ran = check_backbone_call(model, meta, within=counter)
        flops = float(counter.get_total_flops()) if ran else forward_flops(model, meta)
        _COST_CACHE[key] = (params, depth, hidden, flops)
    return _COST_CACHE[key]


def rule_of_thumb_flops(params: int, tokens: int, depth: int, hidden: int) -> float:
    """Forward FLOPs per sample by the 6NT rule's forward third: 2 N T plus attention 4 depth T^2 hidden."""
    return 2.0 * params * tokens + 4.0 * depth * tokens**2 * hidden


def requests_gpus(launcher: DictConfig) -> bool:
    """False for a SLURM launcher asking for no GPUs (hydra/launcher=slurm_cpu): its jobs run on CPUs. A local
    launch plans GPUs wherever the plan is made (a laptop planning a cluster's sweep)."""
    slurm = str(launcher.get("_target_", "")).endswith("SlurmLauncher")
    return not slurm or launcher.get("gpus_per_node") is not None


def job_gpus(cfg: DictConfig) -> int:
    """GPUs (or ranks) per job: the launcher's request where it makes one, else the trainer's devices x nodes."""
    launcher = cfg.hydra.launcher
    if launcher.get("tasks_per_node") is not None and "nodes" in launcher:
        return int(launcher.nodes) * int(launcher.tasks_per_node)
    devices, nodes = cfg.trainer.devices, cfg.trainer.num_nodes
    return (int(devices) if str(devices).isdigit() else 1) * int(nodes)


def job_status(cfg: DictConfig, run_dir: Path, single: bool = False) -> str:
    """What a relaunch would do in run_dir, by the job's own rules (src/training/job.py, src/results.py):
    new (nothing there), refused: changed configuration (the launch refuses it), done (trained and every wanted record
    present), to evaluate (trained; records missing or of other settings), best.ckpt missing (to evaluate, but the
    checkpoint validation chose is gone: the job would fail naming it), resume (a checkpoint before the last step),
    extend A -> B steps (only a larger train.max_steps: trained on from its last checkpoint),
    to train (a directory with nothing trained), <file> unreadable / cannot resume (the job fails naming a damaged
    file), failed (error.json; trains anew) or failed: <one of the above> (what the relaunch does), to evaluate
    (trained in TWIN) for a directory whose tagged sibling trained the same model (reuse_training). single: a run
    without -m, which trains on this machine whatever the launcher."""
    sweep_dir = None if single else OmegaConf.select(cfg, "hydra.sweep.dir", default=None)
    if sweep_dir is not None and run_dir.is_relative_to(str(sweep_dir)):
        from src.launch.validate import nested_run_dir

        if nested_run_dir(Path(str(sweep_dir)), run_dir):  # the launch refuses it: the report would not find it
            return f"{REFUSED}inside or around an earlier launch's run directory"
    from src.launch.validate import run_dir_not_a_folder

    if run_dir_not_a_folder(run_dir):  # the launch refuses it (a link to nothing, a file)
        return f"{REFUSED}run directory {'a link to nothing' if run_dir.is_symlink() else 'a file'}"
    twin = _trained_twin(cfg, run_dir)
    if twin is not None:  # the job links the twin's checkpoints and only evaluates (src/training/job.py)
        return f"to evaluate (trained in {twin.name})"
    if not run_dir.is_dir():
        return "new"
    from src.config import ConfigError
    from src.training.prepare import extension

    try:
        changed = _fingerprint_changes(cfg, run_dir)
        extended = extension(cfg, run_dir, changed)
        if changed and extended is None:  # refused before anything runs, error.json or not
            return f"{REFUSED}changed configuration"
    except ConfigError:  # a damaged fingerprint.json: this job is refused naming it, the sweep's others run
        return f"{REFUSED}fingerprint.json unreadable"
    from src.launch.validate import launch_precision
    from src.training.prepare import other_trained_precision

    here = launch_precision(cfg, single)
    trained = other_trained_precision(cfg, run_dir, here) if here is not None else None
    if trained is not None:  # the job refuses to resume it (check_trained_precision)
        return f"{REFUSED}trained at {trained}, trainer.precision=null is {here} there"
    # trained longer: it goes on from its last checkpoint (src/training/prepare.py extension)
    status = f"{EXTEND}{extended[0]} -> {extended[1]} steps" if extended else _trained_status(cfg, run_dir)
    if (run_dir / "error.json").is_file() and status != "done":
        # A relaunch removes error.json and goes on from what the directory holds (src/run.py _job): it trains anew,
        # resumes or only evaluates. A finished run is skipped (and its error.json removed): done.
        return "failed" if status == "to train" else f"failed: {status}"
    return status


def _trained_status(cfg: DictConfig, run_dir: Path) -> str:
    """done, to evaluate, best.ckpt missing, results.json unreadable, best.ckpt unreadable, resume, cannot resume or
    to train: what the run directory's checkpoints and records leave to run."""
    from src.evaluation.run import MissingBestCheckpoint, checkpoint_step, missing_for, select_checkpoint
    from src.results import read_results
    from src.training.job import training_finished

    if training_finished(cfg, run_dir):
        try:
            read_results(run_dir)
        except (ValueError, OSError):  # the job fails naming it (delete it to evaluate again): nothing runs till then
            return "results.json unreadable"
        try:
            if not missing_for(cfg, run_dir):
                return "done"
            which = str(OmegaConf.select(cfg, "eval.checkpoint", default="best"))
            path = select_checkpoint(run_dir, which)
            if checkpoint_step(run_dir, which) is None:  # torn: the evaluation fails naming it
                return f"{path.name} unreadable"
            return "to evaluate"
        except MissingBestCheckpoint:  # the job fails saying so: nothing runs until it is restored or last is chosen
            return "best.ckpt missing"
        except (ValueError, KeyError, OSError):  # anything else unreadable: left to the job, which evaluates or says
            return "to evaluate"
    if os.path.lexists(run_dir / "checkpoints" / "last.ckpt"):  # a dangling link too: the job resumes from the previous
        from src.training.checkpoint_io import checkpoint_to_resume

        try:
            checkpoint_to_resume(run_dir / "checkpoints", repair=False)
        except RuntimeError:  # nor a readable last.prev.ckpt: the job fails naming it until the folder is deleted
            return "cannot resume (last.ckpt unreadable)"
        return "resume"
    return "to train"


def _trained_twin(cfg: DictConfig, run_dir: Path) -> Path | None:
    """The sibling whose training a new run directory would reuse (reuse_training), as the job decides it."""
    from src.config import ConfigError
    from src.training.prepare import is_bound, resolve_data

    if not cfg.get("reuse_training", True) or not run_dir.parent.is_dir() or (run_dir.is_dir() and is_bound(run_dir)):
        return None
    from src.training.job import trained_twin  # Lightning: only where a sibling's training may be reused

    cfg = cfg.copy()
    try:
        resolve_data(cfg)
    except (ConfigError, OSError, ValueError):  # data not at hand: the planner cannot compare fingerprints
        return None
    return trained_twin(cfg, run_dir)


def _fingerprint_changes(cfg: DictConfig, run_dir: Path) -> list[str]:
    """The job's fingerprint check on the planned configuration; data keys the planner cannot resolve (shards not
    at hand) are not compared."""
    from src.config import ConfigError
    from src.training.prepare import fingerprint_changes, resolve_data

    cfg = cfg.copy()
    with contextlib.suppress(ConfigError, OSError, ValueError):
        resolve_data(cfg)
    # (train.cond_dropout=auto resolves from the shards' text encoders.)
    return [k for k in fingerprint_changes(cfg, run_dir)
            if not ((k.startswith("data.") and OmegaConf.select(cfg, k, default=None) is None)
                    or OmegaConf.select(cfg, k, default=None) == "auto")]


def plan_job(index: int, overrides: list[str], flops_method: str = "count", single: bool = False,
             mfu: float | None = None, gpu: str | None = None, composed: DictConfig | None = None) -> JobPlan:
    """One job and what it costs; mfu None: the MFU measured for its configuration on this GPU (launch_mfu).
    composed: the job's configuration as _compose(overrides) gave it, when the caller has it (left unchanged: a
    copy is filled in here); composing is most of a plan's time."""
    from hydra.core.hydra_config import HydraConfig

    from src.launch.validate import check_added_keys
    from src.training.prepare import (build_formulation, check_choices, check_run_name, check_sampler_grids,
                                      check_values)

    cfg = _compose(overrides) if composed is None else copy.deepcopy(composed)
    check_added_keys(overrides, cfg)  # +train.max_step=1: the launch refuses it, so the plan of 500 steps is no plan
    check_values(cfg)  # the job's value checks: a plan of train.max_steps=-1 is no plan
    check_choices(cfg)
    build_formulation(cfg)  # the recipe's check (loss.s=-1), which a run_name without the recipe would not make
    check_run_name(cfg)  # run_name=../x: a run directory outside the sweep's, which the launch refuses
    HydraConfig.instance().set_config(cfg)  # for ${hydra:...} in run names (sweeps/backbones.yaml)
    # A single run (no -m, no sweep) lands in hydra.run.dir (outputs/runs/...), a sweep's job in the sweep's folder.
    run_dir = Path(str(cfg.hydra.run.dir)) if single else Path(str(cfg.hydra.sweep.dir)) / str(cfg.hydra.sweep.subdir)
    meta, assumed = data_meta(cfg)
    params, depth, hidden, fwd_counted = _backbone_cost(cfg, meta)
    patch = int(cfg.model.get("patch_size", 2))
    image_tokens = (int(meta["latent_size"]) // patch) ** 2
    text_tokens = int(meta["context_length"])
    if flops_method == "count":
        fwd = fwd_counted
    elif flops_method == "6nt":
        fwd = rule_of_thumb_flops(params, image_tokens + text_tokens, depth, hidden)
    else:
        raise ValueError(f"flops={flops_method!r}: allowed values are 'count', '6nt'")
    t, ev = cfg.train, cfg.eval
    batch, steps = int(cfg.data.batch_size), int(t.max_steps)
    train = 3.0 * fwd * batch * steps
    # Validation: raw and EMA at every level, every val_every steps. Evaluation: each setting, raw and EMA.
    n_val = steps // int(t.val_every) if int(t.val_every) > 0 else 0
    val = fwd * n_val * int(cfg.data.val_samples) * int(t.val_levels) * 2
    sampling = 0.0
    if ev.enabled:
        from src.sampling.registry import check_steps

        # A sampler from outside is first checked to make nfe(steps) evaluations at these steps (as the job checks it).
        check_steps(str(cfg.sampler.name), tuple(sorted({int(s["steps"]) for s in ev.settings})),
                    float(ev.get("shift", 1.0)))
        check_sampler_grids(cfg, build_formulation(cfg))  # sampler=native at more steps than a schedule's levels
        sampling = _sampling_flops(cfg, fwd, [s for s in ev.settings for _ in ev.ema])
    job = JobPlan(
        index=index, overrides=overrides, run_dir=run_dir, model=str(cfg.model._target_).rsplit(".", 1)[-1],
        params=params, image_tokens=image_tokens, text_tokens=text_tokens, batch_size=batch, steps=steps,
        gpus=job_gpus(cfg), fwd_flops_per_sample=fwd, train_flops=train, eval_flops=val + sampling,
        status="new", assumptions=assumed, data_checks=_data_checks(cfg), val_flops=val,
        requests_gpus=requests_gpus(cfg.hydra.launcher),
    )
    job.mfu, job.mfu_source = (mfu, "given (--mfu)") if mfu is not None else launch_mfu(cfg, job, gpu)
    status = job_status(cfg, run_dir, single)
    goes_on = status.endswith("resume") or extends(status)
    job.set_status(status, _checkpoint_step(run_dir) if goes_on else None)
    if status.endswith("to evaluate"):  # a relaunch samples only the records results.json lacks
        from src.evaluation.run import missing_for

        with contextlib.suppress(Exception):  # unreadable: the job evaluates or fails, count it all
            job.sampling_left = _sampling_flops(cfg, fwd, missing_for(cfg, run_dir))
    return job


def _sampling_flops(cfg: DictConfig, fwd: float, settings) -> float:
    """Forward FLOPs of sampling eval.n_samples at each of these settings (steps, cfg): the configured sampler's
    network evaluations (heun: 2 steps - 1), a doubled batch under guidance."""
    from src.sampling import sampler_nfe

    nfe = sum(sampler_nfe(str(cfg.sampler.name), int(s["steps"])) * (1 if float(s["cfg"]) == 1.0 else 2)
              for s in settings)
    return fwd * nfe * int(cfg.eval.n_samples)


def _checkpoint_step(run_dir: Path) -> int | None:
    """The step of the run's last checkpoint (what a relaunch resumes from); None when unreadable."""
    import torch

    from src.training.checkpoint_io import checkpoint_to_resume

    try:
        last = checkpoint_to_resume(run_dir / "checkpoints", repair=False)
        ckpt = torch.load(last, map_location="cpu", weights_only=True, mmap=True) if last is not None else None
    except Exception:  # noqa: BLE001 (a truncated or foreign file: the job resumes or fails, count it all)
        return None
    return int(ckpt.get("global_step", 0)) if ckpt is not None else None


def _data_checks(cfg: DictConfig) -> list[str]:
    from src.data.expectations import check_shard_folders

    return check_shard_folders(cfg.data.train_dir, cfg.data.eval_dir) if cfg.data.kind == "shards" else []


def plan_sweep(overrides: Sequence[str], peak_tflops: float = H100_BF16_DENSE_TFLOPS, mfu: float | None = None,
               flops_method: str = "count", gpu: str | None = None) -> Plan:
    """Expand the sweep and plan every job; mfu None: each job's measured for its configuration, else DEFAULT_MFU."""
    if not 0 < peak_tflops < float("inf"):  # inf would plan every job at 0 GPU-hours
        raise ValueError(f"--peak-tflops={peak_tflops}: must be a finite number > 0")
    if mfu is not None and not 0 < mfu <= 1:
        raise ValueError(f"--mfu={mfu}: must be in (0, 1]")
    from src.launch.failures import grouped
    from src.models.perf import gpu_words

    if gpu is not None and not gpu_words(gpu):  # "NVIDIA" alone, or "": no device to look up
        raise ValueError(f"--gpu={gpu!r}: names no GPU model; give one, e.g. H100, H200 or 'NVIDIA H200'")
    with _hydra_context():
        base, jobs = expand_jobs(overrides)
        launcher = base.hydra.launcher
        check_launcher(launcher)
        parallelism = int(launcher.array_parallelism) if launcher.get("array_parallelism") else None
        single = not {"-m", "--multirun"} & set(overrides) and jobs == [list(overrides)]
        # Each job checked in order as src.run checks them before launch (src/launch/validate.py
        # check_sweep_jobs): its configuration, then, for a valid one, whether an earlier valid job has its run
        # directory (launched once, or refused: another configuration in that directory, refused like an invalid job).
        planned, valid, invalid, not_launched, runs = [], [], [], [], {}
        for job in jobs:
            cfg = None if single else _compose(job)  # one Hydra cannot compose (a typo in a key) ends the command
            try:
                job_plan = plan_job(len(planned) + len(invalid), job, flops_method, single, mfu, gpu, cfg)
                twin = None if single else _same_run(cfg, job, runs)
            except Exception as e:  # src.run refuses it before launch and launches the rest: so does the plan
                if single:
                    raise
                invalid.append((_job_name(cfg, job), error_line(e)))
                continue
            if twin is not None and twin.refused:
                invalid.append((f"{_job_name(cfg, job)} [{twin.apart}]", twin.line))  # src.run's name for it
            elif twin is not None:
                not_launched.append(twin.line)
            else:
                planned.append(job_plan)
                valid.append(job)
        if invalid and not planned:  # nothing to plan: the command's error, each cause once
            raise JobsRefused(grouped(invalid))
        _plan_training_waves(base, valid, planned)
    return Plan(planned, peak_tflops, flops_method, parallelism, not_launched, grouped(invalid),
                bool(base.get("fail_fast")))


class JobsRefused(Exception):
    """Every job of a sweep is refused before launch: a line per cause (src/launch/failures.py grouped)."""

    def __init__(self, lines: list[str]):
        super().__init__("\n".join(lines))
        self.lines = lines


def error_line(e: BaseException) -> str:
    """The one line src.run gives for this error: Hydra's own, else the configuration error behind it."""
    from src.launch.failures import one_line
    from src.launch.validate import hydra_error_line

    return hydra_error_line(e) or one_line(configuration_error(e) or e)


def _job_name(cfg: DictConfig, overrides: list[str]) -> str:
    """A job's name in the plan's refusals, as src.run names it (its run name, else its recipe overrides)."""
    from hydra.core.hydra_config import HydraConfig

    from src.launch.validate import job_name

    HydraConfig.instance().set_config(cfg)
    return job_name(cfg, overrides)


def check_launcher(launcher: DictConfig) -> None:
    """A SLURM launcher's values, checked as src.run checks them before it launches (src/launch/submitit.py
    preflight, without asking the cluster): gpus_per_node=0 or nodes=0 planned jobs of no GPUs (a ZeroDivisionError),
    a negative array_parallelism an array of no slots (an IndexError)."""
    if not str(launcher.get("_target_", "")).endswith("SlurmLauncher"):
        return
    from src.launch.submitit import check_slurm_params

    check_slurm_params(OmegaConf.to_container(launcher, resolve=True))


def _same_run(cfg: DictConfig, job: list[str], runs: dict):
    """src/launch/validate.py same_run_dir for a valid job of a sweep: None for a new run directory (recorded in
    runs), else the SameRun of the earlier job whose directory it names."""
    from hydra.core.hydra_config import HydraConfig

    from src.launch.validate import same_run_dir

    HydraConfig.instance().set_config(cfg)  # for ${hydra:...} in run names
    return same_run_dir(cfg, job, runs)


#: Statuses of a job that trains when the sweep is launched.
TRAINS = ("new", "to train", "resume", "failed", "failed: resume", "cannot resume (last.ckpt unreadable)",
          "failed: cannot resume (last.ckpt unreadable)")


def _plan_training_waves(base: DictConfig, jobs: list[list[str]], planned: list[JobPlan]) -> None:
    """Jobs that evaluate the model another job of this sweep trains first (src/launch/sweeper.py training_waves):
    'to evaluate (after TWIN trains)', at no training cost."""
    from src.launch.sweeper import leaders, shares_training, training_key

    if not shares_training(base, jobs):
        return
    first = leaders(jobs)
    for i, job in enumerate(planned):
        leader = planned[first[training_key(jobs[i])]]
        if leader is job:
            continue
        job.wave = 2
        trains = leader.status in TRAINS or extends(leader.status)
        if job.status in ("new", "to train", "failed") and trains:  # nothing trained: it reuses
            job.set_status(f"to evaluate (after {leader.run_dir.name} trains)")


def jobs_gpu(gpu: str | None) -> tuple[str, str]:
    """The jobs' GPU (--gpu, else this machine's, else H100) and how the plan names it."""
    if gpu is not None:
        return gpu, gpu
    import torch

    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        return name, f"{name} (this machine's GPU)"
    return "H100", "H100 (no --gpu, and no GPU here)"


def launch_mfu(cfg: DictConfig, job: JobPlan, gpu: str | None) -> tuple[float, str]:
    """The MFU measured by make bench-gpu for this job's launch (device, depth, per-GPU batch, settings), else the
    default; and where it comes from, saying why when it is the default."""
    from src.models.perf import launch_settings, measured_mfu, read_bench_results, same_gpu

    gpu, named = jobs_gpu(gpu)
    results = read_bench_results(GPU_RESULTS)
    depth = int(cfg.model.depth)
    settings = launch_settings(OmegaConf.to_container(cfg.model), OmegaConf.to_container(cfg.optim),
                               OmegaConf.to_container(cfg.train))
    measured = cfg.model.get("hidden_size") in (None, 64 * depth) and str(cfg.model._target_).endswith(".MMDiT")
    found = measured_mfu(results, gpu, depth, job.batch_size // max(1, job.gpus), settings) if measured else None
    if found:
        return found
    device = str(results["header"].get("device", "")) if results else ""
    if not results:
        why = "has no measurement (make bench-gpu writes them)"
    elif results["header"].get("dry_run"):
        why = "has no measurement on a GPU (a CPU dry run)"
    elif not same_gpu(gpu, device):
        why = f"has no measurement on {named}, only on {device} (--gpu names the jobs' GPU)"
    elif not measured:
        why = (f"measures MM-DiT at hidden_size 64 x depth only, not {job.model} at depth {depth}, hidden_size "
               f"{cfg.model.get('hidden_size')}")
    else:
        why = (f"has no measurement of this configuration (depth {depth}, per-GPU batch near "
               f"{job.batch_size // max(1, job.gpus)}, these throughput settings) on {device}")
    return DEFAULT_MFU, f"the default {DEFAULT_MFU:.0%}: {GPU_RESULTS.name} {why}"


# ---- printing ------------------------------------------------------------------------------------------------
def _si(x: float) -> str:
    for unit, scale in (("Z", 1e21), ("E", 1e18), ("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6)):
        if abs(x) >= scale:
            return f"{x / scale:.3g}{unit}"
    return f"{x:.3g}"


def render(plan: Plan, root: Path | None = None) -> str:
    """The job table and the totals."""
    root = root or Path.cwd()
    rows = []
    for j in plan.jobs:
        try:
            where = str(j.run_dir.resolve().relative_to(root.resolve()))
        except ValueError:
            where = str(j.run_dir)
        rows.append([str(j.index), where, j.model, f"{j.params / 1e6:.2f}M", f"{j.image_tokens}+{j.text_tokens}",
                     str(j.batch_size), str(j.steps), str(j.gpus), _si(j.train_flops) if j.trains_here else "reused",
                     _si(j.total_flops - j.train_flops * j.trains_here),  # a reused model's validation is its twin's
                     f"{plan.job_hours(j, j.total_flops):.3g}", j.status])
    head = ["#", "run directory", "backbone", "params", "tokens", "batch", "steps", "GPUs", "train FLOP",
            "eval FLOP", "GPU-h", "status"]
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in [head, *rows]]
    train = sum(j.train_flops * j.trains_here for j in plan.jobs)  # a model reused by its twins counts once
    extra = sum(j.total_flops for j in plan.jobs) - train
    left = [j for j in plan.jobs if j.status != "done" and not j.refused and not j.blocked]
    refused = [j for j in plan.jobs if j.refused]
    blocked = [j for j in plan.jobs if j.blocked]
    hours = sum(plan.job_hours(j, j.total_flops) for j in plan.jobs)
    rates = sorted({j.mfu for j in plan.jobs})
    utilisation = f"{rates[0]:.0%} utilisation" if len(rates) == 1 else \
        f"each job's utilisation ({rates[0]:.0%} to {rates[-1]:.0%})"
    done = len(plan.jobs) - len(left) - len(refused) - len(blocked)
    lines += [
        "",
        f"{len(plan.jobs)} job{'s' * (len(plan.jobs) != 1)} ({len(left)} to run; done: {done}"
        f"{f'; refused: {len(refused)}' if refused else ''}{f'; blocked: {len(blocked)}' if blocked else ''}). "
        f"FLOPs ({'counted on the meta device' if plan.flops_method == 'count' else '6NT rule + attention'}): "
        f"training {_si(train)}, validation + evaluation {_si(extra)}.",
        f"GPU-hours at {plan.peak_tflops:g} TFLOP/s peak and {utilisation}: {hours:.4g} in all, "
        f"{sum(plan.job_hours(j, j.flops_left) for j in left):.4g} still to run. Utilisation: {plan.mfu_source}.",
    ]
    if left and plan.parallelism:
        gpus = max(j.gpus for j in left)
        at_once = min(plan.parallelism, len(left))
        waves: dict[int, list[JobPlan]] = {}  # the second wave starts when the first is over
        for j in left:
            waves.setdefault(j.wave, []).append(j)
        wall = sum(_array_hours([plan.job_hours(j, j.flops_left) / gpus for j in wave], plan.parallelism)
                   for wave in waves.values())
        devices = f"{gpus} GPU(s)" if all(j.requests_gpus for j in left) else f"{gpus} task(s)"
        lines.append(f"Wall clock with {at_once} job{'s' * (at_once != 1)} of {devices} at once (array_parallelism)"
                     f"{f', in {len(waves)} waves' if len(waves) > 1 else ''}: about {wall:.3g} h.")
    cpu_jobs = [j for j in plan.jobs if not j.requests_gpus]
    if cpu_jobs:
        lines.append(f"{'All jobs request' if len(cpu_jobs) == len(plan.jobs) else f'{len(cpu_jobs)} jobs request'} "
                     "no GPU (hydra.launcher.gpus_per_node=null): the GPU-hours are what they would take on GPUs; "
                     "on CPUs they take far longer (the FLOPs are what they run).")
    if refused:
        lines.append(f"Refused by a relaunch, not in 'still to run' (jobs {', '.join(str(j.index) for j in refused)}): "
                     "their directories hold a run of another configuration, or an unreadable fingerprint.json, or "
                     "lie inside or around an earlier launch's run directory, or are a link to nothing or a file; "
                     "trained anew in other directories (another sweep_name), they take "
                     f"{sum(plan.job_hours(j, j.total_flops) for j in refused):.4g} GPU-hours.")
    if blocked:
        lines.append(f"Blocked, not in 'still to run' (jobs {', '.join(str(j.index) for j in blocked)}): a relaunch "
                     "fails naming the file in their status until it is restored or deleted; then they take "
                     f"{sum(plan.job_hours(j, j.flops_left) for j in blocked):.4g} GPU-hours.")
    lines += [f"Not launched: {line}." for line in plan.not_launched]
    if plan.refused_before_launch:
        lines.append(f"Refused before launch, not in the table (src.run names them and "
                     f"{'with fail_fast=true launches no job' if plan.fail_fast else 'launches the others'}):")
        lines += [f"  {line}" for line in plan.refused_before_launch]
    notes = list(dict.fromkeys(a for j in plan.jobs for a in j.assumptions))
    if notes:
        lines.append("Assumed: " + "; ".join(notes) + ".")
    lines += [f"Check: {c}." for c in dict.fromkeys(c for j in plan.jobs for c in j.data_checks)]
    return "\n".join(lines)


def _array_hours(hours: list[float], at_once: int) -> float:
    """When the last of these jobs ends, each started in order on the first of at_once slots to free up (a SLURM
    array): 122 equal jobs 64 at a time take two jobs' time, not 122 / 64 of one."""
    import heapq

    slots = [0.0] * min(at_once, len(hours))
    for h in hours:
        heapq.heappush(slots, heapq.heappop(slots) + h)
    return max(slots, default=0.0)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m src.plan", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--peak-tflops", type=float, default=H100_BF16_DENSE_TFLOPS,
                        help="peak FLOP rate per GPU in TFLOP/s (default: H100 SXM dense bf16, 989)")
    parser.add_argument("--mfu", type=float, default=None,
                        help="model FLOPs utilisation (default: measured in bench/results/gpu.md for the launch, "
                             "else 0.37)")
    parser.add_argument("--gpu", help="the jobs' GPU model, matched by whole words against the device measured in "
                                      "bench/results/gpu.md, e.g. H100, H200 (default: this machine's GPU, else H100)")
    parser.add_argument("--flops", choices=("count", "6nt"), default="count",
                        help="count: FLOPs counted on the meta device (default); 6nt: the rule of thumb")
    parser.add_argument("--config-dir", "-cd", action="append", default=[],
                        help="a folder of configurations added to the search path, as for python -m src.run "
                             "(e.g. conf/loss/<name>.yaml of a formulation defined outside this repository)")
    args, overrides = parser.parse_known_args(argv)
    if args.config_dir:  # what Hydra's --config-dir does for src.run, for the compose API
        dirs = [Path(d).resolve() for d in args.config_dir]
        missing = [str(d) for d in dirs if not d.is_dir()]
        if missing:
            parser.error(f"--config-dir {missing[0]}: no such folder")
        overrides = [*overrides, "hydra.searchpath=[" + ",".join(f"file://{d}" for d in dirs) + "]"]
    unknown = [o for o in overrides if o.startswith("--") and o != "--multirun"]
    if unknown:
        parser.error(f"unknown option(s) {unknown}; Hydra overrides are key=value")
    logging.disable(logging.WARNING)  # Lightning/Hydra chatter; the plan is the output
    try:
        plan = plan_sweep(overrides, args.peak_tflops, args.mfu, args.flops, args.gpu)
    except JobsRefused as e:  # every job: a line per cause
        print("\n".join(f"plan: {line}" for line in e.lines), file=sys.stderr)
        return 2
    except Exception as e:  # a one-line error, as for `python -m src.run`
        print(f"plan: {error_line(e)}", file=sys.stderr)
        return 2
    finally:  # process-wide: a caller in the same process (a notebook, a test) keeps its warnings
        logging.disable(logging.NOTSET)
    print(render(plan))
    return 1 if plan.refused_before_launch else 0  # src.run, launching the others, ends with status 1 too


if __name__ == "__main__":
    sys.exit(main())
