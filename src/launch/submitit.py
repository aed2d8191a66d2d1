"""A Hydra launcher over submitit (SLURM) that keeps a sweep going when single jobs fail.

hydra-submitit-launcher 1.2 waits for its jobs one by one and raises at the first that did not return (cancelled,
killed, out of memory, node failure): the launching command ends with a traceback while the other array tasks keep
running, and nothing says which jobs were lost. This launcher waits for every job, records each failure (a job's
own error, which src.run.main returns, or the scheduler's reason) for the summary of `python -m src.run`, and lets
the sweep end normally. Preemption and time-outs stay submitit's business: on its signal (SIGUSR2) it requeues the
job, whose rerun resumes from the run directory's last checkpoint (src/launch/preemption.py saves one first).
"""

from __future__ import annotations

import logging
import os
import subprocess
import time
from pathlib import Path
from typing import Any, Sequence

from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus, filter_overrides
from hydra_plugins.hydra_submitit_launcher import submitit_launcher as base
from omegaconf import OmegaConf

from src.launch.failures import one_line, record_failure

log = logging.getLogger(__name__)


class CollectingSubmititLauncher(base.BaseSubmititLauncher):
    """Base of the plugin class in hydra_plugins/flowsweep_launcher (Hydra loads launchers from there only)."""

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        # Copied from hydra_submitit_launcher 1.2 (BaseSubmititLauncher.launch) up to map_array; the waiting differs.
        import submitit

        assert self.config is not None
        num_jobs = len(job_overrides)
        assert num_jobs > 0
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

        log.info(f"Submitit '{self._EXECUTOR}' sweep output dir : {self.config.hydra.sweep.dir}")
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        if "mode" in self.config.hydra.sweep:
            os.chmod(sweep_dir, mode=int(str(self.config.hydra.sweep.mode), 8))
        job_params: list[Any] = []
        for idx, overrides in enumerate(job_overrides):
            idx = initial_job_idx + idx
            log.info(f"\t#{idx} : {' '.join(filter_overrides(overrides))}")
            job_params.append((list(overrides), "hydra.sweep.dir", idx, f"job_id_for_{idx}", Singleton.get_state()))
        jobs = executor.map_array(self, *zip(*job_params))
        log.info("submitted %d job(s): %s", len(jobs), jobs[0].job_id.split("_")[0] if jobs else "")
        return [self._collect(job, list(overrides)) for job, overrides in zip(jobs, job_overrides)]

    def _collect(self, job, overrides: list[str]) -> JobReturn:
        """The job's JobReturn; a job that failed or never returned is recorded and reported as completed."""
        name = " ".join(filter_overrides(overrides)) or f"job {job.job_id}"
        try:
            ended = wait_for(job)
            if ended is not None:
                raise RuntimeError(f"the scheduler reports {ended} and no result was written")
            ret = job.results()[0]  # rank 0's return
        except Exception as e:  # submitit.core.utils.UncompletedJobError: cancelled, killed, node failure, ...
            error = f"job {job.job_id} ended without a result: {one_line(e)}"
            record_failure(name, error)
            return JobReturn(overrides=overrides, status=JobStatus.COMPLETED,
                             _return_value={"failed": True, "run_name": name, "error": error})
        if ret.status == JobStatus.FAILED:  # the task raised: only with fail_fast=true; the sweeper re-raises
            record_failure(name, one_line(ret._return_value))
            return ret
        value = ret._return_value
        if isinstance(value, dict) and value.get("failed"):
            record_failure(value.get("run_name", name), value.get("error", "failed"))
        return ret


#: SLURM states after which a job never runs again (PREEMPTED is not one: a preempted job may be requeued).
FINAL_STATES = {"BOOT_FAIL", "CANCELLED", "COMPLETED", "DEADLINE", "FAILED", "NODE_FAIL", "OUT_OF_MEMORY",
                "SPECIAL_EXIT", "TIMEOUT"}


def squeue_state(job_id: str) -> str | None:
    """The job's state as squeue reports it, or None when squeue does not list it (long gone, or no squeue)."""
    try:
        out = subprocess.run(["squeue", "-h", "-t", "all", "-j", job_id, "-o", "%T"], capture_output=True, text=True,
                             timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    states = out.stdout.split()
    return states[0].upper() if out.returncode == 0 and states else None


def wait_for(job, result_grace_s: float = 30.0, max_poll_s: float = 10.0) -> str | None:
    """Block until the job is over: None once it wrote its result, else the state it ended in.

    submitit alone asks sacct, and waits forever for a job that died without a result where sacct gives no answer
    (clusters or test clusters without accounting). squeue is asked as well: a job it lists in a final state, or
    no longer lists, has ended; its result file gets result_grace_s to appear (shared file systems lag).
    """
    poll, ended_at, state = 1.0, None, None
    while True:
        if job.done():  # the result file, or sacct saying the job ended
            return None if job.paths.result_pickle.exists() else getattr(job, "state", "ended")
        state = squeue_state(job.job_id)
        if state is None or state in FINAL_STATES:
            ended_at = ended_at if ended_at is not None else time.monotonic()
            if time.monotonic() - ended_at > result_grace_s:
                return state or "no longer in the queue"
            poll = 1.0
        else:
            ended_at = None  # pending, running, requeued: keep waiting
        time.sleep(poll)
        poll = min(2 * poll, max_poll_s)
