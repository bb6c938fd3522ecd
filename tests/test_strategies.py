"""The strategy registry and the checkpoint layout it implies (no Ray, no training)."""

from __future__ import annotations

import pytest

from prelora_ray.config import STRATEGIES, TrainSettings
from prelora_ray.strategies import REGISTRY, build
from prelora_ray.strategies.base import Strategy
from prelora_ray.trainer import LoopState, _split_legacy


def test_registry_names_are_the_configs_strategies_and_each_section_exists():
    assert sorted(REGISTRY) == sorted(STRATEGIES)
    cfg = TrainSettings()
    for name, cls in REGISTRY.items():
        assert cls.name == name and issubclass(cls, Strategy)
        assert cls.section is None or hasattr(cfg, cls.section), name
        assert type(build(cfg.replace(strategy=name))) is cls


def test_loop_state_holds_no_strategy_fields():
    assert set(LoopState.__dataclass_fields__) == {"epoch", "step", "phase", "history", "resumed_at", "forked_from"}


def test_prelora_state_round_trips_and_a_checkpoint_from_before_strategies_still_loads():
    strategy = build(TrainSettings.load(None, ["prelora.k=2", "prelora.m=1"]))
    strategy.monitor.record({"query": [1.0, 2.0]}, 0.5)
    strategy.state.switch_epoch, strategy.state.ranks = 4, {"query": [2, 4]}
    saved = strategy.state_dict()
    other = build(TrainSettings.load(None, ["prelora.k=2", "prelora.m=1"]))
    other.load_state_dict(saved)
    assert other.state_dict() == saved
    # the layout of main at 2a433b9: the switch's fields in "loop", the windows in "monitor"
    old = {
        "loop": {
            "epoch": 5,
            "step": 40,
            "phase": "warmup",
            "switch_epoch": 4,
            "freeze_epoch": -1,
            "ranks": {"query": [2, 4]},
            "history": [],
            "decisions": [],
            "resumed_at": [],
            "forked_from": -1,
        },
        "monitor": saved["monitor"],
    }
    loop, state = _split_legacy(old)
    assert set(loop) == set(LoopState.__dataclass_fields__)
    other.load_state_dict(state)
    assert other.state_dict() == saved


def test_a_strategy_not_in_the_registry_is_a_one_line_error():
    with pytest.raises(ValueError, match="strategy='relora'"):
        TrainSettings.load(None, ["strategy=relora"])
