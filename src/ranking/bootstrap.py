"""Bootstrap intervals for average ranks, resampling training seeds and evaluation samples (beyond the paper; docs/ranking.md#bootstrap-intervals).

Each draw
1. resamples, with replacement, the per-sample CLIP scores and sample feature rows of every record and the
   reference feature rows, and recomputes CLIP score and FID (src/metrics/frechet.py, the evaluation's own
   Frechet distance, float64, covariances with ddof=1). The draws are paired: within a draw every record of a
   dataset uses the same resampled prompt indices, because all recipes and settings share prompts and initial
   noise (docs/sampling.md#common-random-numbers), and every record with the same reference file uses the same resampled
   reference rows;
2. resamples, with replacement and per entry, the entry's training seeds (k seeds drawn from its k), and takes
   per control setting the mean of the drawn seeds' metrics (a seed drawn twice counts twice; when no drawn seed
   has a setting, all the entry's seeds for it are used);
3. sorts the entries per control setting on these seed-means and averages their fronts over each column.

So the percentile intervals, the first-front probabilities and the separability verdicts include training-seed
variance; an entry with one seed contributes none (its interval covers evaluation noise only). With k seeds the
seed bootstrap underestimates the between-seed variance by a factor (k - 1) / k, the usual bootstrap bias.

Separability: two entries are separated when one has the better (lower) average rank in at least
`separation` (default 0.95) of the draws, ties counting half; otherwise the data cannot separate them.
"""
from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Callable, Sequence

import numpy as np
import pandas as pd
from threadpoolctl import threadpool_limits

from src.metrics.frechet import frechet_distance, frechet_distance_rows, frechet_distance_rows_cov, sqrtm_psd
from src.ranking.aggregate import column_indicators, fronts_per_setting, mean_over_settings
from src.ranking.paper import COLUMNS, spearman_draws

CHUNK_BYTES = 64 * 2**20  # memory bound on the batched (draws, d, d) covariance stacks
FEATURE_CACHE_BYTES = 512 * 2**20  # sample features kept in memory; beyond this they are reloaded per chunk


# ---------------------------------------------------------------------------------------------- moments


def resampled_moments(x: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean (B, d) and covariance (B, d, d), ddof=1, of x's rows repeated counts[b] times (counts sum to n)."""
    n = x.shape[0]
    centre = x.mean(axis=0)
    x0 = x - centre  # covariance is shift invariant; centring keeps float64 sums accurate
    mean0 = counts @ x0 / n
    scatter = np.swapaxes(x0[None] * counts[..., None], -1, -2) @ x0
    cov = (scatter - n * mean0[..., :, None] * mean0[..., None, :]) / (n - 1)
    return mean0 + centre, cov


def resampled_rows(x: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean (B, d) and rows (B, m, d) with rows^T rows = the covariance of resampled_moments: each distinct drawn row,
    centred on the draw's mean and weighted by sqrt(count / (n - 1)); zero rows pad the draws to the largest m."""
    n = x.shape[0]
    centre = x.mean(axis=0)
    x0 = x - centre
    mean0 = counts @ x0 / n
    drawn = counts > 0
    m = int(drawn.sum(axis=1).max())
    order = np.argsort(~drawn, axis=1, kind="stable")[:, :m]  # each draw's drawn rows first
    weight = np.sqrt(np.take_along_axis(counts, order, axis=1) / (n - 1))  # 0 on the padding
    rows = weight[..., None] * (x0[order] - mean0[:, None, :])
    return mean0 + centre, rows


def use_rows(counts: np.ndarray, ref_counts: np.ndarray, dim: int) -> bool:
    """Whether the row form (frechet_distance_rows) is the smaller problem: fewer distinct drawn rows than features."""
    return min(int((counts > 0).sum(axis=1).max()), int((ref_counts > 0).sum(axis=1).max())) < dim


def use_reference_covariance(ref_counts: np.ndarray, dim: int) -> bool:
    """Whether the row form meets the reference as its covariance (frechet_distance_rows_cov): a reference of as
    many distinct drawn rows as features or more (COCO-2014 val: ~25,600 of 40,504), whose rows would make the
    cross-Gram matrix grow with it (B1 B2^T: m x 25,600), where B1 S2 B1^T is m x m whatever its size."""
    return int((ref_counts > 0).sum(axis=1).max()) >= dim


# ---------------------------------------------------------------------------------------------- per-record draws


@dataclass
class MetricDraws:
    """Bootstrap draws of CLIP score and FID per record, (draws, rows), and records that could not be resampled."""

    clip: np.ndarray
    fid: np.ndarray
    fixed: dict[int, str] = field(default_factory=dict)  # row -> why it keeps its point values


def bootstrap_metrics(records: pd.DataFrame, draws: int, seed: int = 0,
                      progress: Callable[[str], None] | None = None, device: str = "cpu",
                      workers: int = 0) -> MetricDraws:
    """Paired bootstrap draws of every record's CLIP score and FID from its evaluation sample arrays.

    progress, when given, hears the estimated duration once a record has been timed (when it is over
    PROGRESS_AFTER_S) and then every tenth of the draws: at the paper's scale (1464 records, 1000 samples of 768
    features) one draw of one record costs about 62 ms on one core, against a reference of 1000 rows (the row form)
    and against COCO-2014 val's 40,504 alike (the samples' rows against the reference's covariance, which costs
    1.4 s a draw once for every record of its dataset; bench/results/bootstrap.md), so 200 draws take about 5
    core-hours, divided among the workers.
    device: where the Frechet distances are computed (src/ranking/bootstrap_torch.py: cpu = numpy, cuda, auto).
    workers: threads computing the numpy path's records in parallel, 0 = every usable core (resolve_workers); the
    draws are the same for any number.
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
    sample_key: dict[int, tuple] = {}
    scores_of: dict[int, np.ndarray] = {}
    kept_bytes = 0
    for row in range(len(records)):
        loaded = _load_record(records, row, references, result.fixed)
        if loaded is None:
            continue
        scores, feats, ref = loaded
        sample_key[row], scores_of[row] = (records["dataset"].iat[row], len(scores)), scores
        kept_bytes += feats.nbytes
        features[row] = feats if kept_bytes <= FEATURE_CACHE_BYTES else None
    # Drawn in sorted order, not in the records' (the order of the sweeps on the command line, of the records in a
    # results.json): the same records get the same draws however they were listed.
    for key in sorted(set(sample_key.values())):
        sample_counts[key] = rng.multinomial(key[1], np.full(key[1], 1.0 / key[1]), size=draws).astype(float)
    for row, scores in scores_of.items():
        result.clip[:, row] = sample_counts[sample_key[row]] @ scores / len(scores)
    ref_counts = {
        path: rng.multinomial(len(references[path]), np.full(len(references[path]), 1.0 / len(references[path])),
                              size=draws).astype(float)
        for path in sorted(references)
    }

    ops = _frechet_ops(device)
    workers = resolve_workers(workers) if isinstance(ops, SimpleNamespace) else 1  # torch batches on its device
    dim = max((ref.shape[1] for ref in references.values()), default=1)
    chunk = max(1, min(draws, ops.chunk_bytes // (8 * 4 * dim * dim)))
    clock = _Progress(progress, draws, len(features), workers)
    with _record_pool(workers) as pool:
        for start in range(0, draws, chunk):
            sl = slice(start, min(start + chunk, draws))
            clock.chunk_done(start)
            for path, ref in references.items():
                rows = [row for row in features if records["reference_arrays"].iat[row] == path]
                counts = {row: sample_counts[sample_key[row]][sl] for row in rows}
                ref_draws = ref_counts[path][sl]
                # fewer distinct rows than features: the row form; the reference's form once per chunk, shared
                row_form = {row: use_rows(counts[row], ref_draws, ref.shape[1]) for row in rows}
                # a reference of many distinct rows meets the samples' rows as its covariance
                mixed = use_reference_covariance(ref_draws, ref.shape[1])
                ref_rows = ops.resampled_rows(ref, ref_draws) if any(row_form.values()) and not mixed else None
                ref_moments = None
                if mixed or not all(row_form.values()):
                    mu_r, cov_r = ops.resampled_moments(ref, ref_draws)
                    ref_moments = (mu_r, cov_r, None if all(row_form.values()) else ops.sqrtm_psd(cov_r))

                def fid_draws(row: int) -> np.ndarray:
                    feats = features[row]
                    if feats is None:
                        feats = _load_record(records, row, references, {})[1]
                    if row_form[row] and mixed:
                        rows_s = ops.resampled_rows(feats, counts[row])
                        return ops.frechet_distance_rows_cov(*rows_s, *ref_moments[:2])
                    if row_form[row]:
                        return ops.frechet_distance_rows(*ops.resampled_rows(feats, counts[row]), *ref_rows)
                    return ops.frechet_distance(*ops.resampled_moments(feats, counts[row]), *ref_moments)

                for row, fid in zip(rows, pool.map(fid_draws, rows)):
                    result.fid[sl, row] = fid
                    clock.record_done(sl.stop - sl.start)
    return result


def check_settings(confidence: float, separation: float, seed: int) -> None:
    """The bootstrap's interval level, separation probability and seed, or a ValueError naming the bad one."""
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"bootstrap confidence={confidence!r}: must lie in (0, 1)")
    if not 0.5 < separation <= 1.0:
        raise ValueError(f"bootstrap separation={separation!r}: must lie in (0.5, 1]")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"bootstrap seed={seed!r}: must be an integer >= 0")


def resolve_workers(workers: int) -> int:
    """The bootstrap's worker threads: workers, or every core this process may use for 0; a clear error below 0."""
    if not isinstance(workers, (int, np.integer)) or isinstance(workers, bool) or workers < 0:
        raise ValueError(f"bootstrap workers={workers!r} is not allowed; allowed: 0 (every usable core) or a "
                         "positive integer")
    if workers == 0:
        return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return int(workers)


@contextmanager
def _record_pool(workers: int):
    """map over records: serial for one worker, else threads. numpy's matmul and eigvalsh release the GIL, and
    BLAS is held to one thread per worker, so w workers run ~w times faster (bench/results/bootstrap.md) and every
    record's arithmetic is the same for any w: the draws do not depend on the worker count."""
    with threadpool_limits(limits=1, user_api="blas"):
        if workers == 1:
            yield SimpleNamespace(map=map)
        else:
            with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="bootstrap") as pool:
                yield pool


def _frechet_ops(device: str):
    """The numpy functions above ("cpu"), or their batched torch twins on a GPU (src/ranking/bootstrap_torch.py)."""
    from src.ranking.bootstrap_torch import TorchFrechet, resolve_device

    device = resolve_device(device)
    if device == "cpu":
        return SimpleNamespace(resampled_moments=resampled_moments, sqrtm_psd=sqrtm_psd,
                               frechet_distance=frechet_distance, resampled_rows=resampled_rows,
                               frechet_distance_rows=frechet_distance_rows,
                               frechet_distance_rows_cov=frechet_distance_rows_cov, chunk_bytes=CHUNK_BYTES)
    return TorchFrechet(device)


PROGRESS_AFTER_S = 30.0  # estimated bootstrap durations below this are not reported


class _Progress:
    """Estimated duration once a record has been timed, then a line every tenth of the draws (see bootstrap_metrics)."""

    def __init__(self, say: Callable[[str], None] | None, draws: int, records: int, workers: int = 1):
        self.say, self.draws, self.records, self.workers = say, draws, records, workers
        self.start = time.perf_counter()
        self.estimate: float | None = None
        self.first_record: float | None = None
        self.records_done = 0
        self.next_tenth = 1

    def record_done(self, draws_in_chunk: int) -> None:
        if self.say is None or self.estimate is not None:
            return
        now = time.perf_counter()
        self.records_done += 1
        if self.first_record is None:  # the first record's time includes the reference's moments: time the next
            self.first_record = now
            return
        # w workers finish records about w at a time: time 2w of them (fewer when the chunk holds fewer)
        timed = self.records_done - 1
        if timed < min(2 * self.workers, self.records - 1):
            return
        per = (now - self.first_record) / timed / draws_in_chunk  # one record, one draw, wall time
        self.estimate = per * self.records * self.draws
        if self.estimate > PROGRESS_AFTER_S:
            self.say(f"bootstrap: {self.draws} draws x {self.records} records, about {_duration(self.estimate)} "
                     f"on {self.workers} worker(s) (--bootstrap 0 skips it, fewer draws shorten it)")

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
    try:
        scores, feats = _npz(arrays, ("clip_scores", "features"))
        if reference not in references:
            references[reference] = _npz(reference, ("features",))[0]
    except UnreadableArrays as e:  # as a missing file: the run shows as partial, src.evaluate computes it again
        fixed[row] = str(e)
        return None
    scores = scores.reshape(-1)
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


class UnreadableArrays(Exception):
    """An npz file that cannot be read (damaged after it was written: it is written atomically)."""


def _npz(path: str, names: Sequence[str]) -> list[np.ndarray]:
    """Named arrays of an npz file as float64; a clear error naming the file when one is absent, UnreadableArrays
    when the file is damaged (a bad zip directory, CRC or array header)."""
    try:
        with np.load(path, allow_pickle=False) as data:
            files = sorted(data.files)
            arrays = [np.asarray(data[n], np.float64) for n in names if n in files]
    except Exception as e:  # noqa: BLE001 -- zipfile, zlib and numpy's header parser raise many kinds
        text = str(e).strip().splitlines()
        raise UnreadableArrays(f"unreadable file {path} ({type(e).__name__}: {text[0] if text else ''})") from e
    absent = [n for n in names if n not in files]
    if absent:
        raise ValueError(f"{path}: npz lacks the array(s) {', '.join(absent)} (has {', '.join(files) or 'none'})")
    return arrays


# ---------------------------------------------------------------------------------------------- ranks


@dataclass
class RankBootstrap:
    """Bootstrap draws of average ranks per column, percentile intervals, first-front probabilities and pairwise
    ordering probabilities of the entries."""

    recipes: list[str]  # the entries
    draws: dict[str, np.ndarray]  # column -> (B, entries)
    intervals: pd.DataFrame  # index entry; columns '<column> lo', '<column> hi'
    first_front: pd.DataFrame  # index entry; 'P(front 1) <column>': share of draws x settings on the first front
    prob_better: dict[str, pd.DataFrame]  # column -> P(row entry ranks better than column entry)
    spearman: pd.DataFrame  # column, lo, hi: percentile interval of the Spearman correlation with the paper
    metrics: MetricDraws
    seed_weights: np.ndarray  # (B, records): how often each record's training seed was drawn
    confidence: float
    separation: float


def bootstrap_ranks(
    records: pd.DataFrame,
    pooled: pd.DataFrame,
    groups: dict[str, pd.Series],
    draws: int = 200,
    seed: int = 0,
    confidence: float = 0.9,
    separation: float = 0.95,
    progress: Callable[[str], None] | None = None,
    device: str = "cpu",
    workers: int = 0,
) -> RankBootstrap:
    """Intervals, first-front probabilities and ordering probabilities of every entry's average rank.

    records: one row per training seed and control setting (load_sweep's, with 'entry' and 'train_seed');
    pooled: the seed-mean table of pool_seeds(records) ('recipe' = entry); groups: the column masks on pooled.
    See the module docstring for what a draw resamples.
    """
    check_settings(confidence, separation, seed)
    metrics = bootstrap_metrics(records, draws, seed, progress, device, workers)
    weights = seed_weights(records, draws, seed)
    cells = _cells(records, pooled)
    clip = pool_draws(metrics.clip, weights, cells, len(pooled))
    fid = pool_draws(metrics.fid, weights, cells, len(pooled))
    fronts = fronts_per_setting(pooled, clip, fid)
    recipes = sorted(pooled["recipe"].unique())
    indicators = column_indicators(pooled, groups, recipes)
    tail = 100.0 * (1.0 - confidence) / 2.0
    index = pd.Index(recipes, name="recipe")
    per_column, intervals, first, prob = {}, pd.DataFrame(index=index), pd.DataFrame(index=index), {}
    for column in COLUMNS:
        avg = mean_over_settings(fronts, indicators[column])
        per_column[column] = avg
        with np.errstate(invalid="ignore"):
            # Draw values, not interpolations: the bounds stay exact multiples of 1 / (settings averaged).
            lo = np.nanpercentile(avg, tail, axis=0, method="lower") if np.isfinite(avg).any() else np.nan
            hi = np.nanpercentile(avg, 100.0 - tail, axis=0, method="higher") if np.isfinite(avg).any() else np.nan
        intervals[f"{column} lo"], intervals[f"{column} hi"] = lo, hi
        on_first = ((fronts == 1).astype(np.int64) @ indicators[column]).sum(axis=0)  # over draws and settings
        n = indicators[column].sum(axis=0) * draws
        with np.errstate(invalid="ignore", divide="ignore"):
            first[f"P(front 1) {column}"] = np.where(n > 0, on_first / np.maximum(n, 1), np.nan)
        prob[column] = pd.DataFrame(prob_better(avg), index=recipes, columns=recipes)
    spearman = spearman_draws(per_column, recipes, confidence)
    return RankBootstrap(recipes, per_column, intervals, first, prob, spearman, metrics, weights, confidence,
                         separation)


def seed_weights(records: pd.DataFrame, draws: int, seed: int = 0) -> np.ndarray:
    """(draws, records): per draw, how often each record's training seed was drawn from its entry's seeds.

    Per entry, k seeds are drawn with replacement from its k seeds (the same draw for all its settings and
    datasets: a seed label is one replicate). Its own random stream, so the evaluation-sample draws of a given
    seed do not change with the number of training seeds.
    """
    rng = np.random.default_rng([int(seed), 1])
    weights = np.ones((draws, len(records)))
    labels = records["train_seed"].to_numpy()
    for _, rows in sorted(records.groupby("entry", sort=True).indices.items()):
        seeds, position = np.unique(labels[rows], return_inverse=True)
        if len(seeds) > 1:
            counts = rng.multinomial(len(seeds), np.full(len(seeds), 1.0 / len(seeds)), size=draws)
            weights[:, rows] = counts[:, position]
    return weights


def _cells(records: pd.DataFrame, pooled: pd.DataFrame) -> np.ndarray:
    """For every record, the row of pooled (its entry and control setting)."""
    where = {key: i for i, key in enumerate(pooled[["recipe", "dataset", "setting", "ema"]].itertuples(index=False,
                                                                                                      name=None))}
    keys = records[["entry", "dataset", "setting", "ema"]].itertuples(index=False, name=None)
    return np.array([where[key] for key in keys], dtype=np.int64)


def pool_draws(values: np.ndarray, weights: np.ndarray, cells: np.ndarray, n_cells: int) -> np.ndarray:
    """(B, cells): per draw the weighted mean of the records' values in each cell (entry x control setting).

    A drawn record with a NaN value makes the cell NaN (last front); a cell none of whose seeds was drawn (a seed
    lacking that setting) takes the mean over all its records.
    """
    member = np.zeros((len(cells), n_cells))
    member[np.arange(len(cells)), cells] = 1.0
    drawn = weights > 0
    nan = np.isnan(values)
    num = np.where(drawn & ~nan, weights * np.nan_to_num(values), 0.0) @ member
    den = weights @ member
    every = np.nan_to_num(values) @ member / np.maximum(member.sum(axis=0), 1.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = np.where(den > 0, num / np.where(den > 0, den, 1.0), every)
    out[((drawn & nan).astype(float) @ member > 0) & (den > 0)] = np.nan
    out[(nan.astype(float) @ member > 0) & (den == 0)] = np.nan
    return out


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
            # max(p, 1 - p): not 1 - separation < p, where 1 - 0.9 = 0.0999... would call P = 0.1 inseparable but
            # the same pair listed the other way round (P = 0.9) separated.
            if np.isfinite(p) and max(p, 1.0 - p) < separation:
                pairs.append((a, b, float(p)))
    return pairs
