"""One process per run directory: an exclusive lock, so two launches of one sweep never train into one run.

A relaunched sweep whose earlier jobs still run (or two users launching the same sweep) would otherwise have two
trainers overwrite each other's checkpoints. flock is released by the kernel when the process dies (killed,
preempted, node lost), so there is no stale lock to clean up.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
from pathlib import Path
from typing import Iterator

LOCK_FILE = ".run.lock"


class RunDirBusy(RuntimeError):
    """Another live process holds the run directory."""


# Where launchers put a process's rank before Lightning knows it: torchrun (RANK), SLURM (SLURM_PROCID), and
# Lightning's own re-launch of a single run over several devices (LOCAL_RANK and NODE_RANK in the children).
RANK_VARIABLES = ("RANK", "SLURM_PROCID", "LOCAL_RANK", "NODE_RANK")


def is_launch_rank_zero() -> bool:
    """Whether this process is its job's first rank (or the job has one process)."""
    return all(os.environ.get(key, "0") in ("", "0") for key in RANK_VARIABLES)


@contextlib.contextmanager
def run_dir_lock(run_dir: str | os.PathLike) -> Iterator[None]:
    """Hold run_dir's lock for the block (rank 0 only: the other ranks of a job share their rank 0's run)."""
    if not is_launch_rank_zero():
        yield
        return
    path = Path(run_dir) / LOCK_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "unknown process"
            raise RunDirBusy(f"{run_dir} is in use by another job ({holder}); not starting a second one") from None
        try:
            f.seek(0)
            f.truncate()
            f.write(json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                                "slurm_job": os.environ.get("SLURM_JOB_ID")}))
            f.flush()
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)
