"""Algorithms 1 and 2: tables worked out by hand from the paper's pseudocode, edge cases included."""

from __future__ import annotations

import subprocess
import sys

import pytest

from prelora_ray import assign_ranks, candidate_ranks, partial_convergence_test
from prelora_ray.algorithms import is_power_of_two, percent_change


@pytest.mark.parametrize(
    "norms, losses, tau, zeta, expected",
    [
        # ΔW: 10 -> 10.05 = +0.5 %, -> 10.08 = +0.298 %; ΔL: 2 -> 1.98 = -1 %, -> 1.97 = -0.505 %: all within
        ({"query": [10.0, 10.05, 10.08]}, [2.0, 1.98, 1.97], 1.0, 5.0, True),
        # ΔW 10 -> 10.2 = +2 % > τ = 1
        ({"query": [10.0, 10.2, 10.25]}, [2.0, 1.98, 1.97], 1.0, 5.0, False),
        # ΔL 2 -> 1.8 = -10 %: |ΔL| = 10 > ζ = 5 (the sign does not matter)
        ({"query": [10.0, 10.05, 10.08]}, [2.0, 1.8, 1.79], 1.0, 5.0, False),
        # shrinking weights: 10 -> 9.8 = -2 %, |−2| > 1
        ({"query": [10.0, 9.8, 9.79]}, [2.0, 1.98, 1.97], 1.0, 5.0, False),
        # boundary: exactly τ (100 -> 101 = +1 %) and exactly ζ (100 -> 95 = -5 %) pass (the test is "> τ fails")
        ({"query": [100.0, 101.0]}, [100.0, 95.0], 1.0, 5.0, True),
        # two families, the second fails in the last window: 5 -> 5 -> 5.1 = +2 %
        ({"query": [10.0, 10.0, 10.0], "value": [5.0, 5.0, 5.1]}, [1.0, 1.0, 1.0], 1.0, 5.0, False),
        # k = 4, all within: 0.1 % steps on the norm, 1 % on the loss
        ({"query": [10.0, 10.01, 10.02, 10.03]}, [1.0, 0.99, 0.9801, 0.970299], 0.5, 1.5, True),
        # k = 4, the first pair fails (1.0 -> 0.95 = -5 % > 2.5), later ones pass: still False
        ({"query": [10.0, 10.0, 10.0, 10.0]}, [1.0, 0.95, 0.95, 0.95], 0.5, 2.5, False),
        # the paper's Exp3 thresholds (τ 0.25, ζ 1): 0.2 % and 0.9 % pass
        ({"mlp_in": [20.0, 20.04]}, [3.0, 2.973], 0.25, 1.0, True),
    ],
)
def test_partial_convergence_table(norms, losses, tau, zeta, expected):
    assert partial_convergence_test(norms, losses, tau, zeta) is expected


def test_nan_never_passes():
    assert partial_convergence_test({"query": [1.0, 1.0]}, [1.0, float("nan")], 1.0, 1.0) is False
    assert partial_convergence_test({"query": [1.0, float("nan")]}, [1.0, 1.0], 1.0, 1.0) is False


@pytest.mark.parametrize(
    "norms, losses, tau, zeta",
    [
        ({"query": [1.0, 1.0]}, [1.0, 1.0], 0.0, 1.0),  # τ must be > 0
        ({"query": [1.0, 1.0]}, [1.0, 1.0], 1.0, -1.0),  # ζ must be > 0
        ({"query": [1.0, 1.0, 1.0]}, [1.0, 1.0], 1.0, 1.0),  # lengths differ
        ({"query": [1.0]}, [1.0], 1.0, 1.0),  # one window is not a test
        ({}, [1.0, 1.0], 1.0, 1.0),  # no family
    ],
)
def test_partial_convergence_rejects_bad_input(norms, losses, tau, zeta):
    with pytest.raises(ValueError):
        partial_convergence_test(norms, losses, tau, zeta)


@pytest.mark.parametrize(
    "r_min, r_max, expected",
    [(8, 64, [8, 16, 32, 64]), (1, 1, [1]), (2, 16, [2, 4, 8, 16]), (16, 16, [16])],
)
def test_candidate_ranks(r_min, r_max, expected):
    assert candidate_ranks(r_min, r_max) == expected


@pytest.mark.parametrize("r_min, r_max", [(6, 64), (8, 48), (64, 8), (0, 8), (-8, 8)])
def test_candidate_ranks_rejects(r_min, r_max):
    with pytest.raises(ValueError):
        candidate_ranks(r_min, r_max)


@pytest.mark.parametrize(
    "changes, expected",
    [
        # R = [8, 16, 32, 64] (|R| = 4). min 0, max 1 -> v = change. i = ceil(4v) - 1 for v > 0, else 0:
        # v=0 -> 8; v=.25 -> ceil(1)-1 = 0 -> 8; v=.26 -> ceil(1.04)-1 = 1 -> 16; v=.5 -> 1 -> 16;
        # v=.51 -> 2 -> 32; v=.75 -> 2 -> 32; v=.76 -> 3 -> 64; v=1 -> 3 -> 64
        ([0.0, 0.25, 0.26, 0.5, 0.51, 0.75, 0.76, 1.0], [8, 8, 16, 16, 32, 32, 64, 64]),
        # min 0.2, max 1.0 (range 0.8): 0.2 -> v 0 -> 8; 0.4 -> .25 -> 8; 0.6 -> .5 -> 16; 0.8 -> .75 -> 32; 1.0 -> 64
        ([0.2, 0.4, 0.6, 0.8, 1.0], [8, 8, 16, 32, 64]),
        # absolute changes: -0.9 moves as much as +0.9. |.| = [0.1, 0.9, 0.5]: v = [0, 1, 0.5] -> 8, 64, 16
        ([0.1, -0.9, 0.5], [8, 64, 16]),
        # layer order kept: reversed input, reversed ranks
        ([1.0, 0.5, 0.0], [64, 16, 8]),
    ],
)
def test_assign_ranks_table(changes, expected):
    assert assign_ranks({"query": changes}, 8, 64) == {"query": expected}


def test_assign_ranks_per_family_normalisation():
    # each family is min-max scaled on its own: the same numbers get different ranks in different families
    ranks = assign_ranks({"query": [0.1, 0.2], "mlp_in": [0.2, 5.0]}, 8, 64)
    assert ranks == {"query": [8, 64], "mlp_in": [8, 64]}
    ranks = assign_ranks({"query": [0.0, 1.0, 2.0], "value": [0.0, 10.0, 11.0]}, 4, 16)
    # R = [4, 8, 16]; query v = [0, .5, 1] -> i = [0, ceil(1.5)-1 = 1, 2] -> [4, 8, 16]
    # value v = [0, .909, 1] -> i = [0, ceil(2.73)-1 = 2, 2] -> [4, 16, 16]
    assert ranks == {"query": [4, 8, 16], "value": [4, 16, 16]}


@pytest.mark.parametrize(
    "changes, tie_rank, expected",
    [
        ([0.3], "min", [8]),  # one layer: 0/0, the tie rank
        ([0.3, 0.3, 0.3], "min", [8, 8, 8]),  # all equal
        ([0.0, 0.0], "min", [8, 8]),  # all zero
        ([-0.3, 0.3], "max", [64, 64]),  # equal magnitudes
        ([0.3, 0.3], "middle", [32, 32]),  # R[len(R) // 2] = R[2] = 32
    ],
)
def test_assign_ranks_ties_no_nan(changes, tie_rank, expected):
    assert assign_ranks({"key": changes}, 8, 64, tie_rank=tie_rank) == {"key": expected}


def test_r_min_equals_r_max_gives_that_rank_everywhere():
    assert assign_ranks({"query": [0.0, 0.3, 9.0]}, 16, 16) == {"query": [16, 16, 16]}


def test_zero_rank_below_threshold():
    # below 0.05 % -> rank 0 (no adapter); the rest bucketed among themselves: [0.1, 0.5, 0.9] -> v [0, .5, 1] -> 8, 16, 64
    ranks = assign_ranks({"query": [0.01, 0.1, 0.02, 0.5, 0.9]}, 8, 64, zero_rank_below=0.05)
    assert ranks == {"query": [0, 8, 0, 16, 64]}
    assert assign_ranks({"query": [0.01, 0.02]}, 8, 64, zero_rank_below=0.05) == {"query": [0, 0]}


@pytest.mark.parametrize(
    "kwargs",
    [
        {"changes": {"query": [0.1]}, "r_min": 8, "r_max": 48},
        {"changes": {"query": [0.1]}, "r_min": 64, "r_max": 8},
        {"changes": {"query": [float("nan")]}, "r_min": 8, "r_max": 64},
        {"changes": {"query": []}, "r_min": 8, "r_max": 64},
        {"changes": {"query": [0.1]}, "r_min": 8, "r_max": 64, "tie_rank": "median"},
        {"changes": {"query": [0.1]}, "r_min": 8, "r_max": 64, "zero_rank_below": -1.0},
    ],
)
def test_assign_ranks_rejects(kwargs):
    with pytest.raises(ValueError):
        assign_ranks(**kwargs)


def test_percent_change_and_powers_of_two():
    assert percent_change(2.0, 2.5) == pytest.approx(25.0)
    assert percent_change(2.0, 1.5) == pytest.approx(-25.0)
    assert percent_change(0.0, 0.0) == 0.0
    assert percent_change(0.0, 1.0) == float("inf")
    assert [n for n in range(-2, 70) if is_power_of_two(n)] == [1, 2, 4, 8, 16, 32, 64]
    assert not is_power_of_two(True) and not is_power_of_two(8.0)


def _modules_after(code: str) -> set[str]:
    out = subprocess.run([sys.executable, "-c", f"{code}; import sys; print(' '.join(sys.modules))"], capture_output=True, text=True, check=True)
    return set(out.stdout.split())


def test_import_prelora_ray_imports_no_ray_peft_mlflow():
    mods = _modules_after("import prelora_ray")
    assert not {"ray", "peft", "mlflow"} & mods


def test_algorithms_import_neither_ray_nor_peft_nor_torch():
    mods = _modules_after("import prelora_ray.algorithms")
    assert not {"ray", "peft", "mlflow", "torch"} & mods


def test_trainer_imports_no_ray_no_mlflow():
    mods = _modules_after("import prelora_ray.trainer")
    assert not {"ray", "mlflow"} & mods
