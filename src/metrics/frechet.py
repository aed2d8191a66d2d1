"""Frechet distance between Gaussian fits of feature sets (Heusel et al. 2017), in float64 (docs/evaluation.md#fid-on-clip-features).

The one implementation of the project: the evaluation's FID (src/evaluation) and the rank report's bootstrap
(src/ranking/bootstrap.py) both call it. numpy only, no torch at import time, so the ranking stays importable
without torch (torch tensors are still accepted: they are converted through `.numpy()`).
"""

from __future__ import annotations

import numpy as np


def _as_float64(x, name: str) -> np.ndarray:
    if hasattr(x, "detach"):  # a torch tensor; converted without importing torch here
        x = x.detach().cpu().double().numpy()
    arr = np.asarray(x, dtype=np.float64)
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} contains NaN or inf values")
    return arr


def feature_statistics(features) -> tuple[np.ndarray, np.ndarray]:
    """Mean (d,) and unbiased covariance (d, d) of an (n, d) feature set, in float64 (n >= 2)."""
    x = _as_float64(features, "features")
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"features must have shape (n, d) with n >= 2, got {tuple(x.shape)}")
    return x.mean(axis=0), np.atleast_2d(np.cov(x, rowvar=False))


def sqrtm_psd(sigma: np.ndarray) -> np.ndarray:
    """Symmetric square root of (a stack of) PSD matrices via eigh; round-off negative eigenvalues clipped to 0."""
    sigma = np.asarray(sigma, np.float64)
    lam, vec = np.linalg.eigh((sigma + np.swapaxes(sigma, -1, -2)) / 2)
    return (vec * np.sqrt(np.clip(lam, 0.0, None))[..., None, :]) @ np.swapaxes(vec, -1, -2)


def frechet_distance(mu1, sigma1, mu2, sigma2, root2: np.ndarray | None = None):
    """d^2 = |mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)), float64; a float, or an array for stacks.

    mu (..., d) and sigma (..., d, d) may carry leading batch dimensions (the bootstrap's draws); they broadcast.
    tr (S1 S2)^(1/2) is computed as tr (S2^(1/2) S1 S2^(1/2))^(1/2): that matrix is symmetric PSD with the
    eigenvalues of S1 S2, so eigh gives real eigenvalues and no imaginary parts arise. Round-off negative
    eigenvalues are clipped to 0, and a round-off negative total to 0. root2, S2^(1/2), may be passed when many
    S1 share one S2 (the bootstrap: every record of a dataset against one reference).
    """
    mu1, mu2 = _as_float64(mu1, "mu1"), _as_float64(mu2, "mu2")
    s1, s2 = _as_float64(sigma1, "sigma1"), _as_float64(sigma2, "sigma2")
    d = mu1.shape[-1] if mu1.ndim else 0
    if (mu1.ndim < 1 or mu2.shape[-1:] != (d,) or s1.shape[-2:] != (d, d) or s2.shape[-2:] != (d, d)):
        raise ValueError(
            f"frechet_distance: shapes must be mu (d,), sigma (d, d), got {mu1.shape}, {s1.shape}, {mu2.shape}, {s2.shape}"
        )
    root2 = sqrtm_psd(s2) if root2 is None else np.asarray(root2, np.float64)
    inner = root2 @ s1 @ root2
    lam = np.linalg.eigvalsh((inner + np.swapaxes(inner, -1, -2)) / 2)
    tr_covmean = np.sqrt(np.clip(lam, 0.0, None)).sum(axis=-1)
    diff = mu1 - mu2
    trace = np.trace(s1, axis1=-2, axis2=-1) + np.trace(s2, axis1=-2, axis2=-1)
    out = np.maximum(0.0, (diff**2).sum(axis=-1) + trace - 2.0 * tr_covmean)
    return float(out) if np.ndim(out) == 0 else out


def frechet_distance_rows(mu1, rows1, mu2, rows2):
    """The same d^2 from each side's rows B with B^T B = sigma (..., m, d), for stacks of low-rank covariances.

    The bootstrap's resampled covariances have rank below d whenever a draw holds fewer distinct rows than
    features (1000 samples resampled: ~632 distinct; CLIP L/14: 768 features). Then, with S1 = B1^T B1 and
    S2 = B2^T B2, the non-zero eigenvalues of S1 S2 are those of K K^T with K = B1 B2^T (m1 x m2), so
    tr (S1 S2)^(1/2) is the sum of the square roots of the eigenvalues of the smaller of K K^T and K^T K, and
    tr S = |B|_F^2: no d x d square root at all. Zero rows (padding) add zero eigenvalues and change nothing.
    In the bootstrap at 1000 x 768 on one CPU thread it is 3.0x faster (bench/results/bootstrap.md), and on steep
    spectra the more accurate form: it agrees with the singular values of K, which never square the condition
    number, to 2.5e-7 where the square-root form is 3e-6 off (eigenvalues ~ i^-2; tests/test_ranking_bootstrap.py).
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    rows1, rows2 = np.asarray(rows1, np.float64), np.asarray(rows2, np.float64)
    k = rows1 @ np.swapaxes(rows2, -1, -2)
    gram = k @ np.swapaxes(k, -1, -2) if k.shape[-2] <= k.shape[-1] else np.swapaxes(k, -1, -2) @ k
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh(gram), 0.0, None)).sum(axis=-1)
    trace = (rows1**2).sum(axis=(-1, -2)) + (rows2**2).sum(axis=(-1, -2))
    out = np.maximum(0.0, ((mu1 - mu2) ** 2).sum(axis=-1) + trace - 2.0 * tr_covmean)
    return float(out) if np.ndim(out) == 0 else out


def frechet_distance_rows_cov(mu1, rows1, mu2, sigma2):
    """The same d^2 from one side's rows B1 (..., m, d) with B1^T B1 = S1 and the other side's covariance S2.

    For a resampled side of few distinct rows against one of many (the bootstrap: 1000 samples, ~632 distinct rows,
    against COCO-2014 val's 40,504 reference images, ~25,600 distinct): the non-zero eigenvalues of S1 S2 are those
    of B1 S2 B1^T (m x m), which costs m d^2 whatever the other side's size, where the full row form's cross-Gram
    matrix grows with its rows (B1 B2^T: m x 25,600, about 20x the work of this at the paper's scale).
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    rows1, s2 = np.asarray(rows1, np.float64), np.asarray(sigma2, np.float64)
    inner = rows1 @ s2 @ np.swapaxes(rows1, -1, -2)
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh((inner + np.swapaxes(inner, -1, -2)) / 2), 0.0, None)).sum(-1)
    trace = (rows1**2).sum(axis=(-1, -2)) + np.trace(s2, axis1=-2, axis2=-1)
    out = np.maximum(0.0, ((mu1 - mu2) ** 2).sum(axis=-1) + trace - 2.0 * tr_covmean)
    return float(out) if np.ndim(out) == 0 else out


def fid_from_features(features_a, features_b) -> float:
    """Frechet distance between the Gaussian fits of two (n, d) feature sets."""
    return frechet_distance(*feature_statistics(features_a), *feature_statistics(features_b))
