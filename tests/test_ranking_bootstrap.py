"""Bootstrap of evaluation samples: Frechet distance, resampled moments, paired draws, separability (training-seed
resampling: tests/test_ranking_seeds.py)."""
import json

import numpy as np
import pytest
from scipy import linalg

from src.metrics.frechet import fid_from_features, frechet_distance, frechet_distance_rows
from src.ranking.aggregate import load_sweep, pool_seeds, rank_table, setting_groups
from src.ranking.bootstrap import (bootstrap_metrics, bootstrap_ranks, check_settings, inseparable_pairs, pool_draws,
                                   prob_better, resampled_moments, resampled_rows, resolve_workers, use_rows)
from src.ranking.synthetic import write_synthetic_sweep

RECIPES = ("good", "twin-a", "twin-b")


def scipy_fid(a, b):
    """The textbook formula with scipy's sqrtm (as in pytorch-fid)."""
    mu1, mu2, s1, s2 = a.mean(0), b.mean(0), np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def test_frechet_matches_scipy_sqrtm():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(40, 5)) @ rng.normal(size=(5, 5))
    b = rng.normal(0.5, 1.3, size=(60, 5))
    assert fid_from_features(a, b) == pytest.approx(scipy_fid(a, b), rel=1e-8)
    assert fid_from_features(a, a) == pytest.approx(0.0, abs=1e-9)


def test_bootstrap_uses_the_metric_frechet_distance():
    """One Frechet distance: the bootstrap's is the evaluation's (src/metrics/frechet.py), not a copy."""
    import src.metrics.frechet as metric
    import src.ranking.bootstrap as bootstrap

    assert bootstrap.frechet_distance is metric.frechet_distance
    assert not hasattr(bootstrap, "frechet_from_features") and not hasattr(bootstrap, "_check_consistency")


def test_resampled_moments_equal_moments_of_repeated_rows():
    rng = np.random.default_rng(2)
    x = rng.normal(3.0, 2.0, size=(12, 3))
    counts = rng.multinomial(12, np.full(12, 1 / 12), size=4).astype(float)
    mu, cov = resampled_moments(x, counts)
    for b in range(4):
        rows = np.repeat(x, counts[b].astype(int), axis=0)
        np.testing.assert_allclose(mu[b], rows.mean(0), rtol=1e-12)
        np.testing.assert_allclose(cov[b], np.cov(rows, rowvar=False), rtol=1e-10, atol=1e-12)
    batched = frechet_distance(mu, cov, mu[::-1], cov[::-1])
    first, last = (np.repeat(x, counts[b].astype(int), axis=0) for b in (0, 3))
    assert batched[0] == pytest.approx(scipy_fid(first, last))


def test_row_form_equals_the_metric_frechet_distance_on_resampled_draws():
    """The bootstrap's row form (a draw with fewer distinct rows than features: 60 rows resampled, ~38 distinct, 48
    features) gives the metric's distance, and its rows reproduce the resampled covariance."""
    rng = np.random.default_rng(4)
    n, d = 60, 48
    x = rng.normal(size=(n, d)) @ rng.normal(size=(d, d)) / 5
    ref = rng.normal(size=(n, d)) + 0.3
    counts, ref_counts = (rng.multinomial(n, np.full(n, 1 / n), size=5).astype(float) for _ in range(2))
    mu, cov = resampled_moments(x, counts)
    mu_rows, rows = resampled_rows(x, counts)
    np.testing.assert_allclose(mu_rows, mu, rtol=1e-12)
    np.testing.assert_allclose(np.swapaxes(rows, -1, -2) @ rows, cov, rtol=1e-10, atol=1e-12)
    expected = frechet_distance(mu, cov, *resampled_moments(ref, ref_counts))
    np.testing.assert_allclose(frechet_distance_rows(mu_rows, rows, *resampled_rows(ref, ref_counts)), expected,
                               rtol=1e-8)
    assert use_rows(counts, ref_counts, d) and not use_rows(counts, ref_counts, 20)


def test_row_form_is_accurate_on_a_steep_spectrum():
    """Eigenvalues ~ i^-2, like real embeddings': the row form agrees to 1e-6 with the sum of the singular values
    of K = B1 B2^T, which never squares the condition number."""
    rng = np.random.default_rng(5)
    n, d = 300, 256
    scale = np.arange(1, d + 1) ** -1.0
    basis = np.linalg.qr(rng.normal(size=(d, d)))[0]
    x, ref = ((rng.normal(size=(n, d)) * scale) @ basis + shift for shift in (0.01, 0.0))
    counts, ref_counts = (rng.multinomial(n, np.full(n, 1 / n), size=3).astype(float) for _ in range(2))
    (mu1, b1), (mu2, b2) = resampled_rows(x, counts), resampled_rows(ref, ref_counts)
    nuclear = np.linalg.svd(b1 @ np.swapaxes(b2, -1, -2), compute_uv=False).sum(-1)
    exact = ((mu1 - mu2) ** 2).sum(-1) + (b1**2).sum((-1, -2)) + (b2**2).sum((-1, -2)) - 2 * nuclear
    np.testing.assert_allclose(frechet_distance_rows(mu1, b1, mu2, b2), exact, rtol=1e-6)


def test_bootstrap_takes_the_row_form_when_draws_have_fewer_rows_than_features(tmp_path, monkeypatch):
    """40 samples, 48 features: the row form; its draws equal the square-root form's (use_rows forced off)."""
    import src.ranking.bootstrap as bootstrap

    sweep = write_synthetic_sweep(tmp_path / "s", recipes=("rf", "edm"), datasets=("digits",), n_samples=40,
                                  n_reference=60, dim=48)
    records = load_sweep([sweep]).records
    calls = []
    monkeypatch.setattr(bootstrap, "use_rows", lambda *a: calls.append(bootstrap_use_rows(*a)) or calls[-1])
    rows = bootstrap_metrics(records, 6, seed=1)
    assert calls and all(calls)
    monkeypatch.setattr(bootstrap, "use_rows", lambda *a: False)
    # 1e-6: the square-root form adds sqrt(round-off) for each of the ~23 zero eigenvalues (about 1e-8 relative)
    np.testing.assert_allclose(rows.fid, bootstrap_metrics(records, 6, seed=1).fid, rtol=1e-6)


bootstrap_use_rows = use_rows


@pytest.fixture
def twin_sweep(tmp_path):
    """'good' is far better; 'twin-b' is a byte-identical copy of 'twin-a' (same arrays, same metrics)."""
    sweep = write_synthetic_sweep(tmp_path / "twins", recipes=RECIPES, quality=(1.0, 0.3, 0.3), datasets=("digits",),
                                  n_samples=32, n_reference=48, dim=4)
    a, b = (json.loads((sweep / str(i) / "results.json").read_text()) for i in (1, 2))
    for rec_a, rec_b in zip(a, b):
        rec_b.update({k: rec_a[k] for k in ("clip_score", "fid_clip")}, arrays=f"../1/{rec_a['arrays']}")
    (sweep / "2" / "results.json").write_text(json.dumps(b))
    return sweep


def _boot(sweep, **kwargs):
    records = load_sweep([sweep]).records
    ranked = rank_table(pool_seeds(records))
    return bootstrap_ranks(records, ranked, setting_groups(ranked), **kwargs)


def test_identical_recipes_cannot_be_separated_and_a_dominant_one_can(twin_sweep):
    boot = _boot(twin_sweep, draws=60, seed=0)
    # Paired draws: the twins get identical resampled metrics in every draw, hence always tie.
    np.testing.assert_array_equal(boot.draws["all"][:, 1], boot.draws["all"][:, 2])
    p = boot.prob_better["all"]
    assert p.loc["twin-a", "twin-b"] == 0.5
    assert p.loc["good", "twin-a"] == 1.0 and p.loc["twin-a", "good"] == 0.0
    assert inseparable_pairs(p, 0.95, ["good", "twin-a", "twin-b"]) == [("twin-a", "twin-b", 0.5)]
    lo, hi = boot.intervals.loc["good", "all lo"], boot.intervals.loc["good", "all hi"]
    assert lo == hi == 1.0
    assert boot.first_front.loc["good", "P(front 1) all"] == 1.0
    assert boot.first_front.loc["twin-a", "P(front 1) all"] == boot.first_front.loc["twin-b", "P(front 1) all"] < 0.5
    assert not boot.metrics.fixed


def test_draws_are_reproducible_and_depend_on_seed(twin_sweep):
    records = load_sweep([twin_sweep]).records
    first, again, other = (bootstrap_metrics(records, 8, seed=s) for s in (0, 0, 1))
    np.testing.assert_array_equal(first.fid, again.fid)
    assert not np.array_equal(first.fid, other.fid)
    # Draws scatter around the recorded values (resampling inflates FID a little, never to another scale).
    assert np.all(np.abs(np.median(first.clip, 0) - records["clip_score"].to_numpy()) < 0.01)
    assert np.all(np.median(first.fid, 0) < 3 * records["fid_clip"].to_numpy() + 1)


def test_records_without_arrays_stay_fixed(twin_sweep):
    results = twin_sweep / "0" / "results.json"
    recs = json.loads(results.read_text())
    recs[0]["arrays"] = None
    results.write_text(json.dumps(recs))
    records = load_sweep([twin_sweep]).records
    draws = bootstrap_metrics(records, 5, seed=0)
    assert list(draws.fixed) == [0] and np.all(draws.fid[:, 0] == recs[0]["fid_clip"])
    assert "no arrays" in draws.fixed[0]
    assert not np.all(draws.fid[:, 1] == recs[1]["fid_clip"])  # the others are resampled


def test_prob_better_counts_ties_half():
    avg = np.array([[1.0, 2.0, 1.0], [1.0, 1.0, 2.0], [2.0, 1.0, 2.0], [1.0, 1.0, 1.0]])
    p = prob_better(avg)
    assert p[0, 1] == pytest.approx((1 + 0.5 + 0 + 0.5) / 4)
    np.testing.assert_allclose(p + p.T, 1.0)


def test_intervals_are_the_draws_at_the_two_tails_of_the_confidence(tmp_path):
    sweep = write_synthetic_sweep(tmp_path / "close", recipes=("a", "b", "c"), quality=(0.5, 0.5, 0.45),
                                  datasets=("digits",), n_samples=32, n_reference=48, dim=4)
    boot = _boot(sweep, draws=60, seed=3, confidence=0.8)
    for column, avg in boot.draws.items():
        ordered = np.sort(avg, axis=0)  # 60 draws: the 10% tail ends at draw 5.9, the 90% one at 53.1 (of 0..59)
        np.testing.assert_array_equal(boot.intervals[f"{column} lo"].to_numpy(), ordered[5])
        np.testing.assert_array_equal(boot.intervals[f"{column} hi"].to_numpy(), ordered[54])
    ordered = np.sort(boot.draws["all"], axis=0)  # neighbouring draws differ here, so the tails are pinned
    assert (ordered[5] != ordered[6]).any() and (ordered[53] != ordered[54]).any()


def test_separation_is_strict_at_its_threshold():
    import pandas as pd

    order = ["a", "b", "c"]
    prob = pd.DataFrame([[0.5, 0.95, 0.94], [0.05, 0.5, 0.06], [0.06, 0.94, 0.5]], index=order, columns=order)
    # P = 0.95 (and 0.05) separates at separation 0.95; 0.94 and 0.06 do not.
    assert inseparable_pairs(prob, 0.95, order) == [("a", "c", 0.94), ("b", "c", 0.06)]
    check_settings(0.9, 1.0, 0)
    with pytest.raises(ValueError, match="separation"):
        check_settings(0.9, 0.5, 0)  # a coin flip separates nothing


@pytest.mark.parametrize("separation", [0.75, 0.8, 0.9, 0.95])
@pytest.mark.parametrize("draws", [100, 200, 1000])
def test_separation_does_not_depend_on_which_entry_is_listed_first(separation, draws):
    """a ranks better than b in exactly (1 - separation) of the draws, so b better in `separation` of them: separated,
    whichever of the two the table lists first (P(a better) = 1 - separation is as strict a bound as P = separation)."""
    import pandas as pd

    wins = round((1.0 - separation) * draws)
    avg = np.zeros((draws, 2))
    avg[:, 0] = 1.0
    avg[:wins, 0] = -1.0  # a's average rank: better than b's in `wins` draws, worse in the others
    prob = pd.DataFrame(prob_better(avg), index=["a", "b"], columns=["a", "b"])
    assert prob.loc["a", "b"] == pytest.approx(1.0 - separation) and prob.loc["b", "a"] == pytest.approx(separation)
    assert inseparable_pairs(prob, separation, ["b", "a"]) == []
    assert inseparable_pairs(prob, separation, ["a", "b"]) == []
    avg[wins, 0] = -1.0  # one more win for a: now inside the open interval, inseparable either way round
    prob = pd.DataFrame(prob_better(avg), index=["a", "b"], columns=["a", "b"])
    assert [pair[:2] for pair in inseparable_pairs(prob, separation, ["a", "b"])] == [("a", "b")]
    assert [pair[:2] for pair in inseparable_pairs(prob, separation, ["b", "a"])] == [("b", "a")]


def test_pool_draws_weights_seeds_by_how_often_they_were_drawn():
    nan = np.nan
    cells = np.array([0, 0, 0, 1, 2, 2])  # three seeds of one cell, one of another, two of a third
    weights = np.array([[2, 1, 0, 1, 1, 1], [0, 0, 3, 1, 1, 1], [1, 0, 2, 1, 1, 1], [0, 3, 0, 1, 0, 0],
                        [0, 3, 0, 1, 0, 0]], dtype=float)
    values = np.array([[1, 4, 100, 7, 2, 6], [1, 4, 10, 7, 2, 6], [nan, 4, 10, 7, 2, 6], [nan, 4, 10, 7, 2, 6],
                       [1, 4, 10, 7, nan, 6]], dtype=float)
    expected = np.array([[2.0, 7, 4], [10, 7, 4],
                         [nan, 7, 4],  # a drawn seed's NaN makes the cell NaN (last front)
                         [4, 7, 4],  # an undrawn seed's NaN does not; a cell none of whose seeds was drawn: all
                         [4, 7, nan]])  # ... unless one of them is NaN
    np.testing.assert_array_equal(pool_draws(values, weights, cells, 3), expected)


def test_a_record_with_a_null_metric_keeps_it_in_every_draw(twin_sweep):
    results = twin_sweep / "0" / "results.json"
    recs = json.loads(results.read_text())
    recs[0]["fid_clip"] = None  # its arrays are there, but the recorded run diverged: last front in every draw
    results.write_text(json.dumps(recs))
    draws = bootstrap_metrics(load_sweep([twin_sweep]).records, 4, seed=0)
    assert "non-finite" in draws.fixed[0] and np.isnan(draws.fid[:, 0]).all()


def test_a_record_of_one_sample_keeps_its_recorded_metrics_in_every_draw(twin_sweep):
    """One sample has no covariance to resample (eval.n_samples >= 2 is enforced; a hand-made or truncated record):
    set aside with its recorded values, as a record without arrays is."""
    recs = json.loads((twin_sweep / "0" / "results.json").read_text())
    arrays = twin_sweep / "0" / recs[0]["arrays"]
    with np.load(arrays) as data:
        kept = {k: data[k][:1] if k in ("clip_scores", "features") else data[k] for k in data.files}
    np.savez(arrays, **kept)
    records = load_sweep([twin_sweep]).records
    row = int(np.flatnonzero((records["arrays"] == str(arrays)).to_numpy())[0])
    draws = bootstrap_metrics(records, 4, seed=0)
    assert draws.fixed[row] == "fewer than 2 samples or reference rows"
    assert np.all(draws.fid[:, row] == records["fid_clip"].iat[row])
    assert len(draws.fixed) == 1


@pytest.mark.parametrize("kwargs, message", [({"draws": 0}, "positive"), ({"confidence": 1.0}, "confidence"),
                                             ({"separation": 0.4}, "separation")])
def test_bad_bootstrap_settings_raise(twin_sweep, kwargs, message):
    with pytest.raises(ValueError, match=message):
        _boot(twin_sweep, **{"draws": 4, **kwargs})


def test_reloading_features_over_the_memory_budget_gives_the_same_draws(twin_sweep, monkeypatch):
    import src.ranking.bootstrap as bootstrap

    records = load_sweep([twin_sweep]).records
    cached = bootstrap_metrics(records, 6, seed=3)
    monkeypatch.setattr(bootstrap, "FEATURE_CACHE_BYTES", 0)
    monkeypatch.setattr(bootstrap, "CHUNK_BYTES", 8 * 4 * 4 * 4 * 2)  # two draws per chunk at d = 4
    reloaded = bootstrap_metrics(records, 6, seed=3)
    np.testing.assert_array_equal(cached.fid, reloaded.fid)
    np.testing.assert_array_equal(cached.clip, reloaded.clip)


def test_draws_do_not_depend_on_the_order_of_the_records(tmp_path):
    """Each record's draws depend on the records, not on their order (the sweeps' order on the command line, the
    records' in results.json): two datasets listed shapes first draw as listed digits first."""
    sweep = write_synthetic_sweep(tmp_path / "s", recipes=("rf", "edm"), n_samples=16, n_reference=24, dim=3,
                                  sampler_settings=((5, 5.0),))
    records = load_sweep([sweep]).records
    assert records["dataset"].iloc[0] == "digits" and set(records["dataset"]) == {"digits", "shapes"}
    backwards = records.iloc[::-1].reset_index(drop=True)
    first, second = bootstrap_metrics(records, 5, seed=0), bootstrap_metrics(backwards, 5, seed=0)
    np.testing.assert_array_equal(first.clip, second.clip[:, ::-1])
    np.testing.assert_array_equal(first.fid, second.fid[:, ::-1])


def test_draws_do_not_depend_on_the_number_of_workers(tmp_path):
    """Worker threads compute records in parallel with BLAS held to one thread: the same arithmetic, equal draws."""
    sweep = write_synthetic_sweep(tmp_path / "s", recipes=("rf", "edm", "eps/linear"), datasets=("digits",),
                                  n_samples=40, n_reference=60, dim=48)
    records = load_sweep([sweep]).records
    assert len(records) >= 6
    one, *more = (bootstrap_metrics(records, 5, seed=2, workers=w) for w in (1, 2, 3, 0))
    for other in more:
        np.testing.assert_array_equal(one.fid, other.fid)
        np.testing.assert_array_equal(one.clip, other.clip)


@pytest.mark.parametrize("workers", [-1, 1.5, "2", True])
def test_bad_worker_counts_are_refused(workers):
    with pytest.raises(ValueError, match=r"bootstrap workers=.* is not allowed; allowed: 0 \(every usable core\)"):
        resolve_workers(workers)


def test_report_cli_refuses_a_bad_worker_count_before_writing(tmp_path, capsys):
    from src.ranking.report import main

    sweep = write_synthetic_sweep(tmp_path / "s", recipes=("rf", "edm"), datasets=("digits",), n_samples=16,
                                  n_reference=20, dim=4)
    for draws in ("4", "0"):
        assert main([str(sweep), "--out", str(tmp_path / "r"), "--bootstrap", draws, "--workers", "-2"]) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert err == ["rank report: error: --workers -2 is not allowed; allowed: 0 (every usable core) or a "
                       "positive integer"]
        assert not (tmp_path / "r").exists()
    assert main([str(sweep), "--out", str(tmp_path / "r"), "--bootstrap", "4", "--workers", "2"]) == 0
    assert (tmp_path / "r" / "report.md").is_file()


def test_long_bootstraps_announce_their_duration_and_progress(twin_sweep, monkeypatch):
    import src.ranking.bootstrap as bootstrap

    records = load_sweep([twin_sweep]).records
    quiet: list[str] = []
    bootstrap_metrics(records, 20, seed=0, progress=quiet.append)
    assert quiet == []  # seconds at most: nothing to announce
    monkeypatch.setattr(bootstrap, "PROGRESS_AFTER_S", -1.0)  # every bootstrap counts as long
    monkeypatch.setattr(bootstrap, "CHUNK_BYTES", 8 * 4 * 4 * 4 * 2)  # two draws per chunk at d = 4
    lines: list[str] = []
    draws = bootstrap_metrics(records, 20, seed=0, progress=lines.append)
    np.testing.assert_array_equal(draws.fid, bootstrap_metrics(records, 20, seed=0).fid)  # reporting changes nothing
    assert lines[0].startswith(f"bootstrap: 20 draws x {len(records)} records, about ")
    assert "--bootstrap 0 skips it" in lines[0]
    done = [int(line.split()[1].split("/")[0]) for line in lines[1:]]
    assert done == list(range(2, 20, 2)) and all("left" in line for line in lines[1:])


def test_rows_against_a_covariance_equal_the_metric_frechet_distance():
    """frechet_distance_rows_cov: the samples' rows against the reference's covariance give the metric's distance."""
    from src.metrics.frechet import frechet_distance_rows_cov

    rng = np.random.default_rng(7)
    x, ref = rng.normal(size=(30, 24)), rng.normal(size=(300, 24)) + 0.2
    counts, ref_counts = (rng.multinomial(len(a), np.full(len(a), 1 / len(a)), size=4).astype(float) for a in (x, ref))
    expected = frechet_distance(*resampled_moments(x, counts), *resampled_moments(ref, ref_counts))
    got = frechet_distance_rows_cov(*resampled_rows(x, counts), *resampled_moments(ref, ref_counts))
    np.testing.assert_allclose(got, expected, rtol=1e-8)


def test_bootstrap_never_forms_the_rows_of_a_large_reference(tmp_path, monkeypatch):
    """At the paper's scale the reference (COCO-2014 val, 40,504 images: ~25,600 distinct rows a draw) has far more
    rows than features: its rows were multiplied with every record's in every draw (m x 25,600 cross-Gram
    matrices, ~20x the work of B1 S2 B1^T). The samples' rows now meet its covariance; draws as the square roots'."""
    import src.ranking.bootstrap as bootstrap

    sweep = write_synthetic_sweep(tmp_path / "s", recipes=("rf", "edm"), datasets=("digits",), n_samples=20,
                                  n_reference=200, dim=24)
    records = load_sweep([sweep]).records
    rows_of = []
    real = bootstrap.resampled_rows
    monkeypatch.setattr(bootstrap, "resampled_rows", lambda x, c: rows_of.append(len(x)) or real(x, c))
    fid = bootstrap_metrics(records, 6, seed=1).fid
    assert rows_of and max(rows_of) == 20  # the samples' rows only, never the reference's 200
    monkeypatch.setattr(bootstrap, "use_rows", lambda *a: False)
    np.testing.assert_allclose(fid, bootstrap_metrics(records, 6, seed=1).fid, rtol=1e-6)
