"""Non-dominated sorting (Deb et al. 2002), the ranking of Esser et al. 2024, section 5.1 (docs/ranking.md#non-dominated-sorting)."""
from __future__ import annotations

from typing import Sequence

import numpy as np

NAN_POLICIES = ("raise", "last")


def dominance_matrix(points: np.ndarray, maximize: Sequence[bool]) -> np.ndarray:
    """Boolean (n, n) matrix D with D[i, j] true when point i dominates point j."""
    costs = _as_costs(points, maximize)
    no_worse = (costs[:, None, :] <= costs[None, :, :]).all(axis=-1)
    better = (costs[:, None, :] < costs[None, :, :]).any(axis=-1)
    # Deb's definition: equal points are no worse and nowhere better, so they do not dominate each other.
    return no_worse & better


def non_dominated_ranks(points, maximize: Sequence[bool], nan_policy: str = "raise") -> np.ndarray:
    """Front index (1 = non-dominated) of each row of an (n, k) array; equal points share a front."""
    if nan_policy not in NAN_POLICIES:
        raise ValueError(f"non_dominated_ranks: nan_policy={nan_policy!r} is not allowed; use one of {NAN_POLICIES}")
    pts = np.asarray(points, dtype=np.float64)
    if pts.ndim != 2:
        raise ValueError(f"non_dominated_ranks: points must be an (n, k) array, got shape {pts.shape}")
    nan_rows = np.isnan(pts).any(axis=1)
    if nan_rows.any() and nan_policy == "raise":
        raise ValueError(
            f"non_dominated_ranks: points has NaN in rows {np.flatnonzero(nan_rows).tolist()}; "
            "remove them or pass nan_policy='last' to put them in a final front"
        )
    ranks = np.zeros(len(pts), dtype=np.int64)
    finite = np.flatnonzero(~nan_rows)
    ranks[finite] = _peel_fronts(dominance_matrix(pts[finite], maximize))
    if nan_rows.any():
        ranks[nan_rows] = (ranks[finite].max() if len(finite) else 0) + 1
    return ranks


def _peel_fronts(dominates: np.ndarray) -> np.ndarray:
    """Repeatedly take the points no remaining point dominates, giving them fronts 1, 2, ... (docs/ranking.md#non-dominated-sorting)."""
    n = len(dominates)
    ranks = np.zeros(n, dtype=np.int64)
    dominator_count = dominates.sum(axis=0)
    remaining = np.ones(n, dtype=bool)
    front = 0
    while remaining.any():
        front += 1
        current = remaining & (dominator_count == 0)
        if not current.any():  # only possible if dominance had a cycle, i.e. a bug upstream; never loop forever
            raise RuntimeError("non_dominated_ranks: no non-dominated point left; the dominance relation has a cycle")
        ranks[current] = front
        remaining &= ~current
        dominator_count -= dominates[current].sum(axis=0)
    return ranks


def _as_costs(points: np.ndarray, maximize: Sequence[bool]) -> np.ndarray:
    """Points turned into costs to minimise (maximised columns negated)."""
    pts = np.asarray(points, dtype=np.float64)
    if pts.ndim != 2:
        raise ValueError(f"non_dominated_ranks: points must be an (n, k) array, got shape {pts.shape}")
    if pts.shape[1] == 0:
        raise ValueError("non_dominated_ranks: points has no objective columns; at least one is needed")
    flags = np.asarray(maximize)
    if flags.ndim != 1 or flags.dtype != bool or len(flags) != pts.shape[1]:
        raise ValueError(
            f"non_dominated_ranks: maximize must hold one bool per column ({pts.shape[1]}), got {maximize!r}"
        )
    return np.where(flags, -pts, pts)
