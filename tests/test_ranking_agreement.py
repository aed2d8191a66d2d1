"""The study's self-consistency: rank agreement between training seeds (src/ranking/agreement.py), and the report's
seed-agreement note and column on synthetic sweeps whose seeds agree or disagree."""
import math

import pandas as pd
import pytest

from src.ranking.agreement import noise_ceiling, seed_agreement, spearman_brown
from src.ranking.report import build_report, markdown
from src.ranking.synthetic import write_synthetic_sweep


def test_seed_agreement_is_the_mean_pairwise_spearman_over_shared_entries():
    a = pd.Series([1.0, 2.0, 3.0, 4.0], index=list("abcd"))
    assert seed_agreement([a, a.copy()]) == 1.0
    assert seed_agreement([a, pd.Series([4.0, 3.0, 2.0, 1.0], index=list("abcd"))]) == -1.0
    # Pairs (a, a) 1, (a, r) -1, (a, r) -1 -> -1/3; entry e, ranked by one seed only, does not count.
    r = pd.Series([4.0, 3.0, 2.0, 1.0, 9.0], index=list("abcde"))
    assert math.isclose(seed_agreement([a, a.copy(), r]), -1.0 / 3.0)
    assert math.isnan(seed_agreement([a])) and math.isnan(seed_agreement([a, a.iloc[:2]]))


def test_seed_agreement_is_a_rank_correlation_and_skips_pairs_it_cannot_correlate():
    a = pd.Series([1.0, 2.0, 3.0, 4.0], index=list("abcd"))
    # Monotone but not linear: Spearman 1 (Pearson would be about 0.8).
    assert seed_agreement([a, pd.Series([1.0, 2.0, 3.0, 100.0], index=list("abcd"))]) == 1.0
    # Three shared entries are enough; a ranking whose entries all tie has no correlation and its pairs are
    # skipped, not averaged in as NaN.
    assert seed_agreement([a.iloc[:3], a.iloc[:3].copy()]) == 1.0
    tied = pd.Series(2.0, index=list("abcd"))
    assert seed_agreement([a, tied, a.copy()]) == 1.0
    assert math.isnan(seed_agreement([a, tied]))


def test_spearman_brown_and_the_noise_ceiling():
    assert spearman_brown(0.5, 1) == 0.5 and spearman_brown(1.0, 3) == 1.0
    assert math.isclose(spearman_brown(0.54, 3), 1.62 / 2.08)
    assert math.isclose(noise_ceiling(0.54, 3), math.sqrt(1.62 / 2.08))
    assert math.isnan(noise_ceiling(-0.2, 3))
    assert math.isnan(noise_ceiling(0.0, 3))  # reliability 0: nothing to bound, not a ceiling of 0


def _sweep(tmp_path, name, disagree):
    """Five recipes, three seeds: the same order in every seed, or seed 1 reversing seeds 0 and 2."""
    order = [1.0, 0.8, 0.6, 0.4, 0.2]
    quality = [(q, 1.2 - q, q) if disagree else (q, q, q) for q in order]
    return write_synthetic_sweep(tmp_path / name, recipes=("rf", "eps/linear", "v/cos", "edm/cos", "v/linear"),
                                 quality=quality, seeds=(0, 1, 2), datasets=("digits",), n_samples=24,
                                 n_reference=32, dim=2, sampler_settings=[(5, 5.0), (50, 5.0)])


@pytest.mark.parametrize("disagree", [False, True])
def test_the_report_gives_the_seed_agreement_per_column(tmp_path, disagree):
    report = build_report([_sweep(tmp_path, "s", disagree)], draws=0)
    agree = report.seed_agreement
    assert set(agree) == {"all", "5 steps", "50 steps"}
    if disagree:  # pairs (0, 1) and (1, 2) reversed, (0, 2) equal: about (-1 - 1 + 1) / 3
        assert agree["all"] < 0
        assert "so seed noise alone" not in markdown(report)  # no reliability to bound
    else:
        assert agree["all"] > 0.9
        assert "the 3-seed mean ranked here has reliability" in markdown(report)
    assert "Seed agreement (each training seed ranked alone" in markdown(report)
    assert report.spearman.set_index("column")["seed agreement"].to_dict() == agree


def test_one_seed_has_no_agreement_note(tmp_path):
    sweep = write_synthetic_sweep(tmp_path / "one", recipes=("rf", "eps/linear", "v/cos"), datasets=("digits",),
                                  n_samples=12, n_reference=16, dim=2, sampler_settings=[(5, 5.0)])
    report = build_report([sweep], draws=0)
    assert all(math.isnan(v) for v in report.seed_agreement.values())
    assert report.seed_ranks == {}  # one seed alone is the pooled ranking: nothing ranked twice
    assert "Seed agreement" not in markdown(report)
