"""The paper's Table 1 as data and the Spearman comparison with it (docs/ranking.md#comparison-with-table-1)."""
import numpy as np
import pandas as pd
import pytest

from src.ranking.paper import PAPER_TABLE1, paper_ranks, paper_table, spearman_vs_paper


def test_table1_transcribed_from_spec():
    table = paper_table()
    assert len(table) == 16
    assert table.loc["rf/lognorm(0.00, 1.00)"].tolist() == [1.54, 1.25, 1.50]
    assert table.loc["edm(-1.20, 1.20)"].tolist() == [15.58, 20.25, 15.00]
    # Table 1 is sorted by the average over all settings; 5- and 50-step values are multiples of 0.25 (docs/ranking.md#comparison-with-table-1).
    assert table["all"].is_monotonic_increasing
    assert np.allclose((table[["5 steps", "50 steps"]] * 4) % 1, 0)


def frame(values):
    """An average-rank frame with the three columns set to the same values."""
    index = pd.Index(list(values), name="recipe")
    return pd.DataFrame({c: list(values.values()) for c in ("all", "5 steps", "50 steps")}, index=index)


def test_spearman_is_one_for_the_paper_order_and_minus_one_reversed():
    names = ["rf/lognorm(0.00, 1.00)", "rf/cosmap", "v/linear", "edm/rf", "not-in-paper"]
    same = spearman_vs_paper(frame(dict(zip(names, [1.0, 2.0, 3.0, 4.0, 5.0])))).set_index("column")
    assert same.loc["all", "spearman"] == pytest.approx(1.0) and same.loc["all", "n_shared"] == 4
    reversed_ = spearman_vs_paper(frame(dict(zip(names, [4.0, 3.0, 2.0, 1.0, 0.0])))).set_index("column")
    assert reversed_.loc["all", "spearman"] == pytest.approx(-1.0)


def test_spearman_on_a_known_shuffle():
    # Paper ranks (all) of these four: 1.54 < 2.08 < 2.71 < 2.75; ours swaps the middle two: rho = 1 - 6*2/(4*15) = 0.8.
    names = ["rf/lognorm(0.00, 1.00)", "rf/lognorm(1.00, 0.60)", "rf/lognorm(0.50, 0.60)", "rf/mode(1.29)"]
    result = spearman_vs_paper(frame(dict(zip(names, [1.0, 3.0, 2.0, 4.0])))).set_index("column")
    assert result.loc["all", "spearman"] == pytest.approx(0.8)


def test_spearman_needs_three_shared_recipes():
    result = spearman_vs_paper(frame({"rf": 1.0, "v/cos": 2.0, "mine": 3.0}))
    assert result["n_shared"].tolist() == [2, 2, 2] and result["spearman"].isna().all()


def test_uniform_rf_aliases_match_the_paper_row_once():
    """rf/mode(0.00) is the paper's rf; with both spellings in a sweep, rf alone takes the row (else Table 1's rf
    would count twice in the correlation, as two recipes)."""
    assert paper_ranks(["rf/mode(0.00)", "mine"]).loc["rf/mode(0.00)", "all"] == PAPER_TABLE1["rf"][0]
    ranks = paper_ranks(["rf/mode(0.00)", "rf", "mine", "rf/uniform"])
    assert ranks.loc["rf", "all"] == PAPER_TABLE1["rf"][0]
    assert ranks.loc[["rf/mode(0.00)", "mine", "rf/uniform"]].isna().all().all()
    both = spearman_vs_paper(frame({"rf": 1.0, "rf/mode(0.00)": 2.0, "v/cos": 3.0, "eps/linear": 4.0}))
    assert both["n_shared"].tolist() == [3, 3, 3]


def test_paper_top_three_in_our_top_five():
    from src.ranking.paper import top_overlap

    theirs = np.array([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0])
    assert top_overlap(theirs, theirs) == 3
    assert top_overlap(-theirs, theirs) == 1  # reversed: the paper's best three are our 7th, 6th and 5th
    assert top_overlap(-np.arange(1.0, 11.0), np.arange(1.0, 11.0)) == 0
    ours = np.array([6.0, 1.0, 5.0, 2.0, 3.0, 4.0, 7.0])  # paper's 1st is our 6th, 2nd our 1st, 3rd our 5th
    assert top_overlap(ours, theirs) == 2
    ours_tied = np.array([5.0, 1.0, 1.0, 1.0, 1.0, 5.0, 7.0])  # a tie at the boundary counts in
    assert top_overlap(ours_tied, theirs) == 3


PAPER_ORDER = list(PAPER_TABLE1)  # Table 1 is sorted by its "all" column


def test_top_three_overlap_needs_more_recipes_than_our_top_five():
    """With five shared recipes or fewer every paper top-3 recipe is trivially in our top 5: the report must say
    nothing (NaN) rather than a perfect 3."""
    five = spearman_vs_paper(frame(dict(zip(PAPER_ORDER[:5], [1.0, 2.0, 3.0, 4.0, 5.0]))))
    assert five["paper top 3 in our top 5"].isna().all()
    six = spearman_vs_paper(frame(dict(zip(PAPER_ORDER[:6], [1.0, 2.0, 3.0, 4.0, 5.0, 6.0])))).set_index("column")
    assert six.loc["all", "paper top 3 in our top 5"] == 3


def test_spearman_vs_paper_compares_every_column_the_ranks_have():
    """A sweep without an all-settings column still gets its 5- and 50-step comparisons (a missing column is
    skipped, not the end of the table)."""
    ranks = frame(dict(zip(PAPER_ORDER[:4], [1.0, 2.0, 3.0, 4.0])))[["5 steps", "50 steps"]]
    assert spearman_vs_paper(ranks)["column"].tolist() == ["5 steps", "50 steps"]


def test_spearman_draws_interval_over_draws_with_recipes_the_draws_leave_unranked_left_out():
    """The percentile interval of the per-draw Spearman correlation: one draw in Table 1's order (rho 1) and one
    reversed (rho -1) give the central 90% [-0.9, 0.9]; a draw with all ranks tied has no correlation and is left
    out, as is a recipe with no finite draw; the three recipes left are enough for an interval but too few for the
    top-3 overlap."""
    from src.ranking.paper import spearman_draws

    recipes = PAPER_ORDER[:4] + ["mine"]
    draws = np.array([[1.0, 2.0, 3.0, np.nan, 9.0], [3.0, 2.0, 1.0, np.nan, 9.0], [5.0, 5.0, 5.0, np.nan, 9.0]])
    result = spearman_draws({c: draws for c in ("all", "5 steps", "50 steps")}, recipes).set_index("column")
    assert result.loc["all", "lo"] == pytest.approx(-0.9) and result.loc["all", "hi"] == pytest.approx(0.9)
    assert result["top 3 in top 5 (mean over draws)"].isna().all()
    wide = spearman_draws({c: draws for c in ("all", "5 steps", "50 steps")}, recipes, confidence=0.5)
    assert wide.set_index("column").loc["all", "hi"] == pytest.approx(0.5)


def test_spearman_draws_top_overlap_is_averaged_over_draws_with_more_than_five_recipes():
    """The top-3-in-top-5 figure is the mean over draws, and only with more than five shared recipes."""
    from src.ranking.paper import spearman_draws

    in_order, reversed_ = np.arange(1.0, 7.0), np.arange(6.0, 0.0, -1.0)
    draws = {c: np.stack([in_order, reversed_]) for c in ("all", "5 steps", "50 steps")}
    result = spearman_draws(draws, PAPER_ORDER[:6]).set_index("column")
    assert result.loc["all", "top 3 in top 5 (mean over draws)"] == pytest.approx((3 + 2) / 2)
    five = spearman_draws({c: d[:, :5] for c, d in draws.items()}, PAPER_ORDER[:5])
    assert five["top 3 in top 5 (mean over draws)"].isna().all()


def test_spearman_draws_correlates_with_table1_ties_as_long_as_two_values_differ():
    """At 50 steps Table 1 ties eps/linear and rf/mode(1.75) (2.75); with rf (5.75) the three still have an order
    to correlate with."""
    from src.ranking.paper import spearman_draws

    draws = np.array([[1.0, 2.0, 3.0], [1.0, 1.0, 3.0]])
    result = spearman_draws({c: draws for c in ("all", "5 steps", "50 steps")}, ["eps/linear", "rf/mode(1.75)", "rf"])
    assert np.isfinite(result.set_index("column").loc["50 steps", ["lo", "hi"]].astype(float)).all()


@pytest.mark.parametrize("entries, hint", [
    (["rf [sampler=native]", "eps/linear [sampler=native]"], "--sampler NAME ranks one sampler's records"),
    (["rf [sweep=a]", "eps/linear [sweep=b]"], "without --by-sweep"),
    (["rf [optim.lr=0.001]", "eps/linear [optim.lr=0.001]"], None),
])
def test_the_no_comparison_hint_names_only_an_option_that_drops_the_qualifier(entries, hint):
    """Entries qualified by a swept learning rate or a sweep (--by-sweep) are not unqualified by --sampler: the
    sentence must not send the user there."""
    from src.ranking.report import spearman_line

    frame = pd.DataFrame({r: [float(i + 1)] * 3 for i, r in enumerate(entries)}, index=["all", "5 steps", "50 steps"]).T
    line = spearman_line(spearman_vs_paper(frame), entries)
    assert line.startswith("Paper comparison: none; the paper's recipes are here only as qualified entries")
    assert ("--sampler" in line) == (hint == "--sampler NAME ranks one sampler's records")
    assert hint is None and line.endswith("Table 1.") or hint in line


def test_spearman_p_value_of_a_few_recipes_is_exact():
    """The report printed "all: 1.00 (p=0, 3 recipes)" (scipy's t approximation): 2 of the 6 orderings of three
    recipes are as extreme, p = 1/3; of four with two swapped (rho 0.8), 8 of the 24 orderings."""
    three = spearman_vs_paper(frame({"eps/linear": 1.0, "rf": 2.0, "edm/rf": 3.0})).set_index("column")
    assert three.loc["all", "spearman"] == pytest.approx(1.0) and three.loc["all", "p_value"] == pytest.approx(1 / 3)
    names = ["rf/lognorm(0.00, 1.00)", "rf/lognorm(1.00, 0.60)", "rf/lognorm(0.50, 0.60)", "rf/mode(1.29)"]
    four = spearman_vs_paper(frame(dict(zip(names, [1.0, 3.0, 2.0, 4.0])))).set_index("column")
    assert four.loc["all", "p_value"] == pytest.approx(8 / 24)
    # Many recipes: scipy's value, which is close there.
    many = dict(zip(PAPER_TABLE1, range(16)))
    assert spearman_vs_paper(frame(many)).loc[0, "p_value"] < 1e-6
