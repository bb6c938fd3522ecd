"""The noise helpers of a front: intervals, the exact McNemar test, dominance with intervals (hand-worked numbers)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from prelora_ray.significance import (
    accuracy_interval,
    check_alpha,
    compare_accuracy,
    compare_interval,
    compare_speedup,
    dominated,
    mcnemar,
    pack_hits,
    paired_difference,
    unpack_hits,
)

Z95 = 1.959963984540054  # the standard normal's 97.5% quantile


def wilson_by_hand(correct: int, n: int) -> tuple[float, float]:
    p = correct / n
    denom = 1 + Z95**2 / n
    centre = (p + Z95**2 / (2 * n)) / denom
    half = Z95 * math.sqrt(p * (1 - p) / n + Z95**2 / (4 * n * n)) / denom
    return centre - half, centre + half


@pytest.mark.parametrize(("correct", "n"), [(350, 360), (360, 360), (0, 360), (1, 2), (349, 360)])
def test_the_wilson_interval_is_the_score_interval(correct, n):
    lo, hi = accuracy_interval(correct, n)
    want_lo, want_hi = wilson_by_hand(correct, n)
    assert lo == pytest.approx(want_lo, abs=1e-12) and hi == pytest.approx(want_hi, abs=1e-12)


def test_the_exact_interval_at_the_ends_is_closed_form():
    n = 360
    assert accuracy_interval(n, n, method="exact") == pytest.approx((0.025 ** (1 / n), 1.0), abs=1e-12)
    assert accuracy_interval(0, n, method="clopper-pearson") == pytest.approx((0.0, 1 - 0.025 ** (1 / n)), abs=1e-12)


def test_one_digits_image_is_a_fraction_of_the_interval():
    lo, hi = accuracy_interval(349, 360)  # 0.9694
    assert hi - lo > 5 / 360  # the interval spans more than five images


@pytest.mark.parametrize(
    ("only_a", "only_b", "p"),
    [
        (0, 5, 2 / 2**5),  # every discordant image went B's way: 2 * (1/2)^5
        (1, 9, 2 * (1 + 10) / 2**10),  # 2 * P(X <= 1), X ~ Bin(10, 1/2)
        (3, 3, 1.0),
        (0, 0, 1.0),  # no discordant image: nothing to test
    ],
)
def test_mcnemar_is_the_exact_binomial_test_on_the_discordant_images(only_a, only_b, p):
    both = 40
    a = np.array([True] * only_a + [False] * only_b + [True] * both + [False] * 7)
    b = np.array([False] * only_a + [True] * only_b + [True] * both + [False] * 7)
    test = mcnemar(a, b)
    assert (test.b, test.c) == (only_a, only_b)
    assert test.p == pytest.approx(p, abs=1e-12)


def test_mcnemar_needs_the_same_images():
    with pytest.raises(ValueError, match="same length"):
        mcnemar([True, False], [True])


def _pair(only_a: int, only_b: int, both: int = 300) -> tuple[np.ndarray, np.ndarray]:
    a = np.array([True] * only_a + [False] * only_b + [True] * both)
    b = np.array([False] * only_a + [True] * only_b + [True] * both)
    return a, b


def test_accuracy_verdicts_follow_the_paired_test():
    a, b = _pair(0, 10)  # p = 2/1024
    assert compare_accuracy(a, b) == "worse" and compare_accuracy(b, a) == "better"
    a, b = _pair(1, 4)  # p = 0.375: four images against one is noise
    assert compare_accuracy(a, b) == "indistinguishable" == compare_accuracy(b, a)
    a, b = _pair(0, 5)  # p = 0.0625: significant at 0.1, not at 0.05
    assert compare_accuracy(a, b, alpha=0.05) == "indistinguishable"
    assert compare_accuracy(a, b, alpha=0.1) == "worse"


def test_speedups_differ_only_when_their_intervals_are_disjoint():
    assert compare_speedup((1.5, 1.4, 1.6), (1.0, 0.9, 1.1)) == "better"
    assert compare_speedup((1.0, 0.9, 1.1), (1.5, 1.4, 1.6)) == "worse"
    assert compare_speedup((1.2, 1.0, 1.3), (1.25, 1.1, 1.4)) == "indistinguishable"
    assert compare_speedup((1.2, 1.1, 1.3), (1.3, 1.3, 1.4)) == "indistinguishable"  # touching ends
    nan = float("nan")
    assert compare_speedup((1.2, nan, nan), (1.1, nan, nan)) == "better"  # no interval: the point values


def test_dominance_with_intervals_on_hand_made_rows():
    images = np.arange(312)
    same = images >= 12  # 300 right
    better = np.ones(312, dtype=bool)  # 12 more: p = 2/2^12 against `same`
    worse = images >= 24  # 12 fewer than `same`
    rows_correct = [same, same, better, worse, same]
    speed = [
        (1.5, 1.4, 1.6),  # 0: fast
        (1.0, 0.9, 1.1),  # 1: as accurate as 0, surely slower: dominated by 0
        (1.0, 0.95, 1.05),  # 2: surely the most accurate, slow: a trade-off, plausible
        (1.55, 1.3, 1.8),  # 3: the fastest point, within noise of 0, surely less accurate than 0: dominated
        (1.45, 1.35, 1.55),  # 4: a tie with 0 within noise: plausible
    ]
    assert dominated(rows_correct, speed) == [False, True, False, True, False]


def test_ties_and_all_indistinguishable_rows_are_all_plausible():
    a, b = _pair(2, 3)
    rows = [a, b, a, b]
    speed = [(1.0, 0.8, 1.2), (1.1, 0.9, 1.3), (1.0, 0.8, 1.2), (0.95, 0.85, 1.05)]
    assert dominated(rows, speed) == [False] * 4
    assert dominated([a, a], [(1.0, 0.9, 1.1)] * 2) == [False, False]  # identical rows do not dominate each other


def test_a_trade_off_is_not_domination():
    fast_less_accurate, slow_more_accurate = _pair(0, 12)
    assert dominated([fast_less_accurate, slow_more_accurate], [(2.0, 1.9, 2.1), (1.0, 0.9, 1.1)]) == [False, False]


@pytest.mark.parametrize("bad", [0, 0.0, 0.51, -0.1, "x", None, float("nan")])
def test_a_bad_alpha_is_one_line_naming_the_key(bad):
    with pytest.raises(ValueError, match=r"^alpha: .*\(0, 0.5\]") as err:
        check_alpha(bad)
    assert "\n" not in str(err.value)


def test_good_alphas_pass():
    assert check_alpha(0.5) == 0.5 and check_alpha("0.05") == 0.05


@pytest.mark.parametrize("size", [0, 1, 7, 8, 9, 360])
def test_packed_hits_round_trip(size):
    hits = np.random.default_rng(size).random(size) < 0.7
    text = pack_hits(hits)
    assert text.startswith(f"{size}:") and len(text) <= len(str(size)) + 1 + 4 * (size // 24 + 1)
    assert (unpack_hits(text) == hits).all() and unpack_hits(text).size == size


def test_the_paired_difference_maps_the_exact_interval_of_the_discordant_images():
    n = 100
    a = np.array([False] * 5 + [True] * 90 + [False] * 5)  # B alone gets the first 5 right
    b = np.array([True] * 5 + [True] * 90 + [False] * 5)
    d, lo, hi = paired_difference(a, b)
    pi_hi = 1 - 0.025 ** (1 / 5)  # Clopper-Pearson's upper end for 0 of 5
    assert d == pytest.approx(-5 / n)
    assert lo == pytest.approx(5 / n * (2 * 0 - 1)) and hi == pytest.approx(5 / n * (2 * pi_hi - 1))
    assert hi > 0  # 5 images against 0: p = 0.0625, not significant at 0.05
    assert paired_difference(a, a) == (0.0, 0.0, 0.0)


@pytest.mark.parametrize("seed", range(20))
def test_the_paired_interval_excludes_zero_exactly_when_mcnemar_rejects(seed):
    rng = np.random.default_rng(seed)
    a = rng.random(360) < 0.9
    b = np.where(rng.random(360) < 0.06, ~a, a)  # a few images flipped
    b[: seed % 7] = True
    _, lo, hi = paired_difference(a, b)
    verdict = compare_accuracy(a, b)
    assert (hi < 0) == (verdict == "worse") and (lo > 0) == (verdict == "better")


def test_compare_interval_reads_the_direction():
    assert compare_interval((0.5, 0.4, 0.6), (0.9, 0.8, 1.0), "min") == "better"  # a smaller epoch time
    assert compare_interval((0.5, 0.4, 0.6), (0.9, 0.8, 1.0), "max") == "worse"
    nan = float("nan")
    assert compare_interval((0.5, nan, nan), (0.9, nan, nan), "minimize") == "better"
