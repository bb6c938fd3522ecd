"""Training strategies as plug-ins: one file per strategy, a registry by `TrainSettings.strategy`.

A strategy subclasses `base.Strategy` and overrides the hooks it needs; `build(cfg)` gives the one a
config asks for. The names here are `config.STRATEGIES` (a test keeps them equal).
"""

from __future__ import annotations

from prelora_ray.config import TrainSettings
from prelora_ray.strategies.base import Strategy
from prelora_ray.strategies.full import Full
from prelora_ray.strategies.lte import LTE
from prelora_ray.strategies.prelora import PreLoRA
from prelora_ray.strategies.relora_prelora import ReLoRAPreLoRA

REGISTRY: dict[str, type[Strategy]] = {cls.name: cls for cls in (Full, PreLoRA, ReLoRAPreLoRA, LTE)}


def build(cfg: TrainSettings) -> Strategy:
    """The strategy `cfg.strategy` names, with its settings."""
    try:
        return REGISTRY[cfg.strategy](cfg)
    except KeyError:
        raise ValueError(f"strategy={cfg.strategy!r} is invalid: one of {', '.join(REGISTRY)}") from None


__all__ = ["REGISTRY", "Strategy", "build"]
