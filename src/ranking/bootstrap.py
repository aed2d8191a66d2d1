"""Bootstrap intervals for average ranks by resampling evaluation samples (beyond the paper; SPEC 7, 9).

Each draw resamples, with replacement, the per-sample CLIP scores and sample feature rows of every record
and the reference feature rows, recomputes CLIP score and FID (Frechet distance on CLIP features, float64,
covariances with ddof=1), then the fronts per control setting and the average ranks. The draws are paired:
within a draw every record of a dataset uses the same resampled prompt indices, because all recipes and
settings share prompts and initial noise (SPEC 7, common random numbers), and every record with the same
reference file uses the same resampled reference rows.

Separability: two recipes are separated when one has the better (lower) average rank in at least
`separation` (default 0.95) of the draws, ties counting half; otherwise the data cannot separate them.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from src.ranking.aggregate import average_weights, fronts_per_setting, mean_over_settings
from src.ranking.paper import COLUMNS

CHUNK_BYTES = 64 * 2**20  # memory bound on the batched (draws, d, d) covariance stacks
CONSISTENCY_RTOL = 1e-3


# ---------------------------------------------------------------------------------------------- Frechet distance


def sqrtm_psd(cov: np.ndarray) -> np.ndarray:
    """Symmetric square root of (a stack of) positive semi-definite matrices, via eigh."""
    w, v = np.linalg.eigh(cov)
    return (v * np.sqrt(np.clip(w, 0.0, None))[..., None, :]) @ np.swapaxes(v, -1, -2)


def frechet_distance(mu1, cov1, mu2, cov2) -> np.ndarray:
    """||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)) for (stacks of) Gaussians (Heusel et al. 2017)."""
    root2 = sqrtm_psd(cov2)
    # tr (S1 S2)^(1/2) = sum of sqrt eigenvalues of S2^(1/2) S1 S2^(1/2), which is symmetric PSD.
    eig = np.linalg.eigvalsh(root2 @ cov1 @ root2)
    tr_sqrt = np.sqrt(np.clip(eig, 0.0, None)).sum(axis=-1)
    diff = np.asarray(mu1) - np.asarray(mu2)
    trace = np.trace(cov1, axis1=-2, axis2=-1) + np.trace(cov2, axis1=-2, axis2=-1)
    return (diff**2).sum(axis=-1) + trace - 2.0 * tr_sqrt


def resampled_moments(x: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean (B, d) and covariance (B, d, d), ddof=1, of x's rows repeated counts[b] times (counts sum to n)."""
    n = x.shape[0]
    centre = x.mean(axis=0)
    x0 = x - centre  # covariance is shift invariant; centring keeps float64 sums accurate
    mean0 = counts @ x0 / n
    scatter = np.swapaxes(x0[None] * counts[..., None], -1, -2) @ x0
    cov = (scatter - n * mean0[..., :, None] * mean0[..., None, :]) / (n - 1)
    return mean0 + centre, cov


def frechet_from_features(a: np.ndarray, b: np.ndarray) -> float:
    """Frechet distance between two feature sets, float64 (the bootstrap's own definition)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    ones_a, ones_b = np.ones((1, len(a))), np.ones((1, len(b)))
    return float(frechet_distance(*resampled_moments(a, ones_a), *resampled_moments(b, ones_b))[0])


# ---------------------------------------------------------------------------------------------- per-record draws


@dataclass
class MetricDraws:
    """Bootstrap draws of CLIP score and FID per record, (draws, rows), and records that could not be resampled."""

    clip: np.ndarray
    fid: np.ndarray
    fixed: dict[int, str] = field(default_factory=dict)  # row -> why it keeps its point values
    inconsistent: dict[int, str] = field(default_factory=dict)  # row -> recomputed vs recorded metric


def bootstrap_metrics(records: pd.DataFrame, draws: int, seed: int = 0) -> MetricDraws:
    """Paired bootstrap draws of every record's CLIP score and FID from its evaluation sample arrays."""
    if int(draws) < 1:
        raise ValueError(f"bootstrap draws={draws!r}: must be a positive integer")
    rng = np.random.default_rng(seed)
    clip = np.tile(records["clip_score"].to_numpy(float), (draws, 1))
    fid = np.tile(records["fid_clip"].to_numpy(float), (draws, 1))
    result = MetricDraws(clip=clip, fid=fid)
    samples, references = _load_arrays(records, result.fixed)
    _check_consistency(records, samples, references, result.inconsistent)

    sample_counts: dict[tuple, np.ndarray] = {}  # (dataset, n) -> (draws, n), shared by paired records
    for row, (scores, _) in samples.items():
        key = (records["dataset"].iat[row], len(scores))
        if key not in sample_counts:
            sample_counts[key] = rng.multinomial(key[1], np.full(key[1], 1.0 / key[1]), size=draws).astype(float)
        counts = sample_counts[key]
        clip[:, row] = counts @ scores / len(scores)
    ref_counts = {
        path: rng.multinomial(len(ref), np.full(len(ref), 1.0 / len(ref)), size=draws).astype(float)
        for path, ref in references.items()
    }

    dim = max((ref.shape[1] for ref in references.values()), default=1)
    chunk = max(1, min(draws, CHUNK_BYTES // (8 * 4 * dim * dim)))
    for start in range(0, draws, chunk):
        sl = slice(start, min(start + chunk, draws))
        for path, ref in references.items():
            mu_r, cov_r = resampled_moments(ref, ref_counts[path][sl])
            for row, (scores, feats) in samples.items():
                if records["reference_arrays"].iat[row] != path:
                    continue
                counts = sample_counts[(records["dataset"].iat[row], len(scores))][sl]
                mu_s, cov_s = resampled_moments(feats, counts)
                fid[sl, row] = frechet_distance(mu_s, cov_s, mu_r, cov_r)
    return result


def _load_arrays(records: pd.DataFrame, fixed: dict[int, str]):
    """Per-sample arrays per resamplable row, reference features per path; others recorded in fixed."""
    cache: dict[str, dict] = {}
    samples, references = {}, {}
    for row in range(len(records)):
        arrays, reference = records["arrays"].iat[row], records["reference_arrays"].iat[row]
        if not arrays or not reference:
            fixed[row] = "no arrays / reference_arrays in the record"
            continue
        missing = [p for p in (arrays, reference) if not Path(p).is_file()]
        if missing:
            fixed[row] = f"missing file {missing[0]}"
            continue
        data, ref = _npz(arrays, cache), _npz(reference, cache)
        for name, source, path in (("clip_scores", data, arrays), ("features", data, arrays), ("features", ref, reference)):
            if name not in source:
                raise ValueError(f"{path}: npz lacks the array {name!r} (has {sorted(source)})")
        scores = np.asarray(data["clip_scores"], np.float64).reshape(-1)
        feats = np.asarray(data["features"], np.float64)
        ref_feats = np.asarray(ref["features"], np.float64)
        if feats.ndim != 2 or ref_feats.ndim != 2 or feats.shape[1] != ref_feats.shape[1] or len(feats) != len(scores):
            raise ValueError(
                f"{arrays}: features {feats.shape} / clip_scores {scores.shape} do not match reference features "
                f"{ref_feats.shape} of {reference}; expected (n, d), (n,) and (m, d)"
            )
        if len(feats) < 2 or len(ref_feats) < 2:
            fixed[row] = "fewer than 2 samples or reference rows"
            continue
        if not (np.isfinite(feats).all() and np.isfinite(scores).all() and np.isfinite(ref_feats).all()):
            fixed[row] = "non-finite clip_scores or features"
            continue
        samples[row] = (scores, feats)
        references[reference] = ref_feats
    return samples, references


def _npz(path: str, cache: dict) -> dict:
    """Arrays of an npz file, loaded once."""
    if path not in cache:
        with np.load(path) as data:
            cache[path] = {k: data[k] for k in data.files}
    return cache[path]


def _check_consistency(records, samples, references, out: dict[int, str]) -> None:
    """Flag records whose stored CLIP score / FID differ from the values recomputed from their arrays."""
    for row, (scores, feats) in samples.items():
        stored_clip, stored_fid = records["clip_score"].iat[row], records["fid_clip"].iat[row]
        clip = float(scores.mean())
        fid = frechet_from_features(feats, references[records["reference_arrays"].iat[row]])
        bad = []
        if not np.isclose(clip, stored_clip, rtol=CONSISTENCY_RTOL, atol=1e-6, equal_nan=True):
            bad.append(f"clip_score {stored_clip:.6g} vs {clip:.6g}")
        if not np.isclose(fid, stored_fid, rtol=CONSISTENCY_RTOL, atol=1e-6, equal_nan=True):
            bad.append(f"fid_clip {stored_fid:.6g} vs {fid:.6g}")
        if bad:
            out[row] = "recorded vs recomputed: " + ", ".join(bad)


# ---------------------------------------------------------------------------------------------- ranks


@dataclass
class RankBootstrap:
    """Bootstrap draws of average ranks per column, percentile intervals and pairwise ordering probabilities."""

    recipes: list[str]
    draws: dict[str, np.ndarray]  # column -> (B, recipes)
    intervals: pd.DataFrame  # index recipe; columns '<column> lo', '<column> hi'
    prob_better: dict[str, pd.DataFrame]  # column -> P(row recipe ranks better than column recipe)
    metrics: MetricDraws
    confidence: float
    separation: float


def bootstrap_ranks(
    records: pd.DataFrame,
    groups: dict[str, pd.Series],
    draws: int = 200,
    seed: int = 0,
    confidence: float = 0.9,
    separation: float = 0.95,
) -> RankBootstrap:
    """Percentile intervals of every recipe's average rank and pairwise ordering probabilities (see module doc)."""
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"bootstrap confidence={confidence!r}: must lie in (0, 1)")
    if not 0.5 < separation <= 1.0:
        raise ValueError(f"bootstrap separation={separation!r}: must lie in (0.5, 1]")
    metrics = bootstrap_metrics(records, draws, seed)
    fronts = fronts_per_setting(records, metrics.clip, metrics.fid)
    recipes = sorted(records["recipe"].unique())
    weights = average_weights(records, groups, recipes)
    tail = 100.0 * (1.0 - confidence) / 2.0
    per_column, intervals, prob = {}, pd.DataFrame(index=pd.Index(recipes, name="recipe")), {}
    for column in COLUMNS:
        avg = mean_over_settings(fronts, weights[column])
        per_column[column] = avg
        with np.errstate(invalid="ignore"):
            lo, hi = np.nanpercentile(avg, [tail, 100.0 - tail], axis=0) if np.isfinite(avg).any() else (np.nan, np.nan)
        intervals[f"{column} lo"], intervals[f"{column} hi"] = lo, hi
        prob[column] = pd.DataFrame(prob_better(avg), index=recipes, columns=recipes)
    return RankBootstrap(recipes, per_column, intervals, prob, metrics, confidence, separation)


def prob_better(avg: np.ndarray) -> np.ndarray:
    """P[i, j] = fraction of draws where recipe i's average rank is lower than j's, ties counting half."""
    a, b = avg[:, :, None], avg[:, None, :]
    with np.errstate(invalid="ignore"):
        p = (a < b).mean(axis=0) + 0.5 * (a == b).mean(axis=0)
    p[np.isnan(avg).any(axis=0)] = np.nan
    p[:, np.isnan(avg).any(axis=0)] = np.nan
    return p


def inseparable_pairs(prob: pd.DataFrame, separation: float, order: Sequence[str]) -> list[tuple[str, str, float]]:
    """Pairs (a, b, P(a better)) in table order that the data cannot separate: separation > P > 1 - separation."""
    pairs = []
    for i, a in enumerate(order):
        for b in order[i + 1:]:
            p = prob.loc[a, b]
            if np.isfinite(p) and 1.0 - separation < p < separation:
                pairs.append((a, b, float(p)))
    return pairs
