"""ConvergenceMonitor on hand-made snapshots: boundaries, sliding windows, mean vs last, per-layer
changes between the last two windows, state round trip; and the norms it is fed (bias excluded,
LoRA delta included)."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn

from prelora_ray.algorithms import assign_ranks, partial_convergence_test
from prelora_ray.monitor import ConvergenceMonitor, effective_weight_norm, layer_norms


def feed(mon: ConvergenceMonitor, rows: list[tuple[list[float], float]], family: str = "query") -> None:
    for norms, loss in rows:
        mon.record({family: list(norms)}, loss)


# -- boundaries ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "k, m, units, boundaries",
    [
        # k·m = 6 units needed, then every m = 2 units: 6, 8, 10 (never 2 or 4: fewer than k windows)
        (3, 2, 11, [6, 8, 10]),
        # k·m = 6, every 3: 6, 9, 12
        (2, 3, 13, [6, 9, 12]),
        # m = 1: every unit from k·m = 4 on
        (4, 1, 7, [4, 5, 6, 7]),
        # k = 2, m = 1 (the fast test setting): from unit 2 on
        (2, 1, 4, [2, 3, 4]),
        # the paper's k = 3, m = 3: 9, 12, 15
        (3, 3, 16, [9, 12, 15]),
    ],
)
def test_boundaries_only_at_multiples_of_m_once_k_windows_exist(k, m, units, boundaries):
    mon = ConvergenceMonitor(k=k, m=m)
    assert not mon.at_boundary()  # nothing recorded
    seen = []
    for unit in range(1, units + 1):
        mon.record({"query": [1.0]}, 1.0)
        if mon.at_boundary():
            seen.append(unit)
    assert seen == boundaries
    assert mon.units == units


def test_passed_is_false_before_k_windows_even_with_flat_values():
    mon = ConvergenceMonitor(k=3, m=2)
    for _ in range(5):  # 5 < k·m = 6
        mon.record({"query": [1.0]}, 1.0)
        assert not mon.passed(100.0, 100.0)
    mon.record({"query": [1.0]}, 1.0)
    assert mon.passed(100.0, 100.0)


# -- windows ---------------------------------------------------------------------------------------

# seven units of one family with two layers; k = 2, m = 2 keeps the last k·m = 4 units (4..7)
SEVEN = [
    ([100.0, 100.0], 9.0),  # unit 1: dropped
    ([50.0, 50.0], 8.0),  # unit 2: dropped
    ([70.0, 70.0], 7.0),  # unit 3: dropped
    ([1.0, 10.0], 4.0),  # unit 4: window 1
    ([2.0, 20.0], 3.0),  # unit 5: window 1
    ([3.0, 30.0], 2.0),  # unit 6: window 2
    ([4.0, 40.0], 1.0),  # unit 7: window 2
]


def test_sliding_window_mean_over_the_last_k_m_units():
    mon = ConvergenceMonitor(k=2, m=2, window_stat="mean")
    feed(mon, SEVEN)
    assert len(mon.snapshots) == 4 and mon.units == 7
    per_layer, losses = mon.windows()
    # window 1 = units 4, 5: layer 0 (1+2)/2 = 1.5, layer 1 (10+20)/2 = 15, loss (4+3)/2 = 3.5
    # window 2 = units 6, 7: layer 0 (3+4)/2 = 3.5, layer 1 (30+40)/2 = 35, loss (2+1)/2 = 1.5
    assert per_layer == {"query": [[1.5, 15.0], [3.5, 35.0]]}
    assert losses == [3.5, 1.5]
    families, losses = mon.family_windows()
    # W_t = mean over the family's layers: (1.5+15)/2 = 8.25, (3.5+35)/2 = 19.25
    assert families == {"query": [8.25, 19.25]} and losses == [3.5, 1.5]


def test_sliding_window_last_takes_each_window_end():
    mon = ConvergenceMonitor(k=2, m=2, window_stat="last")
    feed(mon, SEVEN)
    per_layer, losses = mon.windows()
    # window 1 ends at unit 5: [2, 20], loss 3; window 2 ends at unit 7: [4, 40], loss 1
    assert per_layer == {"query": [[2.0, 20.0], [4.0, 40.0]]}
    assert losses == [3.0, 1.0]
    assert mon.family_windows() == ({"query": [11.0, 22.0]}, [3.0, 1.0])  # (2+20)/2, (4+40)/2


def test_mean_and_last_differ_and_change_the_decision():
    # k = 2, m = 2; window 1 = [10, 10], window 2 = [10, 12]. mean: W = 10 -> 11 = +10 %; last: 10 -> 12 = +20 %
    rows = [([10.0], 1.0), ([10.0], 1.0), ([10.0], 1.0), ([12.0], 1.0)]
    mean, last = ConvergenceMonitor(k=2, m=2, window_stat="mean"), ConvergenceMonitor(k=2, m=2, window_stat="last")
    feed(mean, rows)
    feed(last, rows)
    assert mean.family_windows()[0] == {"query": [10.0, 11.0]}
    assert last.family_windows()[0] == {"query": [10.0, 12.0]}
    assert mean.passed(15.0, 1.0) and not last.passed(15.0, 1.0)  # 10 <= 15 < 20
    assert mean.layer_changes() == {"query": [10.0]} and last.layer_changes() == {"query": [20.0]}


def test_windows_are_in_time_order_with_k_3():
    mon = ConvergenceMonitor(k=3, m=1)
    feed(mon, [([5.0], 5.0), ([6.0], 6.0), ([7.0], 7.0), ([8.0], 8.0)])  # unit 1 slides out
    assert mon.windows() == ({"query": [[6.0], [7.0], [8.0]]}, [6.0, 7.0, 8.0])


def test_several_families_and_losses_averaged_per_window():
    mon = ConvergenceMonitor(k=2, m=3)
    for q, v, loss in [(1, 2, 6.0), (2, 4, 3.0), (3, 6, 0.0), (4, 8, 1.0), (5, 10, 1.0), (6, 12, 1.0)]:
        mon.record({"query": [float(q)], "value": [float(v), float(2 * v)]}, loss)
    per_layer, losses = mon.windows()
    # query: (1+2+3)/3 = 2, (4+5+6)/3 = 5; value layer 0: (2+4+6)/3 = 4, (8+10+12)/3 = 10; layer 1 doubles
    assert per_layer == {"query": [[2.0], [5.0]], "value": [[4.0, 8.0], [10.0, 20.0]]}
    assert losses == [3.0, 1.0]  # (6+3+0)/3, (1+1+1)/3
    assert mon.family_windows()[0] == {"query": [2.0, 5.0], "value": [6.0, 15.0]}


def test_passed_is_algorithm_1_over_the_family_windows():
    mon = ConvergenceMonitor(k=3, m=2)
    rows = [
        ([10.0, 12.0], 2.0),
        ([10.2, 12.2], 1.9),
        ([10.3, 12.3], 1.85),
        ([10.35, 12.4], 1.8),
        ([10.4, 12.4], 1.78),
        ([10.4, 12.5], 1.77),
    ]
    feed(mon, rows)
    norms, losses = mon.family_windows()
    for tau, zeta in [(0.1, 0.1), (1.0, 5.0), (2.0, 10.0), (0.5, 5.0), (2.0, 1.0)]:
        assert mon.passed(tau, zeta) == partial_convergence_test(norms, losses, tau, zeta)
    # W: (10.1+12.1)/2 = 11.1, (10.325+12.35)/2 = 11.3375, (10.4+12.45)/2 = 11.425: +2.14 %, +0.77 %
    # L: 1.95, 1.825, 1.775: -6.41 %, -2.74 %
    assert mon.passed(2.5, 7.0) and not mon.passed(2.0, 7.0) and not mon.passed(2.5, 6.0)


# -- per-layer changes and ranks ------------------------------------------------------------------


def test_layer_changes_between_the_last_two_windows_only():
    mon = ConvergenceMonitor(k=3, m=1)
    # windows: [10, 4, 8], [20, 4, 8], [22, 3, 8]: the first pair (+100 % on layer 0) must not count
    feed(mon, [([10.0, 4.0, 8.0], 1.0), ([20.0, 4.0, 8.0], 1.0), ([22.0, 3.0, 8.0], 1.0)])
    # (22-20)/20 = +10 %, (3-4)/4 = -25 %, (8-8)/8 = 0 %
    assert mon.layer_changes() == {"query": pytest.approx([10.0, -25.0, 0.0])}
    # |changes| = [10, 25, 0]: R = [8, 16, 32, 64], v = .4, 1, 0 -> ceil(1.6)-1 = 1 -> 16, 64, 8
    assert mon.ranks(8, 64) == {"query": [16, 64, 8]}
    assert mon.ranks(8, 64) == assign_ranks(mon.layer_changes(), 8, 64)


def test_layer_changes_use_window_values_with_mean():
    mon = ConvergenceMonitor(k=2, m=2, window_stat="mean")
    feed(mon, SEVEN)
    # windows [1.5, 15] -> [3.5, 35]: (3.5-1.5)/1.5 = +133.3 %, (35-15)/15 = +133.3 %
    assert mon.layer_changes() == {"query": pytest.approx([200 / 1.5, 2000 / 15])}


def test_ranks_pass_the_options_through():
    mon = ConvergenceMonitor(k=2, m=1)
    feed(mon, [([10.0, 10.0, 10.0], 1.0), ([10.0, 11.0, 12.0], 1.0)])  # changes 0, 10, 20 %
    assert mon.ranks(8, 64) == {"query": [8, 16, 64]}  # v = 0, .5, 1
    assert mon.ranks(8, 64, zero_rank_below=5.0) == {"query": [0, 8, 64]}
    feed(mon, [([10.0, 11.0, 12.0], 1.0)])  # the last two windows are now equal: a tie
    assert mon.ranks(8, 64, tie_rank="max") == {"query": [64, 64, 64]}


# -- state -----------------------------------------------------------------------------------------


def test_state_dict_round_trip_resumes_exactly():
    rows = [([float(i), float(2 * i + 1)], 10.0 - i) for i in range(1, 10)]
    full = ConvergenceMonitor(k=3, m=2)
    feed(full, rows)
    part = ConvergenceMonitor(k=3, m=2)
    feed(part, rows[:5])
    state = part.state_dict()
    buf = io.BytesIO()
    torch.save(copy.deepcopy(state), buf)  # checkpoints go through torch.save
    buf.seek(0)
    resumed = ConvergenceMonitor(k=3, m=2)
    resumed.load_state_dict(torch.load(buf, weights_only=False))
    assert resumed.units == 5 and len(resumed.snapshots) == 5
    feed(resumed, rows[5:])
    assert resumed.units == full.units == 9
    assert resumed.at_boundary() == full.at_boundary()
    assert resumed.windows() == full.windows()
    assert resumed.layer_changes() == full.layer_changes()
    assert resumed.snapshots.maxlen == 6  # the window keeps sliding after a resume
    assert resumed.passed(50.0, 50.0) == full.passed(50.0, 50.0)


def test_state_dict_is_a_snapshot_not_a_view():
    mon = ConvergenceMonitor(k=2, m=1)
    feed(mon, [([1.0], 1.0)])
    state = mon.state_dict()
    feed(mon, [([2.0], 2.0), ([3.0], 3.0)])
    assert state["units"] == 1 and len(state["snapshots"]) == 1


# -- the norms fed to it ---------------------------------------------------------------------------


def test_effective_weight_norm_is_frobenius_of_the_weight_without_bias():
    torch.manual_seed(0)
    linear = nn.Linear(5, 3)
    with torch.no_grad():
        linear.bias.fill_(100.0)  # must not count
    expected = float(torch.sqrt((linear.weight.detach().double() ** 2).sum()))
    assert effective_weight_norm(linear) == pytest.approx(expected, rel=1e-6)


def test_layer_norms_include_the_lora_delta():
    from prelora_ray.adapters.lora import inject_lora
    from prelora_ray.adapters.model import merge_adapters
    from prelora_ray.config import ModelSettings
    from prelora_ray.models import build_model, family_module_names
    from prelora_ray.strategies.prelora import PreLoRASettings

    torch.manual_seed(0)
    model = build_model(ModelSettings(preset="vit-digits"), num_classes=10, image_size=8, num_channels=1)
    names = family_module_names(model, ["query", "mlp_out"])
    before = layer_norms(model, names)
    peft_model = inject_lora(model, {"query": [2, 4, 8, 2], "mlp_out": [4, 4, 4, 4]}, PreLoRASettings())
    assert layer_norms(peft_model, names) == before  # B = 0: nothing changed
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
    with_delta = layer_norms(peft_model, names)
    assert with_delta != before
    merged = layer_norms(merge_adapters(peft_model), names)  # W + s·B·A folded in
    for family in names:
        assert with_delta[family] == pytest.approx(merged[family], rel=1e-5)


def test_windows_before_k_windows_and_mismatched_checkpoint_are_clear_errors():
    import pytest as _pytest

    mon = ConvergenceMonitor(k=2, m=1)
    mon.record({"query": [1.0]}, 1.0)
    with _pytest.raises(ValueError, match="k\\*m = 2"):
        mon.layer_changes()
    other = ConvergenceMonitor(k=3, m=1)
    with _pytest.raises(ValueError, match="prelora.k=3"):
        other.load_state_dict(mon.state_dict())
