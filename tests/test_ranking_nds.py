"""Non-dominated sorting: hand-worked fronts and properties on random point sets (docs/ranking.md#non-dominated-sorting, Deb's definition)."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from src.ranking import non_dominated_ranks

CLIP_FID = [True, False]  # CLIP score up, FID down


def dominates(a, b, maximize):
    """Reference dominance written independently of the module: no worse everywhere, better somewhere."""
    a = [x if up else -x for x, up in zip(a, maximize)]
    b = [x if up else -x for x, up in zip(b, maximize)]
    return all(x >= y for x, y in zip(a, b)) and any(x > y for x, y in zip(a, b))


def brute_force_fronts(points, maximize):
    """Peel fronts with explicit loops."""
    remaining, ranks, front = set(range(len(points))), [0] * len(points), 0
    while remaining:
        front += 1
        current = {i for i in remaining if not any(dominates(points[j], points[i], maximize) for j in remaining)}
        for i in current:
            ranks[i] = front
        remaining -= current
    return ranks


# ------------------------------------------------------------------------------------------- hand-worked


def test_equal_points_share_a_front():
    assert non_dominated_ranks([[1, 1], [1, 1], [0, 0]], [True, True]).tolist() == [1, 1, 2]


def test_single_recipe_is_front_one():
    assert non_dominated_ranks([[0.25, 3.0]], CLIP_FID).tolist() == [1]


def test_all_equal_points_form_one_front():
    assert non_dominated_ranks(np.full((4, 2), 0.7), CLIP_FID).tolist() == [1, 1, 1, 1]


def test_one_recipe_dominating_all():
    # (CLIP, FID): the first has the best CLIP and the best FID; the other three trade off against each other.
    points = [[0.30, 1.0], [0.20, 2.0], [0.25, 5.0], [0.10, 1.5]]
    assert non_dominated_ranks(points, CLIP_FID).tolist() == [1, 2, 2, 2]


def test_three_fronts_minimising_both():
    # A B C trade off (front 1); D is dominated by B, F by C (front 2); E is dominated by D and F (front 3).
    points = [[1, 5], [2, 3], [4, 1], [3, 4], [5, 5], [4, 2]]
    assert non_dominated_ranks(points, [False, False]).tolist() == [1, 1, 1, 2, 3, 2]


def test_equal_in_one_objective_better_in_other_dominates():
    assert non_dominated_ranks([[0.2, 1.0], [0.2, 2.0]], CLIP_FID).tolist() == [1, 2]


def test_direction_matters():
    points = [[0.3, 1.0], [0.2, 2.0]]
    assert non_dominated_ranks(points, CLIP_FID).tolist() == [1, 2]
    assert non_dominated_ranks(points, [False, True]).tolist() == [2, 1]


def test_empty_input_gives_empty_ranks():
    assert non_dominated_ranks(np.zeros((0, 2)), CLIP_FID).shape == (0,)


# ------------------------------------------------------------------------------------------- NaN and bad input


def test_nan_rows_raise_by_default():
    with pytest.raises(ValueError, match=r"NaN in rows \[1\]"):
        non_dominated_ranks([[0.2, 1.0], [np.nan, 2.0]], CLIP_FID)


def test_nan_rows_go_to_a_final_front_when_asked():
    points = [[0.3, 1.0], [np.nan, 0.5], [0.2, 2.0]]
    assert non_dominated_ranks(points, CLIP_FID, nan_policy="last").tolist() == [1, 3, 2]
    assert non_dominated_ranks([[np.nan, 1.0]], CLIP_FID, nan_policy="last").tolist() == [1]


@pytest.mark.parametrize(
    "points, maximize, nan_policy, message",
    [
        ([0.2, 0.3], CLIP_FID, "raise", "shape"),
        ([[0.2, 1.0]], [True], "raise", "one bool per column"),
        ([[0.2, 1.0]], [1, 0], "raise", "one bool per column"),
        ([[0.2, 1.0]], CLIP_FID, "drop", "nan_policy='drop'"),
        (np.zeros((2, 0)), [], "raise", "no objective"),
    ],
)
def test_bad_input_raises_clear_error(points, maximize, nan_policy, message):
    with pytest.raises(ValueError, match=message):
        non_dominated_ranks(points, maximize, nan_policy=nan_policy)


# ------------------------------------------------------------------------------------------- properties

point_sets = st.integers(1, 3).flatmap(
    lambda k: st.tuples(
        # small integers: many ties and equal points
        arrays(np.int64, st.tuples(st.integers(0, 25), st.just(k)), elements=st.integers(0, 4)),
        st.lists(st.booleans(), min_size=k, max_size=k),
    )
)


@settings(max_examples=80, deadline=None, derandomize=True)
@given(point_sets)
def test_fronts_satisfy_deb_definition(case):
    points, maximize = case
    ranks = non_dominated_ranks(points, maximize)
    n = len(points)
    if n:
        assert sorted(set(ranks.tolist())) == list(range(1, ranks.max() + 1))
    for i in range(n):
        for j in range(n):
            if dominates(points[j], points[i], maximize):
                # No point in front k is dominated by a point in front k or later.
                assert ranks[j] < ranks[i]
            if (points[i] == points[j]).all():
                assert ranks[i] == ranks[j]
        if ranks[i] > 1:
            # Every point in front k + 1 is dominated by some point in front k.
            assert any(ranks[j] == ranks[i] - 1 and dominates(points[j], points[i], maximize) for j in range(n))


@settings(max_examples=40, deadline=None, derandomize=True)
@given(point_sets)
def test_matches_brute_force_and_is_permutation_equivariant(case):
    points, maximize = case
    ranks = non_dominated_ranks(points, maximize)
    assert ranks.tolist() == brute_force_fronts(points.tolist(), maximize)
    perm = np.random.default_rng(len(points)).permutation(len(points))
    assert non_dominated_ranks(points[perm], maximize).tolist() == ranks[perm].tolist()


def test_continuous_random_points_seeded():
    rng = np.random.default_rng(0)
    points = rng.normal(size=(200, 2))
    ranks = non_dominated_ranks(points, CLIP_FID)
    assert ranks.tolist() == brute_force_fronts(points.tolist(), CLIP_FID)
    assert ranks.max() > 3
