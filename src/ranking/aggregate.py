"""Load a sweep's results and rank recipes per control setting, averaged as in the paper's Table 1 (docs/ranking.md#average-rank-and-columns)."""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import pandas as pd
import yaml

from src.ranking.nds import non_dominated_ranks
from src.ranking.paper import COLUMNS

RUN_MARKERS = (".hydra/config.yaml", "results.json", "error.json")
SETTING_KEY = ["dataset", "setting", "ema"]  # a control setting (docs/ranking.md#control-settings: dataset x sampler setting x EMA)
RECORD_KEY = ["recipe", *SETTING_KEY]
REQUIRED_FIELDS = ("recipe", "dataset", "setting", "steps", "cfg", "ema", "clip_score", "fid_clip")
OPTIONAL_FIELDS = (
    "family", "params", "shift", "fid_inception", "n_samples", "checkpoint_step", "arrays",
    "reference_arrays", "created",
)
OBJECTIVES = (("clip_score", True), ("fid_clip", False))  # CLIP score up, FID down (docs/ranking.md#objectives)


@dataclass
class Sweep:
    """Records of one or more sweep directories, with the status of every run directory found."""

    roots: tuple[Path, ...]
    records: pd.DataFrame
    runs: pd.DataFrame
    duplicates: pd.DataFrame

    @property
    def name(self) -> str:
        """Sweep name: the directory name, or the names joined with '+'."""
        return "+".join(root.name for root in self.roots)

    @property
    def partial(self) -> bool:
        """True when some run has no results (running, killed, failed or unreadable)."""
        return bool((self.runs["status"] != "done").any())


# ---------------------------------------------------------------------------------------------- loading


def is_run_dir(path: Path) -> bool:
    """A run directory holds .hydra/config.yaml, results.json or error.json."""
    return any((path / marker).is_file() for marker in RUN_MARKERS)


def find_run_dirs(root: Path | str) -> list[Path]:
    """Run directories under root (root itself included), not descending into a run directory."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"sweep directory {str(root)!r} does not exist")
    found = []
    for current, dirs, _ in os.walk(root):
        path = Path(current)
        if is_run_dir(path):
            found.append(path)
            dirs[:] = []
        else:
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
    return sorted(found)


def load_run(run_dir: Path) -> tuple[dict, list[dict]]:
    """Status row and record rows of one run directory."""
    results, error = run_dir / "results.json", run_dir / "error.json"
    status = {"run_dir": str(run_dir), "status": "incomplete", "error": "", "n_records": 0,
              "overrides": _read_overrides(run_dir)}
    records: list[dict] = []
    if error.is_file():
        status["status"] = "failed"
        status["error"] = _read_error(error)
    if results.is_file():
        try:
            raw = json.loads(results.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            status.update(status="unreadable", error=f"results.json: {exc}")
            return status, records
        if not isinstance(raw, list):
            raise ValueError(f"{results}: expected a JSON list of records, got {type(raw).__name__}")
        records = [_record_row(rec, run_dir, results, i) for i, rec in enumerate(raw)]
        status["n_records"] = len(records)
        if status["status"] == "incomplete":
            status["status"] = "done"
    return status, records


def load_sweep(dirs: Iterable[Path | str]) -> Sweep:
    """Records and run statuses of every run directory under the given sweep directories."""
    roots = tuple(Path(d) for d in dirs)
    if not roots:
        raise ValueError("load_sweep: no sweep directory given")
    statuses, rows = [], []
    for root in roots:
        for run_dir in find_run_dirs(root):
            status, records = load_run(run_dir)
            statuses.append({"sweep": root.name, **status})
            rows.extend({"sweep": root.name, **rec} for rec in records)
    runs = pd.DataFrame(statuses, columns=["sweep", "run_dir", "status", "error", "n_records", "overrides"])
    records = pd.DataFrame(rows, columns=["sweep", "run_dir", *REQUIRED_FIELDS, *OPTIONAL_FIELDS])
    records, duplicates = _drop_duplicates(records)
    return Sweep(roots=roots, records=records, runs=runs, duplicates=duplicates)


def _read_overrides(run_dir: Path) -> str:
    """The job's Hydra overrides (.hydra/overrides.yaml) as one string, naming the recipe of a failed job."""
    path = run_dir / ".hydra" / "overrides.yaml"
    try:
        overrides = yaml.safe_load(path.read_text()) if path.is_file() else None
    except (OSError, yaml.YAMLError):
        return ""
    return " ".join(map(str, overrides)) if isinstance(overrides, list) else ""


def _read_error(path: Path) -> str:
    """One-line summary of an error.json."""
    try:
        err = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        return f"unreadable error.json: {exc}"
    if not isinstance(err, dict):
        return str(err).splitlines()[0] if str(err) else ""
    message = str(err.get("error", "")).strip().splitlines()
    kind = err.get("type", "")
    return f"{kind}: {message[0] if message else ''}".strip(": ")


def _record_row(rec: dict, run_dir: Path, results: Path, index: int) -> dict:
    """One results.json record as a flat table row, paths made absolute."""
    if not isinstance(rec, dict):
        raise ValueError(f"{results}: record {index} is a {type(rec).__name__}, expected an object")
    missing = [f for f in REQUIRED_FIELDS if f not in rec]
    if missing:
        raise ValueError(f"{results}: record {index} lacks required field(s) {missing}")
    row = {f: rec[f] for f in REQUIRED_FIELDS}
    row.update({f: rec.get(f) for f in OPTIONAL_FIELDS})
    row["run_dir"] = str(run_dir)
    row["steps"] = int(row["steps"])
    row["cfg"] = float(row["cfg"])
    row["ema"] = bool(row["ema"])
    for metric in ("clip_score", "fid_clip", "fid_inception"):
        row[metric] = math.nan if row[metric] is None else float(row[metric])
    row["params"] = json.dumps(row["params"], sort_keys=True) if row["params"] is not None else None
    for key in ("arrays", "reference_arrays"):
        row[key] = resolve_path(row[key], run_dir) if row[key] else None
    return row


def resolve_path(path: str, run_dir: Path) -> str:
    """An absolute path for a results path: absolute as is, else relative to the run dir, else to the cwd."""
    p = Path(path)
    if p.is_absolute():
        return str(p)
    in_run = run_dir / p
    if in_run.exists() or not p.exists():
        return str(in_run.resolve())
    return str(p.resolve())


def _drop_duplicates(records: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Keep the newest record per (recipe, control setting) (e.g. a rerun job); return the dropped ones."""
    if records.empty:
        return records.reset_index(drop=True), records.copy()
    order = records.assign(_created=records["created"].fillna("").astype(str), _pos=np.arange(len(records)))
    order = order.sort_values(["_created", "_pos"], kind="stable")
    keep = ~order.duplicated(RECORD_KEY, keep="last")
    kept = order[keep].sort_values("_pos").drop(columns=["_created", "_pos"]).reset_index(drop=True)
    dropped = order[~keep].sort_values("_pos").drop(columns=["_created", "_pos"]).reset_index(drop=True)
    return kept, dropped


# ---------------------------------------------------------------------------------------------- settings


def control_settings(records: pd.DataFrame) -> pd.DataFrame:
    """The control settings present, one row each (dataset, setting, ema, steps, cfg), in a stable order."""
    cols = [*SETTING_KEY, "steps", "cfg"]
    settings = records[cols].drop_duplicates(SETTING_KEY)
    order = ["dataset", "steps", "cfg", "setting", "ema"]
    settings = settings.sort_values(order, ascending=[True, True, True, True, False])  # EMA before raw
    return settings.reset_index(drop=True)


def setting_label(dataset: str, setting: str, ema: bool) -> str:
    """Human-readable name of a control setting."""
    return f"{dataset}, {setting}, {'EMA' if ema else 'raw'}"


def setting_groups(records: pd.DataFrame, fifty_step_cfg: Sequence[float] | None = None) -> dict[str, pd.Series]:
    """Row masks of the column groups: all settings, the 5-step ones, the 50-step ones (optionally some CFG scales)."""
    fifty = records["steps"] == 50
    if fifty_step_cfg is not None:
        cfgs = [float(c) for c in fifty_step_cfg]
        if not cfgs or not all(math.isfinite(c) for c in cfgs):
            raise ValueError(f"fifty_step_cfg={list(fifty_step_cfg)!r}: give one or more finite CFG scales")
        present = sorted(records.loc[fifty, "cfg"].unique().tolist())
        absent = [c for c in cfgs if not np.isclose(present, c).any()]
        if absent:
            raise ValueError(
                f"fifty_step_cfg={cfgs}: no 50-step setting has CFG scale {absent}; the sweep has {present or 'none'}"
            )
        fifty = fifty & np.isclose(records["cfg"].to_numpy()[:, None], cfgs).any(axis=1)
    return {"all": pd.Series(True, index=records.index), "5 steps": records["steps"] == 5, "50 steps": fifty}


def describe_fifty_step(records: pd.DataFrame, fifty_step_cfg: Sequence[float] | None) -> str:
    """One sentence stating which settings the 50-step column averages."""
    present = sorted(records.loc[records["steps"] == 50, "cfg"].unique().tolist())
    chosen = present if fifty_step_cfg is None else sorted(float(c) for c in fifty_step_cfg)
    scales = ", ".join(f"{c:.1f}" if round(c, 1) == c else f"{c:g}" for c in chosen) or "none present"
    how = "all 50-step settings (default)" if fifty_step_cfg is None else "chosen with --fifty-step-cfg"
    return (
        f"50 steps column: the 50-step settings at CFG {scales}, {how}; the paper does not state which CFG "
        "scale(s) its 50-step column uses (its values are multiples of 0.25, suggesting one)."
    )


# ---------------------------------------------------------------------------------------------- ranking


def fronts_per_setting(records: pd.DataFrame, clip=None, fid=None) -> np.ndarray:
    """Front index of every record within its control setting; clip / fid may be (B, rows) bootstrap draws."""
    clip = records["clip_score"].to_numpy(float) if clip is None else np.asarray(clip, float)
    fid = records["fid_clip"].to_numpy(float) if fid is None else np.asarray(fid, float)
    single = clip.ndim == 1
    clip, fid = np.atleast_2d(clip), np.atleast_2d(fid)
    fronts = np.zeros(clip.shape, dtype=np.int64)
    maximize = [up for _, up in OBJECTIVES]
    for rows in records.groupby(SETTING_KEY, sort=False).indices.values():
        for b in range(clip.shape[0]):
            points = np.column_stack([clip[b, rows], fid[b, rows]])
            # A record whose metrics are NaN (e.g. diverged samples) goes to the last front of its setting.
            fronts[b, rows] = non_dominated_ranks(points, maximize, nan_policy="last")
    return fronts[0] if single else fronts


def rank_table(records: pd.DataFrame) -> pd.DataFrame:
    """The records with their front index ('front') within each control setting."""
    return records.assign(front=fronts_per_setting(records))


def average_weights(
    records: pd.DataFrame, groups: dict[str, pd.Series], recipes: Sequence[str]
) -> dict[str, np.ndarray]:
    """Per column a (rows, recipes) matrix W: fronts @ W is each recipe's mean front over the column's settings."""
    recipe_pos = {r: i for i, r in enumerate(recipes)}
    cols = records["recipe"].map(recipe_pos).to_numpy()
    weights = {}
    for name, mask in groups.items():
        w = np.zeros((len(records), len(recipes)))
        rows = np.flatnonzero(np.asarray(mask))
        w[rows, cols[rows]] = 1.0
        counts = w.sum(axis=0)
        weights[name] = np.divide(w, counts, out=np.full_like(w, np.nan), where=counts > 0)
    return weights


def average_ranks(ranked: pd.DataFrame, groups: dict[str, pd.Series]) -> pd.DataFrame:
    """Mean front per recipe over each column's control settings, with the number of settings covered ('n <column>')."""
    recipes = sorted(ranked["recipe"].unique())
    weights = average_weights(ranked, groups, recipes)
    fronts = ranked["front"].to_numpy(float)
    table = pd.DataFrame(index=pd.Index(recipes, name="recipe"))
    for name in COLUMNS:
        mask = np.asarray(groups[name])
        table[name] = mean_over_settings(fronts, weights[name])
        table[f"n {name}"] = ranked[mask].groupby("recipe").size().reindex(recipes, fill_value=0).astype(int)
    return table.sort_values(["all", "recipe"], na_position="last")


def mean_over_settings(fronts: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """fronts (rows,) or (B, rows) @ weights, NaN for recipes with no settings (all-NaN weight columns)."""
    out = np.asarray(fronts, dtype=float) @ np.nan_to_num(weights)
    out[..., np.isnan(weights).all(axis=0)] = np.nan
    return out


def missing_settings(records: pd.DataFrame) -> dict[str, list[str]]:
    """For each recipe lacking some control setting of the sweep, the labels of the settings it lacks."""
    settings = control_settings(records)
    all_keys = list(settings[SETTING_KEY].itertuples(index=False, name=None))
    have = records.groupby("recipe")[SETTING_KEY].apply(lambda g: set(g.itertuples(index=False, name=None)))
    missing = {}
    for recipe in sorted(have.index):
        lacks = [setting_label(*key) for key in all_keys if key not in have[recipe]]
        if lacks:
            missing[recipe] = lacks
    return missing
