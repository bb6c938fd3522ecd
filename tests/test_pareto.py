"""Pareto computation: property-based against brute force; knee, hypervolume, speed-up by hand."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from prelora_ray.front import hypervolume, knee_point, pareto_front, pareto_mask, speedup_at_equal_accuracy

NAN, INF = float("nan"), float("inf")


# ---------------------------------------------------------------- brute-force references


def brute_force_mask(points: list[list[float]], directions: list[str]) -> list[bool]:
    """O(n²) definition: i is on the front iff no j is >= everywhere and > somewhere (finite rows only)."""
    sign = [1 if d.startswith("max") else -1 for d in directions]
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
            ge = all(s * a >= s * b for s, a, b in zip(sign, q, p, strict=True))
            gt = any(s * a > s * b for s, a, b in zip(sign, q, p, strict=True))
            dominated |= ge and gt
        out.append(not dominated)
    return out


def grid_cells_dominated(points: np.ndarray) -> int:
    """Brute-force hypervolume for non-negative integer points, all maximised, reference at the origin:
    count the unit cells [c, c+1]^m that some point dominates."""
    m = points.shape[1]
    return sum(
        1
        for cell in itertools.product(*[range(int(points[:, d].max())) for d in range(m)])
        if any(all(c + 1 <= p[d] for d, c in enumerate(cell)) for p in points)
    )


def point_sets(n_obj: int, with_nonfinite: bool = True):
    """Points drawn from a tiny integer set so duplicates and equal coordinates are common."""
    value = st.integers(0, 4).map(float)
    if with_nonfinite:
        value = st.one_of(value, value, value, st.sampled_from([NAN, INF, -INF]))
    return st.lists(st.lists(value, min_size=n_obj, max_size=n_obj), min_size=1, max_size=25)


DIRECTION = st.sampled_from(["max", "min", "maximize", "minimize"])


# ---------------------------------------------------------------- pareto_mask / pareto_front


@pytest.mark.parametrize("n_obj", [1, 2, 3, 4])
@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_front_matches_brute_force(n_obj, data):
    points = data.draw(point_sets(n_obj, with_nonfinite=data.draw(st.booleans())))
    directions = data.draw(st.lists(DIRECTION, min_size=n_obj, max_size=n_obj))
    expected = brute_force_mask(points, directions)
    mask = pareto_mask(points, directions)
    assert mask.dtype == bool and mask.tolist() == expected
    # the front: exactly the masked indices, best first on objective 0
    front = pareto_front(points, directions)
    assert sorted(front.tolist()) == [i for i, on in enumerate(expected) if on]
    sign = 1 if directions[0].startswith("max") else -1
    firsts = [sign * points[i][0] for i in front]
    assert firsts == sorted(firsts, reverse=True)


def test_nan_and_inf_rows_are_never_on_the_front_and_dominate_nothing():
    points = [[NAN, 0.0], [0.5, 1.0], [INF, 0.0], [0.9, -INF], [0.4, 2.0]]
    # (max, min): rows 0, 2, 3 are non-finite (even "inf accuracy" or "-inf time" would dominate all)
    assert pareto_mask(points, ["max", "min"]).tolist() == [False, True, False, False, False]
    assert pareto_mask([[NAN, NAN]], ["max", "min"]).tolist() == [False]


def test_duplicates_on_the_front_are_all_kept_and_front_is_sorted():
    points = [[1.0, 1.0], [1.0, 1.0], [0.0, 5.0], [2.0, 3.0]]
    assert pareto_mask(points, ["max", "min"]).tolist() == [True, True, False, True]
    assert pareto_front(points, ["max", "min"]).tolist() == [3, 0, 1]


def test_front_ties_on_first_objective_ordered_by_the_next_then_by_index():
    # all max; 0, 1, 2 tie on objective 0 and are mutually non-dominated in 3-D
    points = [[1, 0, 3], [1, 3, 0], [1, 2, 2], [0, 0, 0], [1, 3, 0]]
    assert pareto_front(points, ["max"] * 3).tolist() == [1, 4, 2, 0]


def test_empty_input_gives_empty_front_and_directions_are_lenient():
    assert pareto_mask(np.zeros((0, 2)), ["max", "min"]).shape == (0,)
    assert pareto_mask([], ["max", "min"]).shape == (0,)
    assert pareto_front([], ["max", "min"]).tolist() == []
    assert pareto_mask([[1, 2], [2, 1]], [" MAX", "Minimize"]).tolist() == [False, True]  # (2, 1) dominates (1, 2)
    assert pareto_mask([3.0, 1.0, 3.0], ["min"]).tolist() == [False, True, False]  # 1 objective, 1-D input


# ---------------------------------------------------------------- knee_point


def test_knee_by_hand():
    # acc (max) vs time (min). Front: A(0.80, 1.0), B(0.93, 1.2), C(0.95, 3.0); D(0.70, 2.0) is dominated by A.
    # normalised over the front (1 = best): acc (x-0.80)/0.15, time (3.0-t)/2.0
    #   A(0, 1), B(0.867, 0.9), C(1, 0); distance to (1, 1): A 1.0, B sqrt(0.133²+0.1²)=0.167, C 1.0 -> B
    points = [[0.80, 1.0], [0.93, 1.2], [0.95, 3.0], [0.70, 2.0]]
    assert knee_point(points, ["max", "min"]) == 1
    # the dominated point never wins, even with the front given as a mask
    assert knee_point(points, ["max", "min"], mask=pareto_mask(points, ["max", "min"])) == 1


def test_knee_single_point_ties_and_constant_objective():
    assert knee_point([[0.5, 2.0]], ["max", "min"]) == 0
    # symmetric front: A(0,1) C(1,0) both at distance 1 from utopia -> lowest index
    assert knee_point([[1.0, 0.0], [0.0, 1.0]], ["max", "max"]) == 0
    # duplicates of the knee -> lowest index
    assert knee_point([[0.0, 1.0], [0.6, 0.6], [0.6, 0.6], [1.0, 0.0]], ["max", "max"]) == 1
    # an objective constant over the front scales to 1 and decides nothing: knee from the other alone
    assert knee_point([[5.0, 0.2, 1.0], [5.0, 0.9, 0.0], [5.0, 0.5, 0.5]], ["min", "max", "max"]) == 2


def test_knee_three_objectives_by_hand():
    # all max; front corners (1,0,0), (0,1,0), (0,0,1) are at distance sqrt(2) from (1,1,1);
    # (0.5,0.5,0.5) at sqrt(3*0.25)=0.866 -> index 3; (0.9,0.9,0) at sqrt(0.01+0.01+1)=1.01
    points = [[1, 0, 0], [0, 1, 0], [0, 0, 1], [0.5, 0.5, 0.5], [0.9, 0.9, 0]]
    assert knee_point(points, ["max"] * 3) == 3


def test_knee_mask_drops_nonfinite_rows():
    points = [[NAN, 1.0], [0.9, 1.0], [0.5, 0.5]]
    assert knee_point(points, ["max", "min"], mask=[True, True, True]) == 1
    assert knee_point(points, ["max", "min"], mask=np.array([1, 0, 1])) == 2


# ---------------------------------------------------------------- hypervolume


def test_hypervolume_2d_by_hand():
    # max acc, min time, reference (0.7, 3.0). Front sorted by time: (0.8,0.5) (0.85,1.5) (0.9,1.0)?
    # (0.85,1.5) is dominated by (0.9,1.0). Slabs in time: [0.5,1.0): acc 0.8-0.7=0.1 -> 0.05;
    # [1.0,2.0): 0.9-0.7=0.2 -> 0.2; [2.0,3.0]: 0.95-0.7=0.25 -> 0.25. Total 0.5.
    points = [[0.9, 1.0], [0.95, 2.0], [0.8, 0.5], [0.85, 1.5]]
    assert hypervolume(points, ["max", "min"], [0.7, 3.0]) == pytest.approx(0.5)
    # a point not strictly beating the reference adds nothing (worse acc; equal time; NaN)
    extra = [[0.6, 0.1], [0.99, 3.0], [NAN, 0.1], [0.99, INF]]
    assert hypervolume(points + extra, ["max", "min"], [0.7, 3.0]) == pytest.approx(0.5)
    # duplicates add nothing
    assert hypervolume(points + points, ["max", "min"], [0.7, 3.0]) == pytest.approx(0.5)


def test_hypervolume_3d_by_hand():
    # two boxes from the origin (all max): [2,1,1] and [1,2,1] overlap in [1,1,1] -> 2 + 2 - 1 = 3;
    # adding [1,1,2] adds 2 - 1 = 1 more -> 4
    assert hypervolume([[2, 1, 1], [1, 2, 1]], ["max"] * 3, [0, 0, 0]) == pytest.approx(3.0)
    assert hypervolume([[2, 1, 1], [1, 2, 1], [1, 1, 2]], ["max"] * 3, [0, 0, 0]) == pytest.approx(4.0)
    # minimisation: mirror image
    assert hypervolume([[-2, -1, -1], [-1, -2, -1]], ["min"] * 3, [0, 0, 0]) == pytest.approx(3.0)
    # mixed, shifted reference (max acc, min time, min memory), ref (0.5, 10, 100):
    # box of (0.9, 4, 60) = 0.4*6*40 = 96; (0.7, 2, 80) = 0.2*8*20 = 32;
    # overlap = acc 0.2 * time (10-4)=6 * mem (100-80)=20 = 24 -> 96 + 32 - 24 = 104
    assert hypervolume([[0.9, 4, 60], [0.7, 2, 80]], ["max", "min", "min"], [0.5, 10, 100]) == pytest.approx(104.0)


def test_hypervolume_one_objective_and_empty():
    assert hypervolume([[3.0], [5.0], [1.0]], ["max"], [2.0]) == pytest.approx(3.0)
    assert hypervolume([3.0, 5.0], ["min"], [4.0]) == pytest.approx(1.0)
    assert hypervolume([], ["max", "min"], [0.0, 1.0]) == 0.0
    assert hypervolume([[NAN, 0.0]], ["max", "min"], [0.0, 1.0]) == 0.0


@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_hypervolume_matches_grid_brute_force_and_its_front(data):
    n_obj = data.draw(st.sampled_from([2, 3, 4]))
    pts = data.draw(
        st.lists(st.lists(st.integers(1, 4).map(float), min_size=n_obj, max_size=n_obj), min_size=1, max_size=8)
    )
    arr = np.array(pts)
    dirs = ["max"] * n_obj
    ref = [0.0] * n_obj
    hv = hypervolume(arr, dirs, ref)
    assert hv == pytest.approx(grid_cells_dominated(arr))
    # a set and its front dominate the same region
    assert hv == pytest.approx(hypervolume(arr[pareto_mask(arr, dirs)], dirs, ref))
    # directions are sign flips: minimising -x against -ref is the same volume
    flip = data.draw(st.lists(st.booleans(), min_size=n_obj, max_size=n_obj))
    sign = np.where(flip, -1.0, 1.0)
    mixed = ["min" if f else "max" for f in flip]
    assert hypervolume(arr * sign, mixed, list(np.array(ref) * sign)) == pytest.approx(hv)


@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_hypervolume_monotone_when_a_dominating_point_is_added(data):
    n_obj = data.draw(st.sampled_from([2, 3]))
    coord = st.floats(-1.0, 1.0, allow_nan=False, allow_infinity=False, width=32)
    pts = np.array(data.draw(st.lists(st.lists(coord, min_size=n_obj, max_size=n_obj), min_size=1, max_size=10)))
    dirs = data.draw(st.lists(st.sampled_from(["max", "min"]), min_size=n_obj, max_size=n_obj))
    sign = np.array([1.0 if d == "max" else -1.0 for d in dirs])
    ref = list(-1.5 * sign)  # worse than every point in every objective
    hv = hypervolume(pts, dirs, ref)
    assert hv == pytest.approx(hypervolume(pts[pareto_mask(pts, dirs)], dirs, ref))
    # a point dominating one existing point never decreases the volume
    i = data.draw(st.integers(0, len(pts) - 1))
    bump = np.array(data.draw(st.lists(st.floats(0.0, 0.5, width=32), min_size=n_obj, max_size=n_obj)))
    bump[data.draw(st.integers(0, n_obj - 1))] += 0.25  # strictly better somewhere
    assert hypervolume(np.vstack([pts, pts[i] + sign * bump]), dirs, ref) >= hv - 1e-12
    # a point dominating every point strictly increases it
    best = (pts * sign).max(axis=0) + 0.1
    assert hypervolume(np.vstack([pts, best * sign]), dirs, ref) > hv


def test_hypervolume_fifty_points_in_four_objectives_is_fast():
    rng = np.random.default_rng(0)
    pts = rng.random((50, 4))
    pts /= np.linalg.norm(pts, axis=1, keepdims=True)  # all on a sphere: a large front
    hv = hypervolume(pts, ["max"] * 4, [0, 0, 0, 0])
    assert 0 < hv < 1


# ---------------------------------------------------------------- speedup_at_equal_accuracy


def test_speedup_at_equal_accuracy():
    acc = [0.950, 0.962, 0.940, 0.958]
    time = [0.5, 0.8, 0.2, 0.6]
    # baseline 0.960 at 1.0 s; within 0.5 points: acc >= 0.955 -> indices 1 (0.8 s) and 3 (0.6 s) -> 3, 1/0.6
    idx, speedup = speedup_at_equal_accuracy(acc, time, 0.960, 1.0, within_points=0.5)
    assert idx == 3 and speedup == pytest.approx(1 / 0.6)
    # within 2 points: acc >= 0.940, so 0.940 qualifies too and is the fastest: 1/0.2 = 5
    assert speedup_at_equal_accuracy(acc, time, 0.960, 1.0, within_points=2.0) == (2, pytest.approx(5.0))
    # within 0 points: only 0.962 (>= 0.960) -> index 1, 1/0.8 = 1.25
    assert speedup_at_equal_accuracy(acc, time, 0.960, 1.0, within_points=0.0) == (1, pytest.approx(1.25))
    # no trial qualifies
    assert speedup_at_equal_accuracy(acc, time, 0.99, 1.0, within_points=0.5) == (None, None)
    assert speedup_at_equal_accuracy([], [], 0.9, 1.0) == (None, None)


def test_speedup_boundary_nan_and_ties():
    # exactly 0.5 points below (0.955 vs 0.96 - 0.005 in floats) qualifies
    assert speedup_at_equal_accuracy([0.955], [2.0], 0.96, 1.0) == (0, pytest.approx(0.5))
    # failed trials (NaN acc or time, zero time) never qualify; equal times -> lowest index
    acc = [NAN, 0.97, 0.97, 0.97, 0.97]
    time = [0.1, NAN, 0.0, 0.4, 0.4]
    assert speedup_at_equal_accuracy(acc, time, 0.96, 2.0) == (3, pytest.approx(5.0))
    # a slower trial at equal accuracy is a slow-down (< 1), still reported
    assert speedup_at_equal_accuracy([0.96], [4.0], 0.96, 2.0) == (0, pytest.approx(0.5))


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "call",
    [
        pytest.param(lambda: pareto_mask([[1, 2]], ["max"]), id="fewer-directions"),
        pytest.param(lambda: pareto_mask([[1, 2]], ["max", "up"]), id="unknown-direction"),
        pytest.param(lambda: pareto_mask([[1, 2]], "max"), id="directions-as-a-string"),
        pytest.param(lambda: pareto_mask([[1, 2]], []), id="no-directions"),
        pytest.param(lambda: pareto_mask([1, 2, 3], ["max", "min"]), id="1-d-for-two-objectives"),
        pytest.param(lambda: pareto_mask([[1, 2], [3]], ["max", "min"]), id="ragged"),
        pytest.param(lambda: pareto_mask([[1, "a"]], ["max", "min"]), id="not-numbers"),
        pytest.param(lambda: pareto_mask(np.zeros((2, 2, 2)), ["max", "min"]), id="3-d"),
        pytest.param(lambda: pareto_front([[1, 2]], ["max", "sideways"]), id="front-unknown-direction"),
        pytest.param(lambda: knee_point([[NAN, 1]], ["max", "min"]), id="knee-no-finite-point"),
        pytest.param(lambda: knee_point([], ["max", "min"]), id="knee-empty"),
        pytest.param(lambda: knee_point([[1, 1], [2, 0]], ["max", "max"], mask=[True]), id="knee-mask-length"),
        pytest.param(lambda: knee_point([[1, 1], [2, 0]], ["max", "max"], mask=[False, False]), id="knee-empty-mask"),
        pytest.param(lambda: knee_point([[1, 1], [2, 0]], ["max", "max"], mask=[0.5, 1.0]), id="knee-mask-not-bool"),
        pytest.param(lambda: hypervolume([[1, 1]], ["max", "max"], [NAN, 0]), id="hv-nan-reference"),
        pytest.param(lambda: hypervolume([[1, 1]], ["max", "max"], [0, 0, 0]), id="hv-reference-length"),
        pytest.param(lambda: hypervolume([[1, 1, 1]], ["max", "max"], [0, 0]), id="hv-values-width"),
        pytest.param(lambda: speedup_at_equal_accuracy([0.9], [1.0, 2.0], 0.9, 1.0), id="speedup-lengths"),
        pytest.param(lambda: speedup_at_equal_accuracy([0.9], [1.0], 0.9, 0.0), id="speedup-zero-baseline-time"),
        pytest.param(lambda: speedup_at_equal_accuracy([0.9], [1.0], NAN, 1.0), id="speedup-nan-baseline-acc"),
        pytest.param(
            lambda: speedup_at_equal_accuracy([0.9], [1.0], 0.9, 1.0, within_points=-1), id="speedup-negative-tolerance"
        ),
        pytest.param(lambda: speedup_at_equal_accuracy([95.0], [1.0], 96.0, 1.0), id="speedup-percent-baseline"),
        pytest.param(lambda: speedup_at_equal_accuracy([95.0], [1.0], 0.96, 1.0), id="speedup-percent-trials"),
        pytest.param(lambda: speedup_at_equal_accuracy([[0.9]], [[1.0]], 0.9, 1.0), id="speedup-2-d"),
    ],
)
def test_bad_input_raises_value_error(call):
    with pytest.raises(ValueError):
        call()


def test_error_messages_say_what_is_wrong():
    with pytest.raises(ValueError, match="'up'.*max"):
        pareto_mask([[1, 2]], ["max", "up"])
    with pytest.raises(ValueError, match="2 objective.*1 direction"):
        pareto_mask([[1, 2]], ["max"])
    with pytest.raises(ValueError, match="differ in length: 1 vs 2"):
        speedup_at_equal_accuracy([0.9], [1.0, 2.0], 0.9, 1.0)
    with pytest.raises(ValueError, match="percentages"):
        speedup_at_equal_accuracy([95.0], [1.0], 0.96, 1.0)
