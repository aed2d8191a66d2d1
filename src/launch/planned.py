"""The jobs a sweep was launched to run: `<sweep dir>/jobs.json`, written by the tagging sweeper (sweeper.py).

A job that never started leaves nothing in its run directory (there is none yet), so without this record a sweep
killed before its last job looks complete to the rank report. Every launch that runs something adds its jobs,
keyed by run name: a relaunch of part of a sweep (one recipe retried) does not forget the others, which are still
part of the study. The record is torch-free, written atomically under a lock (two launches of one sweep may run at
once), and a damaged one is kept aside as jobs.json.damaged with a warning (sweep_files.py).

Entry: {run name: {"run_dir": the run directory relative to the sweep directory, "overrides": the job's command-line
overrides, "time": when it was last launched}}.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from pathlib import Path

from src.launch.sweep_files import DamagedSweepFile, read_sweep_file, update_sweep_file

SWEEP_JOBS = "jobs.json"


def record_planned_jobs(sweep_dir: str | os.PathLike, jobs: Mapping[str, Mapping]) -> None:
    """Add the jobs a launch is about to run ({run name: {"run_dir", "overrides"}}) to `<sweep dir>/jobs.json`;
    the entries of earlier launches stay."""
    if not jobs:
        return
    now = time.strftime("%Y-%m-%dT%H:%M:%S")
    added = {str(name): {"run_dir": str(job["run_dir"]), "overrides": [str(o) for o in job.get("overrides", ())],
                         "time": now} for name, job in jobs.items()}
    update_sweep_file(Path(sweep_dir) / SWEEP_JOBS, lambda planned: {**planned, **added})


def read_planned_jobs(sweep_dir: str | os.PathLike) -> dict[str, dict]:
    """{run name: entry} from `<sweep dir>/jobs.json`; {} for a sweep launched before the record existed;
    DamagedSweepFile (a ValueError naming the file) when it cannot be read."""
    path = Path(sweep_dir) / SWEEP_JOBS
    planned = read_sweep_file(path)
    bad = [name for name, job in planned.items() if not (isinstance(job, dict) and isinstance(job.get("run_dir"), str))]
    if bad:
        raise DamagedSweepFile(f"{path} is unreadable (entry {bad[0]!r} has no run_dir)")
    return planned


def planned_run_dir(sweep_dir: str | os.PathLike, job: Mapping) -> Path:
    """The run directory of a planned job (its run_dir is relative to the sweep directory, so a copied or moved
    sweep still finds its runs)."""
    return Path(sweep_dir) / job["run_dir"]
