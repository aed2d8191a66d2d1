"""How well a study agrees with itself: the rank agreement between its training seeds.

A study whose seeds, each ranked alone, order the recipes differently cannot predict another study (the paper's)
better than its own seeds predict each other. The mean pairwise Spearman correlation between the seeds' average
ranks measures that self-consistency; the Spearman-Brown formula turns it into the reliability of the k-seed mean
the report ranks, and sqrt(reliability) bounds the correlation that seed noise alone allows with a noise-free
reference whose expected ranking is the same (the attenuation argument of test theory, applied to ranks).
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import pandas as pd
from scipy import stats


def seed_agreement(rankings: Sequence[pd.Series]) -> float:
    """Mean Spearman correlation between every pair of rankings (one per training seed), over the entries both rank.

    NaN with fewer than two rankings or when no pair shares three entries with distinct ranks.
    """
    rhos = []
    for i, a in enumerate(rankings):
        for b in rankings[i + 1:]:
            both = pd.concat([a, b], axis=1).dropna()
            if len(both) >= 3 and both.iloc[:, 0].nunique() > 1 and both.iloc[:, 1].nunique() > 1:
                rhos.append(float(stats.spearmanr(both.iloc[:, 0], both.iloc[:, 1]).statistic))
    return float(np.mean(rhos)) if rhos else math.nan


def spearman_brown(r: float, k: int) -> float:
    """Reliability of the mean of k replicates whose pairwise agreement is r (Spearman-Brown prophecy)."""
    return k * r / (1.0 + (k - 1) * r)


def noise_ceiling(r: float, k: int) -> float:
    """The correlation with a noise-free reference that seed noise alone allows the k-seed mean: sqrt(reliability).

    NaN when the seeds do not agree at all (reliability <= 0: nothing to bound).
    """
    reliability = spearman_brown(r, k)
    return math.sqrt(reliability) if reliability > 0 else math.nan
