"""Bootstrap intervals for average ranks by resampling evaluation samples (beyond the paper; docs/ranking.md#bootstrap-intervals).

Each draw resamples, with replacement, the per-sample CLIP scores and sample feature rows of every record
and the reference feature rows, recomputes CLIP score and FID (Frechet distance on CLIP features, float64,
covariances with ddof=1), then the fronts per control setting and the average ranks. The draws are paired:
within a draw every record of a dataset uses the same resampled prompt indices, because all recipes and
settings share prompts and initial noise (docs/sampling.md#common-random-numbers), and every record with the same
reference file uses the same resampled reference rows.

Separability: two recipes are separated when one has the better (lower) average rank in at least
`separation` (default 0.95) of the draws, ties counting half; otherwise the data cannot separate them.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pandas as pd

from src.ranking.aggregate import average_weights, fronts_per_setting, mean_over_settings
from src.ranking.paper import COLUMNS

CHUNK_BYTES = 64 * 2**20  # memory bound on the batched (draws, d, d) covariance stacks
FEATURE_CACHE_BYTES = 512 * 2**20  # sample features kept in memory; beyond this they are reloaded per chunk
CONSISTENCY_RTOL = 1e-3


# ---------------------------------------------------------------------------------------------- Frechet distance


def sqrtm_psd(cov: np.ndarray) -> np.ndarray:
    """Symmetric square root of (a stack of) positive semi-definite matrices, via eigh."""
    w, v = np.linalg.eigh(cov)
    return (v * np.sqrt(np.clip(w, 0.0, None))[..., None, :]) @ np.swapaxes(v, -1, -2)


def frechet_distance(mu1, cov1, mu2, cov2, root2: np.ndarray | None = None) -> np.ndarray:
    """||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)) for (stacks of) Gaussians (Heusel et al. 2017).

    root2, S2^(1/2), may be passed when several S1 share one S2.
    """
    root2 = sqrtm_psd(cov2) if root2 is None else root2
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


def bootstrap_metrics(records: pd.DataFrame, draws: int, seed: int = 0,
                      progress: Callable[[str], None] | None = None) -> MetricDraws:
    """Paired bootstrap draws of every record's CLIP score and FID from its evaluation sample arrays.

    progress, when given, hears the estimated duration once a record has been timed (when it is over
    PROGRESS_AFTER_S) and then every tenth of the draws: at the paper's scale (1464 records, 1000 samples of 768
    features) one draw of one record costs about 0.1 s on one core, so 200 draws take hours on a CPU.
    """
    if int(draws) < 1:
        raise ValueError(f"bootstrap draws={draws!r}: must be a positive integer")
    rng = np.random.default_rng(seed)
    result = MetricDraws(
        clip=np.tile(records["clip_score"].to_numpy(float), (draws, 1)),
        fid=np.tile(records["fid_clip"].to_numpy(float), (draws, 1)),
    )
    references: dict[str, np.ndarray] = {}
    features: dict[int, np.ndarray | None] = {}  # None: over the memory budget, reloaded per chunk of draws
    sample_counts: dict[tuple, np.ndarray] = {}  # (dataset, n) -> (draws, n), shared by paired records
    kept_bytes = 0
    for row in range(len(records)):
        loaded = _load_record(records, row, references, result.fixed)
        if loaded is None:
            continue
        scores, feats, ref = loaded
        _check_consistency(records, row, scores, feats, ref, result.inconsistent)
        key = (records["dataset"].iat[row], len(scores))
        if key not in sample_counts:
            sample_counts[key] = rng.multinomial(key[1], np.full(key[1], 1.0 / key[1]), size=draws).astype(float)
        result.clip[:, row] = sample_counts[key] @ scores / len(scores)
        kept_bytes += feats.nbytes
        features[row] = feats if kept_bytes <= FEATURE_CACHE_BYTES else None
    ref_counts = {
        path: rng.multinomial(len(ref), np.full(len(ref), 1.0 / len(ref)), size=draws).astype(float)
        for path, ref in references.items()
    }

    dim = max((ref.shape[1] for ref in references.values()), default=1)
    chunk = max(1, min(draws, CHUNK_BYTES // (8 * 4 * dim * dim)))
    clock = _Progress(progress, draws, len(features))
    for start in range(0, draws, chunk):
        sl = slice(start, min(start + chunk, draws))
        clock.chunk_done(start)
        for path, ref in references.items():
            mu_r, cov_r = resampled_moments(ref, ref_counts[path][sl])
            root_r = sqrtm_psd(cov_r)  # shared by every record with this reference
            for row, feats in features.items():
                if records["reference_arrays"].iat[row] != path:
                    continue
                if feats is None:
                    feats = _load_record(records, row, references, {})[1]
                counts = sample_counts[(records["dataset"].iat[row], len(feats))][sl]
                result.fid[sl, row] = frechet_distance(*resampled_moments(feats, counts), mu_r, cov_r, root_r)
                clock.record_done(sl.stop - sl.start)
    return result


PROGRESS_AFTER_S = 30.0  # estimated bootstrap durations below this are not reported


class _Progress:
    """Estimated duration once a record has been timed, then a line every tenth of the draws (see bootstrap_metrics)."""

    def __init__(self, say: Callable[[str], None] | None, draws: int, records: int):
        self.say, self.draws, self.records = say, draws, records
        self.start = time.perf_counter()
        self.estimate: float | None = None
        self.first_record: float | None = None
        self.next_tenth = 1

    def record_done(self, draws_in_chunk: int) -> None:
        if self.say is None or self.estimate is not None:
            return
        now = time.perf_counter()
        if self.first_record is None:  # the first record's time includes the reference's moments: time the second
            self.first_record = now
            return
        per = (now - self.first_record) / draws_in_chunk  # one record, one draw
        self.estimate = per * self.records * self.draws
        if self.estimate > PROGRESS_AFTER_S:
            self.say(f"bootstrap: {self.draws} draws x {self.records} records, about {_duration(self.estimate)} "
                     "(--bootstrap 0 skips it, fewer draws shorten it)")

    def chunk_done(self, draws_done: int) -> None:
        if self.say is None or self.estimate is None or self.estimate <= PROGRESS_AFTER_S:
            return
        if draws_done * 10 >= self.next_tenth * self.draws:
            elapsed = time.perf_counter() - self.start
            left = elapsed * (self.draws - draws_done) / draws_done
            self.say(f"bootstrap: {draws_done}/{self.draws} draws, {_duration(elapsed)} so far, about "
                     f"{_duration(left)} left")
            self.next_tenth = draws_done * 10 // self.draws + 1


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _load_record(records: pd.DataFrame, row: int, references: dict, fixed: dict[int, str]):
    """(clip_scores, features, reference features) of one record, validated; None (reason in fixed) if unusable."""
    arrays, reference = records["arrays"].iat[row], records["reference_arrays"].iat[row]
    if not np.isfinite([records["clip_score"].iat[row], records["fid_clip"].iat[row]]).all():
        fixed[row] = "recorded CLIP score or FID is null / non-finite (last front in every draw)"
        return None
    if not (isinstance(arrays, str) and arrays and isinstance(reference, str) and reference):
        fixed[row] = "no arrays / reference_arrays in the record"
        return None
    missing = [p for p in (arrays, reference) if not Path(p).is_file()]
    if missing:
        fixed[row] = f"missing file {missing[0]}"
        return None
    scores, feats = _npz(arrays, ("clip_scores", "features"))
    scores = scores.reshape(-1)
    if reference not in references:
        references[reference] = _npz(reference, ("features",))[0]
    ref = references[reference]
    if feats.ndim != 2 or ref.ndim != 2 or feats.shape[1] != ref.shape[1] or len(feats) != len(scores):
        raise ValueError(
            f"{arrays}: features {feats.shape} / clip_scores {scores.shape} do not match reference features "
            f"{ref.shape} of {reference}; expected (n, d), (n,) and (m, d)"
        )
    if len(feats) < 2 or len(ref) < 2:
        fixed[row] = "fewer than 2 samples or reference rows"
        return None
    if not (np.isfinite(feats).all() and np.isfinite(scores).all() and np.isfinite(ref).all()):
        fixed[row] = "non-finite clip_scores or features"
        return None
    return scores, feats, ref


def _npz(path: str, names: Sequence[str]) -> list[np.ndarray]:
    """Named arrays of an npz file as float64; a clear error naming the file when one is absent."""
    with np.load(path) as data:
        absent = [n for n in names if n not in data.files]
        if absent:
            raise ValueError(f"{path}: npz lacks the array(s) {absent} (has {sorted(data.files)})")
        return [np.asarray(data[n], np.float64) for n in names]


def _check_consistency(records, row, scores, feats, ref, out: dict[int, str]) -> None:
    """Flag a record whose stored CLIP score / FID differ from the values recomputed from its arrays."""
    stored_clip, stored_fid = records["clip_score"].iat[row], records["fid_clip"].iat[row]
    clip, fid = float(scores.mean()), frechet_from_features(feats, ref)
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
    progress: Callable[[str], None] | None = None,
) -> RankBootstrap:
    """Percentile intervals of every recipe's average rank and pairwise ordering probabilities (see module doc)."""
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"bootstrap confidence={confidence!r}: must lie in (0, 1)")
    if not 0.5 < separation <= 1.0:
        raise ValueError(f"bootstrap separation={separation!r}: must lie in (0.5, 1]")
    metrics = bootstrap_metrics(records, draws, seed, progress)
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
