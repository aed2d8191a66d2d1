"""The failed jobs of this process's sweep, for the summary the entry point prints before a non-zero exit.

A module of its own because `python -m src.run` runs src/run.py as `__main__`: a list kept there would not be the
one a launcher appends to when it collects failures reported by job processes (SLURM, submitit).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from src.launch.sweep_files import read_for_update, read_sweep_file

#: (run name, one-line error) of every failed job, in the order they were collected.
FAILED: list[tuple[str, str]] = []


def one_line(exc: BaseException) -> str:
    """`Type: first line of the message`."""
    text = f"{type(exc).__name__}: {exc}".strip()
    return text.splitlines()[0] if text else type(exc).__name__


def record_failure(name: str, error: str) -> None:
    FAILED.append((str(name), str(error).splitlines()[0] if str(error) else "unknown error"))


def summary() -> str:
    """The failure summary; empty when every job succeeded."""
    if not FAILED:
        return ""
    return "\n".join([f"{len(FAILED)} job(s) failed:", *(f"  {line}" for line in grouped(FAILED))])


NAMES_SHOWN = 3  # job names a line of several jobs failing alike spells out


def grouped(failures: list[tuple[str, str]]) -> list[str]:
    """`name: error` per failed job, in order, jobs that failed with the same error in one line (`61 jobs
    (imagenet/rf, imagenet/edm, imagenet/eps_linear and 58 more): error`): the paper grid without its data is one
    cause, not 122 lines."""
    by_error: dict[str, list[str]] = {}
    for name, error in failures:
        by_error.setdefault(error, []).append(name)
    lines = []
    for error, names in by_error.items():
        if len(names) == 1:
            lines.append(f"{names[0]}: {error}")
            continue
        more = f" and {len(names) - NAMES_SHOWN} more" if len(names) > NAMES_SHOWN else ""
        lines.append(f"{len(names)} jobs ({', '.join(names[:NAMES_SHOWN])}{more}): {error}")
    return lines


SWEEP_FAILURES = "failures.json"


def record_sweep_failure(sweep_dir: str | os.PathLike, name: str, error: str, nameless: bool = False) -> None:
    """Note in `<sweep dir>/failures.json` a job that failed before it could use its run directory (a configuration
    error, a refused relaunch, a busy directory): such a job writes nothing into its run directory, so the sweep's
    own file is where a reader (and the rank report) finds it. Entries are keyed by run name, the latest kept;
    nameless: the job has no run name, `name` stands in for one (forget_nameless_failures drops it). A damaged file
    is kept aside as failures.json.damaged, with a warning (src/launch/sweep_files.py)."""
    from src.utils.io import atomic_write_json, file_lock

    path = Path(sweep_dir) / SWEEP_FAILURES
    with file_lock(Path(sweep_dir) / f".{SWEEP_FAILURES}.lock"):
        failures = read_for_update(path)
        failures[str(name)] = {"error": str(error).splitlines()[0] if str(error) else "unknown error",
                               "time": time.strftime("%Y-%m-%dT%H:%M:%S"), **({"nameless": True} if nameless else {})}
        atomic_write_json(path, failures, sort_keys=True)


def forget_nameless_failures(sweep_dir: str | os.PathLike) -> None:
    """Drop the entries of jobs without a run name (an earlier launch's invalid recipes: no run clears them)."""
    _update_failures(sweep_dir, lambda failures: {k: v for k, v in failures.items()
                                                  if not (isinstance(v, dict) and v.get("nameless"))})


def clear_sweep_failure(sweep_dir: str | os.PathLike, name: str) -> None:
    """Drop a job's entry from `<sweep dir>/failures.json` once it ran (no file written when it has none)."""
    _update_failures(sweep_dir, lambda failures: {k: v for k, v in failures.items() if k != str(name)})


def _update_failures(sweep_dir: str | os.PathLike, change) -> None:
    """Rewrite failures.json with change(entries) when that differs; nothing is written when there is no file. A
    damaged file is kept aside (read_for_update) rather than read as empty and overwritten."""
    from src.utils.io import atomic_write_json, file_lock

    path = Path(sweep_dir) / SWEEP_FAILURES
    if not path.is_file():
        return
    with file_lock(Path(sweep_dir) / f".{SWEEP_FAILURES}.lock"):
        if not path.is_file():
            return
        failures = read_for_update(path)
        changed = change(failures)
        if changed != failures or not path.is_file():  # (a damaged file set aside: a readable one replaces it)
            atomic_write_json(path, changed, sort_keys=True)


def read_sweep_failures(sweep_dir: str | os.PathLike) -> dict[str, dict]:
    """{run name: {"error", "time"}} from `<sweep dir>/failures.json` ({} when there is none); DamagedSweepFile (a
    ValueError naming the file) when it cannot be read: a damaged record of failed jobs is not an empty one."""
    return read_sweep_file(Path(sweep_dir) / SWEEP_FAILURES)


class LaunchError(RuntimeError):
    """The launcher could not hand the sweep's jobs to the cluster (no SLURM commands, controller down, a refused
    submission): said in one line by src.run, with the summary of jobs that failed before it."""

    exit_status = 1


class StoppedWaiting(LaunchError):
    """Ctrl-C while the launcher waited for jobs that run on without it (SLURM): said in one line, exit status 130."""

    exit_status = 130
