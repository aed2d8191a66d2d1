"""The training curve in `csv/metrics.csv`, kept across resumes.

Lightning's CSVLogger deletes an existing metrics.csv when a new fit starts in the same folder, so a resumed (or
evaluation-only) rerun would keep only its own rows. Here every attempt appends its rows to the one file, each row
tagged with its `attempt` (0, 1, ...). A resumed attempt re-logs the steps between its checkpoint and the point
where the previous attempt stopped; `read_metrics` keeps, for each step, the rows of the latest attempt that
logged it, which gives the curve of the run as if it had never stopped.
"""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path

import pandas as pd
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter

from src.utils.io import atomic_write_bytes

METRICS_FILE = "metrics.csv"
ATTEMPT = "attempt"


class _AppendingWriter(ExperimentWriter):
    """Lightning's CSV writer, appending to the file of earlier attempts instead of deleting it."""

    def __init__(self, log_dir: str) -> None:
        super().__init__(log_dir)
        self.attempt = 0
        _drop_partial_row(self.metrics_file_path)
        if os.path.isfile(self.metrics_file_path):
            with open(self.metrics_file_path, newline="") as f:
                reader = csv.DictReader(f)
                self.metrics_keys = sorted(reader.fieldnames or [])  # the header the earlier rows were written with
                attempts = [int(row[ATTEMPT]) for row in reader if row.get(ATTEMPT) not in (None, "")]
            self.attempt = max(attempts, default=0) + 1

    def _check_log_dir_exists(self) -> None:  # Lightning's version removes metrics.csv
        pass

    def log_metrics(self, metrics_dict: dict, step: int | None = None) -> None:
        super().log_metrics({**metrics_dict, ATTEMPT: self.attempt}, step)

    def save(self) -> None:
        try:
            super().save()
        except OSError as e:  # an append on a full disk names no file (the half row it left is cut at the resume)
            if e.errno is None or e.filename is not None:
                raise
            raise type(e)(e.errno, e.strerror, str(self.metrics_file_path)) from e

    def _rewrite_with_new_header(self, fieldnames: list[str]) -> None:
        # Lightning's truncates the file, then writes it again: a kill in between lost every attempt's rows.
        with open(self.metrics_file_path, newline="") as f:
            rows = list(csv.DictReader(f))
        text = io.StringIO(newline="")
        writer = csv.DictWriter(text, fieldnames=fieldnames)
        writer.writeheader()
        writer.writerows(rows)
        atomic_write_bytes(self.metrics_file_path, text.getvalue().encode("utf-8"))


def _drop_partial_row(path: str) -> None:
    """Cut the row a kill left half-written at the end of metrics.csv (no newline): the next attempt's first row
    would run on from it, a row of too many fields that read_metrics cannot parse. A file without a whole header
    line is removed (the next attempt writes one)."""
    if not os.path.isfile(path):
        return
    with open(path, "rb+") as f:
        data = f.read()
        if data.endswith(b"\n"):
            return
        keep = data.rfind(b"\n") + 1
        f.truncate(keep)
    if keep == 0:
        os.remove(path)


class ResumableCSVLogger(CSVLogger):
    """CSVLogger whose metrics.csv holds every attempt's rows (see the module docstring)."""

    @property
    def experiment(self) -> _AppendingWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingWriter(log_dir=self.log_dir)
        return self._experiment


def read_metrics(path: str | os.PathLike) -> pd.DataFrame:
    """A run's training curve from `<run dir>/csv/metrics.csv` (or the file itself), as if it had never stopped:
    a value logged again at the same step by a later attempt (a resume redoing the steps after its checkpoint)
    replaces the earlier one; rows left without values are dropped. Other values are kept whatever attempt logged
    them, so an evaluation-only rerun adds its rows to the training curve."""
    path = Path(path)
    if path.is_dir():
        path = path / "csv" / METRICS_FILE
    log = pd.read_csv(path)
    if ATTEMPT not in log or log.empty:
        return log
    log[ATTEMPT] = log[ATTEMPT].fillna(0).astype(int)  # rows written before attempts were recorded
    metrics = [c for c in log.columns if c not in ("step", "epoch", ATTEMPT)]
    out = log.copy()
    for name in metrics:
        logged = log[name].notna()
        latest = log[ATTEMPT].where(logged).groupby(log["step"]).transform("max")
        out.loc[logged & (log[ATTEMPT] < latest), name] = float("nan")
    out = out[out[metrics].notna().any(axis=1)]
    return out.sort_values(["step", ATTEMPT], kind="stable").reset_index(drop=True)
