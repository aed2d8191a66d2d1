"""Hydra's basic sweeper, with each job's swept values in its run name (`run_tag`).

A run directory is tied to one configuration (fingerprint.json) and is named from the recipe and the dataset
(`run_name` in conf/config.yaml). A multirun over any other key (`-m loss=rf,edm optim.lr=1e-4,3e-4`) would send
several configurations to one directory; this sweeper appends `run_tag=/optim.lr=0.0001` (every swept key outside
`name_keys`, which the run name already covers) to each job, so they get their own directories. Keys that are not
swept add nothing: rerunning the same command finds the same directories (resume, skip finished jobs).
"""

from __future__ import annotations

import fnmatch
import logging
import re
import sys
from collections.abc import Sequence
from pathlib import Path

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.types import Override
from hydra.errors import CompactHydraException
from omegaconf import OmegaConf

from src.results import parse_run_tag

log = logging.getLogger(__name__)

# What the default run name (${data.name}/${recipe_slug:${loss}}) already says; a sweep's file may widen it.
NAME_KEYS = ("loss", "loss.*", "data", "data.name")


def _key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~").split("@", 1)[0]


def swept_keys(overrides: Sequence[Override], name_keys: Sequence[str] = NAME_KEYS) -> list[str]:
    """The keys a multirun sweeps over that the run name does not already hold, in command-line order."""
    keys = []
    for o in overrides:
        key = o.key_or_group
        if o.is_sweep_override() and key not in keys and not any(fnmatch.fnmatchcase(key, p) for p in name_keys):
            keys.append(key)
    return keys


def _value_text(override: str) -> str:
    """The value of a job's override as a directory name shows it: a string as itself (the basic sweeper writes
    `ab2\\:AB2` for ab2:AB2, escaped for Hydra's parser, and keeps a quoted string's quotes), anything else as typed."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    raw = override.split("=", 1)[1]
    try:
        value = OverridesParser.create().parse_override(override).value()
    except Exception:  # noqa: BLE001 -- Hydra parses it again when the job starts and reports it there
        return raw
    return value if isinstance(value, str) else raw


def run_tag(job: Sequence[str], keys: Sequence[str]) -> str:
    """`/k1=v1,k2=v2` from one job's overrides ('' when nothing is swept); '/' in a value becomes '_'."""
    values = {_key(o): _value_text(o) for o in job if "=" in o}
    parts = [f"{k}={values[k].replace('/', '_')}" for k in keys if k in values]
    return "/" + ",".join(parts) if parts else ""


def _quoted(text: str) -> str:
    """text as a single-quoted value of Hydra's override grammar: a quote in a swept string (it's) would end it, and a
    ${...} in one would be resolved in the directory name (to a path, say) instead of shown as swept."""
    text = re.sub(r"(\\*)'", lambda m: m.group(1) * 2 + "\\'", text)  # backslashes before a quote are doubled
    text = re.sub(r"(\\+)$", lambda m: m.group(1) * 2, text)  # and before the closing quote
    return "'" + text.replace("${", "\\${") + "'"


def tag_jobs(batches: list[list[list[str]]], keys: Sequence[str]) -> list[list[list[str]]]:
    """Every job's overrides with its run_tag appended (unchanged when no key outside the name is swept)."""
    if not keys:
        return batches
    return [[[*job, f"run_tag={_quoted(run_tag(job, keys))}"] for job in batch] for batch in batches]


class SweepOverrideError(CompactHydraException):
    """A swept value the sweeper cannot launch as a grid of jobs: one line, said before anything is written
    (src/run.py and src/plan.py print a CompactHydraException's message as it is)."""


def check_sweep_overrides(overrides: Sequence[Override]) -> None:
    """Sweeps that Hydra's basic sweeper would run wrong or refuse in a traceback: interval(a,b), a continuous range
    for a sampling sweeper (Optuna), which it refuses naming neither the key nor what would work; and a sweep over
    the named sweep or the sweep's folder, which would run one job per sweep file with none of its swept values
    (only the base configuration's hydra.sweeper.params are expanded), each in its own sweep's folder while the
    sweep's records (multirun.yaml, jobs.json, failures.json) go to one."""
    for o in overrides:
        if o.is_interval_sweep():
            raise SweepOverrideError(f"{o.input_line}: interval() is a continuous range, which this grid sweeper "
                                     f"cannot list as jobs; give the values ({o.key_or_group}=1e-4,3e-4), "
                                     f"range(start,stop,step) or choice(...)")
        if o.is_sweep_override() and o.key_or_group in ("sweep", "sweep_name"):
            raise SweepOverrideError(f"{o.input_line}: a command runs one sweep, in one folder (sweep_name); "
                                     f"run each {o.key_or_group} in a command of its own")


def split_tagged(overrides: list[Override], max_batch_size: int | None, cfg=None) -> list[list[list[str]]]:
    """The basic sweeper's batches of job overrides, each job with its run_tag; `name_keys` from cfg when it has them;
    in training waves (training_waves) when jobs share a training. The sweeper launches these jobs and the planner
    (src/plan.py) lists them."""
    check_sweep_overrides(overrides)
    name_keys = list((cfg.get("name_keys") if cfg is not None else None) or NAME_KEYS)
    jobs = tag_jobs(BasicSweeper.split_arguments(overrides, None), swept_keys(overrides, name_keys))[0]
    first = len(jobs)
    if cfg is not None and shares_training(cfg, jobs):
        jobs = training_waves(jobs)
        first = len(leaders(jobs))
    size = max_batch_size or len(jobs)
    # A wave never shares a batch with the next: the sweeper launches (and waits for) one batch at a time.
    return [jobs[i:min(i + size, end)] for start, end in ((0, first), (first, len(jobs)))
            for i in range(start, end, size)]


#: Swept keys that change only the evaluation: jobs differing in nothing else share one training (a later job
#: links the first one's checkpoints and evaluates only: src/training/job.py reuse_training).
EVALUATION_ONLY = ("sampler", "eval.")


def training_key(job: Sequence[str]) -> tuple[str, ...]:
    """A job's overrides without its run_tag and without the evaluation-only ones among its tagged keys: jobs with the
    same key train the same model in the same parent directory (a swept key the run name holds, e.g. a sweep file's
    name_keys, gives each job its own directory, where reuse_training looks for no twin)."""
    tag = next((o.split("=", 1)[1].strip("'\"") for o in job if _key(o) == "run_tag"), "")
    tagged = set(parse_run_tag(tag))
    return tuple(o for o in job
                 if _key(o) != "run_tag" and not (_key(o) in tagged and _key(o).startswith(EVALUATION_ONLY)))


def leaders(jobs: Sequence[Sequence[str]]) -> dict[tuple[str, ...], int]:
    """The first job of each training: training_key -> its index in jobs."""
    first: dict[tuple[str, ...], int] = {}
    for i, job in enumerate(jobs):
        first.setdefault(training_key(job), i)
    return first


def shares_training(cfg, jobs: Sequence[Sequence[str]]) -> bool:
    """Whether some jobs will reuse another's training: two share a training_key and reuse_training is on (in the
    base configuration and every job)."""
    if len(leaders(jobs)) == len(jobs) or not cfg.get("reuse_training", True):
        return False
    return not any(_key(o) == "reuse_training" and o.split("=", 1)[1].strip().lower() != "true"
                   for job in jobs for o in job)


def training_waves(jobs: Sequence[Sequence[str]]) -> list[list[str]]:
    """The first job of each training, then the others: a launcher that runs a batch at once (a SLURM array) trains
    each model once, and the second wave, launched when the first is over, finds the trained twin and evaluates
    only. Order within each wave is the sweep's."""
    first = set(leaders(jobs).values())
    return [list(jobs[i]) for i in range(len(jobs)) if i in first] + \
        [list(jobs[i]) for i in range(len(jobs)) if i not in first]


def _trained(cfg, value: dict) -> bool:
    """Whether a failed job's training finished (its evaluation failed): its twins can still evaluate that model."""
    from src.training.job import training_finished

    try:
        return training_finished(cfg, Path(value["run_dir"]))
    except Exception:  # noqa: BLE001 -- no configuration or directory came back: count it as not trained
        return False


class TaggingSweeper(BasicSweeper):
    """BasicSweeper whose jobs carry `run_tag`; selected by conf/hydra/sweeper/tagging.yaml."""

    def sweep(self, arguments: list[str]) -> list:
        """BasicSweeper.sweep, except that a sweep whose every job was refused creates nothing: Hydra writes the
        sweep directory and multirun.yaml before launching, which would record settings no job ran with."""
        from hydra.core.override_parser.overrides_parser import OverridesParser

        from src.config import ConfigError
        from src.launch.failures import LaunchError, one_line

        try:  # the launcher's own settings (SLURM: partition, sizes, the cluster answering), before anything is written
            getattr(self.launcher, "preflight", lambda: None)()
        except (ConfigError, LaunchError) as e:
            sys.exit(one_line(e))  # printed on stderr, exit status 1
        params = [*self._parse_config(), *arguments]
        overrides = OverridesParser.create(config_loader=self.hydra_context.config_loader).parse_overrides(params)
        # fail_fast: one job at a time, so that the sweep stops at the first that fails (the sweeper reads a batch's
        # results only once the whole batch has run).
        self.overrides = self.split_arguments(overrides, 1 if self.config.get("fail_fast") else self.max_batch_size)
        if not self.overrides:
            return []
        sweep_dir = Path(self.config.hydra.sweep.dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.config, sweep_dir / "multirun.yaml")
        # The jobs this launch will run, added to those of earlier launches: the report names a planned job that
        # never started (a sweep killed half-way) instead of calling the sweep complete.
        from src.launch.planned import record_planned_jobs

        record_planned_jobs(sweep_dir, self.planned_jobs)
        waves = shares_training(self.config, [job for batch in self.overrides for job in batch])
        failed_trainings: dict[tuple[str, ...], dict] = {}  # training_key -> the failed return of its first job
        returns, initial_job_idx = [], 0
        while not self.is_done():
            batch = self.get_job_batch()
            if waves and failed_trainings:
                batch = self._without_failed_trainings(batch, failed_trainings, sweep_dir)
                if not batch:
                    continue
            self.validate_batch_is_legal(batch)
            results = self.launcher.launch(batch, initial_job_idx=initial_job_idx)
            for job, r in zip(batch, results):
                value = r.return_value  # raises if the job raised (fail_fast)
                if waves and isinstance(value, dict) and value.get("failed") and not _trained(r.cfg, value):
                    failed_trainings.setdefault(training_key(job), value)
            initial_job_idx += len(batch)
            returns.append(results)
        return returns

    def _without_failed_trainings(self, batch, failed_trainings: dict, sweep_dir: Path) -> list:
        """A second-wave batch without the jobs whose model the first wave failed to train: each would train the same
        model again (in the second wave, all at once) and most likely fail the same way. They are recorded as not
        launched (summary, failures.json); rerunning the sweep retries the training, then evaluates them."""
        from src.launch.failures import record_failure, record_sweep_failure
        from src.launch.validate import sweep_job_name
        from src.utils.progress import SWEEP

        kept = []
        for job in batch:
            first = failed_trainings.get(training_key(job))
            if first is None:
                kept.append(job)
                continue
            name = sweep_job_name(self.hydra_context.config_loader, self.config, job)
            trainer = first.get("run_name", "?")
            if first.get("queued"):  # not submitted: an earlier launch's SLURM job is training it (src/launch/submitit)
                line = (f"not launched: the training it shares with {trainer} is in SLURM job {first['queued']} of an "
                        "earlier launch; this command again, once that job is over, evaluates it")
            else:
                line = f"not launched: the training it shares with {trainer} failed; rerun the sweep to retry"
            log.error("%s: %s", name, line)
            record_failure(name, line)
            record_sweep_failure(sweep_dir, name, line)
            SWEEP.drop(1)
        return kept

    def split_arguments(self, overrides: list[Override], max_batch_size: int | None) -> list[list[list[str]]]:
        from src.launch.validate import filter_sweep
        from src.utils.progress import SWEEP

        # Every job's configuration checked before any is launched: an invalid one gets no directory.
        self.planned_jobs: dict[str, dict] = {}  # run name -> run_dir, overrides of every valid job (jobs.json)
        batches = filter_sweep(self, split_tagged(overrides, max_batch_size, self.config), self.planned_jobs)
        jobs = [job for batch in batches for job in batch]  # the ones launched: without refused or repeated jobs
        if shares_training(self.config, jobs):
            first = len(leaders(jobs))
            log.info("%d jobs share %d training(s): %d job(s) train first, then the other %d evaluate the same models",
                     len(jobs), first, first, len(jobs) - first, extra={"console": True})
        SWEEP.planned(len(jobs))  # "job i of n" (src/run.py announces each job)
        return batches
