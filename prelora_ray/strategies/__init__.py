"""Training strategies as plug-ins: one file per strategy, a registry by `TrainSettings.strategy`.

A strategy is a `Strategy` subclass in one file that declares everything about itself (name, config section,
phases with their stored numbers, trainable sets, metrics, summary line, fork point) and overrides the hooks
it needs. The shipped ones register here; a user's package registers its own with `register_strategy` or
the entry-point group `prelora_ray.strategies` (docs/adding_a_strategy.md). `build(cfg)` gives the one a
config asks for. Light to import (config.py does): no torch until a hook runs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from prelora_ray.strategies.base import Strategy, TrunkFork
from prelora_ray.strategies.full import Full
from prelora_ray.strategies.lte import LTE
from prelora_ray.strategies.phases import FULL, Phase
from prelora_ray.strategies.prelora import PreLoRA
from prelora_ray.strategies.registry import (
    ENTRY_POINT_GROUP,
    REGISTRY,
    get,
    names,
    register_strategy,
    strategy_sections,
    unregister_strategy,
)
from prelora_ray.strategies.relora_prelora import ReLoRAPreLoRA

if TYPE_CHECKING:
    from prelora_ray.config import TrainSettings

# the shipped strategies, in the order the `strategy` key's help lists them (prelora is the default)
for _shipped in (PreLoRA, Full, ReLoRAPreLoRA, LTE):
    register_strategy(_shipped)


def build(cfg: TrainSettings) -> Strategy:
    """The strategy `cfg.strategy` names, with its settings."""
    return get(cfg.strategy)(cfg)


__all__ = [
    "ENTRY_POINT_GROUP",
    "FULL",
    "REGISTRY",
    "Phase",
    "Strategy",
    "TrunkFork",
    "build",
    "get",
    "names",
    "register_strategy",
    "strategy_sections",
    "unregister_strategy",
]
