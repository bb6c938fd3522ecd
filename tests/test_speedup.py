"""The speed-up against full training that each run measures on its own device (prelora_ray/calibration.py,
prelora_ray/speedup.py): its arithmetic, and real loops on the tiny ViT timed on a work clock (the floating-point
operations torch's FlopCounterMode has counted so far), which a test can slow down mid-run without timing anything.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from prelora_ray import metrics as M
from prelora_ray import speedup
from prelora_ray.calibration import round_steps
from prelora_ray.config import TrainSettings
from prelora_ray.runtime import LocalRuntime
from prelora_ray.trainer import TrainingLoop
from tests.builders import LOOP_BASE

pytestmark = pytest.mark.usefixtures("one_thread")

# 6 epochs of 2 steps: FULL 0-1, the switch at the end of epoch 1, WARMUP 2, LORA 3-5
RUN = [*LOOP_BASE, "epochs=6", "data.synthetic_samples=64", "prelora.switch_at_epoch=1", "prelora.warmup=1"]
CALIBRATION = (M.STEP_SPEEDUP, M.STEP_SPEEDUP_LO, M.STEP_SPEEDUP_HI, M.CALIBRATION_TIME_S)
TIMING = (M.EPOCH_TIME_S, M.THROUGHPUT, M.PEAK_MEM_MB, "wall_time", *CALIBRATION)


class WorkClock:
    """Time = floating-point operations done so far (FlopCounterMode's count), at `rate` per operation from
    `slow_at` operations on: a machine that becomes `rate` times slower there."""

    def __init__(self, counter: FlopCounterMode, *, slow_at: float = math.inf, rate: float = 2.0) -> None:
        self.counter, self.slow_at, self.rate = counter, slow_at, rate

    def __call__(self) -> float:
        done = self.counter.get_total_flops()
        return min(done, self.slow_at) + self.rate * max(0.0, done - self.slow_at)


def run(extra: tuple[str, ...] = (), *, slow_at: float | None = None) -> tuple[TrainingLoop, float]:
    """A run of RUN (+ `extra`) on the work clock, slowed from `slow_at` operations on (None: on the loop's own
    clocks, no counting); returns the loop and the operations counted."""
    cfg = TrainSettings.load(None, [*RUN, *extra])
    if slow_at is None:
        loop = TrainingLoop(cfg, LocalRuntime())
        loop.run()
        return loop, math.nan
    counter = FlopCounterMode(display=False)
    with counter:
        loop = TrainingLoop(cfg, LocalRuntime(), clock=WorkClock(counter, slow_at=slow_at))
        loop.run()
    return loop, counter.get_total_flops()


def epoch_times(loop: TrainingLoop, phase: str) -> list[float]:
    return [h[M.EPOCH_TIME_S] for h in loop.state.history if h[M.PHASE] == phase]


# -- the arithmetic ------------------------------------------------------------------------------------------------


def test_a_round_cancels_a_slowdown_that_grows_linearly_over_it():
    own, full = 2.0, 3.0
    slow = [1.0, 1.1, 1.2, 1.3]  # the machine's slowness at each of the round's four steps: own, full, full, own
    assert speedup.round_ratio(own * slow[0], full * slow[1], full * slow[2], own * slow[3]) == pytest.approx(1.5)
    assert math.isnan(speedup.round_ratio(0.0, 1.0, 1.0, 0.0))


def test_an_epoch_is_the_median_of_its_rounds_with_their_range():
    assert speedup.epoch_speedup([1.2, 1.6, 1.3]) == {
        M.STEP_SPEEDUP: 1.3,
        M.STEP_SPEEDUP_LO: 1.2,
        M.STEP_SPEEDUP_HI: 1.6,
    }
    assert all(math.isnan(v) for v in speedup.epoch_speedup([]).values())


def test_the_run_weighs_epochs_as_time_does_full_epochs_at_1():
    full = {M.PHASE: "full", **speedup.full_epoch()}
    lora = {M.PHASE: "lora", M.STEP_SPEEDUP: 2.0, M.STEP_SPEEDUP_LO: 1.0, M.STEP_SPEEDUP_HI: 4.0}
    out = speedup.run_speedup([full, full, lora, lora])
    assert out == {M.SPEEDUP: 4 / 3, M.SPEEDUP_LO: 1.0, M.SPEEDUP_HI: 4 / 2.5}
    # full training throughout is 1 exactly, also from records written before calibration (a FULL one counts 1)
    assert speedup.run_speedup([full, {M.PHASE: "full"}] * 20) == {M.SPEEDUP: 1.0, M.SPEEDUP_LO: 1.0, M.SPEEDUP_HI: 1.0}
    # a later phase without a measurement (calibration off, or an old record) leaves it unknown
    assert all(math.isnan(v) for v in speedup.run_speedup([full, {M.PHASE: "lora"}]).values())
    assert all(math.isnan(v) for v in speedup.run_speedup([]).values())


def test_rounds_spread_over_the_epoch():
    assert round_steps(8, 2) == {2: 1, 6: 1}
    assert round_steps(8, 1) == {4: 1}
    assert round_steps(2, 3) == {0: 1, 1: 2}  # more rounds than steps: several before one step
    assert round_steps(8, 0) == {} and round_steps(0, 2) == {}


# -- real loops -----------------------------------------------------------------------------------------------------


def test_calibration_times_the_runs_own_steps_and_full_trainings_and_a_slowdown_moves_only_the_wall_ratio():
    quiet, work = run(slow_at=math.inf)
    history = quiet.state.history
    assert [h[M.PHASE] for h in history] == ["full", "full", "warmup", "lora", "lora", "lora"]
    for h in history:
        if h[M.PHASE] == "full":  # 1 by definition, never measured
            assert [h[k] for k in CALIBRATION] == [1.0, 1.0, 1.0, 0.0]
        else:  # two rounds, the same work each: no spread; on a work clock, a step's work over a full one's
            assert h[M.STEP_SPEEDUP_LO] == h[M.STEP_SPEEDUP] == h[M.STEP_SPEEDUP_HI] and h[M.CALIBRATION_TIME_S] > 0
            full_epoch = epoch_times(quiet, "full")[0]
            assert h[M.STEP_SPEEDUP] == pytest.approx(full_epoch / h[M.EPOCH_TIME_S], rel=1e-9)
    warmup, lora = history[2][M.STEP_SPEEDUP], history[3][M.STEP_SPEEDUP]
    assert warmup < 1 < lora  # base and adapters together cost more than full training; the adapters alone less
    summary = quiet.summary()
    assert summary[M.SPEEDUP] == pytest.approx(6 / (2 + 1 / warmup + 3 / lora), rel=1e-12)
    assert summary[M.SPEEDUP_LO] == summary[M.SPEEDUP] == summary[M.SPEEDUP_HI]

    # the same run on a machine twice as slow from halfway through its work on (inside an epoch, maybe a round)
    slowed, _ = run(slow_at=work / 2)
    wall = {
        name: sum(epoch_times(loop, "full")) / 2 / (sum(epoch_times(loop, "lora")) / 3)
        for name, loop in (("quiet", quiet), ("slowed", slowed))
    }
    assert wall["slowed"] < 0.6 * wall["quiet"]  # today's wall-clock ratio moves a lot...
    assert slowed.summary()[M.SPEEDUP] == pytest.approx(summary[M.SPEEDUP], rel=0.10)  # ... the speed-up does not

    # calibration changes nothing the run computes: the same run without it (and on the wall clock) is ==
    off, _ = run(("calibration.rounds=0",))
    strip = [{k: v for k, v in h.items() if k not in TIMING} for h in off.state.history]
    assert strip == [{k: v for k, v in h.items() if k not in TIMING} for h in history]
    for (name, a), (_, b) in zip(quiet.model.state_dict().items(), off.model.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    assert all(math.isnan(off.summary()[k]) for k in (M.SPEEDUP, M.SPEEDUP_LO, M.SPEEDUP_HI))


def test_every_measures_a_phases_first_epoch_and_repeats_it_between():
    loop, _ = run(("calibration.every=2",))
    measured = [h[M.CALIBRATION_TIME_S] > 0 for h in loop.state.history]
    assert measured == [False, False, True, True, False, True]  # FULL never; WARMUP's first; LORA's 1st and 3rd
    assert loop.state.history[4][M.STEP_SPEEDUP] == loop.state.history[3][M.STEP_SPEEDUP]


def test_full_training_is_1_exactly():
    loop = TrainingLoop(TrainSettings.load(None, [*LOOP_BASE, "strategy=full", "epochs=2"]), LocalRuntime())
    summary = loop.run()
    assert (summary[M.SPEEDUP], summary[M.SPEEDUP_LO], summary[M.SPEEDUP_HI]) == (1.0, 1.0, 1.0)
    assert all(h[M.STEP_SPEEDUP] == 1.0 and h[M.CALIBRATION_TIME_S] == 0.0 for h in loop.state.history)
