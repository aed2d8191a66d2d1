"""A synthetic sweep in the layout of outputs/multirun/<sweep>/<run dirs> for tests, demos and the notebook."""
from __future__ import annotations

import argparse
import io
import json
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from src.metrics.frechet import fid_from_features
from src.ranking.aggregate import FID_FEATURES

# The six Euler sampler settings of the study (docs/evaluation.md#sampler-settings): (steps, CFG scale).
SAMPLER_SETTINGS = ((50, 1.0), (50, 2.5), (50, 5.0), (5, 5.0), (10, 5.0), (25, 5.0))
DEFAULT_RECIPES = ("rf/lognorm(0.00, 1.00)", "rf/cosmap", "eps/linear", "v/cos", "edm(-1.20, 1.20)")
DATASETS = ("digits", "shapes")
STEP_QUALITY = {5: 0.45, 10: 0.7, 25: 0.9, 50: 1.0}


def setting_name(steps: int, cfg: float) -> str:
    """Sampler setting label, e.g. '50 steps, cfg 5.0'."""
    return f"{steps} steps, cfg {cfg:.1f}"


def write_synthetic_sweep(
    sweep_dir: Path | str,
    recipes: Sequence[str] = DEFAULT_RECIPES,
    datasets: Sequence[str] = DATASETS,
    quality: Sequence[float] | None = None,
    n_samples: int = 48,
    n_reference: int = 96,
    dim: int = 6,
    seed: int = 0,
    missing: Sequence[tuple] = (),
    failed: Sequence[str] = (),
    running: Sequence[str] = (),
    sampler_settings: Sequence[tuple[int, float]] = SAMPLER_SETTINGS,
    seeds: Sequence[int] | None = None,
    missing_seeds: Sequence[tuple[str, int]] = (),
    sampler: str | None = None,
    fid_features: str | None = FID_FEATURES,
) -> Path:
    """Write one run dir per (recipe, dataset[, training seed]); quality (default decreasing along recipes) orders
    the recipes.

    missing: (recipe, dataset, steps, cfg, ema) records left out; failed: recipes whose jobs wrote error.json;
    running: recipes whose jobs have only .hydra/config.yaml; sampler_settings: (steps, CFG) pairs, default the
    six (docs/evaluation.md#sampler-settings). seeds: training seeds, one run per seed, named as a seed sweep names them (`rf [seed=1]`); a
    recipe's quality may then be one value per seed (seeds that disagree); missing_seeds: (recipe, seed) runs left
    out. sampler: written as the records' `sampler` field (absent when None); fid_features: the records' feature
    definition (absent when None, as in results written before the field existed).
    """
    sweep_dir = Path(sweep_dir)
    rng = np.random.default_rng(seed)
    quality = np.linspace(1.0, 0.0, len(recipes)) if quality is None else list(quality)
    if len(quality) != len(recipes):
        raise ValueError(f"quality has {len(quality)} values for {len(recipes)} recipes; give one per recipe")
    replicates = [None] if seeds is None else list(seeds)
    per_seed = []  # quality per (recipe, replicate)
    for recipe, q in zip(recipes, quality):
        q = np.broadcast_to(np.asarray(q, float), (len(replicates),)) if np.ndim(q) == 0 else np.asarray(q, float)
        if len(q) != len(replicates):
            raise ValueError(f"quality of {recipe!r} has {len(q)} values for {len(replicates)} seeds")
        per_seed.append(q)
    skip_seeds = {(r, int(s)) for r, s in missing_seeds}
    references = {}
    for dataset in datasets:
        references[dataset] = rng.standard_normal((n_reference, dim))
        _write_npz(sweep_dir / "reference" / f"{dataset}.npz", features=references[dataset])
    prompt_noise = {d: rng.standard_normal((n_samples, dim)) for d in datasets}  # common random numbers (docs/sampling.md#common-random-numbers)
    missing_keys = {(r, d, int(s), float(c), bool(e)) for r, d, s, c, e in missing}
    job = 0
    for recipe, qualities in zip(recipes, per_seed):
        for train_seed, q in zip(replicates, qualities):
            if (recipe, train_seed) in skip_seeds:
                continue
            name = recipe if train_seed is None else f"{recipe} [seed={train_seed}]"
            for dataset in datasets:
                job = _write_run(sweep_dir, job, name, recipe, dataset, train_seed, q, rng, references, prompt_noise,
                                 missing_keys, failed, running, sampler_settings, n_samples, sampler, fid_features)
    return sweep_dir


def _write_run(sweep_dir, job, name, recipe, dataset, train_seed, q, rng, references, prompt_noise, missing_keys,
               failed, running, sampler_settings, n_samples, sampler, fid_features) -> int:
    """One run directory sweep_dir/<job> with its results; returns the next job number."""
    run_dir = sweep_dir / str(job)
    job += 1
    overrides = f"- loss={recipe!r}\n- data={dataset}\n" + (f"- seed={train_seed}\n" if train_seed is not None
                                                           else "")
    _write_text(run_dir / ".hydra" / "config.yaml", f"loss: {recipe!r}\ndata: {dataset}\n")
    _write_text(run_dir / ".hydra" / "overrides.yaml", overrides)
    if recipe in running:
        return job
    if recipe in failed:
        error = {"error": "loss is NaN at step 120", "type": "FloatingPointError"}
        atomic_write_json(run_dir / "error.json", error)
        return job
    records = []
    for steps, cfg in sampler_settings:
        for ema in (True, False):
            if (recipe, dataset, steps, cfg, ema) in missing_keys:
                continue
            level = q * STEP_QUALITY[steps] * (1.0 if ema else 0.9) * (1.0 - 0.05 * abs(cfg - 5.0))
            feats = prompt_noise[dataset] * (1.0 + 0.3 * (1 - level)) + 1.5 * (1.0 - level)
            clip_scores = 0.2 + 0.06 * level + 0.02 * rng.standard_normal(n_samples)
            arrays = f"eval/{dataset}_{steps}_{cfg:.1f}_{'ema' if ema else 'raw'}.npz"
            _write_npz(run_dir / arrays, clip_scores=clip_scores, features=feats)
            record = {
                "recipe": name, "family": recipe.split("(")[0].split("/")[0], "params": {},
                "dataset": dataset, "setting": setting_name(steps, cfg), "steps": steps, "cfg": cfg,
                "shift": 1.0, "ema": ema, "clip_score": float(clip_scores.mean()),
                "fid_clip": fid_from_features(feats, references[dataset]), "fid_inception": None,
                "n_samples": n_samples, "checkpoint_step": 600, "arrays": arrays,
                "reference_arrays": f"../reference/{dataset}.npz",
                "config": {"loss": recipe, **({} if train_seed is None else {"seed": train_seed})},
                "created": "2024-03-05T12:00:00",
            }
            record.update({k: v for k, v in (("sampler", sampler), ("fid_features", fid_features)) if v})
            records.append(record)
    atomic_write_json(run_dir / "results.json", records)
    return job


def _write_npz(path: Path, **arrays) -> None:
    """Atomically write an npz file."""
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    _write_bytes(path, buffer.getvalue())


def _write_text(path: Path, text: str) -> None:
    """Atomically write a text file."""
    _write_bytes(path, text.encode())


def atomic_write_json(path: Path, obj) -> None:
    """Atomically write a JSON file."""
    _write_bytes(path, json.dumps(obj, indent=1).encode())


def _write_bytes(path: Path, data: bytes) -> None:
    """Temp file then rename; no fsync, since synthetic data need not survive a crash (keeps tests fast)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def main(argv: Sequence[str] | None = None) -> None:
    """python -m src.ranking.synthetic SWEEP_DIR: write a demo sweep (one failed and one running job)."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("sweep_dir", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    recipes = (*DEFAULT_RECIPES, "rf/mode(1.29)", "v/linear")
    write_synthetic_sweep(args.sweep_dir, recipes=recipes, seed=args.seed, failed=("v/linear",),
                          running=("rf/mode(1.29)",))
    print(args.sweep_dir)


if __name__ == "__main__":
    main()
