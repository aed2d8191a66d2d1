"""The results record (one per recipe, dataset, sampler setting, EMA; docs/evaluation.md#results-records) and results.json in a run dir.

results.json is a JSON list of records. Every write goes through a temporary file and a rename, under a lock
file, so readers never see a partial file and concurrent writers in one run directory do not lose records.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Mapping

from src.utils.io import atomic_write_json as save_json
from src.utils.io import file_lock

RESULTS_FILE = "results.json"
#: A record is identified by (recipe, dataset, setting, ema): one per control setting of a recipe (docs/evaluation.md#results-records, docs/ranking.md#control-settings).
RECORD_KEY = ("recipe", "dataset", "setting", "ema")


@dataclass
class Record:
    """One evaluation result: a recipe's checkpoint sampled at one setting, with or without EMA weights."""

    recipe: str
    family: str
    params: dict[str, float]
    dataset: str
    setting: str  # SamplerSetting.label, e.g. "50 steps, cfg 5.0"
    steps: int
    cfg: float
    shift: float
    ema: bool
    clip_score: float | None  # mean raw cosine (src/metrics/clip.py)
    fid_clip: float | None  # Frechet distance on L2-normalised CLIP image embeddings (src/metrics/clip.py)
    fid_inception: float | None  # torch-fidelity Inception pool features; None when not computed
    n_samples: int
    n_reference: int  # evaluation images behind the reference statistics
    seed: int  # initial-noise seed (common random numbers)
    checkpoint_step: int | None
    arrays: str  # npz relative to the run dir: clip_scores (n,), features (n, d) [, inception_features]
    reference_arrays: str  # npz with the evaluation images' features (m, d); relative to the run dir or absolute
    config: dict[str, Any] = field(default_factory=dict)
    created: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict; non-finite metrics become null."""
        d = asdict(self)
        for k in ("clip_score", "fid_clip", "fid_inception"):
            if d[k] is not None and not math.isfinite(d[k]):
                d[k] = None
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Record":
        """Rebuild a record; a missing field is an error naming it."""
        names = [f.name for f in fields(cls)]
        missing = [n for n in names if n not in d and n not in ("config", "created")]
        if missing:
            raise ValueError(f"results record lacks field(s) {missing}; has {sorted(d)}")
        return cls(**{n: d[n] for n in names if n in d})


def record_key(record: Mapping[str, Any] | Record) -> tuple:
    """(recipe, dataset, setting, ema) of a record."""
    d = record.to_dict() if isinstance(record, Record) else record
    return tuple(bool(d[k]) if k == "ema" else d[k] for k in RECORD_KEY)


def results_path(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / RESULTS_FILE


def read_results(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of a run directory ([] when it has no results.json)."""
    path = results_path(run_dir)
    if not path.is_file():
        return []
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise ValueError(f"{path}: expected a JSON list of record objects")
    return data


def write_results(run_dir: str | os.PathLike, records: Iterable[Mapping[str, Any] | Record]) -> Path:
    """Replace results.json atomically with these records."""
    rows = [r.to_dict() if isinstance(r, Record) else dict(r) for r in records]
    return save_json(results_path(run_dir), rows)


def merge_results(run_dir: str | os.PathLike, new: Iterable[Mapping[str, Any] | Record]) -> list[dict[str, Any]]:
    """Add records to results.json, replacing those with the same key; atomic and locked. Returns all records."""
    run_dir = Path(run_dir)
    rows = [r.to_dict() if isinstance(r, Record) else dict(r) for r in new]
    with file_lock(run_dir / f".{RESULTS_FILE}.lock"):
        records = read_results(run_dir)
        replaced = {record_key(r) for r in rows}
        records = [r for r in records if record_key(r) not in replaced] + rows
        write_results(run_dir, records)
    return records


def find_record(records: Iterable[Mapping[str, Any]], key: tuple) -> dict[str, Any] | None:
    """The record with this (recipe, dataset, setting, ema) key, or None (the last one if several)."""
    found = None
    for r in records:
        if record_key(r) == key:
            found = dict(r)
    return found
