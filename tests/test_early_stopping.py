"""The rung rules of `early_stopping:` (prelora_ray/early_stopping.py), without Ray: parsing and its one-line errors,
non-dominated sorting, and `decide` on hand-made rows (a diverging trial, a trial within noise, too few trials, the
worst fraction, rows at different epochs, the trunk as a rival, a missing speed-up interval)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import binomtest

from prelora_ray.early_stopping import (
    TRUNK,
    EarlyStopping,
    RungRow,
    decide,
    judgeable,
    lora_start,
    nondominated_ranks,
    parse_early_stopping,
)
from prelora_ray.search_space import parse_search_space

N = 360


def hits(correct: int, *, first: int = 0, n: int = N) -> np.ndarray:
    """`correct` images right, starting at image `first` (wrapping): overlapping patterns give paired differences."""
    out = np.zeros(n, dtype=bool)
    out[(first + np.arange(correct)) % n] = True
    return out


def row(name: str, correct: int, speed: float = 1.3, *, epoch: int = 10, width: float = 0.02, first: int = 0):
    h = hits(correct, first=first)
    return RungRow(name, epoch, float(h.mean()), h, (speed, speed - width, speed + width))


def no_trunk(epoch: int):
    return None


RULES = EarlyStopping(rungs=(2, 4), reduction_factor=3.0, grace_epochs=1, min_trials=3)


# -- parsing -----------------------------------------------------------------------------------------------
def test_absent_is_off_and_defaults_fill_a_minimal_section():
    assert parse_early_stopping(None) is None
    rules = parse_early_stopping({"type": "mo-asha"})
    assert rules == EarlyStopping()
    assert rules.rungs == (1, 2, 4, 8) and rules.reduction_factor == 3.0 and rules.min_trials == 1
    assert rules.grace_epochs == 0 and rules.speed_margin == 0.05
    rules = parse_early_stopping(
        {"type": "mo-asha", "rungs": [1, 3], "rungs_from": "start", "reduction_factor": 2, "grace_epochs": 0}
    )
    assert rules.rungs == (1, 3) and rules.rungs_from == "start" and rules.reduction_factor == 2.0


@pytest.mark.parametrize(
    "section, key",
    [
        ({"type": "asha"}, "early_stopping.type"),
        ({}, "early_stopping.type"),
        ({"type": "mo-asha", "reduction_factor": 1}, "early_stopping.reduction_factor"),
        ({"type": "mo-asha", "reduction_factor": 0.5}, "early_stopping.reduction_factor"),
        ({"type": "mo-asha", "reduction_factor": True}, "early_stopping.reduction_factor"),
        ({"type": "mo-asha", "rungs": [4, 2]}, "early_stopping.rungs"),
        ({"type": "mo-asha", "rungs": [2, 2]}, "early_stopping.rungs"),
        ({"type": "mo-asha", "rungs": []}, "early_stopping.rungs"),
        ({"type": "mo-asha", "rungs": [0, 2]}, "early_stopping.rungs"),
        ({"type": "mo-asha", "rungs": "2,4"}, "early_stopping.rungs"),
        ({"type": "mo-asha", "grace_epochs": -1}, "early_stopping.grace_epochs"),
        ({"type": "mo-asha", "grace_epochs": 1.5}, "early_stopping.grace_epochs"),
        ({"type": "mo-asha", "min_trials": 0}, "early_stopping.min_trials"),
        ({"type": "mo-asha", "rungs_from": "switch"}, "early_stopping.rungs_from"),
        ({"type": "mo-asha", "patience": 3}, "early_stopping.patience"),
        ({"type": "mo-asha", "speed_margin": -0.1}, "early_stopping.speed_margin"),
        ({"type": "mo-asha", "speed_margin": 1.0}, "early_stopping.speed_margin"),
        ("mo-asha", "early_stopping"),
    ],
)
def test_bad_sections_are_one_line_errors_naming_the_key(section, key):
    with pytest.raises(ValueError) as err:
        parse_early_stopping(section)
    message = str(err.value)
    assert message.startswith(f"{key}:") and "\n" not in message


def space(**top):
    data = {
        "base": {"epochs": 6, "model": {"preset": "vit-digits"}},
        "parameters": {"prelora.tau": {"type": "uniform", "low": 1.0, "high": 2.0}},
        **top,
    }
    return parse_search_space(data, path="s.yaml")


def test_a_search_space_carries_the_section_and_names_its_keys_in_errors():
    assert space().early_stopping is None
    assert space(early_stopping={"type": "mo-asha", "rungs": [1, 2]}).early_stopping.rungs == (1, 2)
    with pytest.raises(ValueError, match=r"^s\.yaml: early_stopping\.reduction_factor: must be a number > 1"):
        space(early_stopping={"type": "mo-asha", "reduction_factor": 1})
    with pytest.raises(ValueError, match=r"^s\.yaml: early_stopping: needs fork mode"):
        space(early_stopping={"type": "mo-asha"}, fork=False)


# -- where the rungs are and when a trial may be judged -------------------------------------------------------
def test_rungs_count_epochs_after_the_fork_or_from_the_start():
    assert EarlyStopping(rungs=(2, 4)).rung_epochs(10) == [11, 13]  # the 2nd and 4th epochs it trained itself
    assert EarlyStopping(rungs=(2, 4)).rung_epochs(-1) == [1, 3]  # not a fork: from the start
    assert EarlyStopping(rungs=(12, 20), rungs_from="start").rung_epochs(10) == [11, 19]


def test_a_trial_is_judged_only_in_its_adapted_phase_after_the_grace_epochs():
    # PreLoRA switched at 9, warmup 2: base frozen at the end of epoch 11, LoRA alone from epoch 12
    report = {"epoch": 12, "phase": "lora", "freeze_epoch": 11, "forked_from": 10}
    assert lora_start(report) == 12
    assert judgeable(report, 0) and not judgeable(report, 1)
    assert judgeable({**report, "epoch": 13}, 1)
    assert not judgeable({"epoch": 11, "phase": "warmup", "freeze_epoch": -1, "forked_from": 10}, 0)
    assert not judgeable({"epoch": 3, "phase": "full", "freeze_epoch": -1, "forked_from": -1}, 0)
    # a strategy with no freeze (LTE): its own epochs after the fork
    assert lora_start({"epoch": 6, "phase": "lte", "freeze_epoch": -1, "forked_from": 4}) == 4


# -- non-dominated sorting --------------------------------------------------------------------------------
def test_nondominated_ranks_peel_fronts_and_keep_ties_and_missing_values_on_the_first():
    points = [[0.9, 1.0], [0.8, 1.2], [0.85, 0.9], [0.7, 0.8], [0.9, 1.0], [math.nan, 2.0]]
    assert nondominated_ranks(points) == [0, 0, 1, 2, 0, 0]
    assert nondominated_ranks([]) == []


# -- decide -----------------------------------------------------------------------------------------------
def test_a_diverging_trial_is_stopped_by_a_good_trial_of_the_same_speed():
    good = [row("a", 340), row("b", 338, first=3)]
    bad = row("bad", 40, first=100)
    decision = decide(bad, good, no_trunk, RULES)
    assert decision.stop and decision.dominated_by in ("a", "b") and decision.rank == 2 and decision.rows == 3


def test_a_trial_a_few_images_behind_is_never_stopped_even_when_ranked_last():
    good = [row("a", 340), row("b", 339, first=1)]
    unlucky = row("unlucky", 336, first=5)  # 4 images fewer than the best: within noise
    assert binomtest(4, 4, 0.5).pvalue > 0.05 / 2
    decision = decide(unlucky, good, no_trunk, RULES)
    assert decision.rank == 2 and not decision.stop and "within noise" in decision.why


def test_too_few_trials_at_the_rung_stop_nothing():
    decision = decide(row("bad", 40, first=100), [row("a", 340)], no_trunk, RULES)
    assert not decision.stop and decision.rows == 2 and "min_trials" in decision.why


def test_the_first_trial_at_a_rung_is_judged_against_the_trunk():
    trunk = {10: hits(340)}
    first = EarlyStopping()  # min_trials 1: the trunk is the reference from the first trial on
    bad = row("bad", 200, 0.95, first=7)  # far behind full training at the same epoch, and no faster
    decision = decide(bad, [], trunk.get, first)
    assert decision.stop and decision.dominated_by == TRUNK and decision.rows == 2
    fast = row("fast", 200, 1.5, first=7)  # as far behind, but surely faster than full training: a trade-off
    assert not decide(fast, [], trunk.get, first).stop
    close = row("close", 336, 0.95, first=2)  # a few images behind full training: noise
    assert not decide(close, [], trunk.get, first).stop
    assert not decide(bad, [], no_trunk, first).stop  # no trunk record at its epoch: no reference, no stop


def test_only_the_worst_fraction_by_rank_can_be_stopped():
    rows = [row("a", 340), row("b", 338, first=3)]
    bad = row("bad", 40, first=100)
    lenient = EarlyStopping(reduction_factor=1.2, min_trials=3)  # keeps ceil(3 / 1.2) = 3: everyone
    assert not decide(bad, rows, no_trunk, lenient).stop
    assert decide(bad, rows, no_trunk, EarlyStopping(reduction_factor=1.5, min_trials=3)).stop  # keeps 2


def test_a_faster_trial_is_not_stopped_by_a_more_accurate_slower_one():
    rows = [row("slow", 345, 1.1), row("slow2", 344, 1.1, first=2)]
    fast = row("fast", 300, 1.6, first=50)  # far less accurate, but certainly faster: a trade-off, on the front
    decision = decide(fast, rows, no_trunk, RULES)
    assert decision.rank == 0 and not decision.stop


def test_speed_alone_never_stops_a_trial_and_a_rival_is_slower_only_beyond_the_margin():
    # as measured in a sweep of one model with three LoRA learning rates: disjoint speed-up intervals 1% apart
    a = RungRow("a", 5, 0.70, hits(252), (1.001, 1.0, 1.003))
    c = RungRow("c", 5, 0.70, hits(252, first=2), (0.988, 0.985, 0.991))
    slow = RungRow("slow", 5, 0.70, hits(252, first=1), (0.80, 0.79, 0.81))  # as accurate, surely slower
    rules = EarlyStopping(reduction_factor=2, min_trials=2)
    decision = decide(slow, [a, c], no_trunk, rules)
    assert decision.rank == 2 and not decision.stop  # last by rank, dominated by both on speed: not stopped
    # far less accurate than a rival 1% slower (d), and only a few images behind the one that is faster (p): the
    # margin keeps d's speed from counting as worse, so d dominates it
    bad = RungRow("bad", 5, 0.30, hits(108, first=40), (0.995, 0.994, 0.996))
    p = RungRow("p", 5, 0.31, hits(112, first=40), (0.996, 0.995, 0.997))
    d = RungRow("d", 5, 0.71, hits(256), (0.985, 0.983, 0.987))
    decision = decide(bad, [p, d], no_trunk, rules)
    assert decision.stop and decision.dominated_by == "d"
    strict = EarlyStopping(reduction_factor=2, min_trials=2, speed_margin=0)
    assert not decide(bad, [p, d], no_trunk, strict).stop


def test_the_accuracy_tests_are_bonferroni_corrected_over_the_rivals():
    # 9 discordant images, all for the rival: p = 2 / 2**9 = 0.0039 < 0.05, but > 0.05 / 20 with 20 rivals
    rival = row("r", 340)
    candidate = row("c", 331)
    assert binomtest(9, 9, 0.5).pvalue < 0.05
    assert decide(candidate, [rival, row("r2", 340)], no_trunk, EarlyStopping(min_trials=3)).stop
    crowd = [row(f"r{i}", 340) for i in range(20)]
    assert binomtest(9, 9, 0.5).pvalue > 0.05 / 20
    assert not decide(candidate, crowd, no_trunk, EarlyStopping(min_trials=3)).stop


def test_rows_at_different_epochs_are_compared_through_their_gaps_to_the_trunk():
    trunk = {10: hits(340), 12: hits(345)}
    a = row("a", 338, epoch=10)  # 2 images behind the trunk at its epoch
    b = row("b", 344, epoch=12, first=1)
    bad = row("bad", 200, epoch=12, first=7)  # 145 behind the trunk at epoch 12
    decision = decide(bad, [a, b], trunk.get, RULES)
    assert decision.stop and decision.dominated_by in ("a", "b")
    # without the trunk's records, rows at other epochs decide nothing: only b (same epoch) may dominate
    decision = decide(row("bad", 200, epoch=11, first=7), [a, b], no_trunk, RULES)
    assert not decision.stop


def test_a_few_images_either_side_of_the_trunk_at_other_epochs_decide_nothing():
    # each trunk record 340 right; `ahead` gets 3 more than the trunk at its epoch, `behind` 3 fewer at its own: their
    # gaps' intervals (conditional on 3 discordant images each) are disjoint, but 6 images between two classifiers
    # on the same 360 is noise
    trunk = {10: hits(340), 12: hits(340)}
    ahead = row("ahead", 343, epoch=12)
    behind = row("behind", 337, epoch=10)
    other = row("other", 341, epoch=12, first=1)
    assert not decide(behind, [ahead, other], trunk.get, RULES).stop


def test_the_trunk_dominates_a_trial_no_faster_than_full_training_and_worse():
    trunk = {10: hits(345)}
    rows = [row("a", 340, 1.0), row("b", 341, 1.0, first=2)]
    slow_bad = row("c", 250, 1.0, first=9)
    decision = decide(slow_bad, rows, trunk.get, RULES)
    assert decision.stop
    fast_bad = row("d", 250, 1.5, first=9)  # faster than full training: the trunk cannot dominate it
    decision = decide(fast_bad, [row("a", 340, 1.0), row("b", 341, 1.0, first=2)], trunk.get, RULES)
    assert not decision.stop and decision.dominated_by is None
    assert TRUNK == "trunk"


def test_a_speedup_without_an_interval_decides_nothing():
    good = [row("a", 340), row("b", 338, first=3)]
    bad = row("bad", 40, first=100)
    bad.speedup = (1.3, math.nan, math.nan)  # a trial that logged no calibration interval
    assert decide(bad, good, no_trunk, RULES).stop  # accuracy better, speed not worse (unknown): still dominated
    fast = row("fast", 300, 2.0, first=50)
    fast.speedup = (2.0, math.nan, math.nan)
    decision = decide(fast, good, no_trunk, RULES)
    # less accurate and with no interval to show it faster: dominated with confidence, but on the front by its point
    # values (rank 0), so it is not in the worst fraction: both are needed for a stop
    assert decision.rank == 0 and not decision.stop


def test_rows_round_trip_through_the_record():
    r = row("a", 300, first=4)
    back = RungRow.from_dict(r.as_dict())
    assert back.trial == "a" and back.epoch == r.epoch and back.acc == r.acc and back.speedup == r.speedup
    assert (back.hits == r.hits).all()
