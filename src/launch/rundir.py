"""One process per run directory: an exclusive lock, so two launches of one sweep never train into one run.

A relaunched sweep whose earlier jobs still run (or two users launching the same sweep) would otherwise have two
trainers overwrite each other's checkpoints. flock is released by the kernel when the process dies (killed,
preempted, node lost), so there is no stale lock to clean up.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import socket
import sys
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


HYDRA_SUBDIR = ".hydra"


#: The configuration of the latest `python -m src.evaluate` in a run directory: what the rank report ranks and
#: calls complete until the next launch (which removes it: save_job_config).
EVAL_REQUEST = "eval_request.yaml"


def evaluation_configs(run_dir: str | os.PathLike) -> tuple[Path, ...]:
    """The configurations whose evaluation settings a run's records are ranked under, newest first: the latest
    re-evaluation's request (only when no launch came after it), then launch_configs."""
    return (Path(run_dir) / EVAL_REQUEST, *launch_configs(run_dir))


def launch_configs(run_dir: str | os.PathLike) -> tuple[Path, Path]:
    """A run's configuration files, newest first: the latest launch's `.hydra/config.yaml`, then the `config.yaml`
    the directory was bound with (runs from before the job wrote its own .hydra have only that one)."""
    return Path(run_dir) / HYDRA_SUBDIR / "config.yaml", Path(run_dir) / "config.yaml"


def save_job_config(run_dir: str | os.PathLike, cfg) -> None:
    """Write the job's `.hydra/{config,hydra,overrides}.yaml`, as Hydra would, once the job owns run_dir.

    Hydra's own copy (hydra.output_subdir) is off (conf/config.yaml): Hydra writes it before the job runs, so a
    relaunch that is then refused would overwrite a finished run's record of its configuration.
    """
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    from src.utils.io import atomic_write_bytes

    if not is_launch_rank_zero():  # the job's other ranks share rank 0's directory
        return
    out = Path(run_dir) / HYDRA_SUBDIR
    hydra_cfg = HydraConfig.instance().cfg  # {"hydra": ...}
    files = {"config.yaml": cfg, "hydra.yaml": hydra_cfg, "overrides.yaml": hydra_cfg.hydra.overrides.task}
    for name, node in files.items():
        atomic_write_bytes(out / name, OmegaConf.to_yaml(node).encode("utf-8"))
    (Path(run_dir) / EVAL_REQUEST).unlink(missing_ok=True)  # this launch's settings are the run's latest request


RUN_LOG = "run.log"
LOG_FORMAT = "[%(asctime)s][%(name)s][%(levelname)s] %(message)s"  # as conf/hydra/job_logging/console.yaml


class _RunLogHandler(logging.FileHandler):
    """run.log's handler: a write the file system refuses (a full disk) is said once, in one line, and the job goes
    on without its log; logging's own handleError printed a traceback for every record."""

    failed = False

    def emit(self, record: logging.LogRecord) -> None:
        if not self.failed:
            super().emit(record)

    def handleError(self, record: logging.LogRecord) -> None:
        if not self.failed:
            self.failed = True
            error = sys.exc_info()[1]
            print(f"warning: {self.baseFilename} not written further: {type(error).__name__}: {error}",
                  file=sys.stderr)


@contextlib.contextmanager
def run_log(run_dir: str | os.PathLike) -> Iterator[_RunLogHandler]:
    """Append the job's log (the root logger's records) to `<run dir>/run.log` for the block: only once the job
    owns the directory, so a refused job adds nothing to a finished run's log. Yields the handler: its `failed`
    says whether run.log stopped being written (a full disk)."""
    handler = _RunLogHandler(Path(run_dir) / RUN_LOG)
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        yield handler
    finally:
        root.removeHandler(handler)
        with contextlib.suppress(OSError):  # its last flush on a full disk: the job's own error is what to say
            handler.close()
