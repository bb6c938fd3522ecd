"""Pareto computation: property-based against brute force; knee, hypervolume, speed-up by hand."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from analysis.pareto import hypervolume, knee_point, pareto_front, pareto_mask, speedup_at_equal_accuracy


def brute_force_mask(points: list[list[float]], directions: list[str]) -> list[bool]:
    """O(n²) definition: i is on the front iff no j is >= everywhere and > somewhere (finite rows only)."""
    sign = [1 if d == "max" else -1 for d in directions]
    finite = [all(math.isfinite(v) for v in p) for p in points]
    out = []
    for i, p in enumerate(points):
        if not finite[i]:
            out.append(False)
            continue
        dominated = False
        for j, q in enumerate(points):
            if j == i or not finite[j]:
                continue
            ge = all(s * a >= s * b for s, a, b in zip(sign, q, p))
            gt = any(s * a > s * b for s, a, b in zip(sign, q, p))
            dominated |= ge and gt
        out.append(not dominated)
    return out


def point_sets(n_obj: int):
    value = st.one_of(st.integers(0, 4).map(float), st.just(float("nan")))  # small set: ties are common
    return st.lists(st.lists(value, min_size=n_obj, max_size=n_obj), min_size=1, max_size=25)


@pytest.mark.parametrize("n_obj", [2, 3])
@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_front_matches_brute_force(n_obj, data):
    points = data.draw(point_sets(n_obj))
    directions = data.draw(st.lists(st.sampled_from(["max", "min"]), min_size=n_obj, max_size=n_obj))
    assert pareto_mask(points, directions).tolist() == brute_force_mask(points, directions)


def test_duplicates_on_the_front_are_all_kept_and_front_is_sorted():
    points = [[1.0, 1.0], [1.0, 1.0], [0.0, 5.0], [2.0, 3.0]]
    assert pareto_mask(points, ["max", "min"]).tolist() == [True, True, False, True]
    assert pareto_front(points, ["max", "min"]).tolist() == [3, 0, 1]


def test_knee_by_hand():
    # acc (max) vs time (min). Front: A(0.80, 1.0), B(0.93, 1.2), C(0.95, 3.0).
    # normalised (1 = best): A(0, 1), B(0.867, 0.9), C(1, 0); distance to (1,1): A 1.0, B 0.167, C 1.0 -> B
    points = [[0.80, 1.0], [0.93, 1.2], [0.95, 3.0], [0.70, 2.0]]
    assert knee_point(points, ["max", "min"]) == 1
    assert knee_point([[0.5, 2.0]], ["max", "min"]) == 0


def test_hypervolume_2d_by_hand():
    # max acc, min time, reference (0.7, 3.0): slices in time [0.5,1): 0.1*0.5, [1,2): 0.2*1, [2,3]: 0.25*1 = 0.5
    points = [[0.9, 1.0], [0.95, 2.0], [0.8, 0.5], [0.85, 1.5]]
    assert hypervolume(points, ["max", "min"], [0.7, 3.0]) == pytest.approx(0.5)
    # a point not beating the reference adds nothing
    assert hypervolume(points + [[0.6, 0.1]], ["max", "min"], [0.7, 3.0]) == pytest.approx(0.5)


def test_hypervolume_3d_by_hand():
    # two boxes from the origin (all max): [2,1,1] and [1,2,1] overlap in [1,1,1] -> 2 + 2 - 1 = 3;
    # adding [1,1,2] adds 2 - 1 = 1 more -> 4
    assert hypervolume([[2, 1, 1], [1, 2, 1]], ["max"] * 3, [0, 0, 0]) == pytest.approx(3.0)
    assert hypervolume([[2, 1, 1], [1, 2, 1], [1, 1, 2]], ["max"] * 3, [0, 0, 0]) == pytest.approx(4.0)
    # minimisation: mirror image
    assert hypervolume([[-2, -1, -1], [-1, -2, -1]], ["min"] * 3, [0, 0, 0]) == pytest.approx(3.0)


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_hypervolume_of_set_equals_its_front_and_grows_with_a_dominating_point(data):
    n_obj = data.draw(st.sampled_from([2, 3]))
    pts = data.draw(st.lists(st.lists(st.integers(1, 5).map(float), min_size=n_obj, max_size=n_obj), min_size=1, max_size=8))
    dirs = ["max"] * n_obj
    ref = [0.0] * n_obj
    arr = np.array(pts)
    hv = hypervolume(arr, dirs, ref)
    assert hv == pytest.approx(hypervolume(arr[pareto_mask(arr, dirs)], dirs, ref))
    best = arr.max(axis=0) + 1
    assert hypervolume(np.vstack([arr, best]), dirs, ref) > hv
    # brute force on the integer grid: count unit cells dominated by some point
    cells = sum(
        1 for cell in itertools.product(*[range(int(arr[:, d].max())) for d in range(n_obj)])
        if any(all(c + 1 <= p[d] for d, c in enumerate(cell)) for p in arr)
    )
    assert hv == pytest.approx(cells)


def test_speedup_at_equal_accuracy():
    acc = [0.950, 0.962, 0.940, 0.958]
    time = [0.5, 0.8, 0.2, 0.6]
    # baseline 0.960 at 1.0 s; within 0.5 points: acc >= 0.955 -> indices 1 (0.8 s) and 3 (0.6 s) -> 3, 1/0.6
    idx, speedup = speedup_at_equal_accuracy(acc, time, 0.960, 1.0, within_points=0.5)
    assert idx == 3 and speedup == pytest.approx(1 / 0.6)
    # within 2 points: 0.940 qualifies too and is the fastest
    assert speedup_at_equal_accuracy(acc, time, 0.960, 1.0, within_points=2.0) == (2, pytest.approx(5.0))
    assert speedup_at_equal_accuracy(acc, time, 0.99, 1.0, within_points=0.5) == (None, None)


@pytest.mark.parametrize(
    "call",
    [
        lambda: pareto_mask([[1, 2]], ["max"]),
        lambda: pareto_mask([[1, 2]], ["max", "up"]),
        lambda: pareto_mask([1, 2, 3], ["max", "min"]),
        lambda: knee_point([[float("nan"), 1]], ["max", "min"]),
        lambda: hypervolume([[1, 1]], ["max", "max"], [float("nan"), 0]),
        lambda: speedup_at_equal_accuracy([0.9], [1.0, 2.0], 0.9, 1.0),
        lambda: speedup_at_equal_accuracy([0.9], [1.0], 0.9, 0.0),
    ],
)
def test_bad_input_raises_value_error(call):
    with pytest.raises(ValueError):
        call()
