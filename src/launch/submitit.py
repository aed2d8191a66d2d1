"""A Hydra launcher over submitit (SLURM) that keeps a sweep going when single jobs fail.

hydra-submitit-launcher 1.2 waits for its jobs one by one and raises at the first that did not return (cancelled,
killed, out of memory, node failure): the launching command ends with a traceback while the other array tasks keep
running, and nothing says which jobs were lost. This launcher waits for every job, records each failure (a job's
own error, which src.run.main returns, or the scheduler's reason) for the summary of `python -m src.run`, and lets
the sweep end normally. Preemption and time-outs stay submitit's business: on its signal (SIGUSR2) it requeues the
job, whose rerun resumes from the run directory's last checkpoint (src/launch/preemption.py saves one first).

Before the sweep writes anything, preflight checks the settings by value and with `sbatch --test-only` (one-line
errors naming the setting). A relaunch submits no run whose job from an earlier launch is still queued or running
(slurm_jobs.json); a controller that does not answer is waited out; Ctrl-C stops the waiting, not the jobs.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus, filter_overrides
from hydra_plugins.hydra_submitit_launcher import submitit_launcher as base
from omegaconf import OmegaConf

from src.config import ConfigError
from src.launch.failures import LaunchError, StoppedWaiting, one_line, record_failure, record_sweep_failure
from src.launch.planned import planned_run_dir, read_planned_jobs
from src.launch.rundir import RunDirBusy, run_dir_lock
from src.launch.sweep_files import DamagedSweepFile
from src.utils.io import atomic_write_json

log = logging.getLogger(__name__)


class CollectingSubmititLauncher(base.BaseSubmititLauncher):
    """Base of the plugin class in hydra_plugins/flowsweep_launcher (Hydra loads launchers from there only)."""

    def executor(self):
        """submitit's executor for this launcher's settings (hydra_submitit_launcher 1.2's, as in its launch)."""
        import submitit

        params = self.params
        init_params = {"folder": self.params["submitit_folder"]}
        specific_init_keys = {"max_num_timeout"}
        init_params.update(**{f"{self._EXECUTOR}_{x}": y for x, y in params.items() if x in specific_init_keys})
        init_keys = specific_init_keys | {"submitit_folder"}
        executor = submitit.AutoExecutor(cluster=self._EXECUTOR, **init_params)
        baseparams = set(OmegaConf.structured(base.BaseQueueConf).keys())
        params = {
            x if x in baseparams else f"{self._EXECUTOR}_{x}": y for x, y in params.items() if x not in init_keys
        }
        executor.update_parameters(**params)
        return executor

    def preflight(self) -> None:
        """The launcher's settings checked before the sweep writes anything (TaggingSweeper.sweep): by their values,
        then by the cluster (`sbatch --test-only` on the script submitit would submit: partition, account, QOS, GPUs,
        node sizes). ConfigError naming the setting, or LaunchError when SLURM cannot be reached."""
        check_slurm_params(self.params)
        missing = [tool for tool in ("sbatch", "srun") if shutil.which(tool) is None]
        if missing:
            raise LaunchError(f"{' and '.join(missing)} not found on PATH: hydra/launcher=slurm submits the sweep "
                              "with SLURM's commands, so launch it on a machine of the cluster (a login node), or run "
                              "it here with hydra/launcher=local")
        check_time_limit(self.params)  # sbatch --test-only takes a job over the partition's limit (see there)
        try:  # submitit's own sbatch script (a private method, there since submitit 1.0)
            text = self.executor()._executor._make_submission_file_text("true", "preflight")
        except AttributeError:  # another submitit: its submissions still report sbatch's refusals in one line
            log.warning("submitit %s has no _make_submission_file_text: the settings are not tried with sbatch "
                        "--test-only before submitting", getattr(__import__("submitit"), "__version__", "?"))
            return
        with tempfile.NamedTemporaryFile("w", prefix="flowsweep-preflight-", suffix=".sh") as script:
            script.write(text)
            script.flush()
            try:
                out = subprocess.run(["sbatch", "--test-only", script.name], capture_output=True, text=True,
                                     timeout=120)
            except subprocess.TimeoutExpired:
                raise LaunchError("sbatch --test-only did not answer in 120 s: the SLURM controller is not "
                                  "reachable; nothing was submitted") from None
        if out.returncode != 0:
            raise sbatch_refusal(self.params, out.stderr + out.stdout)

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        # Copied from hydra_submitit_launcher 1.2 (BaseSubmititLauncher.launch) up to map_array; the waiting differs.
        from submitit.core.utils import FailedJobError

        assert self.config is not None
        assert len(job_overrides) > 0
        executor = self.executor()
        log.info(f"Submitit '{self._EXECUTOR}' sweep output dir : {self.config.hydra.sweep.dir}")
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        if "mode" in self.config.hydra.sweep:
            os.chmod(sweep_dir, mode=int(str(self.config.hydra.sweep.mode), 8))
        names = self._names(sweep_dir, job_overrides)
        queued = queued_elsewhere(sweep_dir, names)
        returns: dict[int, JobReturn] = {}
        job_params: list[Any] = []
        submitted: list[int] = []  # the indices of the jobs submitted now
        for idx, (overrides, name) in enumerate(zip(job_overrides, names)):
            if name in queued:  # a relaunch while the earlier launch's job waits or runs: not a second one
                returns[idx] = already_queued(list(overrides), name, *queued[name])
                continue
            log.info(f"\t#{initial_job_idx + idx} : {' '.join(filter_overrides(overrides))}")
            job_params.append((list(overrides), "hydra.sweep.dir", initial_job_idx + idx,
                               f"job_id_for_{initial_job_idx + idx}", Singleton.get_state()))
            submitted.append(idx)
        if job_params:
            try:
                jobs = executor.map_array(self, *zip(*job_params))
            except (FailedJobError, OSError) as e:  # sbatch refused or could not run (the preflight passed before)
                error = " ".join(line.strip() for line in str(e).splitlines() if line.strip())
                refused = LaunchError(f"sbatch did not submit the {len(job_params)} job(s) of this batch: {error}")
                for i in submitted:  # else the rank report lists them as planned but never started
                    record_sweep_failure(sweep_dir, names[i], f"LaunchError: {refused}")
                raise refused from None
            say_submitted(jobs, str(self.params["submitit_folder"]))
            record_slurm_jobs(sweep_dir, {names[i]: job.job_id for i, job in zip(submitted, jobs)})
            returns.update(zip(submitted, self._collect_all(jobs, [job_overrides[i] for i in submitted])))
        return [returns[i] for i in range(len(job_overrides))]

    def _names(self, sweep_dir: Path, job_overrides: Sequence[Sequence[str]]) -> list[str]:
        """Each job's run name: from the sweep's jobs.json, which the sweeper has just written, else composed."""
        from src.launch.planned import read_planned_jobs

        try:
            planned = read_planned_jobs(sweep_dir)
        except ValueError:  # damaged: the names are composed
            planned = {}
        by_overrides = {tuple(job.get("overrides", ())): name for name, job in planned.items()}
        return [by_overrides.get(tuple(map(str, o))) or self._run_name(list(o)) for o in job_overrides]

    def _collect_all(self, jobs: Sequence, job_overrides: Sequence[Sequence[str]]) -> list[JobReturn]:
        """Every job's JobReturn, in order; Ctrl-C stops the waiting, not the jobs, and says so in one line."""
        try:
            with sacct_warned_once():
                return [self._collect(job, list(overrides), self._run_name)
                        for job, overrides in zip(jobs, job_overrides)]
        except KeyboardInterrupt:
            ids = " ".join(sorted({str(job.job_id).split("_")[0] for job in jobs}))
            raise StoppedWaiting(f"stopped waiting; the sweep's {len(jobs)} job(s) run on in SLURM job {ids} and "
                                 f"write their runs under {self.config.hydra.sweep.dir} (`scancel {ids}` stops them; "
                                 "this command again, once they are over, skips the finished runs)") from None

    def _run_name(self, overrides: list[str]) -> str:
        """A job's run name, as the job itself and the sweep's files name it (`digits/rf`)."""
        from src.launch.validate import sweep_job_name

        return sweep_job_name(self.hydra_context.config_loader, self.config, overrides)

    def _collect(self, job, overrides: list[str], name_of=None) -> JobReturn:
        """The job's JobReturn; a job that failed or never returned is recorded and reported as completed.
        name_of(overrides): the job's run name for a job that returned none (default: its overrides)."""
        def name() -> str:  # composed only for a job that failed
            return name_of(overrides) if name_of is not None else \
                " ".join(filter_overrides(overrides)) or f"job {job.job_id}"

        try:
            ended = wait_for(job)
            if ended is not None:
                raise RuntimeError(f"the scheduler reports {ended} and no result was written")
            ret = job.results()[0]  # rank 0's return
        except Exception as e:  # submitit.core.utils.UncompletedJobError: cancelled, killed, node failure, ...
            paths = getattr(job, "paths", None)  # where submitit keeps the job's output (its traceback, if any)
            error = f"job {job.job_id} ended without a result: {one_line(e)}" + \
                (f" (its log: {paths.stderr})" if paths is not None else "")
            failed = name()
            record_failure(failed, error)
            if self is not None:
                record_lost_job(self.config.hydra.sweep.dir, failed, error, str(job.job_id))
            return JobReturn(overrides=overrides, status=JobStatus.COMPLETED,
                             _return_value={"failed": True, "run_name": failed, "error": error})
        if ret.status == JobStatus.FAILED:  # the task raised: only with fail_fast=true; the sweeper re-raises
            record_failure(name(), one_line(ret._return_value))
            return ret
        value = ret._return_value
        if isinstance(value, dict) and value.get("failed"):
            record_failure(value.get("run_name") or name(), value.get("error", "failed"))
        return ret


def say_submitted(jobs: Sequence, folder: str) -> None:
    """The console's line for a batch handed to SLURM: INFO alone stays in the log file (src/utils/progress.py
    ConsoleFilter), which left the console silent for the hours the launcher waits, without the id to scancel.
    folder: hydra.launcher.submitit_folder, where %j stands for each job's id."""
    ids = " ".join(sorted({str(job.job_id).split("_")[0] for job in jobs}))
    log.info("submitted %d job(s) as SLURM job %s; their output: %s/, each run's log: <run dir>/run.log",
             len(jobs), ids, folder.replace("%j", "<job id>").rstrip("/"), extra={"console": True})


def record_lost_job(sweep_dir: str | os.PathLike, name: str, error: str, job_id: str | None = None) -> None:
    """Where the rank report finds a job the scheduler ended without a result (cancelled, out of memory, node
    failure), so that it says why rather than "running or killed": the error.json of a run directory without results
    (the job's rerun removes it, as it does its own); else, for a job that never made its directory or a run whose
    results stay as they were, the sweep's failures.json (cleared once the job runs). Nothing when a later launch
    has submitted the run again (resubmitted), or when a live job holds the run directory's lock: either records its
    own outcome."""
    if job_id is not None and resubmitted(sweep_dir, name, job_id):
        return
    try:
        job = read_planned_jobs(sweep_dir).get(name)
    except DamagedSweepFile:
        job = None
    run_dir = planned_run_dir(sweep_dir, job) if job is not None else None
    if run_dir is not None and run_dir.is_dir():
        # Under the run's lock: a live job there (the same SLURM job requeued after NODE_FAIL, the run launched again
        # locally) records its own outcome, and would keep an error.json written now beside its results.
        try:
            with run_dir_lock(run_dir):
                if not (run_dir / "results.json").exists():
                    atomic_write_json(run_dir / "error.json", {"type": "JobLost", "error": error, "traceback": ""})
                    return
        except RunDirBusy:
            log.info("%s: not recorded as lost in %s, which a live job holds", name, run_dir)
            return
    record_sweep_failure(sweep_dir, name, error)


#: SLURM states after which a job never runs again (PREEMPTED is not one: a preempted job may be requeued).
FINAL_STATES = {"BOOT_FAIL", "CANCELLED", "COMPLETED", "DEADLINE", "FAILED", "NODE_FAIL", "OUT_OF_MEMORY",
                "SPECIAL_EXIT", "TIMEOUT"}


#: `<sweep dir>/slurm_jobs.json`: {run name: the SLURM job id of its latest submission}, for a relaunch to find jobs
#: an earlier launch left queued or running (queued_elsewhere).
SLURM_JOBS = "slurm_jobs.json"
#: States of a job that has not ended (will run, runs, or is being requeued).
LIVE_STATES = {"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "REQUEUED", "REQUEUE_FED", "REQUEUE_HOLD",
               "RESIZING", "SIGNALING", "STAGE_OUT", "STOPPED", "SUSPENDED"}


def resubmitted(sweep_dir: str | os.PathLike, name: str, job_id: str) -> bool:
    """Whether slurm_jobs.json names another SLURM job than job_id for the run: a relaunch (after a scancel, say)
    submitted it again while this launcher still waited for job_id. Its error.json, written now, would be left beside
    the new job's results, and the run reported failed."""
    from src.launch.sweep_files import read_sweep_file

    try:
        latest = read_sweep_file(Path(sweep_dir) / SLURM_JOBS).get(name)
    except ValueError:  # damaged: nothing known, record as before
        return False
    return latest is not None and str(latest) != str(job_id)


def record_slurm_jobs(sweep_dir: str | os.PathLike, ids: dict[str, str]) -> None:
    """Add {run name: SLURM job id} of the jobs just submitted to the sweep's slurm_jobs.json."""
    from src.launch.sweep_files import update_sweep_file

    update_sweep_file(Path(sweep_dir) / SLURM_JOBS,
                      lambda recorded: {**recorded, **{str(name): str(job_id) for name, job_id in ids.items()}})


def queued_elsewhere(sweep_dir: str | os.PathLike, names: Sequence[str]) -> dict[str, tuple[str, str]]:
    """{run name: (SLURM job id, state)} of the given runs whose latest submission (slurm_jobs.json) has not ended:
    submitting them again would queue a second job for the run, which waits, then skips the run or is refused by
    its lock, leaving this command waiting on it (hours, on a busy cluster) for nothing."""
    from src.launch.sweep_files import read_sweep_file

    try:
        recorded = read_sweep_file(Path(sweep_dir) / SLURM_JOBS)
    except ValueError:  # damaged: nothing known, submit (the run directory's lock still guards the run)
        return {}
    live = {}
    for name in dict.fromkeys(names):
        job_id = recorded.get(name)
        state = squeue_state(str(job_id)) if job_id else None
        if state in LIVE_STATES:
            live[name] = (str(job_id), state)
    return live


def already_queued(overrides: list[str], name: str, job_id: str, state: str) -> JobReturn:
    """The return of a job not submitted because an earlier launch's job for its run has not ended (recorded)."""
    error = f"not submitted: SLURM job {job_id} of an earlier launch has this run ({state}); wait for it to end " \
            f"(this command again then skips or resumes the run), or `scancel {job_id}` first"
    record_failure(name, error)
    return JobReturn(overrides=overrides, status=JobStatus.COMPLETED,
                     _return_value={"failed": True, "run_name": name, "error": error, "queued": job_id})


#: squeue_state when the controller does not answer (restarting, overloaded): the job's state is unknown, not over.
NO_ANSWER = "NO ANSWER"


def squeue_state(job_id: str) -> str | None:
    """The job's state as squeue reports it; None when squeue does not list it (long gone: `Invalid job id`, or no
    squeue); NO_ANSWER when squeue fails otherwise (the controller unreachable or slow)."""
    return squeue_job(job_id)[0]


def squeue_job(job_id: str) -> tuple[str | None, str]:
    """(state, SLURM's reason) of the job, as squeue_state says the state; the reason is "" where squeue gives none."""
    try:
        out = subprocess.run(["squeue", "-h", "-t", "all", "-j", job_id, "-o", "%T %r"], capture_output=True,
                             text=True, timeout=60)
    except OSError:
        return None, ""
    except subprocess.TimeoutExpired:
        return NO_ANSWER, ""
    if out.returncode != 0 and "invalid job id" not in out.stderr.lower():
        return NO_ANSWER, ""
    lines = out.stdout.strip().splitlines()
    if out.returncode != 0 or not lines:
        return None, ""
    state, _, reason = lines[0].strip().partition(" ")
    return state.upper(), reason.strip()


#: Reasons a pending job waits for its turn (cluster busy, array_parallelism, a start time): nothing to say. Any other
#: (drained or down nodes, a partition down, QOS or account limits, a hold) is said once, as it may never pass.
TURN_REASONS = {"", "None", "Resources", "Priority", "BeginTime", "Dependency", "JobArrayTaskLimit", "Prolog"}


class _SacctOnce(logging.Filter):
    """submitit asks sacct for its jobs' states, and on a cluster without accounting every call fails: sacct prints
    "Slurm accounting storage is disabled" and submitit warns "Bypassing sacct error ...", every few minutes of a
    sweep that runs for days. The launcher watches the jobs through squeue as well (wait_for), so the first failure is
    said once, with what it means, and sacct is not asked again while the launcher waits (watcher: submitit's)."""

    def __init__(self, watcher) -> None:
        super().__init__()
        self.watcher, self.said = watcher, False

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if "Bypassing sacct error" not in message:
            return True
        if not self.said:
            self.said = True
            self.watcher._make_command = lambda: None  # submitit's watcher skips its update without a command
            log.warning("sacct does not answer (%s); the jobs are watched through squeue instead (a cluster without "
                        "accounting: expected)", message.split("Bypassing sacct error ", 1)[1].split(", status")[0])
        return False


@contextlib.contextmanager
def sacct_warned_once():
    """While the launcher waits for a batch: sacct's failure said once, and sacct not asked again (_SacctOnce)."""
    from submitit.slurm.slurm import SlurmJob

    submitit_log, watcher = logging.getLogger("submitit"), SlurmJob.watcher
    once = _SacctOnce(watcher)
    submitit_log.addFilter(once)
    try:
        yield once
    finally:
        submitit_log.removeFilter(once)
        vars(watcher).pop("_make_command", None)


def wait_for(job, result_grace_s: float = 30.0, max_poll_s: float = 10.0) -> str | None:
    """Block until the job is over: None once it wrote its result, else the state it ended in.

    submitit alone asks sacct, and waits forever for a job that died without a result where sacct gives no answer
    (clusters or test clusters without accounting). squeue is asked as well: a job it lists in a final state, or
    no longer lists, has ended; its result file gets result_grace_s to appear (shared file systems lag). While the
    controller does not answer, the job runs on (slurmd keeps it): the wait goes on. A job pending for a reason
    other than its turn (TURN_REASONS) is said once per reason.
    """
    poll, ended_at, state, warned, said = 1.0, None, None, False, ""
    while True:
        if job.done():  # the result file, or sacct saying the job ended
            return None if job.paths.result_pickle.exists() else getattr(job, "state", "ended")
        state, reason = squeue_job(job.job_id)
        if state == NO_ANSWER:
            if not warned:
                log.warning("squeue does not answer about job %s (the SLURM controller is unreachable); waiting",
                            job.job_id)
                warned = True
            ended_at = None
        elif state is None or state in FINAL_STATES:
            ended_at = ended_at if ended_at is not None else time.monotonic()
            if time.monotonic() - ended_at > result_grace_s:
                return state or "no longer in the queue"
            poll = 1.0
        else:
            ended_at = None  # pending, running, requeued: keep waiting
            if state == "PENDING" and reason.split(",")[0] not in TURN_REASONS and reason != said:
                log.warning("job %s is pending: %s (SLURM's reason); waiting", job.job_id, reason)
                said = reason
        time.sleep(poll)
        poll = min(2 * poll, max_poll_s)


#: Lower bounds of the launcher's numeric settings (None allowed where SLURM's default applies), with what they mean.
BOUNDS = {"nodes": (1, "nodes per job"), "tasks_per_node": (1, "ranks per node"),
          "gpus_per_node": (0, "GPUs per node"), "cpus_per_task": (1, "CPUs per rank"), "mem_gb": (1, "GB per node"),
          "timeout_min": (1, "minutes per submission"), "max_num_timeout": (0, "requeues after a time-out"),
          "array_parallelism": (1, "jobs of the sweep at once"), "signal_delay_s": (0, "seconds")}
OPTIONAL = {"gpus_per_node", "cpus_per_task", "mem_gb"}


def check_slurm_params(params: dict) -> None:
    """ConfigError for a launcher setting SLURM or submitit would take in another sense or reject only later: a count
    below its minimum (timeout_min=0 is no time limit to SLURM, a negative one is read as a time), or a time-out
    signal that would come before the job could train."""
    for key, (low, what) in BOUNDS.items():
        value = params.get(key)
        if value is None and key in OPTIONAL:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            allowed = f"an integer >= {low}" + (" or null (SLURM's default)" if key in OPTIONAL else "")
            hint = "; it follows gpus_per_node unless set (CPU-only: hydra/launcher=slurm_cpu)" \
                if key == "tasks_per_node" else ""
            raise ConfigError(f"hydra.launcher.{key}={value}: not allowed ({what}); allowed: {allowed}{hint}")
    if params["signal_delay_s"] >= 60 * params["timeout_min"]:
        raise ConfigError(f"hydra.launcher.signal_delay_s={params['signal_delay_s']} with "
                          f"hydra.launcher.timeout_min={params['timeout_min']}: the time-out signal would come before "
                          "the job trains a step (each submission would checkpoint and requeue at once); allowed: "
                          f"signal_delay_s < 60 x timeout_min = {60 * params['timeout_min']}")
    check_setup(params.get("setup"))


def check_setup(setup) -> None:
    """ConfigError for `setup` lines that are not valid shell: sbatch --test-only does not parse the script, so every
    job of the sweep would queue, then fail at its start with no result (SLURM's log: `syntax error near ...`)."""
    lines = [str(line) for line in setup or ()]
    if not lines:
        return
    # -n parses without running: a `shopt -s extglob` in the lines never takes effect, so the patterns it allows
    # (`!(*.tmp)`) would be refused; the check parses with it on when the lines turn it on.
    extglob = ["-O", "extglob"] if any(re.search(r"\bshopt\s+-s\b.*\bextglob\b", line) for line in lines) else []
    try:
        out = subprocess.run(["bash", *extglob, "-n"], input="\n".join(lines) + "\n", capture_output=True, text=True,
                             timeout=30)
    except (OSError, subprocess.TimeoutExpired):  # no bash here to ask: the cluster's runs the script as it is
        return
    if out.returncode != 0:
        said = "; ".join(line.strip().removeprefix("bash: ") for line in out.stderr.splitlines() if line.strip())
        raise ConfigError(f"hydra.launcher.setup={lines}: not valid shell ({said}); allowed: lines of a bash script, "
                          "run in order before srun")


#: sbatch's refusals (a piece of its message, lower case) and the launcher settings each is about; None: no setting.
REFUSALS = (
    ("unable to contact slurm controller", None),
    ("invalid partition", ("partition",)),
    ("invalid account", ("account",)),
    ("invalid qos", ("qos",)),
    ("generic resource", ("gpus_per_node", "gres")),
    ("node configuration is not available", ("nodes", "tasks_per_node", "cpus_per_task", "gpus_per_node", "mem_gb")),
    ("processors requested", ("nodes", "tasks_per_node", "cpus_per_task")),
    ("memory", ("mem_gb",)),
    ("time limit", ("timeout_min",)),
)


def _sinfo(fmt: str, partition: str | None = None) -> list[str]:
    """sinfo's lines in the given format (deduplicated, in order); [] when it gives none."""
    try:
        out = subprocess.run(["sinfo", "-h", "-o", fmt, *(["-p", partition] if partition else [])],
                             capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return []
    return list(dict.fromkeys(line.strip() for line in out.stdout.splitlines() if line.strip()))


def sbatch_refusal(params: dict, message: str) -> ConfigError | LaunchError:
    """The one-line error for `sbatch --test-only`'s refusal of the launcher's settings: the settings it is about
    with their values, sbatch's own words, and what the cluster has (its partitions, the sizes of their nodes)."""
    said = "; ".join(line.strip().removeprefix("sbatch: error: ").removeprefix("sbatch: ")
                     for line in message.splitlines() if line.strip()) or "no message"
    lower = said.lower()
    keys = next((keys for piece, keys in REFUSALS if piece in lower), ())
    if keys is None:
        return LaunchError(f"SLURM cannot be reached ({said}); nothing was submitted: start the cluster's controller "
                           "or launch where it answers")
    named = " ".join(f"hydra.launcher.{k}={params.get(k)}" for k in keys if params.get(k) is not None) \
        or "hydra.launcher"
    if "partition" in keys:
        partitions = _sinfo("%R")
        have = f"; the partitions: {', '.join(partitions)}" if partitions else ""
    else:
        nodes = _sinfo("%R: %D node(s) of %c CPUs, %m MB, gres %G", params.get("partition"))
        have = f"; the nodes: {'; '.join(nodes)}" if nodes else ""
    return ConfigError(f"{named}: refused by SLURM ({said}){have}")


def slurm_minutes(limit: str) -> float | None:
    """Minutes in a SLURM time limit as sinfo gives it (`[days-]hours:minutes:seconds`, `minutes:seconds`,
    `minutes`); None for no limit (`infinite`, `UNLIMITED`) or a text it cannot read."""
    days, _, clock = limit.strip().rpartition("-")
    try:
        parts = [int(p) for p in clock.split(":")]
        whole_days = int(days) if days else 0
    except ValueError:
        return None
    if len(parts) == 3:
        return whole_days * 1440 + parts[0] * 60 + parts[1] + parts[2] / 60
    if len(parts) == 2:
        return whole_days * 1440 + (parts[0] * 60 + parts[1] if days else parts[0] + parts[1] / 60)
    return whole_days * 1440 + (parts[0] * 60 if days else parts[0])


def check_time_limit(params: dict) -> None:
    """ConfigError for a timeout_min over the partition's time limit: sbatch --test-only takes such a job, and
    unless the cluster enforces partition limits at submission SLURM keeps it pending for ever (PartitionTimeLimit)
    while the sweep waits for it."""
    lines = [line.split() for line in _sinfo("%P %l", params.get("partition"))]
    limits = [(name.rstrip("*"), limit) for name, limit in (p for p in lines if len(p) == 2)
              if params.get("partition") or name.endswith("*")]  # the named partition, else the default one
    if not limits:
        return
    partition, limit = limits[0]
    minutes = slurm_minutes(limit)
    if minutes is not None and params["timeout_min"] > minutes:
        raise ConfigError(f"hydra.launcher.timeout_min={params['timeout_min']}: over the time limit of partition "
                          f"{partition} ({limit}, {minutes:g} min), so SLURM would keep the jobs pending "
                          f"(PartitionTimeLimit); allowed: up to {int(minutes)} (a run that needs longer is requeued, "
                          "max_num_timeout times)")
