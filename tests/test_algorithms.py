"""Algorithms 1 and 2 as pure functions: tables worked out by hand from the paper's pseudocode.

Every row carries its arithmetic in a comment. ΔX = (X_t - X_{t-1}) / |X_{t-1}| * 100 and the test
passes when |ΔW_t^a| <= τ for every family a and t = 2..k, and |ΔL_t| <= ζ for every t
(docs/algorithms.md, "Algorithm 1"). Powers of two are used where a row sits exactly on a threshold, so
the float arithmetic is exact and "== τ passes" is really tested.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

import prelora_ray
from prelora_ray import assign_ranks, candidate_ranks, partial_convergence_test
from prelora_ray.algorithms import is_power_of_two, percent_change

NAN = float("nan")
INF = float("inf")

# ---------------------------------------------------------------------------------------------------
# Algorithm 1: partial_convergence_test(module_norms, losses, tau, zeta)
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "norms, losses, tau, zeta, expected",
    [
        # --- k = 2 ----------------------------------------------------------------------------
        # ΔW = (10.05-10)/10*100 = +0.5 % <= 1; ΔL = (1.99-2)/2*100 = -0.5 %, |.| = 0.5 <= 1  -> pass
        pytest.param({"query": [10.0, 10.05]}, [2.0, 1.99], 1.0, 1.0, True, id="k2-both-pass"),
        # ΔW = (10.2-10)/10*100 = +2 % > τ = 1 (loss fine: -0.5 %)                            -> fail on weights
        pytest.param({"query": [10.0, 10.2]}, [2.0, 1.99], 1.0, 1.0, False, id="k2-weights-fail"),
        # ΔW = +0.5 % fine; ΔL = (1.9-2)/2*100 = -5 %, |.| = 5 > ζ = 1                        -> fail on loss
        pytest.param({"query": [10.0, 10.05]}, [2.0, 1.9], 1.0, 1.0, False, id="k2-loss-fail"),
        # --- τ is for weights, ζ for loss (the reference code swapped them) ------------------------
        # ΔW = (103-100)/100*100 = 3 % > τ = 1; ΔL = -0.5 % <= ζ = 5 -> fail (swapped names: 3<=5, .5<=1 pass)
        pytest.param({"query": [100.0, 103.0]}, [100.0, 99.5], 1.0, 5.0, False, id="tau-is-weights"),
        # ΔW = 0.5 % <= τ = 1; ΔL = (97-100)/100*100 = -3 %, 3 <= ζ = 5 -> pass (swapped: 3 > 1 would fail)
        pytest.param({"query": [100.0, 100.5]}, [100.0, 97.0], 1.0, 5.0, True, id="zeta-is-loss"),
        # --- boundary: |Δ| == threshold passes (exact binary fractions) ----------------------------
        # ΔW = (9-8)/8*100 = 12.5 == τ = 12.5; ΔL = 0                                          -> pass
        pytest.param({"query": [8.0, 9.0]}, [1.0, 1.0], 12.5, 1.0, True, id="weight-equals-tau"),
        # same ΔW = 12.5 > τ = 12.25                                                           -> fail
        pytest.param({"query": [8.0, 9.0]}, [1.0, 1.0], 12.25, 1.0, False, id="weight-just-above-tau"),
        # ΔL = (3-4)/4*100 = -25, |.| = 25 == ζ = 25; ΔW = 0                                   -> pass
        pytest.param({"query": [8.0, 8.0]}, [4.0, 3.0], 1.0, 25.0, True, id="loss-equals-zeta"),
        # same |ΔL| = 25 > ζ = 24.5                                                            -> fail
        pytest.param({"query": [8.0, 8.0]}, [4.0, 3.0], 1.0, 24.5, False, id="loss-just-above-zeta"),
        # ΔW = (101-100)/100*100 = 1.0 (0.01*100 rounds to exactly 1.0) == τ = 1               -> pass
        pytest.param({"query": [100.0, 101.0]}, [1.0, 1.0], 1.0, 1.0, True, id="one-percent-exact"),
        # --- negative changes count by their absolute value ----------------------------------------
        # ΔW = (7-8)/8*100 = -12.5, |.| = 12.5 == τ                                             -> pass
        pytest.param({"query": [8.0, 7.0]}, [1.0, 1.0], 12.5, 1.0, True, id="shrinking-weight-at-tau"),
        # ΔW = -12.5, |.| = 12.5 > τ = 12 (a signed check, -12.5 <= 12, would wrongly pass)      -> fail
        pytest.param({"query": [8.0, 7.0]}, [1.0, 1.0], 12.0, 1.0, False, id="shrinking-weight-above-tau"),
        # ΔL = (5-4)/4*100 = +25 > ζ = 20 (a rising loss fails like a falling one)              -> fail
        pytest.param({"query": [8.0, 8.0]}, [4.0, 5.0], 1.0, 20.0, False, id="rising-loss-fails"),
        # ΔL = (2-4)/4*100 = -50, |.| = 50 > ζ = 20 (a signed check, -50 <= 20, would pass)     -> fail
        pytest.param({"query": [8.0, 8.0]}, [4.0, 2.0], 1.0, 20.0, False, id="falling-loss-fails"),
        # --- several families: every family must pass ----------------------------------------------
        # query 0 %, key (16.5-16)/16 = 3.125 %, mlp_out (5-4)/4 = 25 % > τ = 5               -> fail
        pytest.param(
            {"query": [10.0, 10.0], "key": [16.0, 16.5], "mlp_out": [4.0, 5.0]},
            [1.0, 1.0],
            5.0,
            1.0,
            False,
            id="three-families-last-fails",
        ),
        # the first family fails: query (9-8)/8 = 12.5 % > 5; key 3.125 %, mlp_out 0 %           -> fail
        pytest.param(
            {"query": [8.0, 9.0], "key": [16.0, 16.5], "mlp_out": [4.0, 4.0]},
            [1.0, 1.0],
            5.0,
            1.0,
            False,
            id="three-families-first-fails",
        ),
        # query 0 %, key 3.125 %, mlp_out (4.125-4)/4 = 3.125 %: all <= τ = 5                   -> pass
        pytest.param(
            {"query": [10.0, 10.0], "key": [16.0, 16.5], "mlp_out": [4.0, 4.125]},
            [1.0, 1.0],
            5.0,
            1.0,
            True,
            id="three-families-all-pass",
        ),
        # shrinking family: value (7.5-8)/8 = -6.25 %, |.| > τ = 5; query +3.125 % fine            -> fail
        pytest.param(
            {"query": [16.0, 16.5], "value": [8.0, 7.5]}, [1.0, 1.0], 5.0, 1.0, False, id="one-family-shrinks-too-much"
        ),
        # --- k = 4: three consecutive pairs, every one must pass -----------------------------------
        # ΔW: (16.5-16)/16 = 3.125, (17-16.5)/16.5 = 3.03, (17.25-17)/17 = 1.47 <= τ = 5
        # ΔL: (3.9-4)/4 = -2.5, (3.85-3.9)/3.9 = -1.28, (3.8-3.85)/3.85 = -1.30: |.| <= ζ = 3      -> pass
        pytest.param({"query": [16.0, 16.5, 17.0, 17.25]}, [4.0, 3.9, 3.85, 3.8], 5.0, 3.0, True, id="k4-all-pass"),
        # ΔW: 0, (20-16)/16 = +25 > τ = 10, 0: only the middle pair fails                       -> fail
        pytest.param(
            {"query": [16.0, 16.0, 20.0, 20.0]}, [1.0, 1.0, 1.0, 1.0], 10.0, 1.0, False, id="k4-middle-weight-fails"
        ),
        # ΔL: (0.95-1)/1 = -5 > ζ = 2.5 in the FIRST pair, then 0, 0 (no "only the last pair")   -> fail
        pytest.param(
            {"query": [10.0, 10.0, 10.0, 10.0]}, [1.0, 0.95, 0.95, 0.95], 1.0, 2.5, False, id="k4-first-loss-fails"
        ),
        # ΔL: 0, 0, (3-4)/4 = -25 > ζ = 10 in the LAST pair                                       -> fail
        pytest.param({"query": [8.0, 8.0, 8.0, 8.0]}, [4.0, 4.0, 4.0, 3.0], 1.0, 10.0, False, id="k4-last-loss-fails"),
        # two families, k = 4: query 0 %, 0 %, 0 %; mlp_in (8.5-8)/8 = 6.25 > τ = 5 in pair 2  -> fail
        pytest.param(
            {"query": [8.0, 8.0, 8.0, 8.0], "mlp_in": [8.0, 8.0, 8.5, 8.5]},
            [1.0, 1.0, 1.0, 1.0],
            5.0,
            1.0,
            False,
            id="k4-second-family-fails",
        ),
        # k = 4 at the boundary everywhere: ΔW = (9-8)/8 = 12.5 == τ, then (9-9) = 0, then (8-9)/9 = -11.1
        # ΔL = (3-4)/4 = -25 == ζ, (3-3) = 0, (3.75-3)/3 = +25 == ζ                               -> pass
        pytest.param({"query": [8.0, 9.0, 9.0, 8.0]}, [4.0, 3.0, 3.0, 3.75], 12.5, 25.0, True, id="k4-on-the-boundary"),
        # --- k = 3 with the paper's thresholds ------------------------------------------------------
        # Exp1 (τ 1, ζ 5): ΔW (10.05-10)/10 = .5, (10.08-10.05)/10.05 = .30; ΔL -1, -.51        -> pass
        pytest.param({"query": [10.0, 10.05, 10.08]}, [2.0, 1.98, 1.97], 1.0, 5.0, True, id="k3-exp1-pass"),
        # Exp3 (τ .25, ζ 1): the same ΔW of 0.5 % is now > .25                                     -> fail
        pytest.param({"query": [10.0, 10.05, 10.08]}, [2.0, 1.98, 1.97], 0.25, 1.0, False, id="k3-exp3-fail"),
    ],
)
def test_partial_convergence_table(norms, losses, tau, zeta, expected):
    assert partial_convergence_test(norms, losses, tau, zeta) is expected


@pytest.mark.parametrize(
    "norms, losses, expected",
    [
        # a NaN anywhere never passes (NaN <= τ is False)
        ({"query": [1.0, NAN]}, [1.0, 1.0], False),
        ({"query": [1.0, 1.0]}, [NAN, 1.0], False),
        # an infinite loss: (inf - 1)/1 = inf > ζ
        ({"query": [1.0, 1.0]}, [1.0, INF], False),
        # a zero previous value: 0 -> 0 is 0 % (passes), 0 -> 1 is +inf % (fails, no ZeroDivisionError)
        ({"query": [0.0, 0.0]}, [1.0, 1.0], True),
        ({"query": [0.0, 1.0]}, [1.0, 1.0], False),
        ({"query": [1.0, 1.0]}, [0.0, 0.5], False),
    ],
)
def test_partial_convergence_non_finite_and_zero(norms, losses, expected):
    assert partial_convergence_test(norms, losses, 1.0, 1.0) is expected


@pytest.mark.parametrize(
    "norms, losses, tau, zeta, match",
    [
        ({"query": [1.0, 1.0]}, [1.0, 1.0], 0.0, 1.0, "tau"),  # τ = 0: nothing could ever pass
        ({"query": [1.0, 1.0]}, [1.0, 1.0], -1.0, 1.0, "tau"),  # τ < 0
        ({"query": [1.0, 1.0]}, [1.0, 1.0], 1.0, 0.0, "zeta"),  # ζ = 0
        ({"query": [1.0, 1.0]}, [1.0, 1.0], 1.0, -5.0, "zeta"),  # ζ < 0
        ({"query": [1.0, 1.0, 1.0]}, [1.0, 1.0], 1.0, 1.0, "query"),  # 3 norm windows, 2 loss windows
        ({"query": [1.0, 1.0]}, [1.0, 1.0, 1.0], 1.0, 1.0, "query"),  # 2 norm windows, 3 loss windows
        ({"query": [1.0, 1.0], "key": [1.0]}, [1.0, 1.0], 1.0, 1.0, "key"),  # one family short: named
        ({"query": [1.0]}, [1.0], 1.0, 1.0, "2 windows"),  # k = 1 is no comparison
        ({}, [1.0, 1.0], 1.0, 1.0, "empty"),  # no family at all
    ],
)
def test_partial_convergence_rejects_bad_input(norms, losses, tau, zeta, match):
    with pytest.raises(ValueError, match=match):
        partial_convergence_test(norms, losses, tau, zeta)


def test_partial_convergence_does_not_mutate_inputs():
    norms, losses = {"query": [8.0, 9.0]}, [4.0, 3.0]
    partial_convergence_test(norms, losses, 12.5, 25.0)
    assert norms == {"query": [8.0, 9.0]} and losses == [4.0, 3.0]


# ---------------------------------------------------------------------------------------------------
# percent_change, candidate_ranks, is_power_of_two
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "previous, current, expected",
    [
        (2.0, 2.5, 25.0),  # (2.5-2)/2*100
        (2.0, 1.5, -25.0),  # (1.5-2)/2*100
        (8.0, 8.0, 0.0),  # no change
        (4.0, 0.0, -100.0),  # (0-4)/4*100
        (-2.0, -1.0, 50.0),  # (-1+2)/|-2|*100: relative to the magnitude
        (0.0, 0.0, 0.0),  # zero previous, no change: 0 %
        (0.0, 1.0, INF),  # zero previous, any change: +inf % (fails the test, no ZeroDivisionError)
        (0.0, -1.0, INF),
    ],
)
def test_percent_change(previous, current, expected):
    assert percent_change(previous, current) == expected


@pytest.mark.parametrize(
    "r_min, r_max, expected",
    [
        (8, 64, [8, 16, 32, 64]),  # 2^3 .. 2^6
        (2, 16, [2, 4, 8, 16]),  # 2^1 .. 2^4 (the digits default)
        (1, 1, [1]),
        (16, 16, [16]),
        (1, 8, [1, 2, 4, 8]),
        (4, 256, [4, 8, 16, 32, 64, 128, 256]),
    ],
)
def test_candidate_ranks(r_min, r_max, expected):
    assert candidate_ranks(r_min, r_max) == expected


@pytest.mark.parametrize(
    "r_min, r_max",
    [(6, 64), (8, 48), (3, 3), (64, 8), (16, 8), (0, 8), (-8, 8), (8, 0), (8.0, 64), (True, 8)],
)
def test_candidate_ranks_rejects(r_min, r_max):
    with pytest.raises(ValueError):
        candidate_ranks(r_min, r_max)


def test_is_power_of_two():
    assert [n for n in range(-4, 130) if is_power_of_two(n)] == [1, 2, 4, 8, 16, 32, 64, 128]
    assert not is_power_of_two(True)  # bool is an int subclass, not a rank
    assert not is_power_of_two(8.0)


# ---------------------------------------------------------------------------------------------------
# Algorithm 2: assign_ranks(changes, r_min, r_max)
# R = [8, 16, 32, 64] (|R| = 4); v = (c - min) / (max - min); i = ceil(4 v) - 1 for v > 0, else 0
# so v = 0 -> 8, (0, .25] -> 8, (.25, .5] -> 16, (.5, .75] -> 32, (.75, 1] -> 64
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "changes, expected",
    [
        # min 0, max 8: v = c/8 = 0, .125, .25, .375, .5, .625, .75, .875, 1
        # i = 0 (v=0), ceil(.5)-1=0, ceil(1)-1=0, ceil(1.5)-1=1, ceil(2)-1=1, ceil(2.5)-1=2, ceil(3)-1=2,
        #     ceil(3.5)-1=3, ceil(4)-1=3
        pytest.param(
            [0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0], [8, 8, 8, 16, 16, 32, 32, 64, 64], id="every-bucket-and-edge"
        ),
        # min 2, max 10 (range 8): v = 0, 1/8, 2/8, 4/8, 8/8 -> i = 0, 0, 0, ceil(2)-1=1, 3      -> 8, 8, 8, 16, 64
        pytest.param([2.0, 3.0, 4.0, 6.0, 10.0], [8, 8, 8, 16, 64], id="non-zero-minimum"),
        # decimal edges: min .1, max .5 (range .4): v = 0, .25, .5, .75, 1 in exact arithmetic (the floats
        # are .25, .49999999999999994, .7500000000000001): i = 0, 0, 1, 2, 3                     -> 8, 8, 16, 32, 64
        pytest.param([0.1, 0.2, 0.3, 0.4, 0.5], [8, 8, 16, 32, 64], id="decimal-edges"),
        # just past the edges: min 0, max 100: v = .26 -> ceil(1.04)-1=1; .51 -> 2; .76 -> 3; .01 -> 0
        pytest.param([0.0, 1.0, 26.0, 51.0, 76.0, 100.0], [8, 8, 16, 32, 64, 64], id="just-past-edges"),
        # order is kept: layers given high to low get ranks high to low (v = 1, .5, 0)
        pytest.param([1.0, 0.5, 0.0], [64, 16, 8], id="order-kept"),
        # two layers: the smaller always gets R[0], the larger R[-1] (v = 0 and 1)
        pytest.param([0.3, 0.31], [8, 64], id="two-layers"),
        # --- negative changes count by magnitude: |c| = [8, 4, 0, 2], v = 1, .5, 0, .25        -> 64, 16, 8, 8
        pytest.param([-8.0, 4.0, 0.0, -2.0], [64, 16, 8, 8], id="negatives-by-magnitude"),
        # all negative: |c| = [1, 5, 3], min 1, max 5: v = 0, 1, .5                              -> 8, 64, 16
        pytest.param([-1.0, -5.0, -3.0], [8, 64, 16], id="all-negative"),
        # a shrink of 9 % is a bigger move than a growth of 1 %: |c| = [1, 9, 5], v = 0, 1, .5   -> 8, 64, 16
        pytest.param([1.0, -9.0, 5.0], [8, 64, 16], id="shrink-beats-growth"),
    ],
)
def test_assign_ranks_table(changes, expected):
    assert assign_ranks({"query": changes}, 8, 64) == {"query": expected}


def test_assign_ranks_sign_does_not_matter():
    changes = [0.3, 1.7, 0.9, 2.2, 0.05]
    assert assign_ranks({"q": changes}, 8, 64) == assign_ranks({"q": [-c for c in changes]}, 8, 64)


def test_assign_ranks_each_family_normalised_on_its_own():
    ranks = assign_ranks({"query": [0.0, 1.0, 2.0], "value": [0.0, 10.0, 11.0], "mlp_in": [0.2, 5.0]}, 4, 16)
    # R = [4, 8, 16] (|R| = 3), i = ceil(3 v) - 1
    # query: min 0, max 2: v = 0, .5, 1 -> i = 0, ceil(1.5)-1 = 1, ceil(3)-1 = 2                 -> 4, 8, 16
    # value: min 0, max 11: v = 0, 10/11 = .909, 1 -> i = 0, ceil(2.73)-1 = 2, 2                 -> 4, 16, 16
    # mlp_in: two layers: v = 0, 1                                                              -> 4, 16
    assert ranks == {"query": [4, 8, 16], "value": [4, 16, 16], "mlp_in": [4, 16]}


@pytest.mark.parametrize(
    "changes, r_min, r_max, tie_rank, expected",
    [
        # min-max normalisation is 0/0 in every row: every layer gets the tie rank, no NaN, no crash
        # R = [8, 16, 32, 64]: min -> R[0] = 8, middle -> R[4 // 2] = R[2] = 32, max -> R[-1] = 64
        pytest.param([0.3], 8, 64, "min", [8], id="one-layer-min"),
        pytest.param([0.3], 8, 64, "middle", [32], id="one-layer-middle"),
        pytest.param([0.3], 8, 64, "max", [64], id="one-layer-max"),
        pytest.param([2.5, 2.5, 2.5], 8, 64, "min", [8, 8, 8], id="all-equal-min"),
        pytest.param([2.5, 2.5, 2.5], 8, 64, "middle", [32, 32, 32], id="all-equal-middle"),
        pytest.param([2.5, 2.5, 2.5], 8, 64, "max", [64, 64, 64], id="all-equal-max"),
        pytest.param([0.0, 0.0, 0.0, 0.0], 8, 64, "min", [8, 8, 8, 8], id="all-zero-min"),
        pytest.param([0.0, 0.0, 0.0, 0.0], 8, 64, "middle", [32, 32, 32, 32], id="all-zero-middle"),
        pytest.param([0.0, 0.0, 0.0, 0.0], 8, 64, "max", [64, 64, 64, 64], id="all-zero-max"),
        # |-1| == |1|: a tie by magnitude
        pytest.param([-1.0, 1.0], 8, 64, "max", [64, 64], id="equal-magnitudes"),
        # R = [8, 16, 32] (odd length): middle -> R[3 // 2] = R[1] = 16
        pytest.param([0.7, 0.7], 8, 32, "middle", [16, 16], id="odd-R-middle"),
        # R = [2, 4] : middle -> R[2 // 2] = R[1] = 4
        pytest.param([0.0], 2, 4, "middle", [4], id="two-R-middle"),
    ],
)
def test_assign_ranks_ties(changes, r_min, r_max, tie_rank, expected):
    assert assign_ranks({"key": changes}, r_min, r_max, tie_rank=tie_rank) == {"key": expected}


def test_assign_ranks_default_tie_rank_is_min():
    # the paper's line 15 with v = 0 gives R[0]
    assert assign_ranks({"key": [1.0, 1.0]}, 8, 64) == {"key": [8, 8]}


@pytest.mark.parametrize("changes", [[0.0, 0.3, 9.0], [5.0], [1.0, 1.0], [-3.0, 0.0, 7.0, 2.0]])
def test_r_min_equals_r_max_gives_that_rank_everywhere(changes):
    # R = [16]: every bucket index is 0
    assert assign_ranks({"query": changes}, 16, 16) == {"query": [16] * len(changes)}


@pytest.mark.parametrize("r_min, r_max", [(6, 64), (8, 48), (12, 12), (64, 8), (32, 16), (0, 8), (8.0, 64)])
def test_assign_ranks_rejects_bad_rank_bounds(r_min, r_max):
    with pytest.raises(ValueError):
        assign_ranks({"query": [0.1, 0.2]}, r_min, r_max)


@pytest.mark.parametrize(
    "changes, threshold, expected",
    [
        # below .05 -> rank 0; the rest [.1, .5, .9]: min .1, max .9, v = 0, .5, 1             -> 8, 16, 64
        pytest.param([0.01, 0.1, 0.02, 0.5, 0.9], 0.05, [0, 8, 0, 16, 64], id="mixed"),
        # the magnitude decides: |-0.01| < .05 -> 0; |-0.9| = .9 active; [.1, .9]: v = 0, 1     -> 0, 8, 64
        pytest.param([-0.01, 0.1, -0.9], 0.05, [0, 8, 64], id="negatives"),
        # exactly at the threshold is not below it: active [.05, .5, 1]: v = 0, .45/.95 = .47 -> i = ceil(1.89)-1
        # = 1, 1                                                                                -> 8, 16, 64
        pytest.param([0.05, 0.5, 1.0], 0.05, [8, 16, 64], id="at-threshold-active"),
        # one active layer left: a tie, the tie rank (min)                                     -> 0, 8
        pytest.param([0.01, 0.3], 0.05, [0, 8], id="one-active"),
        # every layer below: the most-changed one keeps an adapter at the tie rank (min)     -> 0, 8
        pytest.param([0.01, 0.02], 0.05, [0, 8], id="all-below"),
        # threshold 0: nothing is below 0, so plain bucketing: v = 0, .5, 1                    -> 8, 16, 64
        pytest.param([0.0, 1.0, 2.0], 0.0, [8, 16, 64], id="zero-threshold"),
        # the active layers are normalised among themselves, not with the zero-rank ones:
        # active [2, 3, 4, 6, 10]: v = 0, .125, .25, .5, 1 (min is 2, not 0.001)              -> 8, 8, 8, 16, 64
        pytest.param([0.001, 2.0, 3.0, 4.0, 6.0, 10.0], 1.0, [0, 8, 8, 8, 16, 64], id="normalised-among-active"),
    ],
)
def test_zero_rank_below(changes, threshold, expected):
    assert assign_ranks({"query": changes}, 8, 64, zero_rank_below=threshold) == {"query": expected}


def test_zero_rank_below_off_by_default_and_none_is_off():
    assert assign_ranks({"q": [0.0, 0.001, 1.0]}, 8, 64) == {"q": [8, 8, 64]}
    assert assign_ranks({"q": [0.0, 0.001, 1.0]}, 8, 64, zero_rank_below=None) == {"q": [8, 8, 64]}


@pytest.mark.parametrize(
    "changes, kwargs",
    [
        pytest.param({"query": [0.1, NAN]}, {}, id="nan"),
        pytest.param({"query": [NAN]}, {}, id="only-nan"),
        pytest.param({"query": [0.1, 0.2], "key": [NAN, 0.1]}, {}, id="nan-in-second-family"),
        pytest.param({"query": [0.1, INF]}, {}, id="inf"),
        pytest.param({"query": [0.1, -INF]}, {}, id="minus-inf"),
        pytest.param({"query": []}, {}, id="no-layers"),
        pytest.param({"query": [0.1]}, {"tie_rank": "median"}, id="bad-tie-rank"),
        pytest.param({"query": [0.1]}, {"zero_rank_below": -1.0}, id="negative-threshold"),
    ],
)
def test_assign_ranks_rejects(changes, kwargs):
    with pytest.raises(ValueError):
        assign_ranks(changes, 8, 64, **kwargs)


def test_assign_ranks_nan_error_names_the_family():
    with pytest.raises(ValueError, match="key"):
        assign_ranks({"query": [0.1, 0.2], "key": [NAN, 0.1]}, 8, 64)


def test_assign_ranks_output_shape_and_values():
    changes = {"query": [0.3, 1.2, 0.7, 0.1], "mlp_out": [4.0, 0.5, 2.0, 2.0]}
    ranks = assign_ranks(changes, 2, 16)
    assert list(ranks) == list(changes)
    assert all(len(ranks[f]) == len(changes[f]) for f in changes)
    assert all(r in (2, 4, 8, 16) for rs in ranks.values() for r in rs)
    assert all(isinstance(r, int) for rs in ranks.values() for r in rs)
    # R = [2, 4, 8, 16]; mlp_out: min .5, max 4 (range 3.5): v(2) = 1.5/3.5 = .43 -> ceil(1.71)-1 = 1 -> 4
    assert ranks["mlp_out"] == [16, 2, 4, 4]
    # query: min .1, max 1.2 (range 1.1): v(.3) = .18 -> 0 -> 2; v(.7) = .545 -> ceil(2.18)-1 = 2 -> 8
    assert ranks["query"] == [2, 16, 8, 2]


def test_assign_ranks_larger_change_never_gets_a_smaller_rank():
    changes = [0.013, 0.9, 0.31, 0.31, 2.4, 0.0, 1.7, 0.05, 0.6]
    ranks = assign_ranks({"q": changes}, 4, 64)["q"]
    pairs = sorted(zip(changes, ranks, strict=True))
    assert [r for _, r in pairs] == sorted(r for _, r in pairs)
    assert min(ranks) == 4 and max(ranks) == 64


def test_package_reexports_the_algorithms():
    assert prelora_ray.partial_convergence_test is partial_convergence_test
    assert prelora_ray.assign_ranks is assign_ranks
    assert prelora_ray.candidate_ranks is candidate_ranks


# ---------------------------------------------------------------------------------------------------
# Import hygiene: a fresh interpreter per check
# ---------------------------------------------------------------------------------------------------


def _top_level_modules_after(statement: str) -> set[str]:
    code = f"{statement}\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return {name.split(".")[0] for name in json.loads(out.stdout.strip().splitlines()[-1])}


@pytest.mark.parametrize(
    "statement, forbidden",
    [
        ("import prelora_ray", {"ray", "peft", "mlflow"}),
        ("import prelora_ray.algorithms", {"ray", "peft", "mlflow", "torch"}),
        ("from prelora_ray import assign_ranks, partial_convergence_test", {"ray", "peft", "mlflow", "torch"}),
        ("import prelora_ray.trainer", {"ray", "mlflow"}),
    ],
)
def test_imports_stay_light(statement, forbidden):
    loaded = _top_level_modules_after(statement)
    assert "prelora_ray" in loaded
    assert not forbidden & loaded, f"{statement!r} imported {sorted(forbidden & loaded)}"


def test_algorithms_results_are_plain_python():
    # results are JSON-serialisable builtins (they go into checkpoints, MLflow artifacts, Ray reports)
    ranks = assign_ranks({"q": [0.1, 0.2, 0.4]}, 8, 64)
    assert json.loads(json.dumps(ranks)) == ranks
    assert type(partial_convergence_test({"q": [1.0, 1.0]}, [1.0, 1.0], 1.0, 1.0)) is bool
    assert math.isinf(percent_change(0.0, 2.0))
