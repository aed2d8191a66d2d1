"""The batched torch bootstrap (src/ranking/bootstrap_torch.py) equals the numpy path on the same draws."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from src.ranking.aggregate import load_sweep
from src.ranking.bootstrap import bootstrap_metrics, frechet_distance, resampled_moments, sqrtm_psd
from src.ranking.bootstrap_torch import TorchFrechet, resolve_device
from src.ranking.report import main
from src.ranking.synthetic import write_synthetic_sweep

RTOL = 1e-6


def test_batched_frechet_equals_numpy_on_the_same_draws():
    rng = np.random.default_rng(0)
    n, m, d, draws = 200, 150, 24, 7
    feats = rng.normal(size=(n, d)) @ rng.normal(size=(d, d))
    ref = rng.normal(size=(m, d)) + 0.3
    counts = rng.multinomial(n, np.full(n, 1 / n), size=draws).astype(float)
    ref_counts = rng.multinomial(m, np.full(m, 1 / m), size=draws).astype(float)
    mu_r, cov_r = resampled_moments(ref, ref_counts)
    expected = frechet_distance(*resampled_moments(feats, counts), mu_r, cov_r, sqrtm_psd(cov_r))

    ops = TorchFrechet("torch-cpu")
    tmu_r, tcov_r = ops.resampled_moments(ref, ref_counts)
    np.testing.assert_allclose(tcov_r.numpy(), cov_r, rtol=1e-10, atol=1e-12)
    got = ops.frechet_distance(*ops.resampled_moments(feats, counts), tmu_r, tcov_r, ops.sqrtm_psd(tcov_r))
    assert got.dtype == np.float64 and got.shape == (draws,)
    np.testing.assert_allclose(got, expected, rtol=RTOL)



def test_resampled_moments_in_slices_of_draws_equal_those_at_once(monkeypatch):
    """The (draws, d, n) weighted rows are formed a few draws at a time (SCATTER_BYTES): at the paper's reference
    (40,504 x 768) a GPU chunk of 200 draws at once needed 50 GB."""
    import src.ranking.bootstrap_torch as bootstrap_torch

    rng = np.random.default_rng(1)
    x = rng.normal(size=(50, 6))
    counts = rng.multinomial(50, np.full(50, 1 / 50), size=7).astype(float)
    ops = TorchFrechet("torch-cpu")
    whole = ops.resampled_moments(x, counts)
    monkeypatch.setattr(bootstrap_torch, "SCATTER_BYTES", 2 * 8 * x.size)  # two draws at a time
    sliced = ops.resampled_moments(x, counts)
    for a, b in zip(sliced, whole):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(sliced[1].numpy(), resampled_moments(x, counts)[1], rtol=1e-10, atol=1e-12)


def test_round_off_negative_eigenvalues_are_clipped_as_the_numpy_path_clips_them():
    """A covariance with a round-off negative eigenvalue (-1e-6 here, to be seen): clipped to 0, not mirrored."""
    ops = TorchFrechet("torch-cpu")
    mu, eye = np.zeros((1, 3)), np.eye(3)[None]
    bent = np.diag([1.0, 0.5, -1e-6])[None]
    for cov1, cov2 in ((eye, bent), (bent, eye)):  # in the reference's square root; in the product's eigenvalues
        expected = frechet_distance(mu, cov1, mu, cov2, sqrtm_psd(cov2))
        got = ops.frechet_distance(mu, cov1, mu, cov2, ops.sqrtm_psd(ops._tensor(cov2)))
        np.testing.assert_allclose(got, expected, rtol=RTOL)


def test_a_distribution_against_itself_has_fid_zero_never_a_negative_round_off():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(30, 8))
    mu, cov = x.mean(0)[None].repeat(20, 0), np.cov(x, rowvar=False)[None].repeat(20, 0)
    cov = cov * rng.uniform(0.5, 2.0, size=(20, 1, 1))  # 20 scales: some draw's round-off lands below zero
    ops = TorchFrechet("torch-cpu")
    got = ops.frechet_distance(mu, cov, mu, cov)
    assert (got >= 0.0).all() and (frechet_distance(mu, cov, mu, cov) >= 0.0).all()
    np.testing.assert_allclose(got, 0.0, atol=1e-12)
    counts = rng.multinomial(30, np.full(30, 1 / 30), size=20).astype(float)  # the row form, both trace methods
    for method in ("eigh", "newton-schulz"):
        ops = TorchFrechet("torch-cpu", trace_sqrt=method)
        mean, rows = ops.resampled_rows(x, counts)
        got = ops.frechet_distance_rows(mean, rows, mean, rows)
        assert (got >= 0.0).all(), method
        np.testing.assert_allclose(got, 0.0, atol=1e-12)


def test_newton_schulz_trace_equals_numpy_on_a_flat_spectrum():
    """More features than distinct resampled rows (120 rows, ~76 distinct, 96 features): singular covariances. On a
    flat spectrum the iteration reaches RTOL; on power-law spectra it does not (trace_sqrt_newton_schulz), which is
    why eigh is the default."""
    rng = np.random.default_rng(1)
    n, d, draws = 120, 96, 5
    feats = rng.normal(size=(n, d)) * 1.1 + 0.1
    ref = rng.normal(size=(n, d))
    counts = rng.multinomial(n, np.full(n, 1 / n), size=draws).astype(float)
    mu_r, cov_r = resampled_moments(ref, counts)
    expected = frechet_distance(*resampled_moments(feats, counts), mu_r, cov_r, sqrtm_psd(cov_r))
    ops = TorchFrechet("torch-cpu", trace_sqrt="newton-schulz")
    tmu_r, tcov_r = ops.resampled_moments(ref, counts)
    got = ops.frechet_distance(*ops.resampled_moments(feats, counts), tmu_r, tcov_r, ops.sqrtm_psd(tcov_r))
    assert np.linalg.matrix_rank(cov_r[0]) < d
    np.testing.assert_allclose(got, expected, rtol=RTOL)
    with pytest.raises(ValueError, match="trace_sqrt='svd' is not allowed; allowed: 'eigh', 'newton-schulz'"):
        TorchFrechet("torch-cpu", trace_sqrt="svd")
    assert TorchFrechet("torch-cpu").trace_sqrt == "eigh"  # the default (see trace_sqrt_newton_schulz)


def _power_law_rows(power: float, seed: int, n: int = 300, d: int = 256, draws: int = 3):
    """Resampled rows of features whose covariance eigenvalues fall as i^-power (real embeddings' are power laws)."""
    from src.ranking.bootstrap import resampled_rows

    rng = np.random.default_rng(seed)
    scale = np.arange(1, d + 1) ** (-power / 2)
    x, ref = ((rng.normal(size=(n, d)) * scale) @ np.linalg.qr(rng.normal(size=(d, d)))[0] + s for s in (0.01, 0))
    counts, ref_counts = (rng.multinomial(n, np.full(n, 1 / n), size=draws).astype(float) for _ in range(2))
    return resampled_rows(x, counts), resampled_rows(ref, ref_counts)


@pytest.mark.parametrize("power", [0.0, 1.0, 2.0, 3.0])
def test_row_form_newton_schulz_is_certified_on_power_law_spectra(power):
    """The polar iteration's nuclear norm meets the numpy path to 1e-6 and the SVD's to 1e-7 (a steeper spectrum
    only takes more iterations), without falling back to eigh."""
    from src.metrics.frechet import frechet_distance_rows

    (mu1, b1), (mu2, b2) = _power_law_rows(power, seed=int(power))
    assert b1.shape[1] < b1.shape[2]  # fewer distinct rows than features: the row form
    rest = ((mu1 - mu2) ** 2).sum(-1) + (b1**2).sum((-1, -2)) + (b2**2).sum((-1, -2))
    svd = rest - 2 * np.linalg.svd(b1 @ np.swapaxes(b2, -1, -2), compute_uv=False).sum(-1)
    ops = TorchFrechet("torch-cpu", trace_sqrt="newton-schulz")
    got = ops.frechet_distance_rows(mu1, b1, mu2, b2)
    assert ops.fallbacks == 0
    np.testing.assert_allclose(got, frechet_distance_rows(mu1, b1, mu2, b2), rtol=RTOL)
    np.testing.assert_allclose(got, svd, rtol=1e-7)


def test_polar_iteration_bound_holds_at_every_iteration_and_unconverged_draws_fall_back(monkeypatch):
    """The bound is an upper bound on the error at every iteration, round-off included: with its traces clamped at
    0 it was 0 where they came out negative (round-off), while the value was off by 1e-10 of the norm."""
    import src.ranking.bootstrap_torch as bt

    for power, seed in ((2.0, 7), (3.0, 3), (1.0, 1), (0.0, 0), (2.0, 2)):
        (_, b1), (_, b2) = _power_law_rows(power, seed=seed)
        k = torch.from_numpy(b1 @ np.swapaxes(b2, -1, -2))
        exact = torch.linalg.svdvals(k).sum(-1)
        seen = []

        def never(value, bound):  # records every iteration's value and bound, accepts none
            seen.append((value, bound))
            return torch.zeros_like(value, dtype=torch.bool)

        nuclear, done = bt.nuclear_norm_newton_schulz(k, never, max_iterations=60)
        assert not done.any() and len(seen) == 61
        for value, bound in seen:  # the bound is an upper bound on the error, and it shrinks by orders
            assert torch.all((exact - value).abs() <= bound * (1 + 1e-9) + 1e-13 * exact), (power, seed)
        assert torch.all(seen[-1][1] < 1e-7 * exact) and torch.all(seen[0][1] > 1e-3 * exact)
    # A draw that is not certified in the iterations allowed is computed by eigh instead: the same FIDs.
    real = bt.nuclear_norm_newton_schulz
    monkeypatch.setattr(bt, "nuclear_norm_newton_schulz", lambda k, c: real(k, c, max_iterations=3))
    (mu1, b1), (mu2, b2) = _power_law_rows(1.0, seed=3)
    ops = TorchFrechet("torch-cpu", trace_sqrt="newton-schulz")
    np.testing.assert_allclose(ops.frechet_distance_rows(mu1, b1, mu2, b2),
                               TorchFrechet("torch-cpu").frechet_distance_rows(mu1, b1, mu2, b2), rtol=1e-12)
    assert ops.fallbacks == 3


@pytest.mark.parametrize("dim", [8, 48])  # more distinct rows than features (square roots), fewer (the row form)
def test_bootstrap_metrics_on_the_torch_path_equal_the_numpy_path(tmp_path, dim):
    sweep = write_synthetic_sweep(tmp_path / "s", recipes=("rf", "edm"), datasets=("digits",), n_samples=40,
                                  n_reference=60, dim=dim)
    records = load_sweep([sweep]).records
    numpy_draws = bootstrap_metrics(records, 12, seed=3, device="cpu")
    torch_draws = bootstrap_metrics(records, 12, seed=3, device="torch-cpu")
    np.testing.assert_array_equal(torch_draws.clip, numpy_draws.clip)
    np.testing.assert_allclose(torch_draws.fid, numpy_draws.fid, rtol=RTOL)
    assert torch_draws.fixed == numpy_draws.fixed


def test_the_torch_path_meets_a_reference_of_many_rows_as_its_covariance_as_numpy_does(tmp_path, monkeypatch):
    """A reference of more distinct rows than features (COCO-2014 val's 40,504 at the paper's scale): the samples'
    rows meet its covariance (B1 S2 B1^T), never its rows (a cross-Gram matrix growing with it), on a GPU too."""
    sweep = write_synthetic_sweep(tmp_path / "s", recipes=("rf", "edm"), datasets=("digits",), n_samples=40,
                                  n_reference=300, dim=48)
    records = load_sweep([sweep]).records
    numpy_draws = bootstrap_metrics(records, 12, seed=3, device="cpu")
    rows_of = []
    real = TorchFrechet.resampled_rows
    monkeypatch.setattr(TorchFrechet, "resampled_rows", lambda self, x, c: rows_of.append(len(x)) or real(self, x, c))
    torch_draws = bootstrap_metrics(records, 12, seed=3, device="torch-cpu")
    assert rows_of and max(rows_of) == 40  # the samples' rows only, never the reference's 300
    np.testing.assert_allclose(torch_draws.fid, numpy_draws.fid, rtol=RTOL)


def test_device_setting():
    assert resolve_device("cpu") == "cpu"
    assert resolve_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="device='gpu' is not allowed"):
        resolve_device("gpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="device='cuda' is not allowed here"):
            resolve_device("cuda")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message where no GPU is present")
def test_report_cli_refuses_cuda_without_a_gpu(tmp_path, capsys):
    sweep = write_synthetic_sweep(tmp_path / "s", recipes=("rf", "edm"), datasets=("digits",), n_samples=16,
                                  n_reference=20, dim=4)
    assert main([str(sweep), "--out", str(tmp_path / "r"), "--bootstrap", "4", "--device", "cuda"]) == 1
    assert "--device cuda is not allowed here: torch sees no CUDA device" in capsys.readouterr().err
