"""The report's sample comparison, from the files the evaluation writes (eval/<stem>.npz and eval/<stem>.png).

Sample k of every evaluation grid has the same prompt and the same initial noise, in every recipe and every sampler
setting (common random numbers), so cells can be compared side by side:
- per dataset, the first prompts of one sampler setting, one row per recipe (ordered by rank);
- per dataset, one prompt under every sampler setting (steps x CFG), one row per recipe.
The images come from the npz's `grid` array when the evaluation saved it, else are cut from the grid PNG
(src/evaluation/grids.py); the prompts from the npz's `prompts`, a JSON beside the PNG, or the run's evaluation
shards (prompt k is caption k of the evaluation set).
"""
from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pandas as pd

from src.evaluation.grids import read_grid, read_prompts, save_sheet

N_PROMPTS = 8  # columns of the side-by-side sheet
MAX_RECIPES = 12  # rows: the best-ranked recipes
TABLE2_STEPS = 25


def chosen_setting(records: pd.DataFrame) -> tuple[str, bool] | None:
    """(setting label, ema) shown side by side: 25 steps at the largest CFG with EMA weights (the paper's Table 2
    setting) when present, else the setting the most recipes share (ties: more steps, larger CFG, EMA)."""
    if records.empty:
        return None
    table2 = records[(records["steps"] == TABLE2_STEPS) & records["ema"].astype(bool)]
    if len(table2):
        row = table2.sort_values("cfg").iloc[-1]
        return str(row["setting"]), True
    counts = (records.groupby(["setting", "ema", "steps", "cfg"])["recipe"].nunique().rename("n").reset_index()
              .sort_values(["n", "steps", "cfg", "ema"]))
    row = counts.iloc[-1]
    return str(row["setting"]), bool(row["ema"])


def _paths(record) -> tuple[Path | None, Path | None]:
    arrays = record.get("arrays") if hasattr(record, "get") else None
    if not isinstance(arrays, str) or not arrays:
        return None, None
    npz = Path(arrays)
    if not npz.is_absolute() and isinstance(record.get("run_dir"), str):
        npz = Path(record["run_dir"]) / npz
    return npz, npz.with_suffix(".png")


def _eval_captions(record, n: int) -> list[str] | None:
    """The first n captions of the run's evaluation shards (prompt k of the evaluation is caption k % N)."""
    config = record.get("config") if hasattr(record, "get") else None
    if not isinstance(config, dict) and isinstance(record.get("run_dir"), str):  # the loaded records drop it
        config = _run_config(Path(record["run_dir"]))
    eval_dir = (config or {}).get("data", {}).get("eval_dir") if isinstance(config, dict) else None
    if not eval_dir or not (Path(eval_dir) / "meta.json").is_file():
        return None
    try:
        from src.data.shards import iter_samples

        return [s["caption"] for s in itertools.islice(iter_samples(eval_dir), n)]
    except Exception:  # unreadable shards: the sheet goes without prompts
        return None


def _run_config(run_dir: Path) -> dict | None:
    """The resolved configuration stored with the run's first result record."""
    try:
        records = json.loads((run_dir / "results.json").read_text())
        return records[0].get("config") if records else None
    except (OSError, ValueError, AttributeError, IndexError):
        return None


class _Samples:
    """Reads (and caches) the grid samples and prompts of records."""

    def __init__(self):
        self._images, self._prompts = {}, {}

    def images(self, record, n: int) -> np.ndarray | None:
        npz, png = _paths(record)
        if npz is None:
            return None
        key = str(npz)
        if key not in self._images:
            limit = min(n, int(record.get("n_samples") or n))
            self._images[key] = read_grid(npz, png, limit)
        return self._images[key]

    def prompts(self, record, n: int) -> list[str] | None:
        npz, png = _paths(record)
        key = str(npz)
        if key not in self._prompts:
            prompts = read_prompts(npz, png)
            if prompts is None:
                captions = _eval_captions(record, n)
                prompts = [captions[k % len(captions)] for k in range(n)] if captions else None
            self._prompts[key] = prompts
        return self._prompts[key]


def _ordered_recipes(records: pd.DataFrame, order: list[str] | None) -> list[str]:
    present = list(dict.fromkeys(records["recipe"]))
    ranked = [r for r in (order or []) if r in set(present)]
    return (ranked + [r for r in present if r not in set(ranked)])[:MAX_RECIPES]


def sample_figures(records: pd.DataFrame, out_dir: str | Path, order: list[str] | None = None) -> dict[str, Path]:
    """Write the comparison sheets into out_dir; returns title -> PNG path (empty when no grid is readable).

    records: the report's records (recipe, dataset, setting, steps, cfg, ema, arrays, run_dir, ...); order: the
    recipes by rank (rows follow it)."""
    out_dir = Path(out_dir)
    figures: dict[str, Path] = {}
    if records.empty or "arrays" not in records:
        return figures
    reader = _Samples()
    for dataset, part in records.groupby("dataset", sort=True):
        recipes = _ordered_recipes(part, order)
        chosen = chosen_setting(part)
        tag = "".join(c if c.isalnum() else "_" for c in str(dataset))
        # 1. the same prompts, one row per recipe, at one setting
        setting, ema = chosen
        rows, prompts = [], None
        for recipe in recipes:
            rec = part[(part["recipe"] == recipe) & (part["setting"] == setting) & (part["ema"] == ema)]
            images = reader.images(rec.iloc[0], N_PROMPTS) if len(rec) else None
            if images is not None and len(images):
                rows.append((recipe, list(images[:N_PROMPTS])))
                prompts = prompts or reader.prompts(rec.iloc[0], N_PROMPTS)
        if rows:
            n_cols = max(len(images) for _, images in rows)
            labels = prompts[:n_cols] if prompts else [f"prompt {k}" for k in range(n_cols)]
            title = f"{dataset}: the same prompts and noise in every recipe ({setting}, {'EMA' if ema else 'raw'})"
            path = out_dir / f"samples_{tag}.png"
            save_sheet(rows, labels, path, title=title)
            figures[f"Samples, {dataset}: same prompts across recipes"] = path
        # 2. one prompt under every sampler setting (EMA weights when evaluated), one row per recipe
        use_ema = bool(part["ema"].astype(bool).any())
        settings = (part[part["ema"].astype(bool) == use_ema][["setting", "steps", "cfg"]].drop_duplicates("setting")
                    .sort_values(["cfg", "steps"]))
        rows, prompt = [], None
        for recipe in recipes:
            cells = []
            for s in settings.itertuples(index=False):
                rec = part[(part["recipe"] == recipe) & (part["setting"] == s.setting) & (part["ema"] == use_ema)]
                images = reader.images(rec.iloc[0], 1) if len(rec) else None
                cells.append(images[0] if images is not None and len(images) else None)
                if prompt is None and len(rec):
                    found = reader.prompts(rec.iloc[0], 1)
                    prompt = found[0] if found else None
            if any(c is not None for c in cells):
                rows.append((recipe, cells))
        if rows and len(settings) > 1:
            title = (f"{dataset}: prompt {prompt!r}, one noise, every sampler setting "
                     f"({'EMA' if use_ema else 'raw'} weights)") if prompt else \
                f"{dataset}: sample 0 under every sampler setting ({'EMA' if use_ema else 'raw'} weights)"
            path = out_dir / f"steps_cfg_{tag}.png"
            save_sheet(rows, list(settings["setting"]), path, title=title)
            figures[f"Samples, {dataset}: one prompt across sampler settings"] = path
    return figures
