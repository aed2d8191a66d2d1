"""Frechet distance between Gaussian fits of feature sets (Heusel et al. 2017), in float64 (docs/evaluation.md#fid-on-clip-features)."""

from __future__ import annotations

import numpy as np
import torch


def _as_float64(x, name: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
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


def _sqrtm_psd(sigma: np.ndarray) -> np.ndarray:
    """Symmetric square root of a PSD matrix; round-off negative eigenvalues are clipped to 0."""
    lam, vec = np.linalg.eigh((sigma + sigma.T) / 2)
    return (vec * np.sqrt(np.clip(lam, 0.0, None))) @ vec.T


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """d^2 = |mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)), float64.

    tr (S1 S2)^(1/2) is computed as tr (S1^(1/2) S2 S1^(1/2))^(1/2): that matrix is symmetric PSD and has the
    same eigenvalues as S1 S2, so eigh gives real eigenvalues and no imaginary parts arise; round-off
    negative eigenvalues are clipped to 0, and a round-off negative total to 0.
    """
    mu1, mu2 = _as_float64(mu1, "mu1"), _as_float64(mu2, "mu2")
    s1, s2 = _as_float64(sigma1, "sigma1"), _as_float64(sigma2, "sigma2")
    d = mu1.shape[-1] if mu1.ndim else 0
    if mu1.shape != (d,) or mu2.shape != (d,) or s1.shape != (d, d) or s2.shape != (d, d):
        raise ValueError(
            f"frechet_distance: shapes must be mu (d,), sigma (d, d), got {mu1.shape}, {s1.shape}, {mu2.shape}, {s2.shape}"
        )
    root1 = _sqrtm_psd(s1)
    inner = root1 @ s2 @ root1
    lam = np.linalg.eigvalsh((inner + inner.T) / 2)
    tr_covmean = float(np.sqrt(np.clip(lam, 0.0, None)).sum())
    diff = mu1 - mu2
    return max(0.0, float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr_covmean))


def fid_from_features(features_a, features_b) -> float:
    """Frechet distance between the Gaussian fits of two (n, d) feature sets."""
    return frechet_distance(*feature_statistics(features_a), *feature_statistics(features_b))
