"""The strategy registry (the shipped four, registering and refusing a strategy, entry points, phases) and the
checkpoint layout it implies (no Ray, no training)."""

from __future__ import annotations

import dataclasses
import pickle

import pytest

from prelora_ray import config
from prelora_ray.config import TrainSettings, strategy_help, strategy_names, valid_keys
from prelora_ray.fields import setting
from prelora_ray.strategies import FULL, REGISTRY, Phase, build, register_strategy, unregister_strategy
from prelora_ray.strategies.base import Strategy
from prelora_ray.strategies.phases import train_all
from prelora_ray.trainer import LoopState, _split_legacy


def test_registry_names_are_the_configs_strategies_and_each_section_exists():
    assert sorted(REGISTRY) == sorted(strategy_names())
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


# -- registering a strategy: its declaration is checked first ----------------------------------------


def _declared(**attrs) -> type[Strategy]:
    """A Strategy subclass named `attrs['name']` (default `toy`) with the given declaration."""
    return type("Toy", (Strategy,), {"name": "toy", "description": "a toy", **attrs})


@dataclasses.dataclass(kw_only=True)
class _Documented:
    """A section whose one field has its doc."""

    x: int = setting(1, "A number.")


@dataclasses.dataclass(kw_only=True)
class _Undocumented:
    """A section whose field has no doc."""

    x: int = 1


@pytest.mark.parametrize(
    "attrs, message",
    [
        (dict(name="prelora"), "strategy 'prelora' is registered already"),
        (dict(name="not a name"), "name='not a name' is invalid"),
        (dict(section="model", section_class=_Documented), "section='model' is invalid"),
        (dict(section="prelora", section_class=_Documented), "section 'prelora' belongs to strategy 'prelora'"),
        (dict(section="toy"), "section and section_class go together"),
        (dict(section="toy", section_class=_Undocumented), "settings fields without a doc .*: x"),
        (dict(phases=()), "FULL among them"),
        (dict(phases=(FULL, Phase.declare("mine", 2, trains=train_all))), "stored number 2 is phase 'lora'"),
        (dict(phases=(FULL, Phase.declare("lora", 77, trains=train_all))), "phase 'lora' is declared already"),
        (dict(metrics={"toy_count": "zero"}), "metric name -> its number"),
    ],
)
def test_a_bad_declaration_is_refused_naming_what_is_wrong(attrs, message):
    with pytest.raises(ValueError, match=message):
        register_strategy(_declared(**attrs))
    assert "toy" not in REGISTRY


def test_a_class_that_is_no_strategy_is_refused_and_unregistering_an_unknown_name_too():
    with pytest.raises(ValueError, match="not a subclass of prelora_ray.strategies.Strategy"):
        register_strategy(type("Toy", (), {"name": "toy"}))
    with pytest.raises(ValueError, match="strategy='toy' is not registered"):
        unregister_strategy("toy")


def test_a_registered_strategy_is_a_config_value_with_its_section_until_it_leaves():
    toy = _declared(section="toy", section_class=_Documented, section_doc="The toy's.")
    assert register_strategy(toy) is toy and register_strategy(toy) is toy  # again: nothing happens
    try:
        cfg = TrainSettings.load(None, ["strategy=toy", "toy.x=3"])
        assert cfg.toy.x == 3 and cfg.strategy_class() is toy and "toy (a toy)" in strategy_help()
        assert cfg.to_dict()["toy"] == {"x": 3} and TrainSettings.from_dict(cfg.to_dict()) == cfg
        assert config.strategy_names()[-1] == "toy" and config.sections()["toy"] == (_Documented, "The toy's.")
    finally:
        unregister_strategy("toy")
    assert "toy" not in config.strategy_names() and "toy.x" not in valid_keys()
    with pytest.raises(ValueError, match="unknown config key 'toy.x'"):
        TrainSettings.load(None, ["toy.x=3"])


def test_strategy_sections_must_be_registered_ones():
    with pytest.raises(ValueError, match="strategy_sections=\\['nope'\\] is invalid"):
        TrainSettings(strategy_sections={"nope": _Documented()})
    with pytest.raises(ValueError, match="prelora=.* is invalid: a PreLoRASettings"):
        TrainSettings(strategy_sections={"prelora": _Documented()})
    with pytest.raises(ValueError, match="unknown config key 'strategy_sections'"):
        TrainSettings.from_dict({"strategy_sections": {}})


def test_phases_are_the_registered_strategies_and_keep_their_stored_numbers():
    assert [(p.value, p.index) for p in Phase] == [("full", 0), ("warmup", 1), ("lora", 2), ("relora", 3), ("lte", 4)]
    assert Phase("lora") is Phase.LORA and pickle.loads(pickle.dumps(Phase.RELORA)) is Phase.RELORA
    with pytest.raises(ValueError, match="phase 'nope' is unknown"):
        Phase("nope")
    with pytest.raises(AttributeError, match="no registered phase 'nope'"):
        Phase.NOPE  # noqa: B018


def test_an_entry_point_that_fails_to_load_is_a_one_line_error(monkeypatch):
    from prelora_ray.strategies import registry

    class Broken:
        name, value = "broken", "nowhere:Nothing"

        def load(self):
            raise ModuleNotFoundError("No module named 'nowhere'")

    monkeypatch.setattr(registry, "_entry_points_loaded", False)
    monkeypatch.setattr(registry.metadata, "entry_points", lambda group: [Broken()])
    with pytest.raises(ValueError, match="entry point broken = nowhere:Nothing .* failed to load: ModuleNotFound"):
        list(REGISTRY)


def test_the_names_no_section_may_take_are_the_configs_own():
    from prelora_ray.strategies.registry import RESERVED

    assert set(RESERVED) == {f.name for f in dataclasses.fields(TrainSettings)}
