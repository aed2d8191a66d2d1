"""The failed jobs of this process's sweep, for the summary the entry point prints before a non-zero exit.

A module of its own because `python -m src.run` runs src/run.py as `__main__`: a list kept there would not be the
one a launcher appends to when it collects failures reported by job processes (SLURM, submitit).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

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
    lines = [f"{len(FAILED)} job(s) failed:"]
    lines += [f"  {name}: {err}" for name, err in FAILED]
    return "\n".join(lines)


SWEEP_FAILURES = "failures.json"


def record_sweep_failure(sweep_dir: str | os.PathLike, name: str, error: str, nameless: bool = False) -> None:
    """Note in `<sweep dir>/failures.json` a job that failed before it could use its run directory (a configuration
    error, a refused relaunch, a busy directory): such a job writes nothing into its run directory, so the sweep's
    own file is where a reader (and the rank report) finds it. Entries are keyed by run name, the latest kept;
    nameless: the job has no run name, `name` stands in for one (forget_nameless_failures drops it)."""
    from src.utils.io import atomic_write_json, file_lock

    path = Path(sweep_dir) / SWEEP_FAILURES
    with file_lock(Path(sweep_dir) / f".{SWEEP_FAILURES}.lock"):
        failures = read_sweep_failures(sweep_dir)
        failures[str(name)] = {"error": str(error).splitlines()[0] if str(error) else "unknown error",
                               "time": time.strftime("%Y-%m-%dT%H:%M:%S"), **({"nameless": True} if nameless else {})}
        atomic_write_json(path, failures, sort_keys=True)


def forget_nameless_failures(sweep_dir: str | os.PathLike) -> None:
    """Drop the entries of jobs without a run name (an earlier launch's invalid recipes: no run clears them)."""
    from src.utils.io import atomic_write_json, file_lock

    path = Path(sweep_dir) / SWEEP_FAILURES

    def nameless(entry) -> bool:
        return isinstance(entry, dict) and bool(entry.get("nameless"))

    if not path.is_file() or not any(nameless(v) for v in read_sweep_failures(sweep_dir).values()):
        return
    with file_lock(Path(sweep_dir) / f".{SWEEP_FAILURES}.lock"):
        failures = {k: v for k, v in read_sweep_failures(sweep_dir).items() if not nameless(v)}
        atomic_write_json(path, failures, sort_keys=True)


def clear_sweep_failure(sweep_dir: str | os.PathLike, name: str) -> None:
    """Drop a job's entry from `<sweep dir>/failures.json` once it ran (no file written when it has none)."""
    from src.utils.io import atomic_write_json, file_lock

    path = Path(sweep_dir) / SWEEP_FAILURES
    if not path.is_file() or str(name) not in read_sweep_failures(sweep_dir):
        return
    with file_lock(Path(sweep_dir) / f".{SWEEP_FAILURES}.lock"):
        failures = read_sweep_failures(sweep_dir)
        if failures.pop(str(name), None) is not None:
            atomic_write_json(path, failures, sort_keys=True)


def read_sweep_failures(sweep_dir: str | os.PathLike) -> dict[str, dict]:
    """{run name: {"error", "time"}} from `<sweep dir>/failures.json` ({} when there is none)."""
    path = Path(sweep_dir) / SWEEP_FAILURES
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}
