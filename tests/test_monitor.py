"""ConvergenceMonitor: boundaries, sliding windows, mean vs last, per-layer changes, state round trip."""

from __future__ import annotations

import pytest

from prelora_ray.monitor import ConvergenceMonitor


def snap(q0: float, q1: float) -> dict[str, list[float]]:
    return {"query": [q0, q1]}


def test_boundaries_only_at_multiples_of_m_after_k_windows():
    mon = ConvergenceMonitor(k=3, m=2)
    seen = []
    for unit in range(1, 11):
        mon.record(snap(1, 1), 1.0)
        seen.append(mon.at_boundary())
    # k·m = 6 units needed; then every m = 2: units 6, 8, 10
    assert [u for u, b in zip(range(1, 11), seen) if b] == [6, 8, 10]


def test_windows_slide_over_the_last_k_m_units_mean_and_last():
    mean = ConvergenceMonitor(k=2, m=2, window_stat="mean")
    last = ConvergenceMonitor(k=2, m=2, window_stat="last")
    for i, (q, loss) in enumerate([(100, 9.0), (1, 4.0), (2, 3.0), (3, 2.0), (4, 1.0)]):
        for mon in (mean, last):
            mon.record(snap(q, 10 * q), loss)
    # last 4 units: (1,4),(2,3) | (3,2),(4,1)
    per_layer, losses = mean.windows()
    assert losses == [3.5, 1.5] and per_layer["query"] == [[1.5, 15.0], [3.5, 35.0]]
    assert mean.family_windows()[0]["query"] == [8.25, 19.25]  # mean over the 2 layers
    per_layer, losses = last.windows()
    assert losses == [3.0, 1.0] and per_layer["query"] == [[2, 20], [4, 40]]


def test_layer_changes_between_last_two_windows():
    mon = ConvergenceMonitor(k=2, m=1)
    mon.record({"query": [10.0, 4.0]}, 1.0)
    mon.record({"query": [11.0, 3.0]}, 1.0)
    assert mon.layer_changes()["query"] == pytest.approx([10.0, -25.0])
    assert mon.ranks(8, 64) == {"query": [8, 64]}  # |10| < |−25|


def test_passed_needs_k_windows_and_thresholds():
    mon = ConvergenceMonitor(k=2, m=1)
    mon.record(snap(10, 10), 1.0)
    assert not mon.passed(1.0, 1.0)  # one window only
    mon.record(snap(10.05, 10.05), 0.995)
    assert mon.passed(1.0, 1.0)
    assert not mon.passed(0.1, 1.0)


def test_state_round_trip():
    mon = ConvergenceMonitor(k=2, m=2)
    for i in range(5):
        mon.record(snap(i, i), float(i))
    copy = ConvergenceMonitor(k=2, m=2)
    copy.load_state_dict(mon.state_dict())
    assert copy.windows() == mon.windows() and copy.units == 5 and copy.at_boundary() == mon.at_boundary()
