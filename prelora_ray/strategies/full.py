"""`strategy: full`: the baseline. Every parameter trains, every epoch, in phase FULL; no config section."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from prelora_ray.strategies.base import POST_SWITCH_OPTIM_KEYS, Strategy, TrunkFork

if TYPE_CHECKING:
    from prelora_ray.config import TrainSettings


class Full(Strategy):
    """Full-parameter training throughout (the base class's defaults)."""

    name = "full"
    description = "the baseline: never switches"
    fork_mode = "trunk"  # the trunk is this strategy's run: a trial's result is the trunk's
    fork_keys_text = (
        "keys a full run never reads (other strategies' sections, optim.lora_lr or optim.carry_optimizer_state)"
    )

    @classmethod
    def summary_line(cls, summary: dict[str, Any]) -> str:
        """Nothing happened but training."""
        return "no switch (full training throughout)"

    @classmethod
    def _acts_after_fork(cls, key: str) -> bool:
        return key in POST_SWITCH_OPTIM_KEYS  # no LoRA and no optimizer rebuild: never read

    @classmethod
    def trunk_fork(cls, cfg: TrainSettings, history: Sequence[dict[str, Any]]) -> TrunkFork | None:
        """The trunk's result, once the trunk has recorded every epoch."""
        return (
            TrunkFork(mode="trunk", why="full training: its run is the trunk") if len(history) >= cfg.epochs else None
        )
