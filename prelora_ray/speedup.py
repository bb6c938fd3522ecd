"""The speed-up against full training, from calibration rounds to the run's number: plain arithmetic, no torch.

A calibration round (prelora_ray/calibration.py) times the run's own forward+backward (A) and a full-training one
(B) of the same model on the same batch, in the order A, B, B, A: its ratio is (B1 + B2) / (A1 + A2), and a drift
of the machine's speed that is linear over the round cancels. An epoch's `step_speedup` is the median of its
rounds' ratios, `step_speedup_lo` / `_hi` the lowest and highest; a FULL epoch is 1 by definition (it is full
training). The run's `speedup` weighs the epochs as time does: an epoch of ratio r takes 1/r of a full epoch, so
N epochs take sum(1/r_e) full epochs and

    speedup = N / sum_e (1 / r_e)

(a forked trial's N counts the trunk's full epochs before its fork, at 1). `speedup_lo` / `_hi` are the same
formula over every epoch's lowest / highest round: the run's speed-up if each epoch had run at its slowest / its
fastest measured round. A run that trains full throughout (the baseline) is 1, with [1, 1].
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from typing import Any

from prelora_ray import metrics as M

FULL_PHASE = "full"  # strategies.phases.FULL's name (not imported: this module stays torch- and registry-free)
KEYS = (M.STEP_SPEEDUP, M.STEP_SPEEDUP_LO, M.STEP_SPEEDUP_HI)
NAN = float("nan")


def round_ratio(own_a: float, full_a: float, full_b: float, own_b: float) -> float:
    """One round's ratio, its times in the order they were taken (own, full, full, own): full time / own time."""
    own = own_a + own_b
    return (full_a + full_b) / own if own > 0 else NAN


def epoch_speedup(ratios: Sequence[float]) -> dict[str, float]:
    """An epoch's step_speedup (median of its rounds' ratios) and its lowest and highest round."""
    if not ratios:
        return dict.fromkeys(KEYS, NAN)
    return {
        M.STEP_SPEEDUP: float(statistics.median(ratios)),
        M.STEP_SPEEDUP_LO: float(min(ratios)),
        M.STEP_SPEEDUP_HI: float(max(ratios)),
    }


def full_epoch() -> dict[str, float]:
    """A FULL epoch's: 1 by definition."""
    return dict.fromkeys(KEYS, 1.0)


def _epoch_values(record: dict[str, Any]) -> tuple[float, float, float]:
    """A record's (step_speedup, lo, hi); a FULL record written before calibration existed counts 1."""
    if record.get(M.PHASE) == FULL_PHASE:
        return 1.0, 1.0, 1.0
    return tuple(float(record.get(k, NAN)) for k in KEYS)  # type: ignore[return-value]


def _harmonic(values: list[float]) -> float:
    if not values or any(not math.isfinite(v) or v <= 0 for v in values):
        return NAN
    return len(values) / math.fsum(1.0 / v for v in values)


def run_speedup(history: Sequence[dict[str, Any]]) -> dict[str, float]:
    """The run's speedup, speedup_lo and speedup_hi over its per-epoch records (NaN where an epoch has none)."""
    values = [_epoch_values(record) for record in history]
    return {
        M.SPEEDUP: _harmonic([v[0] for v in values]),
        M.SPEEDUP_LO: _harmonic([v[1] for v in values]),
        M.SPEEDUP_HI: _harmonic([v[2] for v in values]),
    }
