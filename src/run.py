"""Entry point: `python -m src.run [-m] key=value ...` trains and evaluates recipes (Hydra multirun = a sweep).

A failing job in a multirun writes error.json into its run directory (one refused, busy, finished already or failing
before its directory is locked: the sweep's failures.json instead) and the sweep goes on; the command ends with a
summary of the failed jobs and a non-zero exit. Configuration errors are one line, before any work and
before any directory is created (src/launch/validate.py); a job refused by its run directory (another
configuration trained there, another job running there) writes nothing into it.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import signal
import sys
import traceback
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import HydraException
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from src.config import ConfigError, register_resolvers
from src.launch.failures import (FAILED, LaunchError, clear_sweep_failure, one_line, record_failure,
                                 record_sweep_failure, summary)
from src.launch.rundir import run_dir_lock, run_log, save_job_config
from src.launch.validate import hydra_error_line, job_name, misplaced_option
from src.utils.io import atomic_write_json

register_resolvers()
log = logging.getLogger(__name__)

__all__ = ["FAILED", "cli", "main"]  # FAILED: (run name, one-line error) of failed jobs, read after Hydra returns


def _finish_wandb() -> None:
    # A W&B run left open would swallow the next multirun job's logs (docs/pitfalls.md).
    if "wandb" in sys.modules:
        import wandb

        if wandb.run is not None:
            wandb.finish()


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> dict | None:
    from src.utils.progress import SWEEP, quiet_console

    # Library chatter to run.log only (conf/config.yaml: verbose).
    quiet_console(bool(cfg.get("verbose", False)), wandb=bool(OmegaConf.select(cfg, "logger.wandb.enabled")))
    hydra_cfg = HydraConfig.get()
    index = OmegaConf.select(hydra_cfg, "job.num", default=None, throw_on_missing=False)
    announce = hydra_cfg.mode == RunMode.MULTIRUN and index is not None
    if announce:  # "job 2/3: digits/edm_-1.20_1.20 (about 1 min left in the sweep)"
        SWEEP.start(int(index), job_name(cfg))
    result = None
    try:
        result = _job(cfg)
        if not announce and result and result.get("skipped"):  # a sweep's jobs say so through SWEEP.finish
            print(f"complete already, skipped: {result['run_dir']}", file=sys.stderr, flush=True)
        return result
    finally:
        if announce:
            stopped = isinstance(sys.exc_info()[1], (SystemExit, KeyboardInterrupt))  # Ctrl-C, SIGTERM
            failed = not result or bool(result.get("failed"))
            SWEEP.finish(skipped=bool(result and result.get("skipped")), failed=failed, stopped=stopped)


@contextlib.contextmanager
def _locked_run_dir(cfg: DictConfig, run_dir: Path, multirun: bool):
    """The run directory's lock, and its own checks again once held: another launch may have bound the directory
    between this job's checks and its lock, and this one must not write over it."""
    from src.training.prepare import check_run_dir

    with run_dir_lock(run_dir):
        check_run_dir(cfg, run_dir, multirun)
        yield


def _job(cfg: DictConfig) -> dict | None:
    from src.training.job import run_job
    from src.training.prepare import prepare_job

    run_dir = Path(HydraConfig.get().runtime.output_dir)
    multirun = HydraConfig.get().mode == RunMode.MULTIRUN
    launched = copy.deepcopy(cfg)  # as composed, for .hydra/config.yaml (the job fills in data folders and shapes)
    error_file = run_dir / "error.json"
    finished = False  # a finished run: one that fails now (a relaunch asking for more) leaves its files as they were
    in_run_dir = False  # the failure is recorded in the run directory (error.json), else in the sweep's failures.json
    try:
        # Everything that can refuse the job, before anything is written into its directory: a refused relaunch
        # leaves a finished run exactly as it was (its error goes to the summary and the sweep's failures.json).
        prepare_job(cfg, run_dir, multirun)
        # The lock next: a job already running in this directory keeps its files (error.json included).
        with _locked_run_dir(cfg, run_dir, multirun), run_log(run_dir) as log_file:
            if multirun:  # this launch runs here: an earlier one's refusal is no longer the job's latest word, and a
                # kill from here on would leave it in the report as if this launch had not run
                clear_sweep_failure(HydraConfig.get().sweep.dir, job_name(cfg))
            finished = run_finished(cfg, run_dir)
            if not finished:  # the launch's record first, so that a crash mid-training leaves it
                error_file.unlink(missing_ok=True)
                save_job_config(run_dir, launched)
            try:
                result = run_job(cfg, run_dir)
            except Exception as e:  # recorded per job so the rest of the sweep goes on
                if not isinstance(e, ConfigError):  # a configuration error says nothing about the run
                    # One line on the console; the traceback in run.log (and error.json) for whoever digs, and the
                    # line names only the files that took it (a full disk refuses both).
                    log.info("%s failed:\n%s", job_name(cfg), traceback.format_exc())
                    if not finished:
                        try:
                            atomic_write_json(error_file, {"type": type(e).__name__, "error": str(e),
                                                           "traceback": traceback.format_exc()})
                            in_run_dir = True
                        except OSError as unwritten:  # a full disk: the job's own error is what to say
                            log.error("%s not written: %s", error_file, one_line(unwritten))
                    kept = [str(f) for f, written in ((run_dir / "run.log", not log_file.failed),
                                                      (error_file, in_run_dir)) if written]
                    log.error("%s failed: %s (traceback %s)", job_name(cfg), one_line(e),
                              f"in {' and '.join(kept)}" if kept else "not written: the file system refused")
                raise
            if finished:
                error_file.unlink(missing_ok=True)
                save_job_config(run_dir, launched)
        return result
    except Exception as e:
        name = job_name(cfg)
        record_failure(name, one_line(e))
        if multirun and not in_run_dir:  # refused, busy, finished, or failed before its directory was locked
            try:
                record_sweep_failure(HydraConfig.get().sweep.dir, name, one_line(e))
            except OSError as unwritten:  # a full or read-only disk: said, and the sweep's other jobs go on
                log.error("%s not written: %s", Path(HydraConfig.get().sweep.dir) / "failures.json",
                            one_line(unwritten))
        if cfg.fail_fast and multirun:
            raise
        # What a launcher that runs jobs in other processes (submitit, SLURM) reads back for the summary.
        return {"run_dir": str(run_dir), "run_name": name, "failed": True, "error": one_line(e)}
    finally:
        _finish_wandb()


def run_finished(cfg: DictConfig, run_dir: Path) -> bool:
    """Training done and results stored: what a later launch that fails must leave as it was."""
    from src.results import results_path
    from src.training.job import training_finished

    # Any results.json, a folder or a dangling link too (read_results refuses those, naming it): not evaluated over.
    return os.path.lexists(results_path(run_dir)) and training_finished(cfg, run_dir)


def cli() -> int:
    # Hydra's composition errors (an option or a key that does not exist, an override it cannot parse) reach us as
    # exceptions, to be said in one line; Hydra itself prints them over many lines. A user's HYDRA_FULL_ERROR=1
    # keeps Hydra's full report.
    condense = "HYDRA_FULL_ERROR" not in os.environ
    misplaced = misplaced_option(sys.argv[1:]) if condense else None
    if misplaced:
        print(misplaced, file=sys.stderr)
        return 2  # argparse's status for a command line it cannot read
    if condense:
        os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        main()
    except LaunchError as e:  # the cluster took none of a batch's jobs, or Ctrl-C while waiting for them
        print(one_line(e), file=sys.stderr)
        if FAILED:
            print(summary(), file=sys.stderr)
        return e.exit_status
    except HydraException as e:
        line = hydra_error_line(e) if condense else None
        if line is None:
            raise
        print(line, file=sys.stderr)
        return 1
    except SystemExit as e:
        # Lightning's SIGTERMException, if Lightning was imported at all: a check that imports it would add seconds
        # to every refusal said before a job starts (sys.exit with a one-line error).
        exceptions = sys.modules.get("lightning.pytorch.utilities.exceptions")
        if exceptions is None or not isinstance(e, exceptions.SIGTERMException):  # Ctrl-C: Lightning exits 1 itself
            raise
        # kill / scancel: training stopped between two steps with last.ckpt saved. A SystemExit without a code, which
        # would end the command with status 0 as if it had finished.
        if FAILED:
            print(summary(), file=sys.stderr)
        print("stopped on SIGTERM (last.ckpt saved); rerun the command to resume", file=sys.stderr)
        return 128 + signal.SIGTERM
    except KeyboardInterrupt:
        # Ctrl-C outside Lightning's fit (which exits 1 itself): in an evaluation-only job (a relaunch with another
        # evaluation setting, a reused training), whose finished settings are in results.json already, or before a
        # job started. One line and status 1, as after Ctrl-C in training, not a traceback.
        if FAILED:
            print(summary(), file=sys.stderr)
        print("interrupted (Ctrl-C); rerun the command to resume", file=sys.stderr)
        return 1
    except Exception as e:
        if isinstance(e, OSError) and (not FAILED or FAILED[-1][1] != one_line(e)):
            # A folder or file the launch itself writes (the run or sweep directory, multirun.yaml, jobs.json) on a
            # read-only or full file system: `OSError: [Errno 30] Read-only file system: '<path>'`, not a traceback.
            if FAILED:
                print(summary(), file=sys.stderr)
            print(f"error: {one_line(e)}", file=sys.stderr)
            return 1
        # fail_fast=true: the sweeper re-raises the first failed job's error, which the job has said in one line and
        # recorded (its traceback is in its run.log and error.json): the summary, not a second, longer telling.
        if not FAILED or FAILED[-1][1] != one_line(e):
            raise
        print(summary(), file=sys.stderr)
        print("fail_fast=true: the sweep stopped at the first failed job; rerun it to go on", file=sys.stderr)
        return 1
    finally:
        if condense:
            os.environ.pop("HYDRA_FULL_ERROR", None)
    if FAILED:
        print(summary(), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(cli())
